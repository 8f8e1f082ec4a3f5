"""Spectral analysis of the correspondence graph: leading eigenvectors, K-means clusters, first eigenvector.

Discovery (paper §5): the N_eig leading eigenvectors of the graph, then K-means with K clusters. We use
the symmetrically normalised adjacency S = D^-1/2 A D^-1/2 (Ng-Jordan-Weiss spectral clustering; rows of
the embedding are L2-normalised before K-means) so large, heavy groups do not take every eigenvector,
*regularised* with tau = the mean degree added to every degree (D -> D + tau I, Qin & Rohe 2013): a
correspondence graph has many tiny components (a few spurious matches), and without regularisation each
of them has eigenvalue exactly 1 and takes a leading eigenvector from the real clusters; with it a
component's eigenvalue is about d / (d + tau), so heavy, well-connected groups come first.
``normalise=False`` uses the raw adjacency, as the paper's wording has it.

Solvers: ``eigsh`` (ARPACK Lanczos, largest algebraic eigenvalues) for small graphs, and for large
ones LOBPCG on the normalised Laplacian L = I - S (its smallest eigenvectors are S's largest) with a
pyamg smoothed-aggregation preconditioner, which converges in a few dozen iterations even with the many
near-degenerate eigenvalues that a graph made of many small components has. Every random start comes
from ``seed``.

Co-segmentation uses the first eigenvector of the raw adjacency (the official code), sign-fixed so that
its mass is positive.
"""
from __future__ import annotations

import logging

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import eigsh, lobpcg

log = logging.getLogger(__name__)

EIGSH_MAX_NODES = 20_000


def _normalised(adj: sp.spmatrix, regularise: bool = True) -> tuple[sp.csr_matrix, np.ndarray]:
    deg = np.asarray(adj.sum(1)).ravel()
    if regularise:  # tau = mean degree (Qin & Rohe 2013)
        deg = deg + (deg.mean() if len(deg) else 0.0)
    inv_sqrt = np.where(deg > 0, 1.0 / np.sqrt(np.maximum(deg, 1e-30)), 0.0)
    d = sp.diags(inv_sqrt.astype(np.float64))
    return (d @ adj.astype(np.float64) @ d).tocsr(), deg


def leading_eigenvectors(adj: sp.spmatrix, k: int, *, normalise: bool = True, regularise: bool = True,
                         method: str = "auto",
                         seed: int = 0, tol: float = 1e-4, maxiter: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest eigenpairs of the (normalised) adjacency: (values [k] descending, vectors [n, k])."""
    n = adj.shape[0]
    if n == 0:
        return np.zeros(0), np.zeros((0, 0))
    k = max(1, min(k, n - 1 if n > 1 else 1))
    rng = np.random.default_rng(seed)
    op = _normalised(adj, regularise)[0] if normalise else adj.astype(np.float64).tocsr()
    if method == "auto":
        method = "eigsh" if (n <= EIGSH_MAX_NODES or not normalise) else "lobpcg"
    if n <= max(2 * k + 1, 64):  # tiny graph: dense is exact and instant
        vals, vecs = np.linalg.eigh(op.toarray())
        vals, vecs = vals[::-1][:k], vecs[:, ::-1][:, :k]
    elif method == "eigsh":
        vals, vecs = eigsh(op, k=k, which="LA", v0=rng.standard_normal(n), tol=tol * 1e-2)
        order = np.argsort(-vals)
        vals, vecs = vals[order], vecs[:, order]
    elif method == "lobpcg":
        if not normalise:
            raise ValueError("the lobpcg solver works on the normalised Laplacian; use normalise=True")
        import pyamg

        lap = (sp.identity(n, format="csr") - op).tocsr()
        # A small shift makes the (singular) Laplacian positive definite for the multigrid hierarchy.
        ml = pyamg.smoothed_aggregation_solver((lap + 1e-5 * sp.identity(n, format="csr")).tocsr())
        x0 = rng.standard_normal((n, k))
        lam, vecs = lobpcg(lap, x0, M=ml.aspreconditioner(), tol=tol, largest=False, maxiter=maxiter)
        order = np.argsort(lam)
        vals, vecs = 1.0 - lam[order], vecs[:, order]
    else:
        raise ValueError(f"unknown eigen solver {method!r}; choose auto, eigsh or lobpcg")
    return vals, vecs


def spectral_embedding(adj: sp.spmatrix, k: int, **kw) -> np.ndarray:
    """Rows of the k leading eigenvectors, L2-normalised per row (rows of isolated vertices stay 0)."""
    _, vecs = leading_eigenvectors(adj, k, **kw)
    norms = np.linalg.norm(vecs, axis=1, keepdims=True)
    return np.where(norms > 1e-12, vecs / np.maximum(norms, 1e-12), 0.0).astype(np.float32)


def kmeans(x: np.ndarray, k: int, *, seed: int = 0, minibatch_above: int = 50_000) -> np.ndarray:
    """Cluster labels [n] with K-means (MiniBatchKMeans for large inputs)."""
    from sklearn.cluster import KMeans, MiniBatchKMeans

    n = len(x)
    k = max(1, min(k, n))
    if n <= minibatch_above:
        return KMeans(n_clusters=k, n_init=3, random_state=seed).fit_predict(x)
    return MiniBatchKMeans(n_clusters=k, batch_size=max(4096, 3 * k), n_init=3, max_no_improvement=20,
                           random_state=seed).fit_predict(x)


def first_eigenvector(adj: sp.spmatrix, seed: int = 0) -> np.ndarray:
    """Leading eigenvector of the raw adjacency, signed so that its entries sum to a positive number."""
    n = adj.shape[0]
    if n == 0:
        return np.zeros(0)
    if n < 3:
        vals, vecs = np.linalg.eigh(adj.toarray().astype(np.float64))
        v = vecs[:, -1]
    else:
        # A positive start vector, like the official code's ones: the Perron vector is found first.
        v0 = 1.0 + 0.01 * np.random.default_rng(seed).standard_normal(n)
        _, vecs = eigsh(adj.astype(np.float64), k=1, which="LA", v0=v0)
        v = vecs[:, 0]
    return v if v.sum() >= 0 else -v
