"""Contact sheet of segments over their photos, for any COCO segment file (unsupervised or COCO).

    draw_segments("segments.json", "photos/", "sheet.png", n=12)

Each tile is one image, scaled to ``tile_height`` px, with every segment filled in a distinct colour
(semi-transparent), outlined, and labelled with its rank and score; the tile title gives the file name
and the number of segments. Images without segments are drawn after those with segments, so the sheet
shows results first. ``segswap-show`` delegates to :func:`draw_segments` for a ``.json`` input.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from segswap.core import viz
from segswap.segments.coco import SegmentIndex


def _tile(rgb: np.ndarray, segs: list, masks: list[np.ndarray], title: str, tile_height: int, alpha: float,
          scores: bool) -> np.ndarray:
    labels = [(f"{k + 1}:{seg.score:.2f}" if scores else f"{k + 1}", seg.bbox[:2]) for k, seg in enumerate(segs)]
    return viz.segment_tile(rgb, masks, labels, title, tile_height, alpha)


def draw_segments(json_path, images_dir=None, out_png="segments.png", n: int = 12, *, columns: int = 4,
                  tile_height: int = 200, alpha: float = 0.45) -> Path:
    """Draw up to ``n`` images of a COCO segment file with their masks into ``out_png``; returns its path.

    ``images_dir``: where the ``file_name`` entries are (default: ``info.provenance.images_dir`` of an
    unsupervised segment file, else the json's folder). The file is read by the generator's own loader
    (:meth:`SegmentIndex.from_coco`: polygons, compressed and uncompressed RLE; malformed entries are
    skipped with a warning naming them). Missing or unreadable images are skipped with a note on stderr.
    """
    from segswap.core.images import BadImage, load_rgb

    json_path = Path(json_path)
    coco = json.loads(json_path.read_text())
    if not isinstance(coco, dict) or "images" not in coco or "annotations" not in coco:
        raise ValueError(f"{json_path}: not a COCO annotation file (needs 'images' and 'annotations')")
    if images_dir is None:
        images_dir = coco.get("info", {}).get("provenance", {}).get("images_dir") or json_path.parent
    images_dir = Path(images_dir)
    index = SegmentIndex.from_coco(json_path, images_dir, check_files=False)
    scores = any(isinstance(a, dict) and "score" in a for a in coco["annotations"])
    by_image = {iid: sorted(index.segments_of_image(iid), key=lambda s: -s.score) for iid in index.images}
    images = sorted(index.images.values(), key=lambda im: (not by_image.get(im.id), im.id))
    tiles = []
    for im in images:
        if len(tiles) >= n:
            break
        try:
            rgb = load_rgb(im.path)
        except BadImage as err:
            print(f"draw_segments: skipping {err}", file=sys.stderr)
            continue
        segs = by_image.get(im.id, [])
        masks = [index.decode_mask(seg).astype(bool) for seg in segs]
        tiles.append(_tile(rgb, segs, masks, f"{im.file_name} ({len(segs)})", tile_height, alpha, scores))
    if not tiles:
        raise ValueError(f"{json_path}: no drawable images found under {images_dir}")
    rows = []
    gap = np.full((tiles[0].shape[0], 6, 3), 255, np.uint8)  # tiles share a height; widths follow the photos
    for start in range(0, len(tiles), columns):
        row = [part for t in tiles[start:start + columns] for part in (t, gap)]
        rows.append(np.concatenate(row, axis=1))
    out_png = Path(viz.write_png(out_png, viz.vstack(rows)))
    return out_png


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser("segswap-segments-show", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", type=Path, help="COCO segment file")
    parser.add_argument("--images", type=Path, default=None, help="image folder (default: from the file)")
    parser.add_argument("--out", type=Path, default=Path("segments.png"))
    parser.add_argument("-n", type=int, default=12, help="images to draw [default: %(default)s]")
    args = parser.parse_args(argv)
    print(draw_segments(args.json, args.images, args.out, n=args.n))
    return 0


if __name__ == "__main__":
    sys.exit(main())
