"""Selective-search box proposals (Uijlings et al.; OpenCV ``cv2.ximgproc.segmentation``).

Selective search runs on a working copy of the image resized so its longer side is ``max_side`` pixels
(default 256: the proposals are coarse object hypotheses, and the cost grows faster than the pixel count;
see the timings in ``benchmarks/bench_segments.py``). Boxes are returned in the coordinates of the image
that was passed in.

Modes (OpenCV's strategies):

``single``   one colour space (HSV), one initial graph segmentation (k=200): fastest, fewest boxes;
``fast``     2 colour spaces x 2 k values x 2 strategy sets (the authors' "fast" setting; default);
``quality``  5 colour spaces x 4 k values x 2 strategy sets: many more boxes, several times slower.

Filters drop boxes that cannot hold a useful segment: too small or too large a fraction of the image,
or too elongated.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

MODES = ("single", "fast", "quality")
DEFAULT_MODE = "fast"
DEFAULT_MAX_SIDE = 256


@dataclass(frozen=True)
class BoxFilter:
    min_area_frac: float = 0.02  # box area / image area: smaller boxes rarely give a usable 16-px-grid segment
    max_area_frac: float = 0.9  # a box covering nearly everything is the whole image, not an object
    max_aspect: float = 4.0  # longer side / shorter side

    def __post_init__(self):
        if not 0.0 <= self.min_area_frac < self.max_area_frac <= 1.0:
            raise ValueError(f"need 0 <= min_area_frac < max_area_frac <= 1, got "
                             f"{self.min_area_frac}, {self.max_area_frac}")
        if self.max_aspect < 1.0:
            raise ValueError(f"max_aspect must be >= 1, got {self.max_aspect}")

    def keep(self, boxes: np.ndarray, height: int, width: int) -> np.ndarray:
        """boolean [N] for boxes [N, 4] (x, y, w, h)."""
        if len(boxes) == 0:
            return np.zeros(0, bool)
        bw, bh = boxes[:, 2].astype(np.float64), boxes[:, 3].astype(np.float64)
        area = bw * bh / float(height * width)
        aspect = np.maximum(bw, bh) / np.maximum(np.minimum(bw, bh), 1.0)
        return (area >= self.min_area_frac) & (area <= self.max_area_frac) & (aspect <= self.max_aspect)


def selective_search(rgb: np.ndarray, *, mode: str = DEFAULT_MODE, max_side: int = DEFAULT_MAX_SIDE) -> np.ndarray:
    """uint8 [H, W, 3] RGB -> unique boxes [N, 4] int32 (x, y, w, h) in this image's pixels."""
    if mode not in MODES:
        raise ValueError(f"unknown selective search mode {mode!r}; choose one of {', '.join(MODES)}")
    if max_side < 32:
        raise ValueError(f"selective search max_side must be >= 32, got {max_side}")
    height, width = rgb.shape[:2]
    scale = min(1.0, max_side / max(height, width))
    work = rgb if scale == 1.0 else cv2.resize(rgb, (max(1, round(width * scale)), max(1, round(height * scale))),
                                               interpolation=cv2.INTER_AREA)
    search = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    search.setBaseImage(cv2.cvtColor(work, cv2.COLOR_RGB2BGR))
    {"single": search.switchToSingleStrategy, "fast": search.switchToSelectiveSearchFast,
     "quality": search.switchToSelectiveSearchQuality}[mode]()
    boxes = np.asarray(search.process(), np.float64).reshape(-1, 4)
    if scale != 1.0:
        x0 = np.floor(boxes[:, 0] / scale)
        y0 = np.floor(boxes[:, 1] / scale)
        x1 = np.ceil((boxes[:, 0] + boxes[:, 2]) / scale)
        y1 = np.ceil((boxes[:, 1] + boxes[:, 3]) / scale)
        boxes = np.stack([x0, y0, np.minimum(x1, width) - x0, np.minimum(y1, height) - y0], axis=1)
    boxes = np.unique(boxes.astype(np.int32), axis=0)
    return boxes[(boxes[:, 2] > 0) & (boxes[:, 3] > 0)]


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one (x, y, w, h) box with each of boxes [N, 4]."""
    x0 = np.maximum(box[0], boxes[:, 0])
    y0 = np.maximum(box[1], boxes[:, 1])
    x1 = np.minimum(box[0] + box[2], boxes[:, 0] + boxes[:, 2])
    y1 = np.minimum(box[1] + box[3], boxes[:, 1] + boxes[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    union = box[2] * box[3] + boxes[:, 2] * boxes[:, 3] - inter
    return inter / np.maximum(union, 1)


def box_nms(boxes: np.ndarray, scores: np.ndarray, *, iou: float, limit: int) -> np.ndarray:
    """Greedy NMS: indices of at most ``limit`` boxes, best score first, no two with IoU > ``iou``."""
    order = np.argsort(-scores, kind="stable")
    kept: list[int] = []
    for idx in order:
        if len(kept) >= limit:
            break
        if kept and box_iou(boxes[idx], boxes[kept]).max() > iou:
            continue
        kept.append(int(idx))
    return np.asarray(kept, np.int64)
