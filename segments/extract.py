"""Unsupervised segments of one image (paper §3.1), and of a chunk of images for one task.

Per image (all work on a copy resized so its longer side is ``work_side`` px):

1. selective search box proposals (:mod:`segswap.segments.proposals`), filtered on size and aspect;
2. dense features on the stride-16 grid (:mod:`segswap.nets.dense_features`: weight-free by default,
   ``moco:PATH`` for MoCo v2 conv4 features) and their saliency = mean cosine distance to the
   neighbours (:mod:`segswap.segments.saliency`);
3. boxes whose mean saliency reaches the ``box_quantile`` of the image's pixel saliency are kept, then
   box NMS keeps at most ``max_boxes``;
4. GrabCut initialised from the saliency map in each kept box (:mod:`segswap.segments.grabcut`), mask
   filters, mask-IoU NMS, at most ``max_segments`` per image;
5. masks are resized back to the original image and RLE-encoded (pycocotools).

Every segment's ``score`` is the *quantile rank* of its mean saliency among the image's pixels (0..1):
0.9 means the segment is on average more salient than 90% of the image. It is comparable between
images and feature extractors, unlike raw cosine distances. Randomness (GrabCut's k-means) is seeded
per image from ``SeedSequence(seed, spawn_key=(image_index,))``, so results do not depend on chunking
or workers.
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass

import cv2
import numpy as np

from segswap.core.images import BadImage, load_rgb
from segswap.core.listing import IMAGE_EXTENSIONS
from segswap.segments.grabcut import grabcut_box, mask_box, mask_nms, passes_filters
from segswap.segments.params import ExtractionParams
from segswap.segments.proposals import box_nms, selective_search
from segswap.segments.saliency import BoxScorer, feature_saliency, upsample_saliency

log = logging.getLogger(__name__)




def check_content(rgb: np.ndarray, path, params: ExtractionParams) -> None:
    """Raise BadImage for images that load but cannot hold segments (blank / single-colour)."""
    # Percentiles, not min/max: a blank scan with a few dust specks or JPEG ringing is still blank.
    lo, hi = np.percentile(rgb.reshape(-1, 3)[:: max(1, rgb.shape[0] * rgb.shape[1] // 200_000)], [1, 99], axis=0)
    spread = float((hi - lo).max())
    if spread < params.min_contrast:
        raise BadImage(path, f"blank or single-colour image (1st-99th percentile range {spread:.1f} grey "
                             f"levels < min_contrast {params.min_contrast})")


@dataclass
class ImageResult:
    width: int
    height: int
    segments: list[dict]  # {"segmentation": RLE, "bbox", "area", "score"}
    rejected: Counter  # masks dropped, by filter name
    seconds: dict  # per stage


def _resize_to(rgb: np.ndarray, side: int) -> np.ndarray:
    h, w = rgb.shape[:2]
    scale = min(1.0, side / max(h, w))
    if scale == 1.0:
        return rgb
    return cv2.resize(rgb, (max(16, round(w * scale)), max(16, round(h * scale))), interpolation=cv2.INTER_AREA)


def _quantile_rank(sorted_values: np.ndarray, value: float) -> float:
    return float(np.searchsorted(sorted_values, value, side="left")) / max(len(sorted_values), 1)


def _rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def extract_image(rgb: np.ndarray, extractor, params: ExtractionParams, *, rng_seed: int) -> ImageResult:
    """Segments of one RGB image (masks at the image's own resolution)."""
    height, width = rgb.shape[:2]
    seconds = {}
    work = _resize_to(rgb, params.work_side)
    wh, ww = work.shape[:2]

    t = time.perf_counter()
    boxes = selective_search(work, mode=params.ss_mode, max_side=params.ss_side)
    boxes = boxes[params.box_filter().keep(boxes, wh, ww)]
    seconds["selective_search"] = time.perf_counter() - t

    t = time.perf_counter()
    feat = extractor(work)
    seconds["features"] = time.perf_counter() - t

    t = time.perf_counter()
    sal_map = upsample_saliency(feature_saliency(feat, radius=params.saliency_radius), wh, ww, extractor.stride)
    sorted_sal = np.sort(sal_map, axis=None)
    box_scores = BoxScorer(sal_map).mean(boxes)
    box_cut = float(np.quantile(sorted_sal, params.box_quantile))
    salient = box_scores >= box_cut
    # Rank the kept boxes by their salient mass above the cut-off, area * (mean - cut): ranking by the mean
    # alone fills every GrabCut slot with small boxes on the single most salient spot, while the excess
    # mass is largest for the box that covers a salient region whole and little else.
    if params.box_rank == "excess":
        rank = (box_scores - box_cut) * boxes[:, 2] * boxes[:, 3]
    else:
        rank = box_scores
    kept = box_nms(boxes[salient], rank[salient], iou=params.box_nms_iou, limit=params.max_boxes)
    kept_boxes = boxes[salient][kept]
    seed_cut = float(np.quantile(sorted_sal, params.seed_quantile))
    seconds["saliency"] = time.perf_counter() - t

    t = time.perf_counter()
    gc = params.grabcut()
    cv2.setRNGSeed(int(rng_seed))
    masks, scores, masses, rejected = [], [], [], Counter()
    for box in kept_boxes:
        mask = grabcut_box(work, sal_map, box, seed_cut, gc)
        if mask is None:
            rejected["no_seed"] += 1
            continue
        # The fill ratio is measured against the proposal box GrabCut was given.
        reason = passes_filters(mask, box, gc)
        if reason is not None:
            rejected[reason] += 1
            continue
        inside = sal_map[mask]
        score = _quantile_rank(sorted_sal, float(inside.mean()))
        if score < params.min_score:
            rejected["low_score"] += 1
            continue
        masks.append(mask)
        scores.append(score)
        masses.append(float((inside - seed_cut).sum()))
    # Duplicates are resolved, and segments ordered, by salient mass above the seed cut-off (as boxes are):
    # a part of an object is on average as salient as the whole, but the whole has more mass.
    order = mask_nms(masks, np.asarray(masses), iou=gc.nms_iou)
    if len(masks) > len(order):
        rejected["duplicate"] += len(masks) - len(order)
    if len(order) > params.max_segments:
        rejected["over_max_segments"] += len(order) - params.max_segments
        order = order[:params.max_segments]
    seconds["grabcut"] = time.perf_counter() - t

    segments = []
    for idx in order:
        mask = masks[idx]
        if (wh, ww) != (height, width):
            mask = cv2.resize(mask.astype(np.uint8) * 255, (width, height), interpolation=cv2.INTER_LINEAR) >= 128
        if not mask.any():
            rejected["empty"] += 1
            continue
        x, y, bw, bh = (int(v) for v in mask_box(mask))
        segments.append({"segmentation": _rle(mask), "bbox": [x, y, bw, bh], "area": int(mask.sum()),
                         "score": round(scores[idx], 4)})
    return ImageResult(width=width, height=height, segments=segments, rejected=rejected, seconds=seconds)



_EXTRACTORS: dict[str, object] = {}  # one feature extractor per process and spec (Ray workers are reused)


def get_extractor(spec: str):
    from segswap.nets.dense_features import build_feature_extractor

    if spec not in _EXTRACTORS:
        _EXTRACTORS[spec] = build_feature_extractor(spec)
    return _EXTRACTORS[spec]


def skip_reason_key(reason: str) -> str:
    """Short counter key for a BadImage reason."""
    text = reason.lower()
    # First match wins: "a directory, not an image file" is a directory, not a non-image file.
    for needle, key in (("a directory", "directory"), ("symlink loop", "symlink_loop"),
                        ("broken symlink", "broken_symlink"), ("not a regular file", "not_a_file"),
                        ("not an image", "not_image"), ("smaller than", "tiny"), ("above the limit", "huge"),
                        ("too large", "huge"), ("blank or single-colour", "blank"), ("empty file", "empty_file"),
                        ("truncated or corrupt", "corrupt"), ("cannot read", "unreadable")):
        if needle in text:
            return key
    return "bad_image"


def image_seed(root_seed: int, index: int) -> int:
    return int(np.random.SeedSequence(root_seed, spawn_key=(index,)).generate_state(1)[0] & 0x7FFFFFFF)


def extract_chunk(items: list[tuple[int, str, str]], features: str, params: ExtractionParams, seed: int) -> dict:
    """Extract segments for (index, path, file_name) items; returns the part dict (never raises BadImage).

    Skipped images are recorded with their reason, not logged: the job's driver names them once.
    """
    extractor = get_extractor(features)
    records = []
    for index, path, file_name in items:
        record = {"index": index, "file_name": file_name}
        try:
            if not file_name.lower().endswith(IMAGE_EXTENSIONS):
                raise BadImage(path, "not an image file (extension not one of "
                                     f"{', '.join(IMAGE_EXTENSIONS)})")
            rgb = load_rgb(path, max_pixels=params.max_pixels, min_side=params.min_side)
            check_content(rgb, path, params)
        except BadImage as err:
            record.update(status="skipped", reason=err.reason, reason_key=skip_reason_key(err.reason))
            records.append(record)
            continue
        try:
            result = extract_image(rgb, extractor, params, rng_seed=image_seed(seed, index))
        except (cv2.error, ValueError, RuntimeError) as err:
            # One odd image (an OpenCV corner case, a degenerate aspect ratio) must not sink the job.
            log.exception("%s: segment extraction failed; skipping the image", path)
            record.update(status="skipped", reason=f"extraction failed ({type(err).__name__}: {err})",
                          reason_key="extraction_error")
            records.append(record)
            continue
        if not result.segments:
            log.info("%s: no segment passed the filters (rejected: %s)", path, dict(result.rejected) or "none")
        record.update(status="ok", width=result.width, height=result.height, segments=result.segments,
                      rejected=dict(result.rejected), seconds={k: round(v, 4) for k, v in result.seconds.items()})
        records.append(record)
    return {"images": records}
