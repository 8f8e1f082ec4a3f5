"""Pixel contrast (issue 8): what it costs per step and what it does to held-out accuracy.

    python benchmarks/bench_contrast.py                       # synthetic shards (tests/synthetic_shards.py)
    python benchmarks/bench_contrast.py --shards 'data/pairs/train-{000000..000007}.tar' \
        --val-shards data/val/train-000000.tar                # shards from segswap-gen

1. Step overhead, in one process with the same inputs: the trainer's step on the head (small
   cross-image transformer forward + Eq. 2 loss + backward + Adam) with and without the projection head
   and contrast loss, at the paper's batch (5 positives + 15 in-batch negatives) on a 30x30 grid
   (480 px). The frozen backbone is left out (random L2-normalised conv4 features): it costs the same
   in both and would only dilute the ratio. Timings alternate with/without and report medians.
2. Ablation through ``segswap-train`` (in-process, same seed, same steps, same global RNG state):
   without the loss and with ``--pixel-contrast WEIGHT``; held-out mask IoU and correspondence error
   (pixels) from the trainer's validation, and its it/s.

Prints a table; every figure is measured in this run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def step_overhead(reps: int, grid: int, n_pos: int, n_neg: int, model: str, device: str) -> dict:
    from segswap.train.loss import SegSwapLoss
    from segswap.train.model import TRANSFORMER_DEFAULTS
    from segswap.train.pixel_contrast import PixelContrastLoss, ProjectionHead
    from segswap.train.trainer import TrainStep
    from segswap.train.transformer import CrossImageTransformer

    g = torch.Generator().manual_seed(0)
    b = n_pos + n_neg
    feat0 = torch.nn.functional.normalize(torch.randn(b, 1024, grid, grid, generator=g), dim=1).to(device)
    feat1 = torch.nn.functional.normalize(torch.randn(b, 1024, grid, grid, generator=g), dim=1).to(device)
    mask0 = torch.zeros(n_pos, grid, grid)
    mask1 = torch.zeros(n_pos, grid, grid)
    q = grid // 4
    mask0[:, q:2 * q + q, q:2 * q + q] = 1.0
    mask1[:, :2 * q, 2 * q:] = 1.0
    ys, xs = torch.meshgrid((torch.arange(grid) + 0.5) / grid, (torch.arange(grid) + 0.5) / grid, indexing="ij")
    flow = torch.stack([xs, ys], -1).expand(n_pos, -1, -1, -1)
    target = {k: v.to(device) for k, v in {"mask0": mask0, "mask1": mask1, "flow01": flow, "flow10": flow,
                                              "flow01_weight": mask0, "flow10_weight": mask1}.items()}
    loss_fn = SegSwapLoss()

    def make(with_contrast: bool):
        torch.manual_seed(0)
        head = CrossImageTransformer(**{**TRANSFORMER_DEFAULTS, "model": model})
        proj = ProjectionHead(head.d_model) if with_contrast else None
        module = TrainStep(head, proj).to(device).train()
        contrast = PixelContrastLoss().to(device) if with_contrast else None
        opt = torch.optim.Adam(module.parameters(), lr=1e-4)
        gen = torch.Generator(device=device).manual_seed(1)

        def step():
            out = module(feat0, feat1, None)
            total = loss_fn(out, target, n_pos=n_pos)["total"]
            if contrast is not None:
                total = total + 0.1 * contrast(out["emb0"][:n_pos], out["emb1"][:n_pos], target["mask0"],
                                               target["mask1"], out["mask0"][:n_pos].detach(),
                                               out["mask1"][:n_pos].detach(), gen)
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
        return step, contrast

    steps = {False: make(False), True: make(True)}
    def timed(step) -> tuple[float, float]:
        """(wall, CPU) seconds of one step. On a shared CPU the process's CPU time is the steadier figure."""
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter(), time.process_time()
        step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - wall, time.process_time() - cpu

    times = {False: [], True: []}
    for _ in range(2):  # warm-up, and the queue fills a little as it would in training
        for k in (False, True):
            steps[k][0]()
    for _ in range(reps):
        for k in (False, True):
            times[k].append(timed(steps[k][0]))
    # The same step once the queues are full (largest contrast set: 2 classes x 2 queues x queue_size).
    contrast = steps[True][1]
    for kind in ("pixel", "region"):
        getattr(contrast, f"{kind}_count").fill_(contrast.queue_size)
    full = [timed(steps[True][0]) for _ in range(max(2, reps // 2))]

    def median(rows, i):
        return statistics.median(r[i] for r in rows)
    return {name: (median(rows, 0), median(rows, 1))
            for name, rows in (("plain", times[False]), ("contrast", times[True]), ("contrast_full_queue", full))}


def train_run(out: str, shards: str, val_shards: str, steps: int, common: list[str], extra: list[str]) -> dict:
    from segswap.train.cli import main
    # The trainer seeds torch's global RNG (dropout) from --seed; fork it so the runs leave no trace here.
    with torch.random.fork_rng(devices=[]):
        t0 = time.perf_counter()
        rc = main(["--shards", shards, "--val-shards", val_shards, "--out", out, "--max-steps", str(steps),
                   "--val-every", str(steps), "--no-resume", *common, *extra])
        wall = time.perf_counter() - t0
    if rc not in (0, None):
        raise SystemExit(f"segswap-train failed (exit {rc}) for {out}")
    val = [json.loads(line) for line in open(os.path.join(out, "val.jsonl"))]
    metrics = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    rates = [m["it_per_s"] for m in metrics if "it_per_s" in m][1:]  # first interval holds start-up
    last = val[-1]
    contrast = [m["loss/contrast"] for m in metrics if "loss/contrast" in m]
    first = val[0] if val[0]["step"] == 0 and len(val) > 1 else None  # the trainer's untrained baseline
    return {"iou": last["iou"], "corr_err_px": last["corr_err_px"], "neg_mask": last.get("neg_mask"),
            "untrained": first,
            "it_per_s": statistics.median(rates) if rates else float("nan"), "wall_s": wall,
            "contrast_last": contrast[-1] if contrast else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shards", help="training shards (default: synthetic shards written to --workdir)")
    p.add_argument("--val-shards", help="held-out shards (default: synthetic, another seed)")
    p.add_argument("--workdir", help="where runs and synthetic shards go (default: a temp dir)")
    p.add_argument("--steps", type=int, default=150, help="training steps per ablation run")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--model", default="tiny", help="transformer size for the ablation")
    p.add_argument("--weight", type=float, default=0.1, help="--pixel-contrast weight of the 'with' run")
    p.add_argument("--contrast-warmup", type=int, default=30)
    p.add_argument("--contrast-queue", type=int, default=5000)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--batch", default="5+15", help="positives+negatives per step in the ablation (paper: 5+15)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-pairs", type=int, default=64)
    p.add_argument("--reps", type=int, default=6, help="timed steps per variant in the overhead part")
    p.add_argument("--overhead-model", default="small")
    p.add_argument("--overhead-grid", type=int, default=30, help="feature grid of the overhead part (30 = 480 px)")
    p.add_argument("--overhead-batch", default="5+15", help="positives+negatives of the overhead part")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--skip-overhead", action="store_true")
    p.add_argument("--skip-ablation", action="store_true")
    args = p.parse_args(argv)
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}")

    if not args.skip_overhead:
        n_pos, n_neg = (int(v) for v in args.overhead_batch.split("+"))
        grid = args.overhead_grid
        o = step_overhead(args.reps, grid, n_pos, n_neg, args.overhead_model, args.device)
        print(f"\n[1] step overhead: '{args.overhead_model}' head, {n_pos}+{n_neg} pairs, {grid}x{grid} grid, "
              f"backbone excluded, "
              f"median of {args.reps}")
        print(f"  {'':30s} {'wall ms':>9s} {'ratio':>6s} {'CPU ms':>9s} {'ratio':>6s}")
        for name, label in (("plain", "plain step"), ("contrast", "+ contrast (filling queues)"),
                            ("contrast_full_queue", "+ contrast (full queues)")):
            (wall, cpu), (wall0, cpu0) = o[name], o["plain"]
            print(f"  {label:30s} {wall * 1000:9.1f} {wall / wall0:6.2f} {cpu * 1000:9.1f} {cpu / cpu0:6.2f}")

    if not args.skip_ablation:
        work = args.workdir or tempfile.mkdtemp(prefix="bench_contrast_")
        os.makedirs(work, exist_ok=True)
        shards, val_shards, source = args.shards, args.val_shards, "given"
        if not shards or not val_shards:
            sys.path.insert(0, os.path.join(HERE, "..", "tests"))
            from synthetic_shards import write_synthetic_shards
            shards = shards or write_synthetic_shards(os.path.join(work, "train"), n_shards=4, pairs_per_shard=32,
                                                      size=args.image_size, seed=args.seed)
            val_shards = val_shards or write_synthetic_shards(os.path.join(work, "val"), n_shards=1,
                                                              pairs_per_shard=args.val_pairs, size=args.image_size,
                                                              seed=args.seed + 1000, first_shard=100)
            source = "synthetic (tests/synthetic_shards.py)"
        n_pos, n_neg = (int(v) for v in args.batch.split("+"))
        common = ["--model", args.model, "--batch-pos", str(n_pos), "--batch-neg", str(n_neg), "--image-size", str(args.image_size), "--seed", str(args.seed),
                  "--lr", str(args.lr), "--warmup-steps", "20", "--workers", "1", "--log-every", "10",
                  "--val-pairs", str(args.val_pairs), "--ckpt-every", "0"]
        plain = train_run(os.path.join(work, "plain"), shards, val_shards, args.steps, common, [])
        withc = train_run(os.path.join(work, "contrast"), shards, val_shards, args.steps, common,
                          ["--pixel-contrast", str(args.weight), "--contrast-warmup", str(args.contrast_warmup),
                           "--contrast-queue", str(args.contrast_queue)])
        print(f"\n[2] ablation: {args.steps} steps, '{args.model}' head, {args.image_size} px, seed {args.seed}, "
              f"batch {args.batch}, shards {source}; held-out {args.val_pairs} pairs")
        print(f"  {'run':34s} {'mask IoU':>9s} {'corr err px':>12s} {'neg mask':>9s} {'it/s':>7s}")
        if plain["untrained"]:
            u = plain["untrained"]
            print(f"  {'untrained (step 0)':34s} {u['iou']:9.3f} {u['corr_err_px']:12.2f} "
                  f"{u.get('neg_mask', float('nan')):9.3f} {'':>7s}")
        for name, r in (("plain", plain),
                        (f"--pixel-contrast {args.weight} (warm-up {args.contrast_warmup})", withc)):
            neg = f"{r['neg_mask']:.3f}" if r["neg_mask"] is not None else "-"
            print(f"  {name:34s} {r['iou']:9.3f} {r['corr_err_px']:12.2f} {neg:>9s} {r['it_per_s']:7.3f}")
        print(f"  IoU change {withc['iou'] - plain['iou']:+.3f}, corr error change "
              f"{withc['corr_err_px'] - plain['corr_err_px']:+.2f} px, it/s ratio {withc['it_per_s'] / plain['it_per_s']:.2f}, "
              f"last contrast term {withc['contrast_last']}")
        print(f"  runs in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
