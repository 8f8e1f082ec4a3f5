"""Contact sheets of discovered clusters: one PNG per cluster, a grid of its regions.

Each tile is the region's box enlarged by ``margin`` (context helps judge a detail), resized to
``tile`` x ``tile`` pixels keeping its aspect ratio on a grey background, with the box drawn in green.
"""
from __future__ import annotations

from segswap.apps.images import read_rgb
from segswap.core import viz


def write_sheet(path: str, regions: list[dict], image_paths: dict[str, str], *, tile: int = 160,
                max_tiles: int = 30, columns: int = 6) -> int:
    """Write a PNG grid of up to ``max_tiles`` regions ({"image", "box"}); returns the tile count."""
    tiles = []
    for r in regions[:max_tiles]:
        tiles.append(viz.region_tile(read_rgb(image_paths[r["image"]]), r["box"], tile))
    if not tiles:
        return 0
    viz.write_png(path, viz.grid(tiles, columns))
    return len(tiles)
