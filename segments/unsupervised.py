"""The unsupervised segment job (paper §3.1): a folder of images -> one COCO annotation file.

Per-image extraction is :mod:`segswap.segments.extract`, its settings :mod:`segswap.segments.params`.

The output is a COCO instances file: ``images`` (id, file_name relative to the image folder, width,
height), ``annotations`` (id, image_id, category_id 1, segmentation = compressed RLE, area, bbox
[x, y, w, h], iscrowd 0, score), ``categories`` = [{"id": 1, "name": "segment"}] and
``info.provenance`` (method, feature spec, every threshold, seed, counters, skipped files and reasons).
An image without any segment stays in ``images`` (it can still serve as a background) and is counted.
Skipped files (unreadable, not images, folders named like images, symlink loops) are named in the log
(the first few per reason) and all listed in the provenance.

The job runs over chunks of images: in-process (``workers=0``) or as one Ray task per chunk through
:mod:`segswap.core.ray_driver` (a local instance listens on loopback only). Each chunk's result is a
part file ``<out>.parts/part-NNNNNN.json`` written atomically; a rerun skips parts whose fingerprint
(settings, seed, file list) matches, so an interrupted job resumes. Parts are merged into ``out``
(atomically) and then removed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from collections import Counter
from pathlib import Path

import cv2

from segswap.core.atomic import atomic_write_json
from segswap.core.listing import list_images
from segswap.core.logs import Progress, SkipLog
from segswap.core.ray_driver import ray_session, run_tasks
from segswap.nets.device import available_cpus
from segswap.segments.extract import extract_chunk, get_extractor, skip_reason_key
from segswap.segments.params import ExtractionParams

log = logging.getLogger(__name__)

METHOD = "selective-search+feature-saliency+grabcut"
METHOD_VERSION = 1  # bump when the algorithm changes, so old part files are not reused
CATEGORY = {"id": 1, "name": "segment", "supercategory": "segment"}


def _write_compact_json(path: Path, obj) -> None:
    atomic_write_json(path, obj, indent=None, separators=(",", ":"))


def _extract_chunk_to_file(part_path: str, fingerprint: str, items, features, params, seed) -> str:
    """Worker entry: one chunk -> one part file (idempotent: same inputs give the same file)."""
    cv2.setNumThreads(1)  # one core per task; Ray already limits BLAS/torch threads
    part = extract_chunk(items, features, params, seed)
    part["fingerprint"] = fingerprint
    _write_compact_json(Path(part_path), part)
    return str(part_path)


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
    listing_skips = []
    if isinstance(image_paths, (str, os.PathLike)) and Path(image_paths).is_dir():
        images_dir = images_dir or image_paths
        # Every file: non-images are skipped (and named) per file, with the other unreadable ones.
        listing = list_images(image_paths, extensions=None)
        # The output may live inside the image folder: never list it or its part files (temporary
        # files are hidden, and listings skip hidden files).
        own = out_json.resolve()
        paths = [p for p in listing.files
                 if not (p.resolve() == own or p.resolve().is_relative_to(own.with_name(own.name + ".parts")))]
        listing_skips = listing.skipped
    else:
        paths = [Path(p) for p in image_paths]
    if not paths:
        raise ValueError("no image files given")
    paths = [p.resolve() for p in paths]
    root = Path(images_dir).resolve() if images_dir else Path(os.path.commonpath([p.parent for p in paths]))

    def name_of(p: Path) -> str:
        return p.relative_to(root).as_posix() if p.is_relative_to(root) else str(p)

    names = [name_of(p) for p in paths]
    # The parent resolved, not the entry: resolving a symlink loop fails.
    listing_skips = [{"file_name": name_of(p.parent.resolve() / p.name), "reason": reason} for p, reason in listing_skips]

    # Check the spec before starting workers (a missing moco checkpoint should fail here, not per chunk).
    spec = get_extractor(features).spec
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
    progress = Progress(len(todo), desc="chunks", logger=log)

    def on_result(_chunk, _part_path, _error) -> None:
        progress.update(1)

    try:
        with ray_session(workers, ray_address) as ray:
            # Errors propagate: a chunk never raises for a bad image, so an error here is a real fault.
            run_tasks(_extract_chunk_to_file, [(c, (str(c[0]), c[1], c[2], spec, params, seed)) for c in todo],
                      on_result, ray=ray, workers=workers)
    finally:
        progress.close()

    _merge(chunks, out_json, settings, job_fingerprint, root, listing_skips)
    shutil.rmtree(parts_dir, ignore_errors=True)
    return out_json


def _part_matches(path: Path, fingerprint: str) -> bool:
    try:
        return json.loads(path.read_text()).get("fingerprint") == fingerprint
    except (OSError, ValueError, AttributeError):
        return False


def _merge(chunks, out_json: Path, settings: dict, job_fingerprint: str, root: Path,
           listing_skips: list[dict] = ()) -> None:
    images, annotations, skipped = [], [], []
    skip_counts, rejected, seconds = Counter(), Counter(), Counter()
    without_segments = []
    skip_log = SkipLog(log, "image skipped")
    for rec in listing_skips:
        key = skip_reason_key(rec["reason"])
        skip_log.skip(key, f"{rec['file_name']}: {rec['reason']}")
        skipped.append(rec)
        skip_counts[key] += 1
    for part_path, fingerprint, _ in chunks:
        part = json.loads(part_path.read_text())
        if part.get("fingerprint") != fingerprint:
            raise RuntimeError(f"{part_path}: part file does not match this job (was it edited or overwritten?)")
        for rec in part["images"]:
            if rec["status"] != "ok":
                skip_log.skip(rec["reason_key"], f"{rec['file_name']}: {rec['reason']}")
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
    _write_compact_json(out_json, coco)
    log.info("wrote %s: %d segments on %d images; %d images without segments; %d skipped %s",
             out_json, len(annotations), len(images), len(without_segments), len(skipped),
             dict(skip_counts) if skip_counts else "")


