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

import warnings
from dataclasses import dataclass, field

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
    """One segment as pasted: context mask in image 0 (bool [H, W]) and dense maps of its warp.

    The pixel lookups the ground truth needs are computed once per paste and only where they can
    matter: the forward map at the context's pixels, the backward map on the box of image 1 whose
    pixels can map into the context (see :meth:`target_box`).
    """

    context0: np.ndarray
    maps: dict
    _lookups: dict = field(default_factory=dict, repr=False)

    def target_box(self, shape) -> tuple[slice, slice]:
        """Slices of image 1 outside which no pixel's backward map lands in the context's box.

        The dense map is bilinear between its lattice nodes, so a pixel's value lies in the box of
        the four nodes around it (NaN nodes left out: a value mixing in a NaN is NaN). Cells whose
        node box misses the context's box (grown by a pixel against rounding) are skipped.
        """
        h, w = shape
        g = self.maps.get("stride")
        if g is None:  # maps made elsewhere, lattice spacing unknown: the whole image
            return slice(0, h), slice(0, w)
        rows, cols = np.flatnonzero(self.context0.any(1)), np.flatnonzero(self.context0.any(0))
        lat = self.maps["bwd_lattice"]
        corners = np.stack([lat[:-1, :-1], lat[1:, :-1], lat[:-1, 1:], lat[1:, 1:]])
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN cells: nanmin says so, and they miss
            lo, hi = np.nanmin(corners, 0), np.nanmax(corners, 0)
        hit = ((hi[..., 0] >= cols[0] - 1) & (lo[..., 0] <= cols[-1] + 2)
               & (hi[..., 1] >= rows[0] - 1) & (lo[..., 1] <= rows[-1] + 2))
        if not hit.any():
            return slice(0, 0), slice(0, 0)
        # Cell (i, j) spans lattice nodes i..i+1, whose pixel centres are at (i - 1 + 0.5) * g (ring first).
        ci, cj = np.flatnonzero(hit.any(1)), np.flatnonzero(hit.any(0))
        r0, r1 = int((ci[0] - 0.5) * g) - 1, int((ci[-1] + 0.5) * g) + 2
        c0, c1 = int((cj[0] - 0.5) * g) - 1, int((cj[-1] + 0.5) * g) + 2
        return slice(max(r0, 0), min(max(r1, 0), h)), slice(max(c0, 0), min(max(c1, 0), w))

    def backward_lookup(self, shape) -> tuple[tuple[slice, slice], np.ndarray]:
        """(target box, flat pixel index in image 0 of each box pixel's backward map, H*W outside)."""
        if "bwd" not in self._lookups:
            box = self.target_box(shape)
            self._lookups["bwd"] = box, _flat_index(self.maps["bwd"][box], *self.context0.shape)
        return self._lookups["bwd"]

    def forward_lookup(self, shape) -> tuple[np.ndarray, np.ndarray]:
        """(flat indices of the context's pixels, flat pixel index in image 1 of their forward map)."""
        if "fwd" not in self._lookups:
            at = np.flatnonzero(self.context0.ravel())
            fwd = self.maps["fwd"].reshape(-1, 2)[at]
            self._lookups["fwd"] = at, _flat_index(fwd, *shape)
        return self._lookups["fwd"]


def _flat_index(pts: np.ndarray, h: int, w: int) -> np.ndarray:
    """Flat index (row * w + col) of the pixel holding each continuous point [..., 2]; h * w outside
    the image or at NaN (index a table with one extra entry there, see :func:`_lookup`)."""
    inside, row, col = _pixel_index(pts, h, w)
    return np.where(inside, row.astype(np.intp) * w + col, h * w)


def _lookup(image: np.ndarray, flat: np.ndarray, outside) -> np.ndarray:
    """``image`` at flat indices from :func:`_flat_index`, ``outside`` where they are off the image."""
    return np.append(image.ravel(), np.asarray(outside, image.dtype))[flat]


def _pixel_index(pts: np.ndarray, h: int, w: int):
    """(inside, row, col) of continuous points [..., 2]; NaN compares False, so it is outside."""
    x, y = pts[..., 0], pts[..., 1]
    inside = (x >= 0) & (x < w) & (y >= 0) & (y < h)
    col = np.where(inside, x, 0).astype(np.int32)  # truncation = floor for x >= 0
    row = np.where(inside, y, 0).astype(np.int32)
    return inside, row, col


def ownership(pastes: list[Paste], shape) -> np.ndarray:
    """int16 [H, W]: index of the paste image 1 shows at each pixel, -1 for background."""
    owner = np.full(shape, -1, np.int16)
    for k, p in enumerate(pastes):
        box, flat = p.backward_lookup(shape)
        owner[box][_lookup(p.context0, flat, False)] = k
    return owner


def ground_truth(pastes: list[Paste], owner1: np.ndarray, *, flow_stride: int, min_cells: float):
    """(mask0, mask1 uint8 {0,255}; flow01, flow10 float32 [H/g, W/g, 2]; per-paste pixel counts)."""
    h, w = owner1.shape
    size = np.array([w, h], np.float64)
    masks0, masks1 = [], []
    for k, p in enumerate(pastes):
        # The same as sampling whole-image maps (sample_mask, sample_labels), on the pixels that matter.
        at, fwd = p.forward_lookup((h, w))
        box, bwd = p.backward_lookup((h, w))
        m1 = owner1 == k  # inside box: ownership set k nowhere else
        m0 = np.zeros(p.context0.shape, bool)
        m0.ravel()[at[_lookup(owner1, fwd, -1) == k]] = True
        # Warp there and back: keep what maps into the other mask, on both sides.
        m1[box] &= _lookup(m0, bwd, False)
        m0.ravel()[at] &= _lookup(m1, fwd, False)
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
