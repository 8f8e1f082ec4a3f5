"""Model predictions over an image collection, cached on disk so a long job resumes where it stopped.

Used by discovery and co-segmentation. The work folder holds:

- ``collection.json``: the image list, evaluation size and model tag; a resumed job must match it;
- ``scores/NNNNNN.npz``: row i of the Eq. 3 scores (image i as query, whole image as region):
  ``idx`` (targets scored) and ``score``;
- ``pairs/AAAAAA_BBBBBB.npz``: head outputs for the unordered pair (a < b): ``mask0 mask1 flow01
  flow10`` as float16 (npz of plain arrays, read back with ``allow_pickle=False``).

Every file is written to a temporary name and renamed, so a killed job leaves no half file behind.
"""
from __future__ import annotations

import json
import logging
import os
import time

import numpy as np
import torch

from segswap.apps.features_cache import FeatureCache
from segswap.apps.graph import PairPredictions
from segswap.apps.images import BadImage
from segswap.apps.pairs import HEAD_KEYS, run_head, score_query
from segswap.core.atomic import atomic_open, atomic_write_json

log = logging.getLogger(__name__)


def _atomic_save_npz(path: str, **arrays) -> None:
    with atomic_open(path, "wb") as f:
        np.savez(f, **arrays)


class Collection:
    """Features, score rows and pair predictions of the images ``paths`` at ``size`` = (W, H)."""

    def __init__(self, model, paths: list[str], size: tuple[int, int], workdir: str, cache: FeatureCache, *,
                 batch_size: int = 16, chunk: int = 64, log_every: float = 30.0):
        self.model, self.paths, self.size = model, list(paths), tuple(size)
        self.workdir, self.cache, self.batch_size, self.chunk = workdir, cache, batch_size, chunk
        self.log_every = log_every
        os.makedirs(os.path.join(workdir, "scores"), exist_ok=True)
        os.makedirs(os.path.join(workdir, "pairs"), exist_ok=True)
        meta = {"images": [os.path.abspath(p) for p in self.paths], "size": list(self.size), "model": cache.tag}
        meta_path = os.path.join(workdir, "collection.json")
        if os.path.exists(meta_path):
            with open(meta_path) as f:
                old = json.load(f)
            if old != meta:
                raise ValueError(f"{meta_path}: this work folder belongs to another image list, size or model; "
                                 "use a new --workdir (or delete the old one)")
        else:
            atomic_write_json(meta_path, meta, indent=None)

    def feats(self, idx) -> torch.Tensor:
        return self.cache.get_many([self.paths[i] for i in idx], self.size)

    def _global_descriptors(self) -> torch.Tensor:
        out = []
        for s in range(0, len(self.paths), self.chunk):
            f = self.feats(range(s, min(s + self.chunk, len(self.paths))))
            out.append(torch.nn.functional.normalize(f.mean((2, 3)), dim=1).cpu())
        return torch.cat(out)

    def score_rows(self, candidates: int = 0):
        """Yield (i, target indices, Eq. 3 scores) for every image i as query (whole image as region).

        With ``candidates`` > 0 each image is scored only against its nearest images by mean-pooled
        feature cosine. Rows are cached as ``scores/NNNNNN.npz`` (``idx`` int32, ``score`` float32), so
        memory and disk grow with N x candidates, not N^2, and a restarted job skips finished rows.
        """
        n = len(self.paths)
        cand = None
        if 0 < candidates < n - 1:
            g = self._global_descriptors()
            cand = np.empty((n, candidates), np.int64)
            for s in range(0, n, 4096):  # blockwise: never an N x N similarity matrix
                sim = g[s:s + 4096] @ g.T
                sim[torch.arange(sim.shape[0]), torch.arange(s, s + sim.shape[0])] = -2
                cand[s:s + 4096] = torch.topk(sim, candidates, dim=1).indices.numpy()
        last = time.time()
        for i in range(n):
            p = os.path.join(self.workdir, "scores", f"{i:06d}.npz")
            if os.path.exists(p):
                try:
                    with np.load(p, allow_pickle=False) as z:
                        yield i, z["idx"].astype(np.int64), z["score"]
                    continue
                except (ValueError, OSError, KeyError):
                    log.warning("%s unreadable; recomputing", p)
            targets = np.array([j for j in (range(n) if cand is None else cand[i]) if j != i], np.int64)
            q = self.feats([i])[0]
            row = []
            for s in range(0, len(targets), self.chunk):
                t = targets[s:s + self.chunk]
                sc, _ = score_query(self.model, q, torch.ones(q.shape[1:], device=q.device), self.feats(t),
                                    self.batch_size)
                row.append(sc.cpu().numpy().astype(np.float32))
            row = np.concatenate(row) if row else np.zeros(0, np.float32)
            _atomic_save_npz(p, idx=targets.astype(np.int32), score=row)
            yield i, targets, row
            if time.time() - last > self.log_every:
                log.info("scored %d / %d images", i + 1, n)
                last = time.time()

    def neighbour_pairs(self, k: int, candidates: int = 0) -> np.ndarray:
        """Unordered pairs (i, j), j among the ``k`` best-scored images of i."""
        out = []
        for i, idx, score in self.score_rows(candidates):
            best = idx[np.argsort(-score, kind="stable")[:k]]
            out.append(np.column_stack([np.full(len(best), i), best]))
        if not out:
            return np.zeros((0, 2), np.int64)
        return np.unique(np.sort(np.concatenate(out), axis=1), axis=0)

    def pair_predictions(self, pairs: np.ndarray) -> PairPredictions:
        """Head outputs for the unordered ``pairs`` [P, 2], computed for those not cached yet."""
        pairs = np.unique(np.sort(np.asarray(pairs, np.int64).reshape(-1, 2), axis=1), axis=0)
        files = [os.path.join(self.workdir, "pairs", f"{a:06d}_{b:06d}.npz") for a, b in pairs]
        todo = [k for k, f in enumerate(files) if not os.path.exists(f)]
        last = time.time()
        for s in range(0, len(todo), self.chunk):
            ks = todo[s:s + self.chunk]
            out = run_head(self.model, self.feats(pairs[ks, 0]), self.feats(pairs[ks, 1]), self.batch_size)
            for j, k in enumerate(ks):
                _atomic_save_npz(files[k], **{key: out[key][j].cpu().numpy().astype(np.float16) for key in HEAD_KEYS})
            if time.time() - last > self.log_every:
                log.info("pair predictions %d / %d", s + len(ks), len(todo))
                last = time.time()
        arrays = {key: [] for key in HEAD_KEYS}
        for f in files:
            with np.load(f, allow_pickle=False) as z:
                for key in HEAD_KEYS:
                    arrays[key].append(z[key])
        if not files:
            h, w = self.size[1] // 16, self.size[0] // 16
            return PairPredictions(np.zeros((0, 2), np.int64), np.zeros((0, h, w)), np.zeros((0, h, w)),
                                   np.zeros((0, h, w, 2)), np.zeros((0, h, w, 2)))
        return PairPredictions(pairs, *(np.stack(arrays[key]) for key in HEAD_KEYS))


def usable_images(cache: FeatureCache, paths: list[str], size: tuple[int, int], chunk: int = 64):
    """Compute (and cache) every image's features; returns (usable paths, messages of the unusable ones).

    A batch job over a user's collection must not die on one corrupt file: a failing chunk is retried
    image by image and the bad files are reported and left out.
    """
    good, bad = [], []
    for s in range(0, len(paths), chunk):
        part = paths[s:s + chunk]
        try:
            cache.get_many(part, size)
            good.extend(part)
            continue
        except BadImage:
            pass
        for p in part:
            try:
                cache.get_many([p], size)
                good.append(p)
            except BadImage as e:
                bad.append(str(e))
    return good, bad


def top_pairs(scores: np.ndarray, k: int) -> np.ndarray:
    """Unordered pairs (i, j) where j is among i's ``k`` best-scored images in a dense [N, N] score
    matrix (NaN scores never chosen); ``Collection.neighbour_pairs`` is the streaming equivalent."""
    s = np.where(np.isnan(scores), -np.inf, scores).astype(np.float64)
    np.fill_diagonal(s, -np.inf)
    k = min(k, s.shape[1] - 1)
    nbr = np.argsort(-s, axis=1, kind="stable")[:, :k]
    i = np.repeat(np.arange(len(s)), k)
    j = nbr.ravel()
    ok = np.isfinite(s[i, j])
    return np.unique(np.sort(np.column_stack([i[ok], j[ok]]), axis=1), axis=0)


def closing_pairs(pairs: np.ndarray) -> np.ndarray:
    """The third pairs Eq. 4 needs: for every image, all pairs among the images it is paired with."""
    pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
    ends = np.concatenate([pairs, pairs[:, ::-1]])
    ends = ends[np.lexsort((ends[:, 1], ends[:, 0]))]
    out = []
    start = 0
    while start < len(ends):
        stop = start + int(np.searchsorted(ends[start:, 0], ends[start, 0], side="right"))
        nb = ends[start:stop, 1]
        if len(nb) > 1:
            a, b = np.triu_indices(len(nb), 1)
            out.append(np.column_stack([nb[a], nb[b]]))
        start = stop
    if not out:
        return np.zeros((0, 2), np.int64)
    allp = np.sort(np.concatenate(out), axis=1)
    return np.unique(allp, axis=0)
