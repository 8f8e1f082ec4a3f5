"""Spectral analysis of the correspondence graph: leading eigenvectors, K-means clusters, first eigenvector.

Discovery (paper §5): the N_eig leading eigenvectors of the graph, then K-means with K clusters.

Operator. We use the symmetrically normalised adjacency S = D^-1/2 A D^-1/2 (Ng-Jordan-Weiss spectral
clustering; rows of the embedding are L2-normalised before K-means), *regularised* with tau = the mean
degree added to every degree (D -> D + tau I, Qin & Rohe 2013). A correspondence graph has many tiny
components (a few spurious matches): without regularisation each has eigenvalue exactly 1 and takes a
leading eigenvector from the real clusters; with it a component's eigenvalue is about d / (d + tau), so
heavy, well-connected groups come first. ``normalise=False`` uses the raw adjacency A.

Solver. The graph is block diagonal over its connected components, and it has very many of them with
nearly equal leading eigenvalues (every repeated detail is its own component). Krylov (ARPACK) and
LOBPCG iterations converge very slowly on such clustered spectra, and multigrid preconditioners do not
coarsen a union of small cliques. So the default solver (``components``) is exact: it splits the graph
into components (scipy.sparse.csgraph), computes the eigenvalues of every small component with batched
dense ``eigvalsh`` (components of equal size in one call), and of large ones with ``eigsh`` (8 leading
pairs first, more only for a component that owns all of them); selects the
N_eig largest over the whole graph; and computes eigenvectors only for the components that own them.
The result is the eigen-decomposition of the whole matrix, at a cost linear in the number of vertices
(measured in ``benchmarks/bench_discovery.py``). ``eigsh`` on the whole matrix stays available.

Vertices of components that own none of the leading eigenvectors have an all-zero embedding row; they
are left unclustered (label -1) rather than lumped into one cluster.

Co-segmentation uses the first eigenvector of the raw adjacency (the official code), sign-fixed so that
its mass is positive.
"""
from __future__ import annotations

import logging

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components
from scipy.sparse.linalg import eigsh

log = logging.getLogger(__name__)

DENSE_MAX = 1500          # components up to this size are solved densely
DENSE_BATCH_BYTES = 2**28  # memory for one batch of dense component matrices
LARGE_PROBE = 8            # leading pairs first computed for a large component (more if it owns them all)


def operator(adj: sp.spmatrix, normalise: bool = True, regularise: bool = True) -> sp.csr_matrix:
    """The matrix whose leading eigenvectors are used (see module docstring), float64 CSR."""
    a = adj.astype(np.float64).tocsr()
    if not normalise:
        return a
    deg = np.asarray(a.sum(1)).ravel()
    if regularise and len(deg):
        deg = deg + deg.mean()
    inv_sqrt = np.where(deg > 0, 1.0 / np.sqrt(np.maximum(deg, 1e-300)), 0.0)
    d = sp.diags(inv_sqrt)
    return (d @ a @ d).tocsr()


def _components(op: sp.csr_matrix):
    n_comp, label = connected_components(op, directed=False)
    order = np.argsort(label, kind="stable")
    sizes = np.bincount(label, minlength=n_comp)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    local = np.empty(len(label), np.int64)
    local[order] = np.arange(len(label)) - starts[label[order]]
    return n_comp, label, order, sizes, starts, local


class _SmallComponents:
    """The entries of all components with at most DENSE_MAX vertices, sorted so that the components of
    one size are contiguous: dense batches are slices, never scans of the whole matrix."""

    def __init__(self, op: sp.csr_matrix, label, sizes, local):
        self.label, self.local, self.sizes = label, local, sizes
        small = np.flatnonzero(sizes <= DENSE_MAX)
        self.comps = small[np.lexsort((small, sizes[small]))]          # by (size, id)
        self.rank = np.full(len(sizes), -1, np.int64)
        self.rank[self.comps] = np.arange(len(self.comps))
        coo = op.tocoo()
        key = self.rank[label[coo.row]]
        keep = key >= 0
        srt = np.argsort(key[keep], kind="stable")
        self.key = key[keep][srt]
        self.row, self.col, self.val = coo.row[keep][srt], coo.col[keep][srt], coo.data[keep][srt]

    def batches(self, wanted: np.ndarray | None = None):
        """(size, ranks lo..hi) of equal-size runs, chunked to DENSE_BATCH_BYTES; only ``wanted`` ranks."""
        ranks = np.arange(len(self.comps)) if wanted is None else np.sort(wanted)
        if len(ranks) == 0:
            return
        m_of = self.sizes[self.comps[ranks]]
        cut = np.flatnonzero(np.diff(m_of)) + 1
        for run in np.split(ranks, cut):
            m = int(self.sizes[self.comps[run[0]]])
            per = max(1, DENSE_BATCH_BYTES // (8 * m * m))
            for s in range(0, len(run), per):
                yield m, run[s:s + per]

    def dense(self, m: int, ranks: np.ndarray) -> np.ndarray:
        """[len(ranks), m, m] dense matrices of the components with these (sorted) ranks."""
        out = np.zeros((len(ranks), m, m))
        slot = np.full(int(ranks[-1] - ranks[0] + 1), -1, np.int64)
        slot[ranks - ranks[0]] = np.arange(len(ranks))
        lo, hi = np.searchsorted(self.key, [ranks[0], ranks[-1] + 1])
        k = self.key[lo:hi] - ranks[0]
        sel = slot[k] >= 0
        r, c = self.row[lo:hi][sel], self.col[lo:hi][sel]
        out[slot[k[sel]], self.local[r], self.local[c]] = self.val[lo:hi][sel]
        return out


def _component_eigenpairs(op: sp.csr_matrix, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    # Many small dense problems: one BLAS thread each is ~8x faster than letting threads fight over
    # 100x100 matrices (measured on 2 busy cores).
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        return _component_eigenpairs_1(op, k, seed)


def _component_eigenpairs_1(op: sp.csr_matrix, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    n = op.shape[0]
    n_comp, label, order, sizes, starts, local = _components(op)
    rng = np.random.default_rng(seed)
    small = _SmallComponents(op, label, sizes, local)
    # Pass 1: eigenvalues of every component (at most k per component can be among the leading ones).
    cand_val, cand_comp = [], []
    for m, ranks in small.batches():
        vals = np.linalg.eigvalsh(small.dense(m, ranks))[:, ::-1][:, :k]
        cand_val.append(vals.ravel())
        cand_comp.append(np.repeat(small.comps[ranks], vals.shape[1]))
    small_val = np.concatenate(cand_val) if cand_val else np.zeros(0)
    small_comp = np.concatenate(cand_comp) if cand_comp else np.zeros(0, np.int64)
    # Large components: ARPACK for a few leading pairs first (LARGE_PROBE), more only for a component
    # whose every computed eigenvalue made the global top k (it may own more of them).
    large_vecs = {}

    def solve(c, kk):
        idx = order[starts[c]:starts[c + 1]]
        vals, vecs = eigsh(op[idx][:, idx], k=kk, which="LA", v0=rng.standard_normal(len(idx)))
        srt = np.argsort(-vals)
        large_vecs[int(c)] = (idx, vals[srt], vecs[:, srt])

    large = np.flatnonzero(sizes > DENSE_MAX)
    for c in large:
        solve(c, min(k, LARGE_PROBE, sizes[c] - 2))
    while True:
        vals_l = [large_vecs[int(c)][1] for c in large]
        cand_val = np.concatenate([small_val, *vals_l])
        cand_comp = np.concatenate([small_comp, *(np.full(len(v), c) for c, v in zip(large, vals_l))]).astype(np.int64)
        top = np.argsort(-cand_val, kind="stable")[:k]
        need = np.bincount(cand_comp[top], minlength=n_comp)  # eigenvectors each component contributes
        more = [c for c, v in zip(large, vals_l) if need[c] == len(v) < min(k, sizes[c] - 2)]
        if not more:
            break
        for c in more:
            solve(c, int(min(k, sizes[c] - 2, 2 * need[c])))
    # Pass 2: eigenvectors of the components that own leading eigenvalues.
    vals_out = []
    vecs_out = np.zeros((n, int(need.sum())))
    col = 0
    owners = np.flatnonzero(need)
    for m, ranks in small.batches(small.rank[owners[sizes[owners] <= DENSE_MAX]]):
        w, v = np.linalg.eigh(small.dense(m, ranks))
        for b, c in enumerate(small.comps[ranks]):
            j = need[c]
            vecs_out[order[starts[c]:starts[c + 1]], col:col + j] = v[b][:, ::-1][:, :j]
            vals_out.extend(w[b][::-1][:j])
            col += j
    for c in owners[sizes[owners] > DENSE_MAX]:
        idx, vals, vecs = large_vecs[int(c)]
        j = need[c]
        vecs_out[idx, col:col + j] = vecs[:, :j]
        vals_out.extend(vals[:j])
        col += j
    vals_out = np.asarray(vals_out)
    srt = np.argsort(-vals_out, kind="stable")
    return vals_out[srt], vecs_out[:, srt]


def leading_eigenvectors(adj: sp.spmatrix, k: int, *, normalise: bool = True, regularise: bool = True,
                         method: str = "components", seed: int = 0, tol: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest eigenpairs of the operator: (values [k] descending, vectors [n, k])."""
    n = adj.shape[0]
    if n == 0:
        return np.zeros(0), np.zeros((0, 0))
    k = max(1, min(k, n))
    op = operator(adj, normalise, regularise)
    if method == "components":
        return _component_eigenpairs(op, k, seed)
    if method == "eigsh":
        if k >= n - 1:
            vals, vecs = np.linalg.eigh(op.toarray())
            return vals[::-1][:k], vecs[:, ::-1][:, :k]
        vals, vecs = eigsh(op, k=k, which="LA", v0=np.random.default_rng(seed).standard_normal(n), tol=tol)
        srt = np.argsort(-vals)
        return vals[srt], vecs[:, srt]
    raise ValueError(f"unknown eigen solver {method!r}; choose components or eigsh")


def spectral_embedding(adj: sp.spmatrix, k: int, **kw) -> np.ndarray:
    """Rows of the k leading eigenvectors, L2-normalised per row (all-zero rows stay 0), float32."""
    _, vecs = leading_eigenvectors(adj, k, **kw)
    norms = np.linalg.norm(vecs, axis=1, keepdims=True)
    return np.where(norms > 1e-12, vecs / np.maximum(norms, 1e-12), 0.0).astype(np.float32)


def kmeans(x: np.ndarray, k: int, *, seed: int = 0, minibatch_above: int = 10_000,
           threads: int | None = 1) -> np.ndarray:
    """Cluster labels [n] with K-means; all-zero rows get -1.

    Vertices of a component that owns a single eigenvector all have the same embedding row, so rows
    are first deduplicated (rounded to 1e-4) and K-means runs on the distinct rows weighted by their
    counts (the same objective, often far fewer points); with at most K distinct rows each is its own
    cluster. MiniBatchKMeans above ``minibatch_above`` distinct rows.
    """
    from sklearn.cluster import KMeans, MiniBatchKMeans

    labels = np.full(len(x), -1, np.int64)
    rows = np.flatnonzero(np.abs(x).sum(1) > 0)
    if len(rows) == 0:
        return labels
    uniq, inverse, counts = np.unique(np.round(x[rows], 4), axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.ravel()
    if len(uniq) <= k:
        labels[rows] = inverse
        return labels
    if len(uniq) <= minibatch_above:
        km = KMeans(n_clusters=k, n_init=3, random_state=seed)
    else:
        # One k-means++ start and at most 20 epochs with early stopping: K = 500 centres over 100
        # dimensions cost 50 GFlop per epoch at 1M rows.
        km = MiniBatchKMeans(n_clusters=k, batch_size=max(4096, 3 * k), n_init=1, max_iter=20,
                             max_no_improvement=10, random_state=seed)
    # One OpenMP/BLAS thread: on busy cores sklearn's threads spin against each other (measured 5x
    # slower with 2 threads than with 1 on a loaded 2-core machine).
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=threads):
        km.fit(uniq, sample_weight=counts)
        labels[rows] = km.predict(uniq)[inverse]
    return labels


def first_eigenvector(adj: sp.spmatrix, seed: int = 0) -> np.ndarray:
    """Leading eigenvector of the raw adjacency, signed so that its entries sum to a positive number."""
    if adj.shape[0] == 0:
        return np.zeros(0)
    _, vecs = leading_eigenvectors(adj, 1, normalise=False, seed=seed)
    v = vecs[:, 0]
    return v if v.sum() >= 0 else -v
