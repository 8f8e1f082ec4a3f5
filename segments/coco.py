"""Segments from a COCO-format instances json: :class:`SegmentIndex`.

One reader for every segment source: COCO's own annotations (polygons, compressed or uncompressed
RLE) and the files the unsupervised extractor writes (compressed RLE plus a ``score``).
pycocotools does the mask encoding (``frPyObjects``, ``merge``, ``area``, ``toBbox``, ``decode``).

Every usable annotation becomes a :class:`~segswap.segments.base.Segment` holding a compressed RLE.
Anything unusable is counted by reason in :attr:`SegmentIndex.skipped` and skipped, with a warning
naming the json file and the image or annotation id (the first few per reason, then a summary):

images ``malformed_image`` (missing/invalid id, file_name, width, height), ``duplicate_image_id``,
``missing_image_file`` (when an images directory is given and the file is not there);
annotations ``malformed_annotation``, ``duplicate_annotation_id`` (an id seen before: the later
annotation is skipped), ``unknown_image`` (image id not in ``images`` or skipped),
``unknown_category`` (a ``category_id`` not in the file's ``categories``; a file that lists no
categories at all is not checked),
``crowd`` (``iscrowd: 1``: a group, not one instance), ``empty_segmentation`` (no polygon or
a polygon of fewer than 3 points), ``out_of_bounds`` (a polygon point more than
:data:`BOUNDS_TOLERANCE` px outside the image, or an RLE whose size is not the image's),
``empty_mask`` (encodes to zero pixels), and the filters: ``small_area`` (``min_area``, pixels),
``small_side`` (``min_side``: the shorter side of the bbox, pixels), ``category_filtered``
(``categories``: ids or names to keep), ``low_score`` (``min_score``).

A file that is not a COCO instances json at all (not JSON, no ``images``/``annotations`` lists)
raises :class:`CocoFormatError` naming the file.
"""
from __future__ import annotations

import json
import logging
import warnings
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from .base import ImageRecord, Segment

log = logging.getLogger(__name__)

# COCO polygons are drawn on pixel corners; its own annotations stray up to a pixel past the border.
BOUNDS_TOLERANCE = 2.0
# Warnings printed per skip reason before falling back to the summary line.
WARN_EXAMPLES = 3


class CocoFormatError(ValueError):
    """The json file as a whole is not usable; the message names it."""


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)


class SegmentIndex:
    """Images and instance segments, with lookups by image and by category.

    Attributes: ``images`` (id -> ImageRecord), ``segments`` (list of Segment, file order),
    ``categories`` (id -> name), ``skipped`` (Counter of reasons), ``source`` (the json path).
    """

    def __init__(self, images: dict[int, ImageRecord], segments: list[Segment], categories: dict[int, str],
                 skipped: Counter | None = None, source: str = "<memory>"):
        self.images = images
        self.segments = segments
        self.categories = categories
        self.skipped = Counter(skipped or {})
        self.skip_examples: dict[str, list[str]] = {}  # reason -> first few "json: what" (from_coco)
        self.source = source
        self._by_image: dict[int, list[int]] = defaultdict(list)
        self._by_category: dict[int, list[int]] = defaultdict(list)
        for i, seg in enumerate(segments):
            self._by_image[seg.image_id].append(i)
            self._by_category[seg.category].append(i)
        # Sorted so that random draws by index are reproducible whatever the json order of ids.
        self.segment_categories = sorted(self._by_category)
        self.images_with_segments = sorted(self._by_image)

    # ------------------------------------------------------------------------------------ lookups

    def __len__(self) -> int:
        return len(self.segments)

    def segments_of_image(self, image_id: int) -> list[Segment]:
        return [self.segments[i] for i in self._by_image.get(image_id, ())]

    def segments_of_category(self, category: int) -> list[Segment]:
        return [self.segments[i] for i in self._by_category.get(category, ())]

    def categories_in_image(self, image_id: int) -> set[int]:
        return {self.segments[i].category for i in self._by_image.get(image_id, ())}

    def decode_mask(self, seg: Segment) -> np.ndarray:
        """uint8 [H, W] with values 0/1 at the original image resolution."""
        with warnings.catch_warnings():
            # pycocotools' decode calls np.array(copy=False), which numpy 2 flags; harmless here.
            warnings.simplefilter("ignore", DeprecationWarning)
            return np.ascontiguousarray(mask_utils.decode(seg.rle), dtype=np.uint8)

    # ------------------------------------------------------------------------------------ loading

    @classmethod
    def from_coco(cls, json_path, images_dir=None, *, min_area: float = 0.0, min_side: float = 0.0,
                  categories=None, min_score: float | None = None, check_files: bool = True,
                  log_skips: bool = True) -> SegmentIndex:
        """Read a COCO instances json; ``images_dir`` (default: the json's folder) holds the files.

        ``categories`` keeps only those ids or names (None keeps all). ``check_files`` skips images
        whose file does not exist (one ``stat`` per image). ``log_skips=False``: do not log the skipped
        items here, only keep the first few per reason in :attr:`SegmentIndex.skip_examples` (a
        generator worker hands them to the driver, which names them once for the whole job).
        """
        json_path = Path(json_path)
        images_dir = Path(images_dir) if images_dir is not None else json_path.parent
        try:
            with open(json_path, encoding="utf-8") as f:
                data = json.load(f)
        except OSError as e:
            raise CocoFormatError(f"{json_path}: cannot read ({e.strerror or e})") from e
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CocoFormatError(f"{json_path}: not valid JSON ({e})") from e
        if not isinstance(data, dict):
            raise CocoFormatError(f"{json_path}: top level must be an object with 'images' and 'annotations'")
        for key in ("images", "annotations"):
            if not isinstance(data.get(key), list):
                raise CocoFormatError(f"{json_path}: '{key}' must be a list (is this a COCO instances file?)")
        loader = _Loader(json_path, images_dir, min_area=min_area, min_side=min_side, categories=categories,
                         min_score=min_score, check_files=check_files, log_skips=log_skips)
        index = loader.run(data)
        return index


def _rle_string_total(counts: bytes) -> int:
    """Sum of the run lengths in a compressed COCO RLE string (-1 if it is not one).

    Same decoding as pycocotools' ``rleFrString``, vectorised: 5 bits per character offset by 48
    (least significant group first), bit 0x20 = more characters follow, bit 0x10 of the last one =
    negative, and every run after the third stored as a difference to the run two before.
    """
    c = np.frombuffer(bytes(counts), np.uint8).astype(np.int64) - 48
    if not len(c):
        return 0
    if c.min() < 0 or c.max() > 63:
        return -1
    ends = (c & 0x20) == 0
    if not ends[-1]:
        return -1
    starts = np.flatnonzero(np.concatenate([[True], ends[:-1]]))
    lengths = np.diff(np.append(starts, len(c)))
    if lengths.max() > 12:  # > 60 bits: not a count of pixels
        return -1
    shift = 5 * (np.arange(len(c)) - np.repeat(starts, lengths))
    x = np.add.reduceat((c & 0x1F) << shift, starts)
    negative = (c[starts + lengths - 1] & 0x10) != 0
    x = np.where(negative, x - (np.int64(1) << (5 * lengths)), x)
    runs = x.copy()
    runs[3::2] = x[1] + np.cumsum(x[3::2]) if len(x) > 3 else runs[3::2]
    runs[4::2] = x[2] + np.cumsum(x[4::2]) if len(x) > 4 else runs[4::2]
    if runs.min() < 0:
        return -1
    return int(runs.sum())


class _Loader:
    def __init__(self, json_path: Path, images_dir: Path, *, min_area, min_side, categories, min_score, check_files,
                 log_skips: bool = True):
        self.json_path = json_path
        self.images_dir = images_dir
        self.min_area = float(min_area)
        self.min_side = float(min_side)
        self.categories_filter = categories
        self.known_categories: set[int] = set()
        self.min_score = min_score
        self.check_files = check_files
        self.skipped: Counter = Counter()
        self.log_skips = log_skips
        self.examples: dict[str, list[str]] = {}
        self.annotation_ids: set[int] = set()

    def skip(self, reason: str, what: str) -> None:
        self.skipped[reason] += 1
        if self.skipped[reason] <= WARN_EXAMPLES:
            self.examples.setdefault(reason, []).append(f"{self.json_path}: {what}")
            if self.log_skips:
                log.warning("%s: skipping %s (%s)", self.json_path, what, reason.replace("_", " "))

    def run(self, data: dict) -> SegmentIndex:
        cats = {}
        for c in data.get("categories") or []:
            if isinstance(c, dict) and isinstance(c.get("id"), int):
                cats[c["id"]] = str(c.get("name", c["id"]))
        keep_cats = self._resolve_category_filter(cats)
        self.known_categories = set(cats)
        images = self._images(data["images"])
        segments = []
        for ann in data["annotations"]:
            seg = self._annotation(ann, images, keep_cats)
            if seg is not None:
                segments.append(seg)
        for reason, n in sorted(self.skipped.items()):
            if n > WARN_EXAMPLES and self.log_skips:
                log.warning("%s: skipped %d items in all for reason %s", self.json_path, n, reason)
        log.info("%s: %d segments in %d images (%d skipped)", self.json_path, len(segments),
                 len({s.image_id for s in segments}), sum(self.skipped.values()))
        index = SegmentIndex(images, segments, cats, self.skipped, source=str(self.json_path))
        index.skip_examples = self.examples
        return index

    def _resolve_category_filter(self, cats: dict[int, str]) -> set[int] | None:
        if self.categories_filter is None:
            return None
        by_name = {name: cid for cid, name in cats.items()}
        keep = set()
        for c in self.categories_filter:
            if isinstance(c, int) or (isinstance(c, str) and c.isdigit()):
                keep.add(int(c))
            elif c in by_name:
                keep.add(by_name[c])
            else:
                raise ValueError(f"{self.json_path}: category {c!r} not in the file's categories "
                                 f"({', '.join(sorted(by_name)[:20])}...)")
        return keep

    def _images(self, entries: list) -> dict[int, ImageRecord]:
        images: dict[int, ImageRecord] = {}
        for k, im in enumerate(entries):
            if not isinstance(im, dict):
                self.skip("malformed_image", f"images[{k}] (not an object)")
                continue
            iid, name, w, h = im.get("id"), im.get("file_name"), im.get("width"), im.get("height")
            if not (isinstance(iid, int) and isinstance(name, str) and name and isinstance(w, int)
                    and isinstance(h, int) and w > 0 and h > 0):
                self.skip("malformed_image", f"images[{k}] id={iid!r} (needs int id, file_name, positive width/height)")
                continue
            if iid in images:
                self.skip("duplicate_image_id", f"image id {iid} ({name}; first seen as {images[iid].file_name})")
                continue
            path = self.images_dir / name
            if self.check_files and not path.is_file():
                self.skip("missing_image_file", f"image id {iid}: file {path} not found")
                continue
            images[iid] = ImageRecord(id=iid, file_name=name, path=path, width=w, height=h)
        return images

    def _annotation(self, ann, images: dict[int, ImageRecord], keep_cats: set[int] | None) -> Segment | None:
        if not isinstance(ann, dict):
            self.skip("malformed_annotation", "an annotation that is not an object")
            return None
        aid, iid, cat, segm = ann.get("id"), ann.get("image_id"), ann.get("category_id"), ann.get("segmentation")
        what = f"annotation id {aid!r} (image id {iid!r})"
        if not isinstance(aid, int) or not isinstance(iid, int) or not isinstance(cat, int) or segm is None:
            self.skip("malformed_annotation", what + ": needs int id, image_id, category_id and a segmentation")
            return None
        if aid in self.annotation_ids:
            self.skip("duplicate_annotation_id", what + ": the id of an earlier annotation")
            return None
        self.annotation_ids.add(aid)
        if iid not in images:
            self.skip("unknown_image", what)
            return None
        if self.known_categories and cat not in self.known_categories:
            self.skip("unknown_category", what + f": category_id {cat} is not in the file's categories")
            return None
        if ann.get("iscrowd", 0):
            self.skip("crowd", what)
            return None
        if keep_cats is not None and cat not in keep_cats:
            self.skip("category_filtered", what)
            return None
        score = ann.get("score", 1.0)
        if not _is_number(score):
            self.skip("malformed_annotation", what + f": score {score!r} is not a number")
            return None
        if self.min_score is not None and score < self.min_score:
            self.skip("low_score", what)
            return None
        im = images[iid]
        rle = self._encode(segm, im, what)
        if rle is None:
            return None
        area = float(mask_utils.area(rle))
        if area <= 0:
            self.skip("empty_mask", what)
            return None
        if area < self.min_area:
            self.skip("small_area", what)
            return None
        bbox = tuple(float(v) for v in mask_utils.toBbox(rle))
        if min(bbox[2], bbox[3]) < self.min_side:
            self.skip("small_side", what)
            return None
        return Segment(id=aid, image_id=iid, category=cat, bbox=bbox, rle=rle, area=area, score=float(score))

    def _encode(self, segm, im: ImageRecord, what: str) -> dict | None:
        h, w = im.height, im.width
        if isinstance(segm, list):  # polygons [[x0, y0, x1, y1, ...], ...]
            polys, arrays = [], []
            for poly in segm:
                try:
                    arr = np.asarray(poly, np.float64) if isinstance(poly, list) else None
                except (TypeError, ValueError):
                    arr = None
                if arr is None or arr.ndim != 1 or not np.isfinite(arr).all():
                    self.skip("malformed_annotation", what + ": a polygon is not a list of numbers")
                    return None
                if len(arr) >= 6 and len(arr) % 2 == 0:
                    polys.append(poly)
                    arrays.append(arr.reshape(-1, 2))
            if not polys:
                self.skip("empty_segmentation", what)
                return None
            pts = np.concatenate(arrays)
            tol = BOUNDS_TOLERANCE
            if (pts[:, 0].min() < -tol or pts[:, 1].min() < -tol or pts[:, 0].max() > w + tol
                    or pts[:, 1].max() > h + tol):
                self.skip("out_of_bounds", what + f": polygon outside the {w}x{h} image")
                return None
            return mask_utils.merge(mask_utils.frPyObjects(polys, h, w))
        if isinstance(segm, dict):  # RLE, compressed (counts str) or uncompressed (counts list)
            size, counts = segm.get("size"), segm.get("counts")
            if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) for v in size)):
                self.skip("malformed_annotation", what + ": RLE needs size [h, w]")
                return None
            if list(size) != [h, w]:
                self.skip("out_of_bounds", what + f": RLE size {size} is not the image's [{h}, {w}]")
                return None
            if isinstance(counts, list):
                if not all(isinstance(v, int) and v >= 0 for v in counts) or sum(counts) != h * w:
                    self.skip("malformed_annotation", what + f": uncompressed RLE counts must sum to {h * w}")
                    return None
                return mask_utils.frPyObjects(segm, h, w)
            if isinstance(counts, (str, bytes)):
                raw = counts.encode("ascii", "replace") if isinstance(counts, str) else bytes(counts)
                # pycocotools decodes without bounds checks: counts that do not sum to h*w would
                # write past the mask buffer in a worker, so check them here.
                total = _rle_string_total(raw)
                if total != h * w:
                    self.skip("malformed_annotation", what + f": corrupt RLE counts (cover {total} pixels, "
                                                             f"image has {h * w})")
                    return None
                rle = {"size": [h, w], "counts": raw}
                return rle
            self.skip("malformed_annotation", what + ": RLE counts must be a string or a list")
            return None
        self.skip("malformed_annotation", what + ": segmentation must be polygons or RLE")
        return None
