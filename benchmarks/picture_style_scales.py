"""A picture of what ``--style-scale`` does: one photo, built-in styles at scales 1, 2/3 (default) and 1/2.

    python benchmarks/picture_style_scales.py [--out docs/images/style_scales.jpg] [--styles 5 17]

One row per style: the photo, then the stylised image at each scale (strength 1, the same style), each
labelled with its CPU-s per 480-px image measured here (best of 3 calls, one thread, the default engine). The
network runs on the image scaled by S and is scaled back, so the strokes grow as 1/S and the cost
shrinks as S^2.
"""
from __future__ import annotations

import argparse
import sys
import time

import cv2
import numpy as np
import skimage.data

from segswap.core.atomic import atomic_write
from segswap.nets.magenta import NUM_BUILTIN_STYLES, MagentaNetworks

SCALES = ((1.0, "1"), (2 / 3, "2/3 (default)"), (0.5, "1/2"))
SIZE = 480
PANEL = 400


def cpu_per_image(networks: MagentaNetworks, image: np.ndarray, weights: np.ndarray, scale: float) -> float:
    networks.multistyle(image, weights, scale)  # warm-up
    best = float("inf")
    for _ in range(3):
        cpu = time.process_time()
        networks.multistyle(image, weights, scale)
        best = min(best, time.process_time() - cpu)
    return best


def labelled(image: np.ndarray, text: str, side: int = PANEL) -> np.ndarray:
    """``image`` shrunk to a ``side`` x ``side`` panel with ``text`` in a white strip below it."""
    panel = cv2.resize(image, (side, side), interpolation=cv2.INTER_AREA)
    strip = np.full((34, side, 3), 255, np.uint8)
    cv2.putText(strip, text, (8, 23), cv2.FONT_HERSHEY_SIMPLEX, 0.6 * side / PANEL, (0, 0, 0), 1, cv2.LINE_AA)
    return np.vstack([panel, strip])


def write_jpeg(path: str, rgb: np.ndarray) -> None:
    """A documentation picture, written atomically (quality 88: photos, small files)."""
    ok, jpeg = cv2.imencode(".jpg", rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 88])
    if not ok:
        raise OSError(f"{path}: JPEG encoding failed")
    atomic_write(path, jpeg.tobytes())
    print(f"wrote {path}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="docs/images/style_scales.jpg")
    p.add_argument("--styles", type=int, nargs="+", default=[5, 17], help=f"built-in style ids (0-{NUM_BUILTIN_STYLES - 1})")
    args = p.parse_args(argv)
    photo = cv2.resize(skimage.data.coffee(), (SIZE, SIZE), interpolation=cv2.INTER_AREA)
    networks = MagentaNetworks()
    rows = []
    for style in args.styles:
        weights = np.eye(NUM_BUILTIN_STYLES, dtype=np.float32)[style]
        panels = [labelled(photo, f"photo; style builtin:{style:02d}")]
        for scale, name in SCALES:
            cost = cpu_per_image(networks, photo, weights, scale)
            print(f"builtin:{style:02d} scale {name}: {cost:.4f} CPU-s per {SIZE}-px image")
            panels.append(labelled(networks.multistyle(photo, weights, scale), f"scale {name}: {cost:.3f} CPU-s"))
        rows.append(np.hstack(panels))
    write_jpeg(args.out, np.vstack(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
