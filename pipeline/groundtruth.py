"""Ground truth of a rendered pair: full-resolution masks and flows both ways, cycle-consistent.

Inputs are the pasted segments in paste order, each with its context mask in image 0 and the dense
maps of its :class:`~segswap.pipeline.geometry.PasteWarp` (see :func:`geometry.dense_maps`).

- **Ownership** (occlusion): a pixel of image 1 shows segment k when k's backward map sends it into
  k's context mask; a later paste covers an earlier one (two-object pairs whose warped boxes touch).
- **Masks**: mask1 = pixels of image 1 owned by some segment; mask0 = context pixels of image 0 whose
  forward map lands inside image 1 on a pixel owned by the same segment (not cut off by the border,
  not covered by another paste). Then the masks are made cycle-consistent as in the official code,
  "warp there and back and multiply": mask1 keeps pixels whose match is in mask0, then mask0 keeps
  pixels whose match is in the trimmed mask1.
- **Flows** (stride g, see :mod:`segswap.shards.format`): at each cell centre the normalised position
  of its match, exact (the lattice values of the dense maps); finite exactly where the cell's centre
  pixel is in the mask.
- Pairs whose mask covers fewer than ``min_cells`` 16-px cells on either side raise
  ``SkipPair("small_mask")``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from segswap.shards.format import flow_cell_centres_in_mask, mask_cells


class SkipPair(Exception):
    """This draw cannot make a usable pair; ``reason`` is a short counter key, ``detail`` says why."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)

    def __reduce__(self):
        return (SkipPair, (self.reason, self.detail))


@dataclass
class Paste:
    """One segment as pasted: context mask in image 0 (bool [H, W]) and dense maps of its warp."""

    context0: np.ndarray
    maps: dict


def _pixel_index(pts: np.ndarray, h: int, w: int):
    """(inside, row, col) of continuous points [..., 2]; NaN compares False, so it is outside."""
    x, y = pts[..., 0], pts[..., 1]
    inside = (x >= 0) & (x < w) & (y >= 0) & (y < h)
    col = np.where(inside, x, 0).astype(np.int32)  # truncation = floor for x >= 0
    row = np.where(inside, y, 0).astype(np.int32)
    return inside, row, col


def sample_mask(mask: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Nearest-pixel lookup of a bool mask at continuous points [..., 2]; False outside or at NaN."""
    inside, row, col = _pixel_index(pts, *mask.shape)
    return inside & mask[row, col]


def sample_labels(labels: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Nearest-pixel lookup of an int label image; -1 outside or at NaN."""
    inside, row, col = _pixel_index(pts, *labels.shape)
    return np.where(inside, labels[row, col], -1)


def ownership(pastes: list[Paste], shape) -> np.ndarray:
    """int16 [H, W]: index of the paste image 1 shows at each pixel, -1 for background."""
    owner = np.full(shape, -1, np.int16)
    for k, p in enumerate(pastes):
        owner[sample_mask(p.context0, p.maps["bwd"])] = k
    return owner


def ground_truth(pastes: list[Paste], owner1: np.ndarray, *, flow_stride: int, min_cells: float):
    """(mask0, mask1 uint8 {0,255}; flow01, flow10 float32 [H/g, W/g, 2]; per-paste pixel counts)."""
    h, w = owner1.shape
    size = np.array([w, h], np.float64)
    masks0, masks1 = [], []
    for k, p in enumerate(pastes):
        m1 = owner1 == k
        m0 = p.context0 & (sample_labels(owner1, p.maps["fwd"]) == k)
        # Warp there and back: keep what maps into the other mask, on both sides.
        m1 &= sample_mask(m0, p.maps["bwd"])
        m0 &= sample_mask(m1, p.maps["fwd"])
        masks0.append(m0)
        masks1.append(m1)
    mask0 = np.logical_or.reduce(masks0)
    mask1 = np.logical_or.reduce(masks1)
    for name, m in (("image 0", mask0), ("image 1", mask1)):
        cells = mask_cells(m.astype(np.uint8))
        if cells < min_cells:
            raise SkipPair("small_mask", f"mask of {name} covers {cells:.1f} cells of 16 px < {min_cells}")
    g = flow_stride
    flows = []
    for masks, key in ((masks0, "fwd_lattice"), (masks1, "bwd_lattice")):
        flow = np.full((h // g, w // g, 2), np.nan, np.float32)
        for k, m in enumerate(masks):
            at = flow_cell_centres_in_mask(m, g)
            lat = pastes[k].maps[key][1:-1, 1:-1]  # drop the ring outside the image
            flow[at] = np.clip(lat[at] / size, 0.0, 1.0)
        flows.append(flow)
    counts = [{"pixels0": int(m0.sum()), "pixels1": int(m1.sum())} for m0, m1 in zip(masks0, masks1)]
    to_png = lambda m: m.astype(np.uint8) * 255  # noqa: E731
    return to_png(mask0), to_png(mask1), flows[0], flows[1], counts
