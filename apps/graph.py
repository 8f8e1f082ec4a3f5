"""The correspondence graph of the paper's discovery (§5.1, Eq. 4), built vectorised for millions of nodes.

Vertices. For each image pair (a, b) kept for the graph, the model's correspondences whose mask value
exceeds ``threshold`` become vertices ``v = (s, t, x^s, x^t, m)``. Like the official code, one direction
is used per pair: the one with more confident cells (so a region is not entered twice). Positions are in
*cell units* of the feature grid (cell (i, j) has centre (j + 0.5, i + 0.5)); x^s is the cell centre and
x^t the predicted match ``flow * (w, h)``.

Edges. Two vertices are connected only when their pairs share exactly one image c (the *hub*). With
x_u, x_v their positions in c and o_u != o_v their other images, Eq. 4 reads

    eps_uv = 1/2 m_u m_v exp(-|x_u^c - x_v^c| / sigma)
             * ( exp(-|x_u^o - C^{o_v -> o_u}(x_v^o)| / sigma) + exp(-|x_v^o - C^{o_u -> o_v}(x_u^o)| / sigma) )

where C^{p -> q} is the predicted flow from image p to image q (the third pair, (o_u, o_v)), read at the
cell containing the point. Writing every edge in terms of (hub, other image) covers the paper's four
cases (s_i = s_j, s_i = t_j, t_i = s_j, t_i = t_j) with one code path. Edges whose third pair has no
prediction are skipped (counted), as in the official code; ``segswap-discover`` predicts those pairs.
Weights below ``min_weight`` (0.01 officially) are dropped so the adjacency stays sparse.

Vectorisation: vertex ends are sorted by (hub, other image); every pair of groups of one hub is a dense
block of candidate edges; blocks are enumerated with repeat/cumsum index arithmetic and evaluated in
chunks of at most ``chunk_entries`` candidate edges, so memory stays bounded at any graph size.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

log = logging.getLogger(__name__)


@dataclass
class PairPredictions:
    """Head outputs for P unordered image pairs, stacked (grids of size h x w for every image).

    pairs:  int64 [P, 2]    (a, b), a != b, each unordered pair at most once
    mask0:  [P, h, w]       repeated-region probability on image a
    mask1:  [P, h, w]       on image b
    flow01: [P, h, w, 2]    normalised (x, y) in b of each cell of a
    flow10: [P, h, w, 2]    normalised (x, y) in a of each cell of b
    """
    pairs: np.ndarray
    mask0: np.ndarray
    mask1: np.ndarray
    flow01: np.ndarray
    flow10: np.ndarray
    _keys: np.ndarray = field(init=False, repr=False)
    _order: np.ndarray = field(init=False, repr=False)

    def __post_init__(self):
        self.pairs = np.asarray(self.pairs, dtype=np.int64).reshape(-1, 2)
        p = len(self.pairs)
        for name in ("mask0", "mask1"):
            if getattr(self, name).shape[:1] != (p,) or getattr(self, name).ndim != 3:
                raise ValueError(f"{name} must be [P={p}, h, w], got {getattr(self, name).shape}")
        for name in ("flow01", "flow10"):
            if getattr(self, name).shape != self.mask0.shape + (2,):
                raise ValueError(f"{name} must be {self.mask0.shape + (2,)}, got {getattr(self, name).shape}")
        if np.any(self.pairs[:, 0] == self.pairs[:, 1]):
            raise ValueError("a pair must join two different images")
        keys = self._pack(self.pairs.min(1), self.pairs.max(1))
        self._order = np.argsort(keys, kind="stable")
        self._keys = keys[self._order]
        if np.any(self._keys[1:] == self._keys[:-1]):
            raise ValueError("an unordered image pair appears twice")

    @staticmethod
    def _pack(lo, hi):
        return np.asarray(lo, np.int64) * (1 << 31) + np.asarray(hi, np.int64)

    @property
    def grid(self) -> tuple[int, int]:
        return self.mask0.shape[1], self.mask0.shape[2]

    def lookup(self, a, b) -> np.ndarray:
        """Index of the pair {a, b} for each (a, b), or -1 when it has no prediction."""
        a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
        k = self._pack(np.minimum(a, b), np.maximum(a, b))
        pos = np.searchsorted(self._keys, k)
        pos_c = np.minimum(pos, len(self._keys) - 1)
        found = (pos < len(self._keys)) & (self._keys[pos_c] == k) if len(self._keys) else np.zeros(k.shape, bool)
        return np.where(found, self._order[pos_c] if len(self._keys) else -1, -1)

    def flow_at(self, p: np.ndarray, src: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """Matches, in cell units of the other image, of points ``pos`` [n, 2] (cell units) of image ``src``
        under the flow of pair ``p`` (direction chosen by whether ``src`` is the pair's a or b)."""
        h, w = self.grid
        col = np.clip(np.floor(pos[:, 0]).astype(np.int64), 0, w - 1)
        row = np.clip(np.floor(pos[:, 1]).astype(np.int64), 0, h - 1)
        from_a = self.pairs[p, 0] == src
        out = np.empty((len(p), 2), np.float32)
        if from_a.any():
            out[from_a] = self.flow01[p[from_a], row[from_a], col[from_a]]
        if (~from_a).any():
            out[~from_a] = self.flow10[p[~from_a], row[~from_a], col[~from_a]]
        out *= np.array([w, h], np.float32)
        return out


@dataclass
class Vertices:
    """Graph vertices: img [V, 2] (s, t); pos [V, 4] (x^s, y^s, x^t, y^t) in cell units; mask [V]; pair [V]."""
    img: np.ndarray
    pos: np.ndarray
    mask: np.ndarray
    pair: np.ndarray

    def __len__(self):
        return len(self.mask)


def extract_vertices(preds: PairPredictions, pair_ids, threshold: float) -> Vertices:
    """Vertices of the pairs ``pair_ids``: cells whose mask exceeds ``threshold``, from the direction of
    each pair that has more such cells."""
    pair_ids = np.asarray(pair_ids, np.int64)
    h, w = preds.grid
    m0 = preds.mask0[pair_ids] > threshold
    m1 = preds.mask1[pair_ids] > threshold
    use0 = m0.reshape(len(pair_ids), -1).sum(1) >= m1.reshape(len(pair_ids), -1).sum(1)
    parts = []
    for forward in (True, False):
        sel = pair_ids[use0 == forward]
        if len(sel) == 0:
            continue
        mask = (preds.mask0 if forward else preds.mask1)[sel]
        flow = (preds.flow01 if forward else preds.flow10)[sel]
        k, r, c = np.nonzero(mask > threshold)
        p = sel[k]
        s = preds.pairs[p, 0 if forward else 1]
        t = preds.pairs[p, 1 if forward else 0]
        xt = flow[k, r, c].astype(np.float32) * np.array([w, h], np.float32)
        pos = np.column_stack([c + 0.5, r + 0.5, xt[:, 0], xt[:, 1]]).astype(np.float32)
        parts.append((np.column_stack([s, t]), pos, mask[k, r, c].astype(np.float32), p))
    if not parts:
        return Vertices(np.zeros((0, 2), np.int64), np.zeros((0, 4), np.float32), np.zeros(0, np.float32),
                        np.zeros(0, np.int64))
    img, pos, mask, pair = (np.concatenate(x) for x in zip(*parts))
    order = np.argsort(pair, kind="stable")  # vertices of one pair contiguous, pairs in the given order
    return Vertices(img[order], pos[order], mask[order], pair[order])


def _cartesian_blocks(start1, len1, start2, len2):
    """All (i, j) with i in [start1, start1+len1), j in [start2, start2+len2), for many blocks at once."""
    sizes = len1 * len2
    total = int(sizes.sum())
    block = np.repeat(np.arange(len(sizes)), sizes)
    offset = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    l2 = len2[block]
    return block, start1[block] + offset // l2, start2[block] + offset % l2


def build_graph(verts: Vertices, preds: PairPredictions, *, sigma: float, min_weight: float = 0.01,
                chunk_entries: int = 20_000_000) -> tuple[sp.csr_matrix, dict]:
    """Symmetric sparse adjacency [V, V] (float32) with Eq. 4 weights, and counters."""
    n = len(verts)
    stats = {"vertices": n, "candidate_edges": 0, "edges": 0, "blocks": 0, "blocks_without_third_pair": 0}
    if n == 0:
        return sp.csr_matrix((0, 0), dtype=np.float32), stats
    # Two ends per vertex: (hub image, position there, other image, position there).
    vid = np.concatenate([np.arange(n), np.arange(n)])
    hub = np.concatenate([verts.img[:, 0], verts.img[:, 1]])
    other = np.concatenate([verts.img[:, 1], verts.img[:, 0]])
    hub_pos = np.concatenate([verts.pos[:, :2], verts.pos[:, 2:]])
    other_pos = np.concatenate([verts.pos[:, 2:], verts.pos[:, :2]])
    order = np.lexsort((other, hub))
    vid, hub, other, hub_pos, other_pos = vid[order], hub[order], other[order], hub_pos[order], other_pos[order]
    mask = verts.mask[vid]
    # Groups of ends with the same (hub, other).
    new_group = np.ones(len(vid), bool)
    new_group[1:] = (hub[1:] != hub[:-1]) | (other[1:] != other[:-1])
    g_start = np.flatnonzero(new_group)
    g_len = np.diff(np.append(g_start, len(vid)))
    g_hub, g_other = hub[g_start], other[g_start]
    # Pairs of groups of the same hub: group g with every later group of its hub.
    hub_end = np.empty(len(g_start), np.int64)  # index one past the last group of g's hub
    new_hub = np.ones(len(g_start), bool)
    new_hub[1:] = g_hub[1:] != g_hub[:-1]
    h_start = np.flatnonzero(new_hub)
    h_end = np.append(h_start[1:], len(g_start))
    hub_end[:] = np.repeat(h_end, np.diff(np.append(h_start, len(g_start))))
    n_later = hub_end - np.arange(len(g_start)) - 1
    g1 = np.repeat(np.arange(len(g_start)), n_later)
    g2 = g1 + 1 + (np.arange(len(g1)) - np.repeat(np.cumsum(n_later) - n_later, n_later))
    third = preds.lookup(g_other[g1], g_other[g2])
    stats["blocks"] = int(len(g1))
    stats["blocks_without_third_pair"] = int((third < 0).sum())
    keep = third >= 0
    g1, g2, third = g1[keep], g2[keep], third[keep]
    sizes = g_len[g1] * g_len[g2]
    stats["candidate_edges"] = int(sizes.sum())
    rows, cols, vals = [], [], []
    # Chunk the blocks so each chunk has at most chunk_entries candidate edges (a block is never split).
    cum = np.cumsum(sizes)
    lo = 0
    while lo < len(g1):
        done = cum[lo - 1] if lo else 0
        hi = max(int(np.searchsorted(cum, done + chunk_entries, side="right")), lo + 1)
        b, i, j = _cartesian_blocks(g_start[g1[lo:hi]], g_len[g1[lo:hi]], g_start[g2[lo:hi]], g_len[g2[lo:hi]])
        p = third[lo:hi][b]
        spatial = np.linalg.norm(hub_pos[i] - hub_pos[j], axis=1)
        # C^{o_j -> o_i}(x_j^o) compared with x_i^o, and C^{o_i -> o_j}(x_i^o) with x_j^o.
        back_i = preds.flow_at(p, other[j], other_pos[j])
        back_j = preds.flow_at(p, other[i], other_pos[i])
        cyc = (np.exp(-np.linalg.norm(other_pos[i] - back_i, axis=1) / sigma)
               + np.exp(-np.linalg.norm(other_pos[j] - back_j, axis=1) / sigma))
        wgt = 0.5 * mask[i] * mask[j] * np.exp(-spatial / sigma) * cyc
        ok = wgt > min_weight
        rows.append(vid[i][ok])
        cols.append(vid[j][ok])
        vals.append(wgt[ok].astype(np.float32))
        lo = hi
    r = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    c = np.concatenate(cols) if cols else np.zeros(0, np.int64)
    v = np.concatenate(vals) if vals else np.zeros(0, np.float32)
    stats["edges"] = int(len(v))
    adj = sp.coo_matrix((np.concatenate([v, v]), (np.concatenate([r, c]), np.concatenate([c, r]))),
                        shape=(n, n)).tocsr()
    return adj, stats
