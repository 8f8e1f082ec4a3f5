"""Contact sheets of discovered clusters: one PNG per cluster, a grid of its regions.

Each tile is the region's box enlarged by ``margin`` (context helps judge a detail), resized to
``tile`` x ``tile`` pixels keeping its aspect ratio on a grey background, with the box drawn in green.
"""
from __future__ import annotations

import math

import cv2
import numpy as np

from segswap.apps.images import read_rgb
from segswap.core.images import write_png


def region_tile(img: np.ndarray, box, tile: int = 160, margin: float = 0.25) -> np.ndarray:
    h, w = img.shape[:2]
    x1, y1, x2, y2 = box
    mx, my = (x2 - x1) * margin, (y2 - y1) * margin
    cx1, cy1 = int(max(0, x1 - mx)), int(max(0, y1 - my))
    cx2, cy2 = int(min(w, x2 + mx)), int(min(h, y2 + my))
    crop = img[cy1:max(cy2, cy1 + 1), cx1:max(cx2, cx1 + 1)].copy()
    cv2.rectangle(crop, (int(x1 - cx1), int(y1 - cy1)), (int(x2 - cx1) - 1, int(y2 - cy1) - 1), (0, 255, 0),
                  max(1, round(max(crop.shape[:2]) / tile)))
    s = tile / max(crop.shape[:2])
    crop = cv2.resize(crop, (max(1, round(crop.shape[1] * s)), max(1, round(crop.shape[0] * s))),
                      interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
    out = np.full((tile, tile, 3), 128, np.uint8)
    oy, ox = (tile - crop.shape[0]) // 2, (tile - crop.shape[1]) // 2
    out[oy:oy + crop.shape[0], ox:ox + crop.shape[1]] = crop
    return out


def write_sheet(path: str, regions: list[dict], image_paths: dict[str, str], *, tile: int = 160,
                max_tiles: int = 30, columns: int = 6) -> int:
    """Write a PNG grid of up to ``max_tiles`` regions ({"image", "box"}); returns the tile count."""
    tiles = []
    for r in regions[:max_tiles]:
        tiles.append(region_tile(read_rgb(image_paths[r["image"]]), r["box"], tile))
    if not tiles:
        return 0
    cols = min(columns, len(tiles))
    rows = math.ceil(len(tiles) / cols)
    gap = 4
    sheet = np.full((rows * (tile + gap) + gap, cols * (tile + gap) + gap, 3), 255, np.uint8)
    for k, t in enumerate(tiles):
        r, c = divmod(k, cols)
        sheet[gap + r * (tile + gap):gap + r * (tile + gap) + tile, gap + c * (tile + gap):gap + c * (tile + gap) + tile] = t
    write_png(path, sheet)
    return len(tiles)
