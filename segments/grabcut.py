"""Masks from boxes: GrabCut initialised by the saliency map (paper §3.1), then filters and mask NMS.

For each kept box, GrabCut (``cv2.grabCut`` in mask mode) runs on a crop of the working image: the box
plus a margin of ``margin`` times the box size on each side (clipped to the image), so the background
colour model sees the object's surroundings, shrunk so its longer side is at most ``max_side`` px (the
mask is resized back). Initial labels:

- outside the box: definite background;
- inside the box, saliency >= the image's saliency threshold: probable foreground;
- inside the box, below it: probable background.

A box with too little salient area (< ``min_seed_frac`` of the box) is skipped: GrabCut would start
from nothing. The result keeps foreground and probable foreground, then (by default) only its largest
4-connected component, since a segment is pasted as one object.

Filters (fractions, all flags of ``segswap-segments``):

- ``min_area_frac`` / ``max_area_frac``: mask area / image area;
- ``min_fill``: mask area / box area (GrabCut that collapsed to a sliver of its box is a failure);
- ``max_fill``: above this the mask is just the box (GrabCut did not separate anything);
- ``nms_iou``: of two masks overlapping more than this (mask IoU), the lower-scoring one is dropped.

OpenCV's GrabCut initialises its colour models with k-means, which draws from OpenCV's global RNG; the
caller seeds it per image (``cv2.setRNGSeed``) so results are reproducible.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class GrabCutParams:
    iterations: int = 5  # as in the paper's co-segmentation GrabCut; more changes little (benchmark)
    margin: float = 0.2  # crop margin around the box, fraction of the box's width/height
    max_side: int = 240  # GrabCut runs on the crop shrunk to this longer side (px)
    min_seed_frac: float = 0.05  # salient pixels needed inside a box to start GrabCut
    largest_component: bool = True
    min_area_frac: float = 0.01
    max_area_frac: float = 0.8
    min_fill: float = 0.2
    max_fill: float = 0.97
    nms_iou: float = 0.5

    def __post_init__(self):
        if self.max_side < 16:
            raise ValueError(f"GrabCut max_side must be >= 16 px, got {self.max_side}")
        if self.iterations < 1:
            raise ValueError(f"GrabCut iterations must be >= 1, got {self.iterations}")
        for name in ("margin", "min_seed_frac", "min_area_frac", "max_area_frac", "min_fill", "max_fill",
                     "nms_iou"):
            value = getattr(self, name)
            if not 0.0 <= value <= (10.0 if name == "margin" else 1.0):
                raise ValueError(f"GrabCut {name} out of range: {value}")
        if self.min_area_frac >= self.max_area_frac:
            raise ValueError(f"min_area_frac {self.min_area_frac} must be < max_area_frac {self.max_area_frac}")
        if self.min_fill >= self.max_fill:
            raise ValueError(f"min_fill {self.min_fill} must be < max_fill {self.max_fill}")


def grabcut_box(rgb: np.ndarray, saliency: np.ndarray, box: np.ndarray, threshold: float,
                params: GrabCutParams) -> np.ndarray | None:
    """One mask (bool [H, W], full working-image size) for box (x, y, w, h), or None if skipped."""
    height, width = saliency.shape
    x, y, bw, bh = (int(v) for v in box)
    box_sal = saliency[y:y + bh, x:x + bw]
    seed = box_sal >= threshold
    if seed.mean() < params.min_seed_frac:
        return None
    mx, my = round(bw * params.margin), round(bh * params.margin)
    cx0, cy0 = max(0, x - mx), max(0, y - my)
    cx1, cy1 = min(width, x + bw + mx), min(height, y + bh + my)
    labels = np.full((cy1 - cy0, cx1 - cx0), cv2.GC_BGD, np.uint8)
    labels[y - cy0:y - cy0 + bh, x - cx0:x - cx0 + bw] = np.where(seed, cv2.GC_PR_FGD, cv2.GC_PR_BGD)
    if seed.all() and labels.min() != cv2.GC_BGD:
        # No background sample at all (box = crop = everything salient): GrabCut's background model would
        # be empty and OpenCV raises; such a box is not an object on a background anyway.
        return None
    crop = np.ascontiguousarray(cv2.cvtColor(rgb[cy0:cy1, cx0:cx1], cv2.COLOR_RGB2BGR))
    crop_h, crop_w = labels.shape
    # GrabCut's cost is linear in pixels: run it on the crop shrunk to at most max_side px, then bring the
    # labels back (nearest); see the benchmark for the time/IoU trade-off.
    scale = min(1.0, params.max_side / max(crop_h, crop_w))
    if scale < 1.0:
        size = (max(1, round(crop_w * scale)), max(1, round(crop_h * scale)))
        crop = cv2.resize(crop, size, interpolation=cv2.INTER_AREA)
        labels = cv2.resize(labels, size, interpolation=cv2.INTER_NEAREST)
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    try:
        cv2.grabCut(crop, labels, None, bgd, fgd, params.iterations, cv2.GC_INIT_WITH_MASK)
    except cv2.error:
        # Raised when one of the two initial classes is empty or degenerate (e.g. a flat crop).
        return None
    if scale < 1.0:
        fg_prob = ((labels == cv2.GC_FGD) | (labels == cv2.GC_PR_FGD)).astype(np.uint8) * 255
        fg = cv2.resize(fg_prob, (crop_w, crop_h), interpolation=cv2.INTER_LINEAR) >= 128
    else:
        fg = (labels == cv2.GC_FGD) | (labels == cv2.GC_PR_FGD)
    if params.largest_component and fg.any():
        count, comp, stats, _ = cv2.connectedComponentsWithStats(fg.astype(np.uint8), connectivity=4)
        if count > 2:
            fg = comp == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    mask = np.zeros((height, width), bool)
    mask[cy0:cy1, cx0:cx1] = fg
    return mask


def mask_box(mask: np.ndarray) -> np.ndarray:
    """Tight (x, y, w, h) box of a non-empty bool mask."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return np.array([cols[0], rows[0], cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1], np.int64)


def passes_filters(mask: np.ndarray, box: np.ndarray, params: GrabCutParams) -> str | None:
    """None if the mask is kept, else the name of the filter that rejected it (for the counters)."""
    area = int(mask.sum())
    if area == 0:
        return "empty"
    frac = area / mask.size
    if frac < params.min_area_frac:
        return "small"
    if frac > params.max_area_frac:
        return "large"
    fill = area / float(box[2] * box[3])
    if fill < params.min_fill:
        return "low_fill"
    if fill > params.max_fill:
        return "box_like"
    return None


def mask_nms(masks: list[np.ndarray], scores: np.ndarray, *, iou: float) -> list[int]:
    """Greedy mask-IoU NMS: indices kept, best score first."""
    order = np.argsort(-np.asarray(scores), kind="stable")
    kept: list[int] = []
    flat = [m.ravel() for m in masks]
    areas = [int(m.sum()) for m in masks]
    for idx in order:
        duplicate = False
        for k in kept:
            inter = int(np.count_nonzero(flat[idx] & flat[k]))
            if inter / max(areas[idx] + areas[k] - inter, 1) > iou:
                duplicate = True
                break
        if not duplicate:
            kept.append(int(idx))
    return kept
