"""Backbone features computed once per (image file, evaluation size), kept in memory and optionally on disk.

Ranking a query against N images runs the co-segmentation head N times but the backbone only once per
image: every image's L2-normalised conv4 features come from this cache. The in-memory table holds
float16 copies (half the memory; cosine similarities change by < 1e-3) and can be bounded
(``max_items``, least recently used first out). The optional disk cache stores one ``.npy`` per entry,
named by a hash of the absolute path, file size, modification time, evaluation size and a model tag
(so features of another checkpoint or of an edited file are never reused). Files are written to a
temporary name and renamed, and read back with ``allow_pickle=False``.
"""
from __future__ import annotations

import hashlib
import logging
import os
from collections import OrderedDict

import numpy as np
import torch

from segswap.apps.images import read_rgb, resize_rgb
from segswap.core.atomic import atomic_open

log = logging.getLogger(__name__)


class FeatureCache:
    """L2-normalised conv4 features of image files, computed in batches by ``model.features``.

    model:      anything with ``features(img [B,3,H,W] ImageNet-normalised) -> [B,C,h,w]`` (L2-normalised)
    device:     where the backbone runs
    cache_dir:  optional folder for the on-disk cache
    batch_size: images per backbone call
    max_items:  bound on the in-memory table (None: unbounded)
    tag:        identifies the model weights in disk-cache keys (e.g. the checkpoint path and mtime)
    """

    def __init__(self, model, *, device: str | torch.device = "cpu", cache_dir: str | None = None,
                 batch_size: int = 8, max_items: int | None = None, tag: str = ""):
        self.model = model
        self.device = torch.device(device)
        self.cache_dir = cache_dir
        self.batch_size = batch_size
        self.max_items = max_items
        self.tag = tag
        self._mem: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.stats = {"computed": 0, "memory_hits": 0, "disk_hits": 0}
        if cache_dir:
            os.makedirs(cache_dir, exist_ok=True)

    def key(self, path: str, size: tuple[int, int]) -> str:
        st = os.stat(path)
        ident = f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{size[0]}x{size[1]}|{self.tag}"
        # surrogateescape: file names need not be UTF-8 (os.fsencode's convention, same key for UTF-8 ones)
        return hashlib.sha1(ident.encode("utf-8", "surrogateescape")).hexdigest()

    @torch.no_grad()
    def compute(self, images: list[np.ndarray]) -> torch.Tensor:
        """Features of uint8 RGB images (all the same size) -> float32 [N, C, h, w] on the device."""
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = torch.from_numpy(np.stack(images[start:start + self.batch_size]))
            out.append(self.model.features(batch.to(self.device)).float())  # normalised the backbone's way
        self.stats["computed"] += len(images)
        return torch.cat(out)

    def _remember(self, key: str, feat: torch.Tensor) -> None:
        self._mem[key] = feat.to(torch.float16).cpu()
        self._mem.move_to_end(key)
        if self.max_items is not None:
            while len(self._mem) > self.max_items:
                self._mem.popitem(last=False)

    def _disk_path(self, key: str) -> str:
        return os.path.join(self.cache_dir, key[:2], key + ".npy")

    def _load_disk(self, key: str) -> torch.Tensor | None:
        if not self.cache_dir:
            return None
        p = self._disk_path(key)
        if not os.path.exists(p):
            return None
        try:
            return torch.from_numpy(np.load(p, allow_pickle=False))
        except (ValueError, OSError) as e:  # a truncated file from a killed job: recompute it
            log.warning("feature cache %s unreadable (%s); recomputing", p, e)
            return None

    def _save_disk(self, key: str, feat: torch.Tensor) -> None:
        if not self.cache_dir:
            return
        p = self._disk_path(key)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with atomic_open(p, "wb") as f:
            np.save(f, feat.to(torch.float16).cpu().numpy(), allow_pickle=False)

    def get_many(self, paths: list[str], size: tuple[int, int]) -> torch.Tensor:
        """Features of the images at ``paths`` resized to ``size`` = (W, H) -> float32 [N, C, h, w]."""
        keys = [self.key(p, size) for p in paths]
        found: dict[int, torch.Tensor] = {}
        missing = []
        for i, k in enumerate(keys):
            if k in self._mem:
                self._mem.move_to_end(k)
                found[i] = self._mem[k]
                self.stats["memory_hits"] += 1
                continue
            feat = self._load_disk(k)
            if feat is not None:
                self.stats["disk_hits"] += 1
                self._remember(k, feat)
                found[i] = feat
            else:
                missing.append(i)
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start:start + self.batch_size]
            feats = self.compute([resize_rgb(read_rgb(paths[i]), size) for i in chunk])
            for i, f in zip(chunk, feats):
                self._remember(keys[i], f)
                self._save_disk(keys[i], f)
                found[i] = f
        return torch.stack([found[i].to(self.device, torch.float32) for i in range(len(paths))])

    def get(self, path: str, size: tuple[int, int]) -> torch.Tensor:
        return self.get_many([path], size)[0]

    def compute_path(self, path: str, size: tuple[int, int]) -> torch.Tensor:
        """Features of one image that will not be asked for again (a query): computed, not stored."""
        return self.compute([resize_rgb(read_rgb(path), size)])[0]
