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

import numpy as np

from segswap.core import viz
from segswap.core.cli import add_version
from segswap.shards.format import Pair
from segswap.shards.reader import iter_pairs

log = logging.getLogger(__name__)


def pair_row(pair: Pair, tile: int, n_lines: int, rng: np.random.Generator) -> np.ndarray:
    """One contact-sheet row for a pair: [img0 | img1] with masks and lines, then [sty0 | sty1] if present."""
    lines = viz.sample_lines(pair.flow01, n_lines, rng)
    kind = pair.meta.get("kind", "?")
    panels = [viz.label(viz.ground_truth_panel(pair.img0, pair.img1, pair.mask0, pair.mask1, lines, tile, n_lines),
                        f"{pair.key} {kind}: image 0 | image 1, masks + flow01")]
    if pair.sty0 is not None:
        styled = viz.side_by_side(viz.fit(pair.sty0, tile), viz.fit(pair.sty1, tile))
        names = [(s or {}).get("styliser", "?") if isinstance(s, dict) else "?" for s in pair.meta.get("style") or []]
        panels.append(viz.label(styled, f"stylised ({', '.join(names) or '?'})"))
    return viz.hconcat(panels)


def contact_sheet(pairs, tile: int = 224, n_lines: int = 12, seed: int = 0) -> np.ndarray:
    """Stack one row per pair (rows padded to the widest) into an RGB image."""
    rng = np.random.default_rng(seed)
    rows = [pair_row(p, tile, n_lines, rng) for p in pairs]
    if not rows:
        raise ValueError("no pairs to show")
    return viz.vstack(rows)


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
    add_version(p)
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
    viz.write_png(args.out, sheet)
    return f"wrote {args.out}: {len(pairs)} pairs, {sheet.shape[1]}x{sheet.shape[0]} px"


if __name__ == "__main__":
    sys.exit(main())
