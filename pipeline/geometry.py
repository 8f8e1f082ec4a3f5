"""Geometry of a pasted segment: the official one-object generator's transforms, minus its bugs.

Coordinates are continuous pixel coordinates (pixel (row r, col c) has its centre at (c + 0.5, r + 0.5)),
as in the shard format. A paste maps image 0 (the source, resized to size x size) into image 1:

1. context: the segment mask is dilated by ``dilation`` px (default ~20 px at 480, scaled with the
   size) so some surroundings are pasted too;
2. border crop (probability ``p_border_crop`` 0.2, one-object pairs): before resizing, the source image
   is cut on the side nearest the dilated segment so the dilated segment touches that border;
3. independent x/y scale ``U(0.7, 1)`` each, then rotation ``U(-15, 15)`` degrees (converted to
   radians once; positive = counter-clockwise on screen);
4. crop to the bounding box of the transformed dilated mask;
5. fit: scale by ``min(cell_w / box_w, cell_h / box_h) * r``, r from ``linspace(r_min, 1, 10)`` with
   ``p ∝ exp(-i / 10)`` (r_min 0.2 for one object, 0.5 for two);
6. uniform translation inside the layout cell (the whole image for one object);
7. optionally a thin-plate spline over the pasted box (:mod:`segswap.pipeline.tps`).

Steps 3-6 compose to one affine matrix (exact both ways). :class:`PasteWarp` adds the TPS and gives
the map in both directions at any points and as dense per-pixel maps. Dense maps are evaluated
exactly on the lattice of flow-cell centres (stride g, plus one ring outside the image) and
bilinearly interpolated to pixel centres: exact for the affine part, and within a few hundredths of
a pixel for the smooth TPS, while the flows (which live on that lattice) stay exact.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from segswap.core.tps import (
    DEFAULT_JITTER,
    DEFAULT_POINTS_PER_SIDE,
    ThinPlateSpline,
    lattice_points,
    random_tps,
    upsample_lattice,
)

REFERENCE_SIZE = 480            # the official image size; pixel parameters below scale from it
DILATION_AT_480 = 20            # official: 20 dilation iterations before Poisson editing
LAYOUT_GAP_AT_480 = 16          # official two-object layout: cells one feature stride apart


@dataclass(frozen=True)
class GeometryConfig:
    scale_range: tuple[float, float] = (0.7, 1.0)
    rotation_deg: tuple[float, float] = (-15.0, 15.0)
    fit_ratio_min_one: float = 0.2
    fit_ratio_min_two: float = 0.5
    fit_ratio_steps: int = 10
    max_fit_scale: float | None = None  # cap on the paste's scale factor (None: the paper's, uncapped)
    p_border_crop: float = 0.2
    p_tps: float = 0.5
    tps_points_per_side: tuple[int, ...] = DEFAULT_POINTS_PER_SIDE
    tps_jitter: float = DEFAULT_JITTER


def dilation_px(size: int) -> int:
    return max(1, int(round(DILATION_AT_480 * size / REFERENCE_SIZE)))


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation by a disc of the given radius (bool [H, W])."""
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    return cv2.dilate(mask.astype(np.uint8), k) > 0


# ------------------------------------------------------------------------------- source side

def border_crop_box(raw_bbox, orig_w: int, orig_h: int, size: int, radius: int):
    """Crop of the original image that makes the dilated segment touch its nearest border.

    ``raw_bbox`` is the segment's [x, y, w, h] in original pixels. The cut is placed ``m`` original
    pixels outside the segment, where m becomes exactly ``radius`` pixels once the crop is resized
    to ``size``; returns (side, (x0, y0, x1, y1)) or None when the segment already touches it.
    """
    bx, by, bw, bh = raw_bbox
    gaps = {"left": bx, "right": orig_w - (bx + bw), "top": by, "bottom": orig_h - (by + bh)}
    side = min(gaps, key=lambda s: (gaps[s], ("left", "right", "top", "bottom").index(s)))
    x0, y0, x1, y1 = 0, 0, orig_w, orig_h
    # kept span from the cut to the far side of the image: L + m, and m * size / (L + m) = radius
    if side in ("left", "right"):
        span = orig_w - bx if side == "left" else bx + bw
    else:
        span = orig_h - by if side == "top" else by + bh
    # Aim 1.5 px inside the dilation's reach: rounding the cut to whole pixels and re-thresholding
    # the resized mask may each lose up to a pixel.
    reach = max(radius - 1.5, 0.0)
    margin = reach * span / max(size - reach, 1)
    if gaps[side] <= margin + 1:
        return None
    if side == "left":
        x0 = int(math.floor(bx - margin))
    elif side == "right":
        x1 = int(math.ceil(bx + bw + margin))
    elif side == "top":
        y0 = int(math.floor(by - margin))
    else:
        y1 = int(math.ceil(by + bh + margin))
    return side, (x0, y0, x1, y1)


def resize_mask(mask: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize a 0/1 mask by area-weighted coverage, keeping pixels more than half covered."""
    m = mask.astype(np.float32)
    interp = cv2.INTER_AREA if (width < m.shape[1] and height < m.shape[0]) else cv2.INTER_LINEAR
    return cv2.resize(m, (width, height), interpolation=interp) > 0.5


# ------------------------------------------------------------------------------- transforms

def draw_fit_ratio(rng: np.random.Generator, r_min: float, steps: int = 10) -> float:
    """r in linspace(r_min, 1, steps) with p ∝ exp(-i / 10): small pastes are the more frequent."""
    ratios = np.linspace(r_min, 1.0, steps)
    prob = np.exp(-np.arange(steps) / 10.0)
    return float(ratios[int(rng.choice(steps, p=prob / prob.sum()))])


def _mask_hull_corners(mask: np.ndarray) -> np.ndarray:
    """Corners of the pixels on the mask's convex hull: their image under an affine map has the
    same bounding box as the transformed mask. The hull of the outer contours is the hull of every
    mask pixel (a hull vertex is an extreme pixel, hence on an outer boundary) for a fraction of the
    points; only its order differs, which min/max of the corners do not see."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    hull = cv2.convexHull(np.concatenate(contours)).reshape(-1, 2).astype(np.float64)
    offs = np.array([[0, 0], [1, 0], [0, 1], [1, 1]], np.float64)
    return (hull[:, None, :] + offs[None]).reshape(-1, 2)


def draw_affine(rng: np.random.Generator, context_mask: np.ndarray, cell, cfg: GeometryConfig, two_object: bool):
    """Steps 3-6 for one segment: (3x3 affine source px -> target px, params dict, pasted box).

    ``cell`` is (x0, y0, x1, y1), the layout cell in image 1 the pasted box must fit in.
    """
    sx, sy = (float(v) for v in rng.uniform(*cfg.scale_range, size=2))
    angle_deg = float(rng.uniform(*cfg.rotation_deg))
    theta = math.radians(angle_deg)  # the one and only degree -> radian conversion
    c, s = math.cos(theta), math.sin(theta)
    # Counter-clockwise on screen with y pointing down: x' = x cos + y sin, y' = -x sin + y cos.
    rot = np.array([[c, s, 0.0], [-s, c, 0.0], [0.0, 0.0, 1.0]])
    m = rot @ np.diag([sx, sy, 1.0])
    corners = _mask_hull_corners(context_mask) @ m[:2, :2].T
    x0, y0 = corners.min(0)
    x1, y1 = corners.max(0)
    box_w, box_h = x1 - x0, y1 - y0
    cx0, cy0, cx1, cy1 = cell
    ratio = draw_fit_ratio(rng, cfg.fit_ratio_min_two if two_object else cfg.fit_ratio_min_one, cfg.fit_ratio_steps)
    fit = min((cx1 - cx0) / box_w, (cy1 - cy0) / box_h) * ratio
    if cfg.max_fit_scale is not None:  # e.g. 1.0: never enlarge a small source (no blurry pastes)
        fit = min(fit, cfg.max_fit_scale)
    pw, ph = box_w * fit, box_h * fit
    tx = float(rng.uniform(cx0, max(cx1 - pw, cx0)))
    ty = float(rng.uniform(cy0, max(cy1 - ph, cy0)))
    affine = (np.array([[1, 0, tx], [0, 1, ty], [0, 0, 1.0]]) @ np.diag([fit, fit, 1.0])
              @ np.array([[1, 0, -x0], [0, 1, -y0], [0, 0, 1.0]]) @ m)
    params = {"scale_x": sx, "scale_y": sy, "rotation_deg": angle_deg, "fit_ratio": ratio,
              "fit_scale": float(fit), "translation": [tx, ty], "cell": [float(v) for v in cell]}
    return affine, params, (tx, ty, tx + pw, ty + ph)


def layout_cells(rng: np.random.Generator, size: int):
    """Two disjoint cells for a two-object pair, a feature stride apart, in random order.

    The image is split in two halves (left/right or top/bottom); each segment's cell is its half,
    or with probability 1/2 one end of it (a quadrant), which gives the variety of the official
    generator's hand-written list of 16 layouts.
    """
    gap = LAYOUT_GAP_AT_480 * size / REFERENCE_SIZE
    half = size / 2.0
    vertical = bool(rng.random() < 0.5)
    a, b = (0.0, half - gap / 2), (half + gap / 2, float(size))
    cells = []
    for along in (a, b):
        if rng.random() < 0.5:
            across = (0.0, float(size))
        else:
            across = (0.0, half - gap / 2) if rng.random() < 0.5 else (half + gap / 2, float(size))
        cells.append((along[0], across[0], along[1], across[1]) if vertical
                     else (across[0], along[0], across[1], along[1]))
    if rng.random() < 0.5:
        cells.reverse()
    return cells


# ------------------------------------------------------------------------------- warps

class PasteWarp:
    """Source (image 0) -> target (image 1) map: an affine matrix, then optionally a TPS."""

    def __init__(self, affine: np.ndarray, tps: ThinPlateSpline | None = None):
        self.affine = np.asarray(affine, np.float64)
        self.inv_affine = np.linalg.inv(self.affine)
        self.tps = tps

    @staticmethod
    def _apply(mat: np.ndarray, pts: np.ndarray) -> np.ndarray:
        return pts @ mat[:2, :2].T + mat[:2, 2]

    def forward(self, pts: np.ndarray) -> np.ndarray:
        """Source points [..., 2] -> target points."""
        q = self._apply(self.affine, np.asarray(pts, np.float64))
        return self.tps(q) if self.tps is not None else q

    def backward(self, pts: np.ndarray) -> np.ndarray:
        """Target points [..., 2] -> source points (NaN where the TPS inverse does not converge)."""
        q = np.asarray(pts, np.float64)
        if self.tps is not None:
            q = self.tps.inverse(q)
        return self._apply(self.inv_affine, q)


def _map_within(fn, lat: np.ndarray, box, restrict: bool) -> np.ndarray:
    """``fn`` at the lattice points, or (``restrict``) only at those inside box (x0, y0, x1, y1), NaN elsewhere."""
    if not restrict:
        return fn(lat)
    x0, y0, x1, y1 = box
    near = (lat[..., 0] >= x0) & (lat[..., 0] <= x1) & (lat[..., 1] >= y0) & (lat[..., 1] <= y1)
    out = np.full_like(lat, np.nan)
    out[near] = fn(lat[near])
    return out


def dense_maps(warp: PasteWarp, size: int, stride: int, region=None, source_region=None):
    """Per-pixel maps both ways plus their exact lattice values.

    Returns dict with ``fwd_lattice``/``bwd_lattice`` ([n+2, n+2, 2], the cell-centre values, ring
    included), ``fwd``/``bwd`` ([size, size, 2] at pixel centres) and ``stride``. With a TPS, ``region`` (x0, y0,
    x1, y1) limits the numerical inverse to target points near the pasted box, and
    ``source_region`` the spline's evaluation to source points near the pasted context (NaN
    elsewhere: nothing reads the maps there, and the spline costs most of a paste's geometry).
    """
    lat = lattice_points(size, size, stride)
    fwd_lat = _map_within(warp.forward, lat, source_region, warp.tps is not None and source_region is not None)
    bwd_lat = _map_within(warp.backward, lat, region, warp.tps is not None and region is not None)
    return {"fwd_lattice": fwd_lat, "bwd_lattice": bwd_lat, "stride": stride,
            "fwd": upsample_lattice(fwd_lat, size, size, stride), "bwd": upsample_lattice(bwd_lat, size, size, stride)}


def draw_tps(rng: np.random.Generator, box, cfg: GeometryConfig):
    """With probability p_tps a random TPS over the pasted box; returns (spline or None, params)."""
    if rng.random() >= cfg.p_tps:
        return None, None
    x0, y0, x1, y1 = box
    return random_tps(rng, x0, y0, x1, y1, points_per_side=cfg.tps_points_per_side, jitter=cfg.tps_jitter)
