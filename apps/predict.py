"""``segswap-predict IMG0 IMG1 --ckpt C --out pred.png``: predicted masks and correspondences of one pair.

Writes
- ``pred.png``: the two images side by side (each resized to the model's input size), the predicted
  repeated region tinted red with the mask as opacity, and lines from a sample of confident cells of
  image 0 to their predicted matches in image 1;
- ``pred.npz`` (beside it, or ``--npz PATH``): ``mask0, mask1`` [h,w] and ``flow01, flow10`` [h,w,2]
  (normalised (x, y) in the other image) as float32, plus ``size`` — plain arrays, loadable with
  ``np.load(path, allow_pickle=False)``.

The checkpoint is one of ours (``last.pth``) or an official SegSwap one (``hard_mining_neg5.pth``).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

import numpy as np

from segswap.core import viz
from segswap.core.atomic import atomic_open
from segswap.core.cli import DEVICE_HELP, add_version
from segswap.core.images import load_rgb

log = logging.getLogger("segswap.predict")


def render(pred: dict, n_corr: int = 30, threshold: float = 0.5, rng: np.random.Generator | None = None) -> np.ndarray:
    """Side-by-side RGB visualisation (see the module docstring)."""
    rng = rng or np.random.default_rng(0)
    im0, im1 = pred["images"]
    lines = viz.prediction_lines(pred["mask0"], pred["flow01"], n_corr, threshold, rng)
    return viz.prediction_panel(im0, im1, pred["mask0"], pred["mask1"], lines, gap=0)


def write_outputs(pred: dict, canvas: np.ndarray, png: str, npz: str) -> None:
    viz.write_png(png, canvas)
    with atomic_open(npz, "wb") as f:
        np.savez(f, mask0=pred["mask0"], mask1=pred["mask1"], flow01=pred["flow01"], flow10=pred["flow10"],
                 size=np.array(pred["images"][0].shape[:2]))


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("segswap-predict", add_help=add_help, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("img0")
    p.add_argument("img1")
    p.add_argument("--ckpt", required=True, help="our checkpoint (last.pth) or the official hard_mining_neg5.pth")
    p.add_argument("--out", default="pred.png", help="visualisation PNG (default pred.png)")
    p.add_argument("--npz", help="raw arrays (default: --out with .npz)")
    p.add_argument("--size", type=int, help="input size, multiple of 16 (default: the checkpoint's, else 480)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--n-corr", type=int, default=30, help="correspondences drawn (default 30)")
    p.add_argument("--threshold", type=float, default=0.5, help="mask threshold for drawn correspondences")
    add_version(p)
    return p


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    from segswap.apps.predictor import load_model

    try:
        img0, img1 = load_rgb(args.img0), load_rgb(args.img1)
        predictor = load_model(args.ckpt, device=args.device, size=args.size)  # CheckpointError is a ValueError
    except ValueError as e:
        print(f"segswap-predict: {e}", file=sys.stderr)
        return 2
    pred = predictor.predict(img0, img1, resolution="grid")
    pred["images"] = [predictor.resized(img0), predictor.resized(img1)]
    npz = args.npz or os.path.splitext(args.out)[0] + ".npz"
    write_outputs(pred, render(pred, args.n_corr, args.threshold), args.out, npz)
    log.info("mask cover: image 0 %.1f%%, image 1 %.1f%%; wrote %s and %s",
             100 * (pred["mask0"] > 0.5).mean(), 100 * (pred["mask1"] > 0.5).mean(), args.out, npz)
    return 0


if __name__ == "__main__":
    sys.exit(main())
