"""``segswap-show``: a contact sheet of generated pairs, to see what a dataset teaches.

    segswap-show data/pairs --out sheet.png [--n 8] [--lines 12]
    segswap-show data/pairs/train-000003.tar --out sheet.png
    segswap-show data/pairs/segments.json --images photos/ --out segments.png

One row per pair: image 0 and image 1 with their ground-truth masks as coloured overlays (green for
image 0's repeated region, magenta for image 1's) and a sample of correspondences drawn as lines from
image 0 to where the stored flow says they land in image 1; then the stylised versions when the
shard has them. A COCO ``.json`` of segments is handed to :func:`segswap.segments.show.draw_segments`.
"""
from __future__ import annotations

import argparse
import itertools
import logging
import sys

import cv2
import numpy as np

from segswap.core.images import write_png
from segswap.shards.format import Pair
from segswap.shards.reader import iter_pairs

log = logging.getLogger(__name__)

MASK_COLOURS = ((60, 220, 60), (230, 60, 230))  # RGB: image 0 green, image 1 magenta
OVERLAY_ALPHA = 0.45
OUTSIDE_DIM = 0.6  # darken what is not repeated so the masks read at a glance
GAP = 4
HEADER = 18


def overlay_mask(img: np.ndarray, mask: np.ndarray, colour) -> np.ndarray:
    """Tint the masked pixels, dim the rest and outline the mask (uint8 RGB in and out)."""
    out = img.astype(np.float32)
    on = mask > 0
    out[on] = (1 - OVERLAY_ALPHA) * out[on] + OVERLAY_ALPHA * np.asarray(colour, np.float32)
    out[~on] *= OUTSIDE_DIM
    out = out.astype(np.uint8)
    contours, _ = cv2.findContours(on.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(out, contours, -1, tuple(int(c) for c in colour), 1, cv2.LINE_AA)
    return out


def sample_correspondences(pair: Pair, n: int, rng: np.random.Generator) -> list[tuple[float, float, float, float]]:
    """Up to ``n`` (x0, y0, x1, y1) in normalised coordinates from the finite cells of flow01."""
    flow = pair.flow01.astype(np.float32)
    rows, cols = np.nonzero(np.isfinite(flow[..., 0]))
    if not len(rows):
        return []
    pick = rng.choice(len(rows), size=min(n, len(rows)), replace=False)
    gh, gw = flow.shape[:2]
    return [((cols[k] + 0.5) / gw, (rows[k] + 0.5) / gh, float(flow[rows[k], cols[k], 0]),
             float(flow[rows[k], cols[k], 1])) for k in pick]


def _label(panel: np.ndarray, text: str) -> np.ndarray:
    head = np.full((HEADER, panel.shape[1], 3), 255, np.uint8)
    cv2.putText(head, text, (3, HEADER - 5), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([head, panel], axis=0)


def pair_row(pair: Pair, tile: int, n_lines: int, rng: np.random.Generator) -> np.ndarray:
    """One contact-sheet row for a pair: [img0 | img1] with lines, then [sty0 | sty1] if present."""
    def fit(im):
        return cv2.resize(im, (tile, tile), interpolation=cv2.INTER_AREA)

    def fit_mask(m):
        return cv2.resize(m, (tile, tile), interpolation=cv2.INTER_NEAREST)

    p0 = overlay_mask(fit(pair.img0), fit_mask(pair.mask0), MASK_COLOURS[0])
    p1 = overlay_mask(fit(pair.img1), fit_mask(pair.mask1), MASK_COLOURS[1])
    gap = np.full((tile, GAP, 3), 255, np.uint8)
    canvas = np.ascontiguousarray(np.concatenate([p0, gap, p1], axis=1))
    offset = tile + GAP
    for k, (x0, y0, x1, y1) in enumerate(sample_correspondences(pair, n_lines, rng)):
        hue = int(180 * k / max(n_lines, 1))
        colour = cv2.cvtColor(np.uint8([[[hue, 255, 255]]]), cv2.COLOR_HSV2RGB)[0, 0].tolist()
        a = (int(x0 * tile), int(y0 * tile))
        b = (int(x1 * tile) + offset, int(y1 * tile))
        cv2.line(canvas, a, b, colour, 1, cv2.LINE_AA)
        cv2.circle(canvas, a, 3, colour, -1, cv2.LINE_AA)
        cv2.circle(canvas, b, 3, colour, -1, cv2.LINE_AA)
    kind = pair.meta.get("kind", "?")
    panels = [_label(canvas, f"{pair.key} {kind}: image 0 | image 1, masks + flow01")]
    if pair.sty0 is not None:
        styled = np.concatenate([fit(pair.sty0), gap, fit(pair.sty1)], axis=1)
        names = [(s or {}).get("styliser", "?") if isinstance(s, dict) else "?" for s in pair.meta.get("style") or []]
        panels.append(_label(styled, f"stylised ({', '.join(names) or '?'})"))
    sep = np.full((HEADER + tile, GAP * 2, 3), 255, np.uint8)
    return np.concatenate(list(itertools.chain.from_iterable((p, sep) for p in panels))[:-1], axis=1)


def contact_sheet(pairs, tile: int = 224, n_lines: int = 12, seed: int = 0) -> np.ndarray:
    """Stack one row per pair (rows padded to the widest) into an RGB image."""
    rng = np.random.default_rng(seed)
    rows = [pair_row(p, tile, n_lines, rng) for p in pairs]
    if not rows:
        raise ValueError("no pairs to show")
    width = max(r.shape[1] for r in rows)
    padded = [np.pad(r, ((0, GAP), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    return np.concatenate(padded, axis=0)




def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="segswap-show", description=__doc__.split("\n")[0])
    p.add_argument("input", help="a shard, a dataset folder, a brace list of shards, or a COCO segments .json")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--n", type=int, default=8, help="pairs (or images of a .json) to show (default 8)")
    p.add_argument("--skip", type=int, default=0, help="pairs to skip first (default 0)")
    p.add_argument("--lines", type=int, default=12, help="correspondence lines per pair (default 12)")
    p.add_argument("--tile", type=int, default=224, help="panel side in pixels (default 224)")
    p.add_argument("--images", help="image folder of a .json input (default: the folder the json records, "
                                    "else the json's own folder)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.n < 1 or args.tile < 32 or args.lines < 0 or args.skip < 0:
        print("error: need --n >= 1, --tile >= 32, --lines >= 0, --skip >= 0", file=sys.stderr)
        return 2
    try:
        print(show(args))
    except (OSError, ValueError) as e:  # missing or bad input, unwritable --out: the message names it
        if args.debug:
            raise
        print(f"error: {args.input}: {e}" if args.input not in str(e) else f"error: {e}", file=sys.stderr)
        return 2
    return 0


def show(args) -> str:
    """Draw the sheet the options ask for; returns the line to print."""
    if args.input.endswith(".json"):
        from segswap.segments.show import draw_segments

        # images_dir None: the segment file's own record of its folder, else the json's folder.
        draw_segments(args.input, args.images, args.out, args.n)
        return f"wrote {args.out}"
    pairs = list(itertools.islice(iter_pairs(args.input), args.skip, args.skip + args.n))
    sheet = contact_sheet(pairs, tile=args.tile, n_lines=args.lines)
    write_png(args.out, sheet)
    return f"wrote {args.out}: {len(pairs)} pairs, {sheet.shape[1]}x{sheet.shape[0]} px"


if __name__ == "__main__":
    sys.exit(main())
