"""What the feature cache buys on CPU, and how far warped features are from features of the warped image.

1. Training step CPU time (user+sys) with the backbone in the loop (images in, VGG16 on every step)
   and through the cache (features in), for the ``tiny`` and ``small`` heads at 240 and 480 px, with the
   CPU recipe's 4 positive + 4 negative pairs and the paper's 5 + 15. A step = features (without the
   cache) + head forward and backward over every pair + loss + Adam. Data loading runs in DataLoader
   workers in both cases and is timed separately (per item, pixel path vs cached path).
2. TPS on the feature grid vs on the image: for pairs of ``--shards``, image 1 is warped by the
   trainer's random spline; cosine per cell between features of the warped image (what the pixel path
   trains on) and the cached features warped on the grid (what the cache path trains on), against the
   cosine with the unwarped features (what ignoring the warp would give).

    python benchmarks/bench_feature_cache.py --shards runs/learning/pairs [--sizes 240,480] [--steps 3]
"""
from __future__ import annotations

import argparse
import os

import cv2
import numpy as np
import torch

from segswap.shards.reader import iter_pairs, iter_raw_samples
from segswap.train.augment import PairAugmenter, decode_choice, random_warp, resize_square, warp_dense
from segswap.train.config import DEFAULTS
from segswap.train.feature_cache import CachedFeatureAugmenter, build_cache, warp_features
from segswap.train.loss import build_loss
from segswap.train.model import build_model
from segswap.train.trainer import negative_indices


def cpu() -> float:
    t = os.times()
    return t.user + t.system


def step_cost(model, size: int, P: int, N: int, cached: bool, steps: int) -> float:
    g = size // 16
    rng = np.random.default_rng(0)
    imgs = torch.from_numpy(rng.integers(0, 255, (2, P, size, size, 3), dtype=np.uint8))
    with torch.no_grad():
        feats = model.features(imgs[0]), model.features(imgs[1])
    b = {"mask0": torch.rand(P, g, g), "mask1": torch.rand(P, g, g), "flow01": torch.rand(P, g, g, 2),
         "flow10": torch.rand(P, g, g, 2), "flow01_weight": torch.rand(P, g, g), "flow10_weight": torch.rand(P, g, g)}
    neg0, neg1 = negative_indices(P, N)
    loss_fn = build_loss(DEFAULTS["loss"])
    opt = torch.optim.Adam(model.head.parameters(), lr=1e-4, betas=(0.5, 0.999))
    model.train()
    total = 0.0
    for i in range(steps + 1):
        t = cpu()
        if cached:
            f0, f1 = feats
        else:
            f0, f1 = model.features(imgs[0]), model.features(imgs[1])
        out = model.head(torch.cat([f0, f0[neg0]]), torch.cat([f1, f1[neg1]]), torch.zeros(P + N, g, g, dtype=torch.bool))
        terms = loss_fn(out, b, n_pos=P)
        opt.zero_grad(set_to_none=True)
        terms["total"].backward()
        opt.step()
        if i:  # the first step warms allocators and kernels up
            total += cpu() - t
    return total / steps


def loader_cost(shards: str, cache_dir: str, meta: dict, size: int, n: int) -> tuple[float, float]:
    raws = [r for _, r in zip(range(n), iter_raw_samples(shards))]
    out = []
    for aug in (PairAugmenter(image_size=size), CachedFeatureAugmenter(cache_dir, meta)):
        rng = np.random.default_rng(0)
        for r in raws[:2]:
            aug(decode_choice(r, aug, rng), rng)
        t = cpu()
        for r in raws:
            aug(decode_choice(r, aug, rng), rng)
        out.append((cpu() - t) / len(raws))
    return out[0], out[1]


def warp_agreement(model, shards: str, size: int, n: int) -> tuple[float, float]:
    g = size // 16
    rng = np.random.default_rng(1)
    warped_vs_pixel, unwarped_vs_pixel = [], []
    for pair in [p for _, p in zip(range(n), iter_pairs(shards))]:
        img = resize_square(pair.img1, size)
        tps = random_warp(rng, (4, 6), 1.0)
        map1, map2 = warp_dense(tps, size, size)
        warped_img = cv2.remap(img, map1, map2, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        with torch.no_grad():
            f = model.features(torch.from_numpy(img)[None])[0].numpy()
            f_pix = model.features(torch.from_numpy(warped_img)[None])[0].numpy()
        f_grid = warp_features(f, tps, None, None)
        warped_vs_pixel.append((f_grid * f_pix).sum(0).reshape(-1))
        unwarped_vs_pixel.append((f * f_pix).sum(0).reshape(-1))
    assert g == f.shape[-1]
    return float(np.mean(np.concatenate(warped_vs_pixel))), float(np.mean(np.concatenate(unwarped_vs_pixel)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shards", required=True, help="generator shards (loader and warp measurements)")
    p.add_argument("--sizes", default="240,480")
    p.add_argument("--heads", default="tiny,small")
    p.add_argument("--batches", default="4+4,5+15", help="positive+negative pairs per step")
    p.add_argument("--steps", type=int, default=3, help="timed steps per setting (after one warm-up)")
    p.add_argument("--pairs", type=int, default=24, help="pairs for the loader and warp measurements")
    p.add_argument("--cache-dir", default="/tmp/bench_feature_cache")
    args = p.parse_args(argv)
    # Threads: OMP_NUM_THREADS decides (on shared cores, 1 avoids OpenMP spin-waits; see docs/learning.md).
    print(f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores, "
          f"{torch.get_num_threads()} torch threads")
    print(f"{'head':6s} {'size':>4s} {'batch':>6s} {'backbone in loop':>17s} {'cached':>9s} {'speed-up':>9s}   (CPU-s per step)")
    for size in (int(s) for s in args.sizes.split(",")):
        for head in args.heads.split(","):
            torch.manual_seed(0)
            model = build_model({**DEFAULTS["model"], "backbone": "vgg16",
                                 "transformer": {**DEFAULTS["model"]["transformer"], "model": head}})
            for batch in args.batches.split(","):
                P, N = (int(x) for x in batch.split("+"))
                full = step_cost(model, size, P, N, cached=False, steps=args.steps)
                fast = step_cost(model, size, P, N, cached=True, steps=args.steps)
                print(f"{head:6s} {size:4d} {batch:>6s} {full:17.2f} {fast:9.2f} {full / fast:8.1f}x", flush=True)
    size = int(args.sizes.split(",")[0])
    model = build_model({**DEFAULTS["model"], "backbone": "vgg16"})
    t = cpu()
    meta = build_cache(os.path.join(args.cache_dir, str(size)), args.shards, model, size, "vgg16", None)
    print(f"\ncache at {size} px: {meta['n_rows']} images in {cpu() - t:.1f} CPU-s (0 when reused)")
    pix, cac = loader_cost(args.shards, os.path.join(args.cache_dir, str(size)), meta, size, args.pairs)
    print(f"loader CPU-s per item at {size} px: pixel path {pix * 1e3:.1f} ms, cached path {cac * 1e3:.1f} ms")
    warped, unwarped = warp_agreement(model, args.shards, size, args.pairs)
    print(f"TPS on image 1, {args.pairs} pairs at {size} px: mean cosine to the features of the warped image: "
          f"warped cached features {warped:.3f}, unwarped features {unwarped:.3f}")
    print(f"load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
