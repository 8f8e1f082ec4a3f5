"""``segswap-eval {brueghel,pitts,tokyo,internet,pairs,retrieval}``: the paper's benchmarks, one command
each, and two evaluations on small real sets that run with or without a checkpoint.

Every command writes a JSON of results (``--out``) and prints a table. Dataset formats are described in
the modules: :mod:`segswap.apps.brueghel`, :mod:`segswap.apps.placerec`, :mod:`segswap.apps.internet`,
:mod:`segswap.apps.eval_pairs`, :mod:`segswap.apps.eval_retrieval` (and docs/evaluation.md).
"""
from __future__ import annotations

import argparse
import os
import sys

from segswap.apps.cli_common import Progress, load, log, model_parser, setup_logging, table, write_json
from segswap.core.cli import add_version


def build_parser() -> argparse.ArgumentParser:
    parent = model_parser()
    p = argparse.ArgumentParser(prog="segswap-eval", description="Evaluate a SegSwap model on the paper's benchmarks.")
    add_version(p)
    sub = p.add_subparsers(dest="benchmark", required=True)

    b = sub.add_parser("brueghel", parents=[parent], help="art-detail retrieval, AP per category then mean")
    b.add_argument("--labels", required=True, help="brueghelTest.json / brueghelVal.json")
    b.add_argument("--images", required=True, help="folder of Brueghel images (the database)")
    b.add_argument("--size", type=int, default=640, help="database images resized to SIZE x SIZE (640)")
    b.add_argument("--query-box-size", type=int, default=64,
                   help="query resized so its box's longer side is ~N px (official default 64)")
    b.add_argument("--rerank-topk", type=int, default=None,
                   help="re-rank only the top K of a dense-cosine baseline (default: score every image)")
    b.add_argument("--out", required=True, help="results JSON")

    for name, vpp in (("pitts", 1), ("tokyo", 12)):
        s = sub.add_parser(name, parents=[parent], help=f"place recognition on {'Pitts30k' if vpp == 1 else 'Tokyo 24/7'}: "
                                                        "re-rank a top-100 list, Recall@1/5/10 at 25 m")
        s.add_argument("--root", required=True, help="dataset root the image lists are relative to")
        s.add_argument("--queries", required=True, help="query image list (Patch-NetVLAD imageNames txt)")
        s.add_argument("--database", required=True, help="database image list (Patch-NetVLAD imageNames txt)")
        s.add_argument("--gt", required=True, help="npz with utmQ, utmDb (and posDistThr), Patch-NetVLAD style")
        s.add_argument("--candidates", required=True,
                       help="NetVLAD_predictions.txt (kapture), [Nq,K] int .npy, or [Nq,Ndb] score .npy")
        s.add_argument("--topk", type=int, default=100, help="candidates re-ranked per query (100)")
        s.add_argument("--dist", type=float, default=None, help="metres for a correct match (npz posDistThr, else 25)")
        s.add_argument("--views-per-place", type=int, default=vpp,
                       help=f"database views per place for spatial NMS ({vpp}; 1 disables)")
        s.add_argument("--width", type=int, default=640)
        s.add_argument("--height", type=int, default=480)
        s.add_argument("--out", required=True, help="results JSON")

    i = sub.add_parser("internet", parents=[parent], help="co-segmentation: P and J per class")
    i.add_argument("root", help="Internet dataset root (Airplane100/, Car100/, Horse100/) or one folder of images")
    i.add_argument("--masks-dir", default="GroundTruth", help="mask subfolder name (GroundTruth)")
    i.add_argument("--size", type=int, default=480)
    i.add_argument("--top-k", type=int, default=5)
    i.add_argument("--threshold", type=float, default=0.85, help="mask threshold for graph vertices (0.85)")
    i.add_argument("--sigma", type=float, default=1.0, help="Eq. 4 sigma in grid cells (1.0)")
    i.add_argument("--workdir", default=None, help="cache of predictions (default: next to --out)")
    i.add_argument("--save-masks", action="store_true", help="write predicted masks next to --out")
    i.add_argument("--out", required=True, help="results JSON")

    from segswap.apps.eval_backbone import add_backbone_options
    from segswap.apps.eval_retrieval import DEFAULT_SCORE, SCORES

    optional = model_parser(ckpt_required=False)
    r = sub.add_parser("pairs", parents=[optional], help="real pairs with optional GT masks / geometry; "
                                                         "beside trivial and mutual-NN baselines")
    r.add_argument("root", help="folder of pair folders (<pair>/img0.*, img1.*, mask0.png, H01.txt, ...)")
    r.add_argument("--size", type=int, default=None, help="images resized to SIZE x SIZE, a multiple of 16 "
                                                          "(default: the checkpoint's training size, else 480)")
    r.add_argument("--sheet", default=None, help="folder for one PNG of predictions per pair")
    r.add_argument("--out", default=None, help="results JSON (optional)")
    add_backbone_options(r)

    t = sub.add_parser("retrieval", parents=[optional], help="images in class folders: P@1 and mAP of Eq. 3 "
                                                             "and its normalisations beside GeM and raw pixels")
    t.add_argument("root", help="folder of class folders of images")
    t.add_argument("--size", type=int, default=None, help="images resized to SIZE x SIZE (default as pairs)")
    t.add_argument("--score", default=DEFAULT_SCORE, choices=SCORES,
                   help=f"the Eq. 3 variant reported as the model's score (default {DEFAULT_SCORE}); "
                        "all are computed and listed")
    t.add_argument("--out", default=None, help="results JSON (optional)")
    add_backbone_options(t)
    return p


def run_brueghel(args) -> tuple[dict, str]:
    from segswap.apps import brueghel

    labels = brueghel.load_labels(args.labels)
    model, cache = load(args)
    res = brueghel.evaluate(model, labels, args.images, cache, size=args.size, query_box_size=args.query_box_size,
                            rerank_topk=args.rerank_topk, batch_size=args.batch_size, progress=Progress(0, desc="queries", logger=log))
    rows = [[c, v["n_queries"], v["ap_cosine"], v["ap"]] for c, v in res["per_category"].items()]
    rows.append(["mean", sum(v["n_queries"] for v in res["per_category"].values()), res["map_cosine"], res["map"]])
    return res, table(rows, ["category", "queries", "AP cosine", "AP SegSwap"])


def run_placerec(args) -> tuple[dict, str]:
    from segswap.apps import placerec

    queries = placerec.read_image_list(args.queries)
    db = placerec.read_image_list(args.database)
    utm_q, utm_db, thr = placerec.read_ground_truth(args.gt, len(queries), len(db))
    dist = args.dist if args.dist is not None else (thr if thr is not None else placerec.DEFAULT_DIST)
    cands = placerec.read_candidates(args.candidates, queries, db, args.root, args.topk)
    model, cache = load(args)
    res = placerec.evaluate(model, queries, db, args.root, cands, utm_q, utm_db, cache, dataset=args.benchmark,
                            size=(args.width, args.height), dist=dist, views_per_place=args.views_per_place,
                            batch_size=args.batch_size, progress=Progress(0, desc="queries", logger=log))
    rows = [["input ranking", *res["recall_input"].values()], ["SegSwap re-ranked", *res["recall"].values()]]
    return res, table(rows, ["", *res["recall"].keys()])


def run_internet(args) -> tuple[dict, str]:
    from segswap.apps import internet

    classes = internet.find_classes(args.root, args.masks_dir)
    model, cache = load(args)
    workdir = args.workdir or os.path.splitext(args.out)[0] + "_work"
    per_class = {}
    for name, folder in classes.items():
        per_class[name] = internet.evaluate_class(
            model, folder, cache, os.path.join(workdir, name), size=args.size, top_k=args.top_k,
            threshold=args.threshold, sigma=args.sigma, masks_dir=args.masks_dir, batch_size=args.batch_size,
            save_masks=(os.path.splitext(args.out)[0] + "_masks/" + name) if args.save_masks else None)
    ps = [v["P"] for v in per_class.values()]
    js = [v["J"] for v in per_class.values()]
    res = {"protocol": "internet", "config": {k: v for k, v in vars(args).items() if k != "log_level"},
           "per_class": per_class, "P": float(sum(ps) / len(ps)), "J": float(sum(js) / len(js))}
    rows = [[c, v["n_scored"], v["P"], v["J"]] for c, v in per_class.items()]
    rows.append(["mean", sum(v["n_scored"] for v in per_class.values()), res["P"], res["J"]])
    return res, table(rows, ["class", "images", "P", "J"])


def _eval_networks(args):
    from segswap.apps.eval_backbone import open_networks
    from segswap.apps.predictor import model_size
    from segswap.nets.device import resolve_device

    args.device = resolve_device(args.device)  # "auto" as in every command; ValueError (exit 2) for no CUDA
    nets = open_networks(args.ckpt, args.backbone, args.backbone_weights, args.device)
    return nets, model_size(nets.model, args.size)


def run_pairs(args) -> tuple[dict, str]:
    from segswap.apps import eval_pairs

    eval_pairs.find_pairs(args.root)  # a missing folder fails before the model loads
    nets, size = _eval_networks(args)
    res = eval_pairs.evaluate(nets, args.root, size, sheet_dir=args.sheet, progress=Progress("pairs"))
    text = table(eval_pairs.summary_rows(res), eval_pairs.SUMMARY_HEADER)
    text += f"\n{res['n_pairs']} pairs at {size}x{size}, features: {res['backbone']}"
    if res["skipped"]:
        text += f"\nskipped {len(res['skipped'])}: " + "; ".join(res["skipped"])
    return res, text


def run_retrieval(args) -> tuple[dict, str]:
    from segswap.apps import eval_retrieval

    eval_retrieval.find_classes(args.root)
    nets, size = _eval_networks(args)
    res = eval_retrieval.evaluate(nets, args.root, size, score=args.score, batch_size=args.batch_size,
                                  feature_cache=args.feature_cache, progress=Progress("queries"))
    text = table(eval_retrieval.summary_rows(res), eval_retrieval.RETRIEVAL_HEADER)
    text += f"\n{res['n_images']} images in {res['n_classes']} classes at {size}x{size}, features: {res['backbone']}"
    if "calibration" in res:
        c = res["calibration"]
        text += (f"\nmask mean on the target: same class {c['M1_same_class']:.3f}, other class "
                 f"{c['M1_other_class']:.3f} (AUC {c['M1_auc_same_vs_other']:.3f}); Eq. 3 AUC same vs other "
                 f"{c['S_auc_same_vs_other']:.3f}; self-pair mask mean {c['self_mask_mean']:.3f}")
    if res["skipped"]:
        text += f"\nskipped {len(res['skipped'])}: " + "; ".join(res["skipped"])
    return res, text


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(level=args.log_level)
    runner = {"brueghel": run_brueghel, "pitts": run_placerec, "tokyo": run_placerec, "internet": run_internet,
              "pairs": run_pairs, "retrieval": run_retrieval}
    try:
        res, text = runner[args.benchmark](args)
    except (FileNotFoundError, ValueError) as e:  # dataset problems: the message names the file
        print(f"segswap-eval {args.benchmark}: error: {e}", file=sys.stderr)
        return 2
    if args.out:
        write_json(args.out, res)
    print(text)
    if args.out:
        print(f"results -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
