"""Both real-image evaluations (``segswap-eval pairs`` and ``retrieval``) for a list of models, one table.

    python benchmarks/bench_real_pairs.py --data /tmp/realpairs [--ckpt A.pth --ckpt B.pth] [--untrained tiny]

``--data`` is the folder of benchmarks/build_real_pairs.py (built there first if it does not exist).
Rows: the training-free baselines on the backbone alone (``--backbone``, ``--backbone-weights``; random
ResNet-50 by default), then for each checkpoint its head (pairs) with its Eq. 3 score variants (retrieval)
beside the mutual-NN and GeM baselines of *its own* backbone. ``--untrained MODEL`` adds a checkpoint of
an untrained head of that transformer size (random weights, seeded), the floor a trained model must clear.
Columns: pairs J at 0.5 and at the best threshold, pixel AUC, correspondence accuracy at 1 and 4 cells,
median error in image-1 pixels; retrieval P@1 and mAP. CPU seconds (user + sys) per run are printed.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

# Before torch loads OpenMP: with active waiting, every head call stalls when the cores are shared
# (measured on 2 shared cores: one query against 88 targets 7.6 CPU s active vs 0.31 s passive).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

HERE = os.path.dirname(os.path.abspath(__file__))
HEADER = ["run", "method", "J@.5", "J*", "AUC", "acc@1", "acc@4", "med px", "P@1", "mAP"]


def untrained_checkpoint(model_size: str, image_size: int, folder: str, seed: int = 0) -> str:
    import torch

    from segswap.train.checkpoint import save_checkpoint
    from segswap.train.config import resolve
    from segswap.train.model import build_model

    cfg = resolve(None, {"data.shards": "none", "train.out": folder, "model.transformer.model": model_size,
                         "data.image_size": image_size})
    torch.manual_seed(seed)
    path = os.path.join(folder, f"untrained-{model_size}.pth")
    save_checkpoint(path, {"step": 0, "config": cfg, "model": build_model(cfg["model"]).state_dict()})
    return path


def rows_of(run: str, pairs: dict, ret: dict, methods: list[str]) -> list[list]:
    rows = []
    for m in methods:
        p = pairs["methods"].get(m, {})
        pm, pg = p.get("masks", {}), p.get("geometry", {})
        r = ret["methods"].get(ret.get("score") if m == pairs["backbone"] else m, {})
        v = lambda d, k: "-" if d.get(k) is None else d[k]  # noqa: E731
        rows.append([run, m, v(pm, "J"), v(pm, "J_best"), v(pm, "auc"), v(pg, "acc@1"), v(pg, "acc@4"),
                     v(pg, "median_px"), v(r, "P@1"), v(r, "mAP")])
    return rows


def run_one(label: str, ckpt: str | None, args) -> tuple[list[list], dict, float]:
    from segswap.apps import eval_pairs, eval_retrieval
    from segswap.apps.eval_backbone import open_networks
    from segswap.apps.predictor import model_size

    t0 = os.times()
    nets = open_networks(ckpt, args.backbone, args.backbone_weights)
    size = model_size(nets.model, args.size)
    pairs = eval_pairs.evaluate(nets, os.path.join(args.data, "pairs"), size,
                                sheet_dir=os.path.join(args.sheets, label) if args.sheets else None)
    ret = eval_retrieval.evaluate(nets, os.path.join(args.data, "retrieval"), size, score=args.score)
    t1 = os.times()
    cpu = (t1.user + t1.system) - (t0.user + t0.system)
    if nets.has_head:
        methods = [nets.name, *(s for s in eval_retrieval.SCORES if s != args.score), "mnn", "gem"]
    else:
        methods = ["all-foreground", "empty", "centre-box", "identity", "mnn", "gem", "raw32"]
    rows = rows_of(label, pairs, ret, methods)
    if not nets.has_head:
        rows.append([label, "chance", "-", "-", "-", "-", "-", "-", ret["chance"]["P@1"], "-"])
    return rows, {"pairs": pairs, "retrieval": ret, "cpu_s": cpu, "size": size}, cpu


def main(argv=None) -> int:
    from segswap.apps.cli_common import table, write_json
    from segswap.apps.eval_retrieval import DEFAULT_SCORE, SCORES
    from segswap.nets.backbones import BACKBONES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="/tmp/realpairs", help="build_real_pairs.py output (built if missing)")
    p.add_argument("--ckpt", action="append", default=[], help="checkpoint to evaluate (repeatable)")
    p.add_argument("--untrained", action="append", default=[], help="also an untrained head of this size "
                                                                     "(tiny|small|base|large; repeatable)")
    p.add_argument("--size", type=int, default=240, help="evaluation size, multiple of 16 (240)")
    p.add_argument("--score", default=DEFAULT_SCORE, choices=SCORES, help="Eq. 3 variant of the model rows")
    p.add_argument("--backbone", default="resnet50", choices=BACKBONES)
    p.add_argument("--backbone-weights", default=None)
    p.add_argument("--sheets", default=None, help="folder for per-run prediction sheets")
    p.add_argument("--out", default=None, help="all results as JSON")
    args = p.parse_args(argv)
    if not os.path.isdir(args.data):
        sys.path.insert(0, HERE)
        import build_real_pairs

        if build_real_pairs.main(["--out", args.data]) != 0:
            return 2
    runs = [("baseline", None)] + [(os.path.basename(c), c) for c in args.ckpt]
    with tempfile.TemporaryDirectory() as tmp:
        runs += [(f"untrained-{m}", untrained_checkpoint(m, args.size, tmp)) for m in args.untrained]
        rows, results = [], {}
        for label, ckpt in runs:
            r, res, cpu = run_one(label, ckpt, args)
            rows += r
            results[label] = res
            # each run's rows as soon as they exist: a long list of checkpoints keeps what finished
            print(f"{label}: {cpu:.1f} CPU s at {res['size']} px\n{table(r, HEADER)}", file=sys.stderr, flush=True)
    print(table(rows, HEADER))
    base = results["baseline"]
    print(f"pairs: {base['pairs']['n_pairs']} ({', '.join(base['pairs']['per_pair'])}); retrieval: "
          f"{base['retrieval']['n_images']} images in {base['retrieval']['n_classes']} classes; "
          f"model rows use --score {args.score}; load {os.getloadavg()[0]:.1f}; {time.strftime('%Y-%m-%d %H:%M')}")
    for label, res in results.items():
        if "calibration" in res["retrieval"]:
            c = res["retrieval"]["calibration"]
            print(f"{label} calibration: target mask mean same class {c['M1_same_class']:.3f} / other "
                  f"{c['M1_other_class']:.3f} (AUC {c['M1_auc_same_vs_other']:.3f}); joint-mask mass same "
                  f"{c['W_same_class']:.2f} / other {c['W_other_class']:.2f}; Eq. 3 AUC "
                  f"{c['S_auc_same_vs_other']:.3f}; self-pair mask mean {c['self_mask_mean']:.3f}")
    if args.out:
        write_json(args.out, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
