"""How far OpenVINO's bfloat16 moves the built-in styles from onnxruntime's float32, in figures and a picture.

    python benchmarks/picture_style_engines.py [--out docs/images/style_engines.jpg] [--styles-per-photo 4]

The 26-style network at the generator's defaults (480-px image, work scale 2/3, strength 1) on each
embedded photo with STYLES_PER_PHOTO styles (drawn with a fixed seed), once with each engine. Prints,
per image, the mean and largest |difference| in grey levels, the share of pixels more than 8 levels
apart and the PSNR of the bfloat16 result against float32, then their spread over all images; the
picture shows the three rows of the table's largest, median and smallest mean difference: photo,
float32, bfloat16, and the difference x4.
"""
from __future__ import annotations

import argparse
import sys
import tempfile

import cv2
import numpy as np
from picture_style_scales import labelled, write_jpeg  # benchmarks/: this script's folder, on sys.path

from segswap.core.images import load_rgb
from segswap.nets.magenta import NUM_BUILTIN_STYLES, MagentaNetworks
from segswap.segments.embedded import embedded_images

SIZE = 480
PANEL = 320  # four panels a row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="docs/images/style_engines.jpg")
    p.add_argument("--styles-per-photo", type=int, default=4)
    args = p.parse_args(argv)
    float32, bfloat16 = MagentaNetworks(engine="onnxruntime"), MagentaNetworks(engine="openvino")
    rng = np.random.default_rng(0)
    rows = []
    print(f"{'photo':>22} {'style':>5} {'mean':>6} {'max':>4} {'>8 levels':>10} {'PSNR dB':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        photos = {path.stem: load_rgb(path) for path in embedded_images(tmp)}
    for name, photo in photos.items():
        photo = cv2.resize(photo, (SIZE, SIZE), interpolation=cv2.INTER_AREA)
        for style in rng.choice(NUM_BUILTIN_STYLES, args.styles_per_photo, replace=False):
            weights = np.eye(NUM_BUILTIN_STYLES, dtype=np.float32)[style]
            a, b = float32.multistyle(photo, weights, 2 / 3), bfloat16.multistyle(photo, weights, 2 / 3)
            d = np.abs(a.astype(np.int16) - b)
            psnr = 10 * np.log10(255 ** 2 / max(float((d.astype(np.float64) ** 2).mean()), 1e-12))
            rows.append((float(d.mean()), int(d.max()), float((d > 8).mean()), psnr, name, int(style), photo, a, b, d))
            print(f"{name:>22} {style:5d} {d.mean():6.2f} {d.max():4d} {100 * (d > 8).mean():9.2f}% {psnr:8.1f}")
    means, psnrs = np.array([r[0] for r in rows]), np.array([r[3] for r in rows])
    print(f"over {len(rows)} images: mean |difference| median {np.median(means):.2f}, range {means.min():.2f}-"
          f"{means.max():.2f} grey levels; PSNR median {np.median(psnrs):.1f}, range {psnrs.min():.1f}-"
          f"{psnrs.max():.1f} dB; pixels > 8 levels apart: {100 * np.mean([r[2] for r in rows]):.2f}% on average")
    order = sorted(rows, key=lambda r: -r[0])
    shown = [order[0], order[len(order) // 2], order[-1]]
    sheet = []
    for mean, _, _, psnr, name, style, photo, a, b, d in shown:
        sheet.append(np.hstack([
            labelled(photo, f"{name}, builtin:{style:02d}", PANEL), labelled(a, "onnxruntime float32", PANEL),
            labelled(b, "openvino bfloat16", PANEL),
            labelled(np.clip(d * 4, 0, 255).astype(np.uint8), f"|diff| x4: mean {mean:.2f}, {psnr:.1f} dB", PANEL)]))
    write_jpeg(args.out, np.vstack(sheet))
    return 0


if __name__ == "__main__":
    sys.exit(main())
