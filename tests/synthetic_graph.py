"""Synthetic pair predictions with planted repeated patterns, for the discovery tests and benchmark.

Images come in groups; every image of group g contains group g's pattern (a ``pattern`` x ``pattern``
block of cells) at a random place. Every pair of images of a group gets "perfect" predictions: mask
~0.95 on both copies of the pattern, and flows mapping each pattern cell to the same cell of the other
copy (the centre of that cell, plus a little noise). Background cells get low mask values and random
flows, except ``noise_cells`` random background cells per pair that get a confident mask and a random
flow (false correspondences). Optionally ``cross_pairs`` random pairs between groups carry only such
noise. The planted cluster of a vertex is its group (or -1 for a noise vertex).
"""
from __future__ import annotations

import numpy as np

from segswap.apps.graph import PairPredictions


def make_planted(n_groups: int, group_size: int, *, grid: tuple[int, int] = (16, 16), pattern: int = 3,
                 noise_cells: int = 1, cross_pairs: int = 0, flow_noise: float = 0.1, seed: int = 0,
                 dtype=np.float16) -> tuple[PairPredictions, np.ndarray, np.ndarray]:
    """Returns (predictions, image group [n_images], pattern offset per image [n_images, 2] (row, col))."""
    rng = np.random.default_rng(seed)
    h, w = grid
    n_img = n_groups * group_size
    group = np.repeat(np.arange(n_groups), group_size)
    offset = np.column_stack([rng.integers(0, h - pattern + 1, n_img), rng.integers(0, w - pattern + 1, n_img)])
    iu, ju = np.triu_indices(group_size, 1)
    base = (np.arange(n_groups) * group_size)[:, None]
    pairs = np.column_stack([(base + iu).ravel(), (base + ju).ravel()])
    if cross_pairs:
        a = rng.integers(0, n_img, cross_pairs * 3)
        b = rng.integers(0, n_img, cross_pairs * 3)
        ok = group[a] != group[b]
        extra = np.unique(np.sort(np.column_stack([a[ok], b[ok]]), axis=1), axis=0)[:cross_pairs]
        pairs = np.concatenate([pairs, extra])
    p = len(pairs)
    # Background: low masks, random flows.
    mask0 = (rng.random((p, h, w), dtype=np.float32) * 0.3).astype(dtype)
    mask1 = (rng.random((p, h, w), dtype=np.float32) * 0.3).astype(dtype)
    flow01 = rng.random((p, h, w, 2), dtype=np.float32).astype(dtype)
    flow10 = rng.random((p, h, w, 2), dtype=np.float32).astype(dtype)
    # False correspondences: a few confident background cells.
    for m in (mask0, mask1):
        for _ in range(noise_cells):
            m[np.arange(p), rng.integers(0, h, p), rng.integers(0, w, p)] = 0.9
    # Planted pattern for same-group pairs.
    same = group[pairs[:, 0]] == group[pairs[:, 1]]
    k = np.flatnonzero(same)
    dr, dc = np.meshgrid(np.arange(pattern), np.arange(pattern), indexing="ij")
    dr, dc = dr.ravel(), dc.ravel()
    for src, dst, mask, flow in ((0, 1, mask0, flow01), (1, 0, mask1, flow10)):
        oa = offset[pairs[k, src]]
        ob = offset[pairs[k, dst]]
        rows = oa[:, 0:1] + dr
        cols = oa[:, 1:2] + dc
        kk = np.repeat(k, len(dr))
        mask[kk, rows.ravel(), cols.ravel()] = 0.95
        tx = (ob[:, 1:2] + dc + 0.5 + flow_noise * rng.standard_normal((len(k), len(dr)))) / w
        ty = (ob[:, 0:1] + dr + 0.5 + flow_noise * rng.standard_normal((len(k), len(dr)))) / h
        flow[kk, rows.ravel(), cols.ravel(), 0] = np.clip(tx, 0, 1).ravel()
        flow[kk, rows.ravel(), cols.ravel(), 1] = np.clip(ty, 0, 1).ravel()
    return PairPredictions(pairs, mask0, mask1, flow01, flow10), group, offset


def vertex_truth(verts, group: np.ndarray, offset: np.ndarray, pattern: int) -> np.ndarray:
    """Planted cluster of each vertex: its group when its source cell lies in the pattern, else -1."""
    s = verts.img[:, 0]
    col = np.floor(verts.pos[:, 0]).astype(int) - offset[s, 1]
    row = np.floor(verts.pos[:, 1]).astype(int) - offset[s, 0]
    inside = (row >= 0) & (row < pattern) & (col >= 0) & (col < pattern)
    same = group[verts.img[:, 0]] == group[verts.img[:, 1]]
    return np.where(inside & same, group[s], -1)
