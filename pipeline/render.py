"""Render one training pair: pick segments and a background, warp, blend, compute the ground truth.

``PairRenderer(segments, backgrounds, ...).render_pair(rng, key, seed=...) -> Pair`` (no style: the
orchestration stylises whole batches and fills ``sty0``/``sty1`` and ``json["style"]``).
Every random choice comes from the ``rng`` argument, in a fixed order, so the same generator state
gives the same pair whatever else the process rendered before. A draw that cannot make a usable pair
raises :class:`~segswap.pipeline.groundtruth.SkipPair` with a reason the caller counts.

One-object pairs (the official generator): a background image; a category drawn uniformly among the
categories absent from the background, then an instance uniformly within it (sources without
categories, i.e. a single category such as unsupervised segments, draw any segment of another
image); image 0 = the instance's image (optionally border-cropped) resized to size x size, image 1 =
the background resized to size x size with the segment and its context pasted, warped as in
:mod:`segswap.pipeline.geometry`, and blended.

Two-object pairs (probability ``p_two_object``): a source image holding instances of two categories
absent from the background; one instance of each; their contexts split between them (each context
pixel goes to the nearer segment) so they do not overlap; each placed in its own layout cell (two
disjoint cells a feature stride apart) with fit ratios from 0.5; later pastes occlude earlier ones.
"""
from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict
from pathlib import Path

import cv2
import numpy as np
from threadpoolctl import ThreadpoolController

from segswap.core.cputime import cpu_seconds
from segswap.core.images import BadImage, load_rgb, resize_rgb
from segswap.core.tps import load_kernels as load_tps_kernels
from segswap.segments.base import ImageRecord
from segswap.segments.coco import SegmentIndex
from segswap.shards.format import DEFAULT_FLOW_STRIDE, FORMAT_VERSION, MIN_MASK_CELLS, RENDERER_VERSION, Pair

from .blend import BLEND_METHODS, DEFAULT_BLEND, GRADIENTS, blend, box_around
from .geometry import (
    GeometryConfig,
    PasteWarp,
    border_crop_box,
    dense_maps,
    dilate,
    dilation_px,
    draw_affine,
    draw_tps,
    layout_cells,
    resize_mask,
)
from .groundtruth import Paste, SkipPair, ground_truth, ownership

# Scanning the loaded BLAS/OpenMP libraries costs ~10 ms: do it once per process.
_THREADPOOLS = ThreadpoolController()
log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
# Two-object sources whose segments overlap by more than this fraction of the smaller one are
# dropped (one would hide the other in image 0); smaller overlaps (touching instances, resizing)
# go to the first segment.
MAX_SEGMENT_OVERLAP = 0.05
# Decoded images kept per renderer (LRU, at most image_cache of them and this many bytes): sources
# and backgrounds repeat, and decoding a photo costs more than rendering from it at 480 px.
IMAGE_CACHE_BYTES = 256 * 2 ** 20
# Attempts at finding a two-object source with two categories absent from the background.
TWO_OBJECT_TRIES = 10
# Stages whose CPU time PairRenderer.stage_cpu accumulates (benchmarks/bench_gen.py prints them).
RENDER_STAGES = ("decode", "segments", "geometry", "ground_truth", "blend")


def _jsonable(v):
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, float):
        return round(v, 6)
    return v


def _pairs_apart(members) -> list[tuple[int, int]]:
    """Index pairs (i < j) of segments whose COCO [x, y, w, h] boxes do not intersect."""
    out = []
    for i, a in enumerate(members):
        for j in range(i + 1, len(members)):
            b = members[j]
            if (a.bbox[0] + a.bbox[2] <= b.bbox[0] or b.bbox[0] + b.bbox[2] <= a.bbox[0]
                    or a.bbox[1] + a.bbox[3] <= b.bbox[1] or b.bbox[1] + b.bbox[3] <= a.bbox[1]):
                out.append((i, j))
    return out


def list_images(folder) -> list[ImageRecord]:
    """Image files of a folder (recursive, sorted) as records without ids, for use as backgrounds."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise ValueError(f"{folder}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return [ImageRecord(id=-1, file_name=str(p.relative_to(folder)), path=p, width=0, height=0) for p in files]


class PairRenderer:
    """Renders pairs from a SegmentIndex; see the module docstring. Backgrounds default to the
    index's own images; pass ImageRecords or paths to use others (e.g. texture photos)."""

    def __init__(self, segments: SegmentIndex, backgrounds=None, *, size: int = 480, blend: str = DEFAULT_BLEND,
                 gradients: str = "normal", flow_stride: int = DEFAULT_FLOW_STRIDE, min_cells: float = MIN_MASK_CELLS,
                 p_two_object: float = 0.5, dilation: int | None = None, p_border_crop: float = 0.2,
                 scale_range=(0.7, 1.0), rotation_deg=(-15.0, 15.0), fit_ratio_min_one: float = 0.2,
                 fit_ratio_min_two: float = 0.5, max_fit_scale: float | None = None, p_tps: float = 0.5,
                 tps_points_per_side=(4, 6),
                 tps_jitter: float = 0.25, image_cache: int = 16):
        if blend not in BLEND_METHODS:
            raise ValueError(f"unknown blend {blend!r}; choose one of {', '.join(BLEND_METHODS)}")
        if gradients not in GRADIENTS:
            raise ValueError(f"unknown gradients {gradients!r}; choose one of {', '.join(GRADIENTS)}")
        if size % 16 or size % flow_stride:
            raise ValueError(f"size {size} must be a multiple of 16 and of flow_stride {flow_stride}")
        if max_fit_scale is not None and (isinstance(max_fit_scale, bool) or not isinstance(max_fit_scale, (int, float))
                                          or not max_fit_scale > 0):
            raise ValueError(f"max_fit_scale must be a number > 0 (or none: no cap), got {max_fit_scale!r}")
        if not len(segments):
            raise ValueError(f"{segments.source}: no usable segments (skipped: {dict(segments.skipped)})")
        self.segments = segments
        if backgrounds is None:
            backgrounds = [segments.images[i] for i in sorted(segments.images)]
        # A background file that is also an image of the index is that image (same id), so its
        # categories are known and it is never pasted onto itself.
        by_path = {rec.path.resolve(): rec for rec in segments.images.values()}
        self.backgrounds = []
        for b in backgrounds:
            rec = b if isinstance(b, ImageRecord) else ImageRecord(id=-1, file_name=Path(b).name, path=Path(b),
                                                                   width=0, height=0)
            self.backgrounds.append(by_path.get(Path(rec.path).resolve(), rec))
        if not self.backgrounds:
            raise ValueError("no background images")
        self.size = int(size)
        self.blend = blend
        self.gradients = gradients
        # Load (or, on a machine's first run, compile) the numba kernels now, so a worker's set-up holds
        # that cost instead of its first pair.
        load_tps_kernels()
        if blend == "multigrid":
            from .poisson import load_kernels

            load_kernels()
        self.flow_stride = int(flow_stride)
        self.min_cells = float(min_cells)
        self.dilation = int(dilation) if dilation is not None else dilation_px(self.size)
        self.geometry = GeometryConfig(scale_range=tuple(scale_range), rotation_deg=tuple(rotation_deg),
                                       fit_ratio_min_one=fit_ratio_min_one, fit_ratio_min_two=fit_ratio_min_two,
                                       max_fit_scale=max_fit_scale,
                                       p_border_crop=p_border_crop, p_tps=p_tps,
                                       tps_points_per_side=tuple(tps_points_per_side), tps_jitter=tps_jitter)
        # A single category means the source has none (unsupervised segments): any segment of
        # another image is a valid source.
        self.category_agnostic = len(segments.segment_categories) < 2
        if self.category_agnostic:
            # Unsupervised segments of one image often cover the same object (nested boxes): draw
            # only pairs whose boxes are apart, instead of drawing and skipping them as overlapping.
            self._apart = {i: _pairs_apart(segments.segments_of_image(i)) for i in segments.images_with_segments}
            self.two_object_images = [i for i, pairs in self._apart.items() if pairs]
        else:
            self.two_object_images = [i for i in segments.images_with_segments
                                      if len(segments.categories_in_image(i)) >= 2]
        self.p_two_object = float(p_two_object)
        if self.p_two_object > 0 and not self.two_object_images:
            log.warning("%s: no image has segments of two categories; making one-object pairs only", segments.source)
            self.p_two_object = 0.0
        self._cache: OrderedDict = OrderedDict()
        self._cache_size = int(image_cache)
        # CPU seconds (user + sys of this process) per stage of render_pair, summed over calls.
        self.stage_cpu: Counter = Counter()

    def _stage(self, name: str):
        return cpu_seconds(self.stage_cpu, name)

    # ------------------------------------------------------------------------------ helpers

    def _load(self, record: ImageRecord) -> np.ndarray:
        key = str(record.path)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        t = time.process_time()
        try:
            img = load_rgb(record.path)
        except BadImage as e:
            raise SkipPair("bad_image", str(e)) from e
        finally:
            # Decoding files is its own stage (it depends on the corpus, not on the output size):
            # moved out of "segments", the stage that calls it.
            spent = time.process_time() - t
            self.stage_cpu["decode"] += spent
            self.stage_cpu["segments"] -= spent
        if record.width and (img.shape[1], img.shape[0]) != (record.width, record.height):
            raise SkipPair("image_size_mismatch", f"{record.path}: file is {img.shape[1]}x{img.shape[0]}, "
                                                  f"annotations say {record.width}x{record.height}")
        self._cache[key] = img
        while len(self._cache) > self._cache_size or (
                len(self._cache) > 1 and sum(v.nbytes for v in self._cache.values()) > IMAGE_CACHE_BYTES):
            self._cache.popitem(last=False)
        return img

    def _background_categories(self, bg: ImageRecord) -> set[int]:
        rec = self.segments.images.get(bg.id)
        if rec is not None and rec.path == bg.path:
            return self.segments.categories_in_image(bg.id)
        return set()

    def _pick_one(self, rng: np.random.Generator, bg: ImageRecord, bg_cats: set[int]):
        segs = self.segments
        if self.category_agnostic:
            # Rejection sampling: exactly uniform over the segments of other images.
            for _ in range(100):
                seg = segs.segments[int(rng.integers(len(segs)))]
                if seg.image_id != bg.id:
                    return [seg]
            raise SkipPair("no_source_segment", "every segment drawn belongs to the background image")
        cats = [c for c in segs.segment_categories if c not in bg_cats]
        if not cats:
            raise SkipPair("no_absent_category", f"background {bg.file_name} holds every category")
        cat = cats[int(rng.integers(len(cats)))]
        members = segs.segments_of_category(cat)
        return [members[int(rng.integers(len(members)))]]

    def _pick_two(self, rng: np.random.Generator, bg: ImageRecord, bg_cats: set[int]):
        segs = self.segments
        for _ in range(TWO_OBJECT_TRIES):
            iid = self.two_object_images[int(rng.integers(len(self.two_object_images)))]
            if iid == bg.id:
                continue
            members = segs.segments_of_image(iid)
            if self.category_agnostic:
                apart = self._apart[iid]
                a, b = apart[int(rng.integers(len(apart)))]
                return [members[a], members[b]]
            cats = sorted(segs.categories_in_image(iid) - bg_cats)
            if len(cats) < 2:
                continue
            chosen = []
            for c in rng.choice(cats, 2, replace=False):
                inst = [s for s in members if s.category == int(c)]
                chosen.append(inst[int(rng.integers(len(inst)))])
            return chosen
        raise SkipPair("no_two_object_source", f"no source with two categories absent from {bg.file_name} "
                                               f"in {TWO_OBJECT_TRIES} draws")

    def _split_contexts(self, raws: list[np.ndarray]) -> list[np.ndarray]:
        if len(raws) == 1:
            return [self._dilate(raws[0])]
        a, b = raws
        overlap = int((a & b).sum())
        if overlap > MAX_SEGMENT_OVERLAP * min(a.sum(), b.sum()):
            raise SkipPair("overlapping_segments", f"segments overlap on {overlap} pixels")
        b = b & ~a
        # Each context pixel goes to the nearer segment, so the two pasted regions never overlap.
        # Distances only matter inside the dilations, which the box around both holds, and a
        # chamfer distance between two points of a box is measured inside it: same values.
        ra, ca = box_around(a, self.dilation)
        rb, cb = box_around(b, self.dilation)
        box = (slice(min(ra.start, rb.start), max(ra.stop, rb.stop)), slice(min(ca.start, cb.start), max(ca.stop, cb.stop)))
        da = cv2.distanceTransform((~a[box]).astype(np.uint8), cv2.DIST_L2, 5)
        db = cv2.distanceTransform((~b[box]).astype(np.uint8), cv2.DIST_L2, 5)
        ctx_a, ctx_b = self._dilate(a), self._dilate(b)
        ctx_a[box] &= da <= db
        ctx_b[box] &= db < da
        return [ctx_a, ctx_b]

    def _dilate(self, mask: np.ndarray) -> np.ndarray:
        """dilate() on the mask's box grown by the radius only: the same pixels, for a fraction of the work."""
        out = np.zeros_like(mask)
        box = box_around(mask, self.dilation)
        out[box] = dilate(mask[box], self.dilation)
        return out

    def _paste(self, img0: np.ndarray, img1: np.ndarray, paste: Paste, region: np.ndarray) -> np.ndarray:
        """img1 with image 0 warped by the paste and blended into ``region`` (bool [H, W]).

        Warping and blending run on the region's box plus one pixel (every blend reads src and dst
        only on the region and its 4-neighbours, and the image border stays the border), which
        gives the same pixels as on the whole image for a fraction of the work.
        """
        if not region.any():
            return img1
        box = box_around(region, 1)
        bwd = paste.maps["bwd"][box] - np.float32(0.5)  # cv2 maps address pixel centres at integers
        bwd[~np.isfinite(bwd)] = -1
        warped = cv2.remap(img0, bwd[..., 0], bwd[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
        out = img1.copy()
        out[box] = blend(self.blend, warped, img1[box], region[box], gradients=self.gradients)
        return out

    # ------------------------------------------------------------------------------ rendering

    def render_pair(self, rng: np.random.Generator, key: str, *, seed=None) -> Pair:
        """One pair for ``key`` from ``rng``; ``seed`` (whatever identifies rng's seed) goes into the json.

        Runs single-threaded in BLAS (one process per shard is the parallelism): numpy's thread
        pools slow the small solves down several times on a busy node.
        """
        with _THREADPOOLS.limit(limits=1):
            return self._render(rng, key, seed)

    def _render(self, rng: np.random.Generator, key: str, seed) -> Pair:
        size, g = self.size, self.flow_stride
        with self._stage("segments"):
            two = self.p_two_object > 0 and bool(rng.random() < self.p_two_object)
            bg = self.backgrounds[int(rng.integers(len(self.backgrounds)))]
            bg_cats = self._background_categories(bg)
            chosen = self._pick_two(rng, bg, bg_cats) if two else self._pick_one(rng, bg, bg_cats)
            src_rec = self.segments.images[chosen[0].image_id]
            crop_draw = float(rng.random())  # drawn for every pair so later draws do not shift

            original = self._load(src_rec)
            background = resize_rgb(self._load(bg), size, size)
            raw_full = [self.segments.decode_mask(s).astype(bool) for s in chosen]
            oh, ow = original.shape[:2]
            crop = None
            if not two and crop_draw < self.geometry.p_border_crop:
                crop = border_crop_box(chosen[0].bbox, ow, oh, size, self.dilation)
            x0, y0, x1, y1 = crop[1] if crop else (0, 0, ow, oh)
            img0 = resize_rgb(original[y0:y1, x0:x1], size, size)
            raws = [resize_mask(m[y0:y1, x0:x1], size, size) for m in raw_full]
            for s, m in zip(chosen, raws):
                if not m.any():
                    raise SkipPair("small_mask", f"segment {s.id} vanishes at {size}x{size}")
            contexts = self._split_contexts(raws)

        with self._stage("geometry"):
            cells = layout_cells(rng, size) if two else [(0.0, 0.0, float(size), float(size))]
            pastes, seg_meta = [], []
            for s, ctx, cell in zip(chosen, contexts, cells):
                affine, params, box = draw_affine(rng, ctx, cell, self.geometry, two)
                tps, tps_params = draw_tps(rng, box, self.geometry)
                reach = self.geometry.tps_jitter * max(box[2] - box[0], box[3] - box[1]) + 2 * g
                region = (box[0] - reach, box[1] - reach, box[2] + reach, box[3] + reach)
                # The source side is read only at the context's pixels and at flow cells inside it.
                rows, cols = np.flatnonzero(ctx.any(1)), np.flatnonzero(ctx.any(0))
                source_region = (cols[0] - 2 * g, rows[0] - 2 * g, cols[-1] + 1 + 2 * g, rows[-1] + 1 + 2 * g)
                maps = dense_maps(PasteWarp(affine, tps), size, g, region=region, source_region=source_region)
                pastes.append(Paste(context0=ctx, maps=maps))
                seg_meta.append({"id": s.id, "category": s.category, "area": s.area, "score": s.score,
                                 "dilation_px": self.dilation, **params,
                                 "affine": [list(r) for r in affine[:2]], "tps": tps_params})

        with self._stage("ground_truth"):
            owner1 = ownership(pastes, (size, size))
        with self._stage("blend"):
            img1 = background
            for k, p in enumerate(pastes):
                img1 = self._paste(img0, img1, p, owner1 == k)
        with self._stage("ground_truth"):
            mask0, mask1, flow01, flow10, counts = ground_truth(pastes, owner1, flow_stride=g,
                                                                min_cells=self.min_cells)
        for m, c in zip(seg_meta, counts):
            m.update(c)

        meta = {
            "format_version": FORMAT_VERSION, "renderer_version": RENDERER_VERSION, "key": key, "size": [size, size], "flow_stride": g, "seed": seed,
            "kind": "two-object" if two else "one-object",
            "source": {"file_name": src_rec.file_name, "id": src_rec.id, "original_size": [oh, ow],
                       "border_crop": {"side": crop[0], "box": list(crop[1])} if crop else None},
            "background": {"file_name": bg.file_name, "id": bg.id if bg.id >= 0 else None},
            "segments": seg_meta,
            "blend": {"method": self.blend, "gradients": self.gradients},
            "style": None,
        }
        return Pair(key=key, img0=img0, img1=img1, mask0=mask0, mask1=mask1, flow01=flow01.astype(np.float16),
                    flow10=flow10.astype(np.float16), meta=_jsonable(meta))


# Keys of the renderer section of a config, with their defaults (PairRenderer's keywords), plus the
# segment-source keys build_renderer reads itself.
RENDER_DEFAULTS = {
    "size": 480, "blend": DEFAULT_BLEND, "gradients": "normal", "flow_stride": DEFAULT_FLOW_STRIDE,
    "min_cells": MIN_MASK_CELLS, "p_two_object": 0.5, "dilation": None, "p_border_crop": 0.2,
    "scale_range": (0.7, 1.0), "rotation_deg": (-15.0, 15.0), "fit_ratio_min_one": 0.2, "fit_ratio_min_two": 0.5,
    "max_fit_scale": None, "p_tps": 0.5, "tps_points_per_side": (4, 6), "tps_jitter": 0.25, "image_cache": 16,
}
SOURCE_KEYS = ("coco_annotations", "images", "backgrounds", "min_area", "min_side", "categories", "min_score")


def build_renderer(cfg: dict, segments: SegmentIndex | None = None) -> PairRenderer:
    """PairRenderer from a config dict: RENDER_DEFAULTS keys plus the segment source.

    ``coco_annotations`` (json path) and ``images`` (folder) load a SegmentIndex with the filters
    ``min_area``/``min_side``/``categories``/``min_score``, unless ``segments`` is given (then those keys
    must be absent). ``backgrounds``: a folder or a list of image files (default: the index's images).
    Unknown keys are errors.
    """
    unknown = sorted(set(cfg) - set(RENDER_DEFAULTS) - set(SOURCE_KEYS))
    if unknown:
        raise ValueError(f"unknown renderer config key(s) {unknown}; known: {sorted(RENDER_DEFAULTS) + list(SOURCE_KEYS)}")
    filters = {k: cfg[k] for k in ("min_area", "min_side", "categories", "min_score") if cfg.get(k) is not None}
    if segments is None:
        if not cfg.get("coco_annotations"):
            raise ValueError("renderer config needs coco_annotations (a COCO instances json) or a SegmentIndex")
        segments = SegmentIndex.from_coco(cfg["coco_annotations"], cfg.get("images"), **filters)
    elif cfg.get("coco_annotations") or filters:
        raise ValueError("give either a SegmentIndex or coco_annotations/filters in the config, not both")
    backgrounds = cfg.get("backgrounds")
    if isinstance(backgrounds, (str, Path)):
        backgrounds = list_images(backgrounds)
    opts = {k: cfg.get(k, v) for k, v in RENDER_DEFAULTS.items()}
    return PairRenderer(segments, backgrounds, **opts)
