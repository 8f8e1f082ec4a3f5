"""Generation throughput and blending cost.

    python benchmarks/bench_gen.py [--pairs 24] [--size 480] [--skip-gen]

Prints:
1. pairs/s and pairs/s per core at SIZE x SIZE on the default corpus (unsupervised segments of the
   embedded scikit-image photos, extracted once beforehand; pyamg blending, no style) for 1 worker
   in-process, 1 Ray worker and 2 Ray workers, with the peak RSS of each worker process, and the
   speed-up of 2 workers over 1;
2. the time to blend the same 480x480 inputs (a segment covering ~40% of the image, ~90k unknowns)
   with pyamg, scipy's direct sparse solve and cv2.seamlessClone, as ratios to the direct solve.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import cv2
import numpy as np

from segswap.pipeline import blend as blending
from segswap.pipeline.config import get_parser, resolve
from segswap.pipeline.run import generate


def _cfg(argv: list[str]) -> dict:
    return resolve(vars(get_parser().parse_args(argv)))


def prepare_corpus(cache: str, images: str | None) -> list[str]:
    """Segment the corpus once (the default path: unsupervised segments of the embedded photos)."""
    argv = ["--out", cache, "--shard-range", "0:0", "--workers", "0"]
    if images:
        argv += ["--images", images]
    generate(_cfg(argv))
    images = images or os.path.join(cache, "embedded-images")
    return ["--segments", "coco", "--coco-annotations", os.path.join(cache, "segments.json"), "--images", images]


def bench_generation(pairs: int, size: int, corpus: list[str]) -> None:
    print(f"== generation: {pairs} pairs per setting at {size}x{size}, unsupervised segments of "
          f"{corpus[-1]}, pyamg, no style")
    rows = []
    for label, workers in (("in-process", 0), ("ray x1", 1), ("ray x2", 2)):
        n_shards = max(2, workers) * 2
        per_shard = max(1, pairs // n_shards)
        with tempfile.TemporaryDirectory() as out:
            summary = generate(_cfg([*corpus, "--out", out, "--num-shards", str(n_shards), "--pairs-per-shard",
                                     str(per_shard), "--size", str(size), "--workers", str(workers), "--seed", "0"]))
            parts_dir = os.path.join(out, "manifests")
            parts = [json.load(open(os.path.join(parts_dir, n))) for n in os.listdir(parts_dir)]
            rss = {}
            for s in (s for p in parts for s in p["shards"].values()):
                rss[s["pid"]] = max(rss.get(s["pid"], 0), s["peak_rss_mb"])
        cores = max(workers, 1)
        rate = summary["pairs_per_s"]
        rows.append((label, rate))
        print(f"{label:>11}: {summary['pairs_written']} pairs in {summary['generation_time_s']:.1f} s = "
              f"{rate:.3f} pairs/s = {rate / cores:.3f} pairs/s/core; {summary['attempts']} attempts, "
              f"skips {summary['skips']}; peak RSS per worker (MiB) {sorted(rss.values())}")
    by = dict(rows)
    print(f"speed-up ray x2 / ray x1: {by['ray x2'] / by['ray x1']:.2f}; "
          f"ray x1 / in-process: {by['ray x1'] / by['in-process']:.2f}")


def blend_inputs(size: int = 480, seed: int = 0):
    rng = np.random.default_rng(seed)
    src = cv2.resize(rng.uniform(0, 255, (12, 12, 3)).astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC)
    dst = cv2.resize(rng.uniform(0, 255, (9, 9, 3)).astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC)
    src = np.clip(src + rng.normal(0, 10, src.shape), 0, 255).astype(np.uint8)
    dst = np.clip(dst + rng.normal(0, 10, dst.shape), 0, 255).astype(np.uint8)
    mask = np.zeros((size, size), np.uint8)
    cv2.ellipse(mask, (size // 2, size // 2), (int(size * 0.38), int(size * 0.3)), 20, 0, 360, 1, -1)
    return src, dst, mask


def bench_blend(repeats: int = 3) -> None:
    src, dst, mask = blend_inputs()
    print(f"== blending 480x480, {int(mask.sum())} unknowns per channel, median of {repeats}")
    times = {}
    for method in ("pyamg", "direct", "cv2"):
        runs = []
        for _ in range(repeats):
            t = time.perf_counter()
            blending.blend(method, src, dst, mask)
            runs.append(time.perf_counter() - t)
        times[method] = statistics.median(runs)
    for method, t in times.items():
        print(f"{method:>7}: {t * 1000:8.1f} ms  ({t / times['direct']:.3f} x direct solve)")
    out_amg = blending.blend("pyamg", src, dst, mask).astype(np.float32)
    out_direct = blending.blend("direct", src, dst, mask).astype(np.float32)
    print(f"pyamg vs direct: max |diff| {np.abs(out_amg - out_direct).max():.1f} grey levels")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", type=int, default=24)
    p.add_argument("--size", type=int, default=480)
    p.add_argument("--skip-gen", action="store_true")
    p.add_argument("--images", help="image folder to benchmark on (default: the embedded photos)")
    args = p.parse_args(argv)
    import logging
    logging.basicConfig(level=logging.WARNING)
    print(f"cpus: {os.cpu_count()}, python {sys.version.split()[0]}")
    bench_blend()
    if not args.skip_gen:
        with tempfile.TemporaryDirectory() as cache:
            bench_generation(args.pairs, args.size, prepare_corpus(cache, args.images))
    return 0


if __name__ == "__main__":
    sys.exit(main())
