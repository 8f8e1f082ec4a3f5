"""Feature saliency (paper §3.1): each feature's mean cosine distance to its neighbours.

The paper defines the saliency of a conv4 feature as "its average cosine distance with its neighbours".
Here the neighbourhood of cell (i, j) is every other cell within Chebyshev distance ``radius`` on the
feature grid (a (2r+1) x (2r+1) window, clipped at the image border, the cell itself excluded);
``radius=0`` means *all* other cells of the image. With unit-norm features the mean cosine similarity to a
window is the dot product with the window's feature sum, so the map costs one box filter per channel.

A feature that differs from its surroundings scores high: an object on a repetitive background stands
out, a cell inside uniform texture does not. The radius default comes from the quality benchmark
(``benchmarks/bench_segments.py``): see :data:`DEFAULT_RADIUS`.

Box scores use the saliency map resized to the working image (bilinear, cell centres at the right
places) and an integral image, so scoring thousands of selective-search boxes is O(1) each.
"""
from __future__ import annotations

import cv2
import numpy as np

# Neighbourhood radius in cells. Chosen by the quality benchmark: mean best-segment IoU 0.61 for global
# (0) against 0.47 for radius 2 and 0.58 for radius 4; small windows mostly light up object boundaries.
DEFAULT_RADIUS = 0


def feature_saliency(feat: np.ndarray, *, radius: int = DEFAULT_RADIUS) -> np.ndarray:
    """L2-normalised features [h, w, C] -> saliency [h, w] float32 in [0, 2] (mean cosine distance)."""
    if feat.ndim != 3:
        raise ValueError(f"expected features [h, w, C], got shape {list(feat.shape)}")
    if radius < 0:
        raise ValueError(f"saliency radius must be >= 0 (0 = global), got {radius}")
    h, w, _ = feat.shape
    if h * w < 2:
        raise ValueError("saliency needs at least two feature cells")
    feat = feat.astype(np.float32, copy=False)
    if radius == 0 or radius >= max(h, w):
        total = feat.sum(axis=(0, 1))
        neighbour_sum = total[None, None, :] - feat
        count = np.full((h, w), h * w - 1, np.float32)
    else:
        k = 2 * radius + 1
        # Unnormalised box sums with zero padding: the border cells just have fewer neighbours.
        neighbour_sum = _box_sum(feat, k) - feat
        count = _box_sum(np.ones((h, w, 1), np.float32), k)[..., 0] - 1.0
    mean_cos = np.einsum("hwc,hwc->hw", feat, neighbour_sum) / count
    return (1.0 - mean_cos).astype(np.float32)


def _box_sum(x: np.ndarray, k: int) -> np.ndarray:
    out = np.empty_like(x)
    for c in range(x.shape[2]):  # cv2.boxFilter handles at most 4 channels at once for float images
        out[..., c] = cv2.boxFilter(x[..., c], -1, (k, k), normalize=False, borderType=cv2.BORDER_CONSTANT)
    return out


def upsample_saliency(sal: np.ndarray, height: int, width: int, stride: int = 16) -> np.ndarray:
    """Saliency grid [h, w] -> map [height, width] whose value at each cell centre is that cell's.

    The grid covers ceil(height / stride) cells per column, so resize to the padded size and crop (a plain
    resize to (height, width) would shift cells when the size is not a multiple of the stride).
    """
    h, w = sal.shape
    full = cv2.resize(sal.astype(np.float32), (w * stride, h * stride), interpolation=cv2.INTER_LINEAR)
    return full[:height, :width]


class BoxScorer:
    """Mean of a pixel map inside boxes, via an integral image."""

    def __init__(self, pixel_map: np.ndarray):
        self.integral = cv2.integral(pixel_map.astype(np.float64))
        self.height, self.width = pixel_map.shape

    def mean(self, boxes: np.ndarray) -> np.ndarray:
        """boxes [N, 4] int (x, y, w, h) inside the map -> mean value inside each box [N]."""
        if len(boxes) == 0:
            return np.zeros(0, np.float64)
        x0, y0 = boxes[:, 0], boxes[:, 1]
        x1, y1 = x0 + boxes[:, 2], y0 + boxes[:, 3]
        ii = self.integral
        total = ii[y1, x1] - ii[y0, x1] - ii[y1, x0] + ii[y0, x0]
        return total / np.maximum(boxes[:, 2] * boxes[:, 3], 1)
