"""Co-segmentation from the correspondence graph (paper §5.2): first eigenvector -> potentials -> GrabCut.

The leading eigenvector of the graph's adjacency gives every correspondence a value; the foreground
potential of an image at a grid cell is the sum of the values of the correspondences with an end in
that cell (both ends count: a vertex lies in its source and in its target image). Negative values are
clipped to 0. The potential, upsampled to the image, seeds GrabCut (5 iterations) as in the official
code: cells above ``fg_fraction`` x the image's maximum are sure foreground, the rest of the support
probable foreground, a ``ring``-pixel band around the support probable background, everything else
background. Images with no potential get an empty mask.
"""
from __future__ import annotations

import cv2
import numpy as np

from segswap.apps.graph import Vertices

DEFAULT_FG_FRACTION = 0.6
DEFAULT_RING = 10
DEFAULT_GRABCUT_ITERS = 5


def foreground_potentials(verts: Vertices, values: np.ndarray, n_images: int, grid: tuple[int, int]) -> np.ndarray:
    """[n_images, h, w] sums of ``values`` [V] at the cells of both ends of every vertex (clipped >= 0)."""
    h, w = grid
    pot = np.zeros(n_images * h * w, np.float64)
    for img, pos in ((verts.img[:, 0], verts.pos[:, :2]), (verts.img[:, 1], verts.pos[:, 2:])):
        col = np.clip(np.floor(pos[:, 0]).astype(np.int64), 0, w - 1)
        row = np.clip(np.floor(pos[:, 1]).astype(np.int64), 0, h - 1)
        np.add.at(pot, (img * h + row) * w + col, values)
    return np.maximum(pot.reshape(n_images, h, w), 0)


def grabcut_mask(img: np.ndarray, potential: np.ndarray, *, fg_fraction: float = DEFAULT_FG_FRACTION,
                 ring: int = DEFAULT_RING, iters: int = DEFAULT_GRABCUT_ITERS) -> np.ndarray:
    """bool [H, W] foreground of ``img`` (uint8 RGB) from a grid ``potential`` [h, w]."""
    hh, ww = img.shape[:2]
    pot = cv2.resize(potential.astype(np.float32), (ww, hh), interpolation=cv2.INTER_LINEAR)
    if not np.any(pot > 0):
        return np.zeros((hh, ww), bool)
    support = (pot > 0).astype(np.uint8)
    seed = np.full((hh, ww), cv2.GC_BGD, np.uint8)
    if ring > 0:
        grown = cv2.dilate(support, np.ones((ring, ring), np.uint8))
        seed[(grown > 0) & (support == 0)] = cv2.GC_PR_BGD
    seed[support > 0] = cv2.GC_PR_FGD
    seed[pot > fg_fraction * pot.max()] = cv2.GC_FGD
    if not np.any((seed == cv2.GC_BGD) | (seed == cv2.GC_PR_BGD)):
        return seed != cv2.GC_BGD  # the potential covers the whole image: no background model to fit
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    out, _, _ = cv2.grabCut(np.ascontiguousarray(img[..., ::-1]), seed, None, bgd, fgd, iters,
                            cv2.GC_INIT_WITH_MASK)
    return (out == cv2.GC_FGD) | (out == cv2.GC_PR_FGD)
