"""Backbone features computed once: training on CPU without running the frozen backbone every step.

The backbone is frozen, so the features of a stored image never change. ``segswap-train --cache-features
DIR`` computes them once for every image of the training shards (plain and stylised) at the training
size, and the trainer then streams features instead of images. On CPU the backbone is most of a step
(VGG16 at 480 px: about 0.8 CPU-s per image against a few ms for the ``tiny`` head), so this is what
makes training fit a CPU; ``benchmarks/bench_feature_cache.py`` measures it.

Layout of ``DIR`` (written under temporary names, then renamed, so a crash leaves no half cache):

``features.npy``   float16 [M, C, g, g], one row per stored image (g = image_size / 16), L2-normalised
``cache.json``     ``{"format": "segswap-feature-cache", "version": 1, "backbone", "backbone_weights",
                   "channels", "image_size", "grid", "shards": [{"url", "size"}], "rows": {key: [img0,
                   img1, sty0, sty1]}}`` (row numbers; -1 where a pair has no stylised rendering)

A cache is reused only when its backbone, weights, image size and shard list (path and size) all
match the run's; otherwise the trainer stops and names what differs.

Augmentations are the pixel path's (``train/augment.py``) with the same random draws in the same order,
applied on the feature grid:

- style: the cached plain or stylised row, with ``p_style``;
- thin-plate spline on image 1 with ``p_tps``: the feature map is resampled bilinearly at the spline's
  source position of every cell centre (``grid_sample``, reflection padding as the pixel path's
  ``BORDER_REFLECT``) and re-normalised. The ground truth (mask1 warped at full resolution, flow10
  re-sampled, flow01 through the exact inverse) is computed exactly as in the pixel path, by the same
  code. What differs: the pixel path computes features *of the warped image*; here the features are
  *warped*. A CNN is not equivariant to local rotation and scaling, so the two differ; the benchmark
  prints the cosine between them;
- swap and background padding of image 1: unchanged (they act on cells already).
"""
from __future__ import annotations

import json
import logging
import os

import numpy as np
import torch
import torch.nn.functional as F

from segswap.core.atomic import atomic_save, atomic_write_json
from segswap.shards.format import Pair
from segswap.shards.reader import iter_pairs, shard_urls
from segswap.train.augment import PairAugmenter, resize_square
from segswap.train.groundtruth import cell_centres

log = logging.getLogger(__name__)

CACHE_FORMAT = "segswap-feature-cache"
CACHE_VERSION = 1
FEATURES, META = "features.npy", "cache.json"
VIEWS = ("img0", "img1", "sty0", "sty1")


class FeatureCacheError(ValueError):
    """A cache that does not fit the run; the message names the folder and what differs."""


def _shard_list(urls) -> list[dict]:
    out = []
    for u in shard_urls(urls):
        if u.startswith("pipe:") or "://" in u:
            raise FeatureCacheError(f"{u}: the feature cache needs local shards (it records their sizes)")
        out.append({"url": os.path.abspath(u), "size": os.path.getsize(u)})
    return out


def cache_identity(urls, backbone: str, backbone_weights, image_size: int) -> dict:
    """What a cache must agree on with the run that uses it."""
    return {"backbone": backbone, "backbone_weights": os.path.abspath(backbone_weights) if backbone_weights else None,
            "image_size": int(image_size), "shards": _shard_list(urls)}


def check_cache(folder: str, identity: dict) -> dict:
    """The cache's metadata when it matches ``identity``; FeatureCacheError naming the difference."""
    with open(os.path.join(folder, META)) as f:
        meta = json.load(f)
    if meta.get("format") != CACHE_FORMAT or meta.get("version") != CACHE_VERSION:
        raise FeatureCacheError(f"{folder}: not a version-{CACHE_VERSION} segswap feature cache")
    for k, v in identity.items():
        if meta.get(k) != v:
            what = "shard list or shard sizes" if k == "shards" else k
            raise FeatureCacheError(f"{folder}: cache was built with another {what} ({meta.get(k)!r:.120} vs "
                                    f"{v!r:.120}); use another --cache-features folder or delete this one")
    return meta


@torch.no_grad()
def build_cache(folder: str, urls, model, image_size: int, backbone: str, backbone_weights, device="cpu",
                batch_size: int = 8) -> dict:
    """Compute the features of every image of ``urls`` with ``model.features`` into ``folder``; returns
    the metadata. Reuses a matching cache; raises FeatureCacheError for a mismatching one."""
    identity = cache_identity(urls, backbone, backbone_weights, image_size)
    if os.path.isfile(os.path.join(folder, META)):
        meta = check_cache(folder, identity)
        log.info("feature cache %s: reusing %d images of %d pairs", folder, meta["n_rows"], len(meta["rows"]))
        return meta
    os.makedirs(folder, exist_ok=True)
    pairs = list(iter_pairs([s["url"] for s in identity["shards"]]))  # decoded lazily below; keys first
    rows, n = {}, 0
    for p in pairs:
        r = [n, n + 1]
        n += 2
        if p.sty0 is not None:
            r += [n, n + 1]
            n += 2
        else:
            r += [-1, -1]
        rows[p.key] = r
    if len(rows) != len(pairs):
        raise FeatureCacheError(f"{folder}: the shards repeat pair keys; the cache indexes pairs by key")
    grid = image_size // 16
    channels = int(model.backbone.channels)
    images = [resize_square(getattr(p, v), image_size) for p in pairs for v in VIEWS if getattr(p, v) is not None]
    log.info("feature cache %s: computing %s features of %d images (%d pairs) at %d px", folder, backbone,
             len(images), len(pairs), image_size)

    def write_features(tmp: str) -> None:
        store = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(n, channels, grid, grid))
        next_report = n // 10
        for i in range(0, n, batch_size):
            batch = torch.from_numpy(np.stack(images[i:i + batch_size])).to(device)
            store[i:i + len(batch)] = model.features(batch).float().cpu().numpy().astype(np.float16)
            if i + len(batch) >= next_report and i + len(batch) < n:  # a line per tenth: this can take minutes
                log.info("feature cache: %d / %d images", i + len(batch), n)
                next_report += max(1, n // 10)
        store.flush()
        del store

    # Features first, the metadata last: a folder with cache.json always holds its features.
    atomic_save(os.path.join(folder, FEATURES), write_features)
    meta = {"format": CACHE_FORMAT, "version": CACHE_VERSION, **identity, "channels": channels, "grid": grid,
            "n_rows": n, "rows": rows}
    atomic_write_json(os.path.join(folder, META), meta, indent=None)
    return meta


def warp_feature_grid(feat: np.ndarray, source_xy: np.ndarray) -> np.ndarray:
    """Resample a [C, g, g] feature map at normalised source positions [g, g, 2] (x, y in [0, 1]),
    bilinearly with reflection at the borders, and re-normalise each cell to unit length."""
    grid = torch.from_numpy(2.0 * source_xy - 1.0).float()[None]  # grid_sample: -1 / 1 = the outer edges
    out = F.grid_sample(torch.from_numpy(feat).float()[None], grid, mode="bilinear", padding_mode="reflection",
                        align_corners=False)[0]
    return F.normalize(out, dim=0).numpy()


class CachedFeatureAugmenter(PairAugmenter):
    """PairAugmenter on cached features: items carry ``feat0``/``feat1`` [C, g, g] instead of images.

    The random draws are the pixel path's, in the same order, so a seeded run makes the same choices.
    ShardStream calls ``choose_fields`` and then ``__call__`` for one sample at a time in one process;
    the view chosen in the first is handed to the second through ``self._chosen`` (checked by key).
    """

    def __init__(self, folder: str, meta: dict, **kwargs):
        super().__init__(image_size=meta["image_size"], **kwargs)
        self.folder, self.rows = folder, meta["rows"]
        self._features = None  # opened lazily, once per DataLoader worker (a memmap does not pickle well)
        self._chosen = None

    def features(self) -> np.ndarray:
        if self._features is None:
            self._features = np.load(os.path.join(self.folder, FEATURES), mmap_mode="r", allow_pickle=False)
        return self._features

    def choose_fields(self, raw: dict, rng: np.random.Generator) -> dict:
        key = raw.get("__key__", "?")
        key = key.rsplit("/", 1)[-1] if isinstance(key, str) else key
        views = []
        for i in ("0", "1"):
            styled = raw.get(f"sty{i}.jpg") is not None and rng.random() < self.p_style
            views.append(int(i) + 2 if styled else int(i))
        self._chosen = (key, views)
        return {k: v for k, v in raw.items() if not k.startswith("sty")}

    def __call__(self, pair: Pair, rng: np.random.Generator) -> dict:
        key, views = self._chosen
        if key != pair.key:
            raise RuntimeError(f"feature cache: view chosen for {key}, called for {pair.key}")
        row = self.rows.get(pair.key)
        if row is None:
            raise KeyError(f"pair {pair.key} is not in the feature cache {self.folder}")
        store = self.features()
        feat0, feat1 = (np.asarray(store[row[v]], dtype=np.float32) for v in views)
        return self.augment(pair, feat0, feat1, rng, "feat", warp_features)


def warp_features(feat: np.ndarray, tps, _map1, _map2) -> np.ndarray:
    """TPS on image 1's cached features: each warped cell reads the features where the spline sends its centre."""
    g = feat.shape[-1]
    return warp_feature_grid(feat, tps(cell_centres(g, g)).astype(np.float32))
