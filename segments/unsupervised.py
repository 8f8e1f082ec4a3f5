"""Unsupervised segments (paper §3.1) from any folder of images, written as a COCO annotation file.

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
images and feature extractors, unlike raw cosine distances.

The output is a COCO instances file: ``images`` (id, file_name relative to the image folder, width,
height), ``annotations`` (id, image_id, category_id 1, segmentation = compressed RLE, area, bbox
[x, y, w, h], iscrowd 0, score), ``categories`` = [{"id": 1, "name": "segment"}] and
``info.provenance`` (method, feature spec, every threshold, seed, counters, skipped files and reasons).
An image without any segment stays in ``images`` (it can still serve as a background) and is counted.

The job runs over chunks of images: in-process (``workers=0``) or as one Ray task per chunk. Each
chunk's result is a part file ``<out>.parts/part-NNNNNN.json`` written atomically; a rerun skips parts
whose fingerprint (settings, seed, file list) matches, so an interrupted job resumes. Parts are merged
into ``out`` (atomically) and then removed. Randomness (GrabCut's k-means) is seeded per image from
``SeedSequence(seed, spawn_key=(image_index,))``, so results do not depend on chunking or workers.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from segswap.nets.device import available_cpus
from segswap.segments.grabcut import GrabCutParams, grabcut_box, mask_box, mask_nms, passes_filters
from segswap.segments.proposals import MODES, BoxFilter, box_nms, selective_search
from segswap.segments.saliency import BoxScorer, feature_saliency, upsample_saliency

log = logging.getLogger(__name__)

METHOD = "selective-search+feature-saliency+grabcut"
METHOD_VERSION = 1  # bump when the algorithm changes, so old part files are not reused
CATEGORY = {"id": 1, "name": "segment", "supercategory": "segment"}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm")


def _param(default, help_text: str, **extra):
    return field(default=default, metadata={"help": help_text, **extra})


@dataclass(frozen=True)
class ExtractionParams:
    """Every setting of the extraction; each is a ``segswap-segments`` flag (``--box-quantile`` …).

    Defaults were chosen with ``benchmarks/bench_segments.py`` (best-segment IoU on images with known
    masks); the figures are in README.md ("Unsupervised segments").
    """

    work_side: int = _param(320, "longer side (px) of the working copy for features, saliency and GrabCut")
    ss_mode: str = _param("fast", "selective search strategy", choices=MODES)
    ss_side: int = _param(256, "longer side (px) of the image selective search runs on")
    min_box_frac: float = _param(0.02, "smallest proposal box, fraction of the image area")
    max_box_frac: float = _param(0.9, "largest proposal box, fraction of the image area")
    max_aspect: float = _param(4.0, "most elongated proposal box (long side / short side)")
    saliency_radius: int = _param(0, "saliency neighbourhood in feature cells (0 = all cells of the image)")
    box_quantile: float = _param(0.6, "keep boxes whose mean saliency reaches this quantile of the image's")
    box_rank: str = _param("excess", "order of boxes for GrabCut: salient mass above the cut-off or mean saliency",
                           choices=("excess", "mean"))
    box_nms_iou: float = _param(0.7, "box IoU above which a lower-scoring proposal is dropped")
    max_boxes: int = _param(10, "GrabCut runs per image (best boxes after NMS)")
    seed_quantile: float = _param(0.6, "pixels at or above this saliency quantile start as probable foreground")
    grabcut_iters: int = _param(5, "GrabCut iterations")
    grabcut_side: int = _param(240, "GrabCut runs on each box's crop shrunk to this longer side (px)")
    grabcut_margin: float = _param(0.2, "GrabCut crop margin around the box, fraction of its size")
    min_seed_frac: float = _param(0.05, "fraction of a box that must be salient for GrabCut to run")
    min_area_frac: float = _param(0.01, "smallest segment, fraction of the image area")
    max_area_frac: float = _param(0.8, "largest segment, fraction of the image area")
    min_fill: float = _param(0.2, "smallest segment area / its box's area")
    max_fill: float = _param(0.97, "largest segment area / its box's area (above: the box itself)")
    mask_nms_iou: float = _param(0.5, "mask IoU above which the lower-scoring segment is dropped")
    min_score: float = _param(0.0, "drop segments whose score (saliency rank of the mask, 0..1) is lower")
    max_segments: int = _param(10, "segments kept per image")
    min_side: int = _param(64, "images with a shorter side (px) are skipped as tiny")
    max_pixels: int = _param(100_000_000, "images with more pixels are skipped as huge")
    min_contrast: float = _param(8.0, "images whose 1st-99th percentile range (grey levels) is below are blank")

    def __post_init__(self):
        if self.work_side < 64:
            raise ValueError(f"work_side must be >= 64 px, got {self.work_side}")
        for name in ("box_quantile", "seed_quantile", "box_nms_iou", "min_score"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.max_boxes < 1 or self.max_segments < 1:
            raise ValueError("max_boxes and max_segments must be >= 1")
        # Validate the sub-parameter groups now, not in a worker.
        self.box_filter()
        self.grabcut()

    @classmethod
    def from_options(cls, **opts) -> ExtractionParams:
        """Build from keyword options; ``None`` values mean "default"; unknown names are errors."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(opts) - names)
        if unknown:
            raise ValueError(f"unknown segment extraction option(s) {unknown}; known: {sorted(names)}")
        return cls(**{k: v for k, v in opts.items() if v is not None})

    def box_filter(self) -> BoxFilter:
        return BoxFilter(min_area_frac=self.min_box_frac, max_area_frac=self.max_box_frac,
                         max_aspect=self.max_aspect)

    def grabcut(self) -> GrabCutParams:
        return GrabCutParams(iterations=self.grabcut_iters, margin=self.grabcut_margin, max_side=self.grabcut_side,
                             min_seed_frac=self.min_seed_frac, min_area_frac=self.min_area_frac,
                             max_area_frac=self.max_area_frac, min_fill=self.min_fill, max_fill=self.max_fill,
                             nms_iou=self.mask_nms_iou)


# --------------------------------------------------------------------------------------------------
# One image


def check_content(rgb: np.ndarray, path, params: ExtractionParams) -> None:
    """Raise BadImage for images that load but cannot hold segments (blank / single-colour)."""
    from segswap.core.images import BadImage

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


# --------------------------------------------------------------------------------------------------
# Chunks and the job

_EXTRACTORS: dict[str, object] = {}  # one feature extractor per process and spec (Ray workers are reused)


def _get_extractor(spec: str):
    from segswap.nets.dense_features import build_feature_extractor

    if spec not in _EXTRACTORS:
        _EXTRACTORS[spec] = build_feature_extractor(spec)
    return _EXTRACTORS[spec]


def skip_reason_key(reason: str) -> str:
    """Short counter key for a BadImage reason."""
    text = reason.lower()
    for needle, key in (("not an image", "not_image"), ("smaller than", "tiny"), ("above the limit", "huge"),
                        ("too large", "huge"), ("blank or single-colour", "blank"), ("empty file", "empty_file"),
                        ("truncated or corrupt", "corrupt"), ("cannot read", "unreadable")):
        if needle in text:
            return key
    return "bad_image"


def image_seed(root_seed: int, index: int) -> int:
    return int(np.random.SeedSequence(root_seed, spawn_key=(index,)).generate_state(1)[0] & 0x7FFFFFFF)


def extract_chunk(items: list[tuple[int, str, str]], features: str, params: ExtractionParams, seed: int) -> dict:
    """Extract segments for (index, path, file_name) items; returns the part dict (never raises BadImage)."""
    from segswap.core.images import BadImage, load_rgb

    extractor = _get_extractor(features)
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
            log.warning("skipping %s", err)
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


def _atomic_write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, separators=(",", ":"))
    os.replace(tmp, path)


def _extract_chunk_to_file(part_path: str, fingerprint: str, items, features, params, seed) -> str:
    """Worker entry: one chunk -> one part file (idempotent: same inputs give the same file)."""
    cv2.setNumThreads(1)  # one core per task; Ray already limits BLAS/torch threads
    part = extract_chunk(items, features, params, seed)
    part["fingerprint"] = fingerprint
    _atomic_write_json(Path(part_path), part)
    return part_path


def list_images(folder) -> list[Path]:
    """Every non-hidden file under ``folder`` (recursively), sorted; non-images are skipped later, counted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NotADirectoryError(f"image folder {folder}: not a directory")
    files = sorted(p for p in folder.rglob("*")
                   if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    return files


def _fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def run_extraction(image_paths, out_json, *, workers: int | None = 0, ray_address: str | None = None, seed: int = 0,
                   features: str = "default", chunk_size: int = 8, images_dir=None, **opts) -> Path:
    """Extract unsupervised segments of ``image_paths`` into the COCO file ``out_json``; returns its path.

    ``image_paths``: a folder (every file under it) or a list of files. ``images_dir``: the folder that
    ``file_name`` entries are relative to (default: the folder given, or the files' common parent).
    ``workers=0`` runs in this process; ``workers >= 1`` runs one Ray task per chunk with at most
    ``workers`` in flight (on the cluster at ``ray_address`` / ``RAY_ADDRESS``, else a local instance).
    ``opts`` are :class:`ExtractionParams` fields (``None`` = default).
    """
    params = ExtractionParams.from_options(**opts)
    if workers is None:  # "as many as there are CPUs", the convention of segswap-gen's --workers
        workers = available_cpus()
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    out_json = Path(out_json)
    if isinstance(image_paths, (str, os.PathLike)) and Path(image_paths).is_dir():
        images_dir = images_dir or image_paths
        # The output may live inside the image folder: never list it, its part files or temp files.
        own = out_json.resolve()
        paths = [p for p in list_images(image_paths)
                 if not (p.resolve() == own or p.resolve().is_relative_to(own.with_name(own.name + ".parts"))
                         or p.name.startswith(own.name + ".tmp"))]
    else:
        paths = [Path(p) for p in image_paths]
    if not paths:
        raise ValueError("no image files given")
    paths = [p.resolve() for p in paths]
    root = Path(images_dir).resolve() if images_dir else Path(os.path.commonpath([p.parent for p in paths]))
    names = [p.relative_to(root).as_posix() if p.is_relative_to(root) else str(p) for p in paths]

    # Check the spec before starting workers (a missing moco checkpoint should fail here, not per chunk).
    spec = _get_extractor(features).spec
    out_json.parent.mkdir(parents=True, exist_ok=True)
    settings = {"method": METHOD, "method_version": METHOD_VERSION, "features": spec,
                "params": dataclasses.asdict(params), "seed": seed}
    job_fingerprint = _fingerprint([settings, names])
    if out_json.exists():
        try:
            done = json.loads(out_json.read_text())["info"]["provenance"]["fingerprint"] == job_fingerprint
        except (ValueError, KeyError, TypeError):
            done = False
        if done:
            log.info("%s is already complete for these images and settings; nothing to do", out_json)
            return out_json

    parts_dir = out_json.with_name(out_json.name + ".parts")
    parts_dir.mkdir(exist_ok=True)
    chunks = []
    for chunk_id, start in enumerate(range(0, len(paths), chunk_size)):
        items = [(i, str(paths[i]), names[i]) for i in range(start, min(start + chunk_size, len(paths)))]
        fingerprint = _fingerprint([settings, items])
        chunks.append((parts_dir / f"part-{chunk_id:06d}.json", fingerprint, items))
    todo = [c for c in chunks if not _part_matches(c[0], c[1])]
    log.info("%d images in %d chunks; %d chunks already done, %d to run (%s)", len(paths), len(chunks),
             len(chunks) - len(todo), len(todo), "in-process" if workers == 0 else f"Ray, {workers} in flight")
    if workers == 0:
        for n, (part_path, fingerprint, items) in enumerate(todo, 1):
            _extract_chunk_to_file(str(part_path), fingerprint, items, spec, params, seed)
            _progress(n, len(todo))
    else:
        _run_ray(todo, spec, params, seed, workers, ray_address)

    _merge(chunks, out_json, settings, job_fingerprint, root)
    shutil.rmtree(parts_dir, ignore_errors=True)
    return out_json


def _part_matches(path: Path, fingerprint: str) -> bool:
    try:
        return json.loads(path.read_text()).get("fingerprint") == fingerprint
    except (OSError, ValueError, AttributeError):
        return False


def _progress(done: int, total: int) -> None:
    if sys.stderr.isatty():
        print(f"\rsegments: {done}/{total} chunks", end="\n" if done == total else "", file=sys.stderr, flush=True)
    elif done == total or done % 10 == 0:
        log.info("segments: %d/%d chunks", done, total)


def _run_ray(todo, spec, params, seed, workers, ray_address) -> None:
    import ray

    if not ray.is_initialized():
        # address=None honours RAY_ADDRESS; without it a local instance with `workers` CPUs starts.
        address = ray_address or os.environ.get("RAY_ADDRESS")
        kwargs = {"address": address} if address else {"num_cpus": workers, "include_dashboard": False}
        ray.init(**kwargs)
    remote = ray.remote(num_cpus=1, max_retries=2)(_extract_chunk_to_file)
    pending, queue, done = [], list(todo), 0
    while queue or pending:
        while queue and len(pending) < workers:
            part_path, fingerprint, items = queue.pop(0)
            pending.append(remote.remote(str(part_path), fingerprint, items, spec, params, seed))
        ready, pending = ray.wait(pending, num_returns=1)
        ray.get(ready)  # re-raise a task's error here, with its traceback
        done += 1
        _progress(done, len(todo))


def _merge(chunks, out_json: Path, settings: dict, job_fingerprint: str, root: Path) -> None:
    images, annotations, skipped = [], [], []
    skip_counts, rejected, seconds = Counter(), Counter(), Counter()
    without_segments = []
    for part_path, fingerprint, _ in chunks:
        part = json.loads(part_path.read_text())
        if part.get("fingerprint") != fingerprint:
            raise RuntimeError(f"{part_path}: part file does not match this job (was it edited or overwritten?)")
        for rec in part["images"]:
            if rec["status"] != "ok":
                skipped.append({"file_name": rec["file_name"], "reason": rec["reason"]})
                skip_counts[rec["reason_key"]] += 1
                continue
            image_id = rec["index"] + 1
            images.append({"id": image_id, "file_name": rec["file_name"], "width": rec["width"],
                           "height": rec["height"]})
            rejected.update(rec["rejected"])
            seconds.update(rec["seconds"])
            if not rec["segments"]:
                without_segments.append(rec["file_name"])
            for seg in rec["segments"]:
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": CATEGORY["id"],
                                    "iscrowd": 0, **seg})
    counters = {"images_total": len(images) + len(skipped), "images_ok": len(images), "images_skipped": len(skipped),
                "skipped_by_reason": dict(sorted(skip_counts.items())),
                "images_without_segments": len(without_segments), "segments": len(annotations),
                "masks_rejected_by_filter": dict(sorted(rejected.items())),
                "seconds_per_image": {k: round(v / max(len(images), 1), 4) for k, v in sorted(seconds.items())}}
    provenance = {**settings, "fingerprint": job_fingerprint, "images_dir": str(root), "counters": counters,
                  "skipped": skipped, "without_segments": without_segments}
    coco = {"info": {"description": "segswap unsupervised segments (paper section 3.1)",
                     "date_created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "provenance": provenance},
            "images": images, "annotations": annotations, "categories": [CATEGORY]}
    _atomic_write_json(out_json, coco)
    log.info("wrote %s: %d segments on %d images; %d images without segments; %d skipped %s",
             out_json, len(annotations), len(images), len(without_segments), len(skipped),
             dict(skip_counts) if skip_counts else "")


class UnsupervisedSegments:
    """The :class:`segswap.segments.base.SegmentSource` for unsupervised segments.

    ``UnsupervisedSegments(features="default", workers=0, seed=0, box_quantile=0.6, …).write_coco(images,
    out_json)`` is :func:`run_extraction` with the options fixed up front (validated here, not later).
    """

    name = "unsupervised"

    def __init__(self, *, features: str = "default", workers: int = 0, ray_address: str | None = None,
                 seed: int = 0, chunk_size: int = 8, images_dir=None, **opts):
        ExtractionParams.from_options(**opts)  # fail now on an unknown or invalid option
        self.options = dict(features=features, workers=workers, ray_address=ray_address, seed=seed,
                            chunk_size=chunk_size, images_dir=images_dir, **opts)

    def write_coco(self, images, out_json) -> Path:
        return run_extraction(images, out_json, **self.options)
