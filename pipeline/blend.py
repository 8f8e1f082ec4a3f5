"""Pasting a warped segment into a background: Poisson blending and its alternatives.

``blend(method, src, dst, mask, gradients=...)`` returns ``dst`` with the ``mask`` region replaced:

- ``multigrid`` (default): Poisson image editing (Pérez et al. 2003) solved directly on the pasted
  region Ω. For every pixel p in Ω: ``|N_p| f_p - sum_{q in N_p ∩ Ω} f_q = sum_{q in N_p \\ Ω} dst_q
  + sum_{q in N_p} v_pq`` with N_p the 4-neighbours inside the image (so Ω may touch the border:
  Neumann there), ``v_pq = src_p - src_q`` (``gradients="normal"``) or, with ``gradients="mixed"``,
  whichever of the src and dst differences is larger in magnitude (keeps background texture showing
  through flat parts of the segment). :mod:`segswap.pipeline.poisson` builds the system on the
  region's box and solves the three channels at once by geometric-multigrid-preconditioned CG, to a
  relative residual of ``tol``.
- ``pyamg``: the same system as a sparse matrix, one Ruge-Stüben hierarchy (pyamg) as the CG
  preconditioner of the three channels; the default before the multigrid, 2.5-2.9x its cost per paste.
- ``direct``: the same system solved with ``scipy.sparse.linalg.spsolve``: the reference for tests
  and the benchmark.
- ``cv2``: ``cv2.seamlessClone`` (NORMAL_CLONE, or MIXED_CLONE for mixed gradients), the official
  code's choice. It solves its own discretisation (a DST-based solver on the mask's bounding box),
  so results differ slightly from the two above.
- ``none``: copy-paste.

All images are uint8 [H, W, 3] of the same size, ``mask`` is bool/uint8 [H, W]; ``src`` is the segment
already warped into the background's frame (only its values inside and next to Ω matter).
"""
from __future__ import annotations

import cv2
import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import spsolve
from threadpoolctl import ThreadpoolController

# Scanning the loaded BLAS/OpenMP libraries costs ~10 ms: do it once per process.
_THREADPOOLS = ThreadpoolController()

BLEND_METHODS = ("multigrid", "pyamg", "direct", "cv2", "none")
DEFAULT_BLEND = "multigrid"
GRADIENTS = ("normal", "mixed")
# Relative residual of the iterative solvers. The result is rounded to uint8, and at 1e-6 it rounds
# to the 1e-8 solution's value on all but 0.006% of the blended pixels (those off by one level, on
# benchmarks/bench_gen.py's pastes), for 25% fewer iterations (7.4 instead of 9.9).
DEFAULT_TOL = 1e-6


def box_around(mask: np.ndarray, margin: int) -> tuple[slice, slice]:
    """Row and column slices of the mask's bounding box grown by ``margin`` px, clipped to the image."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    h, w = mask.shape
    return (slice(max(rows[0] - margin, 0), min(rows[-1] + 1 + margin, h)),
            slice(max(cols[0] - margin, 0), min(cols[-1] + 1 + margin, w)))


def blend(method: str, src: np.ndarray, dst: np.ndarray, mask: np.ndarray, *, gradients: str = "normal",
          tol: float = DEFAULT_TOL) -> np.ndarray:
    if method not in BLEND_METHODS:
        raise ValueError(f"unknown blend method {method!r}; choose one of {', '.join(BLEND_METHODS)}")
    if gradients not in GRADIENTS:
        raise ValueError(f"unknown gradients {gradients!r}; choose one of {', '.join(GRADIENTS)}")
    if src.shape != dst.shape or src.ndim != 3 or mask.shape != dst.shape[:2]:
        raise ValueError(f"blend needs src, dst [H,W,3] and mask [H,W] of one size, got "
                         f"{list(src.shape)}, {list(dst.shape)}, {list(mask.shape)}")
    mask = mask.astype(bool)
    if not mask.any():
        return dst.copy()
    if method == "none":
        out = dst.copy()
        out[mask] = src[mask]
        return out
    if method == "cv2":
        return _seamless_clone(src, dst, mask, gradients)
    return poisson_blend(src, dst, mask, gradients=gradients, solver=method, tol=tol)


def poisson_system(src: np.ndarray, dst: np.ndarray, mask: np.ndarray, gradients: str = "normal"):
    """(A [n, n] CSR, b [n, C], flat indices of Ω) for the masked Poisson equation described above:
    :func:`segswap.pipeline.poisson.grid_system`'s arrays as a sparse matrix."""
    from .poisson import grid_system  # numba compiles on import (~0.3 s): only where a solve runs

    h, w = mask.shape
    deg, b_grid = grid_system(src, dst, mask, gradients)
    idx = np.flatnonzero(mask.ravel())
    n = len(idx)
    pos = -np.ones(h * w, np.int64)
    pos[idx] = np.arange(n)
    rows, cols = np.divmod(idx, w)
    a_rows, a_cols = [], []
    for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        rr, cc = rows + dr, cols + dc
        inside = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
        p = np.flatnonzero(inside)  # positions (in Ω order) with this neighbour in the image
        q = pos[rr[p] * w + cc[p]]  # the neighbour's position in Ω, or -1
        a_rows.append(p[q >= 0])
        a_cols.append(q[q >= 0])
    a_rows = np.concatenate(a_rows)
    a_cols = np.concatenate(a_cols)
    b = b_grid.reshape(h * w, -1)[idx]
    diag = deg.ravel()[idx]
    data = np.concatenate([diag, -np.ones(len(a_rows))])
    A = sp.csr_matrix((data, (np.concatenate([np.arange(n), a_rows]), np.concatenate([np.arange(n), a_cols]))),
                      shape=(n, n))
    return A, b, idx


def poisson_blend(src: np.ndarray, dst: np.ndarray, mask: np.ndarray, *, gradients: str = "normal",
                  solver: str = "multigrid", tol: float = DEFAULT_TOL) -> np.ndarray:
    mask = mask.astype(bool)
    if mask.all():
        # No boundary at all: the Poisson problem fixes the image only up to a constant; copy.
        return src.copy()
    # Only Ω and its neighbours take part: solve on the mask's box plus one pixel (the multigrid
    # works on the whole box it is given; the renderer already passes this box).
    box = box_around(mask, 1)
    if box != (slice(0, mask.shape[0]), slice(0, mask.shape[1])):
        out = dst.copy()
        out[box] = poisson_blend(src[box], dst[box], mask[box], gradients=gradients, solver=solver, tol=tol)
        return out
    if solver == "multigrid":
        from .poisson import grid_system, solve_poisson

        deg, b = grid_system(src, dst, mask, gradients)
        # From src: with normal gradients the solution is src plus a harmonic correction, so the
        # error starts smooth, which multigrid removes fastest.
        x, _ = solve_poisson(mask, deg, b, src, tol=tol)
        values = x[mask]  # row-major, the order of poisson_system's unknowns
    else:
        A, b, _ = poisson_system(src, dst, mask, gradients)
        # One BLAS thread: the vectors are small, and with a thread pool per process on a busy node the
        # solve runs 3-5x slower (measured); parallelism comes from one process per shard instead.
        with _THREADPOOLS.limit(limits=1):
            values = _solve(A, b, solver, tol)
    out = dst.copy()
    out[mask] = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return out


def _solve(A, b, solver: str, tol: float) -> np.ndarray:
    if solver == "direct":
        x = spsolve(A.tocsc(), b)
        x = x.reshape(b.shape[0], -1)
    elif solver == "pyamg":
        import pyamg

        # One forward Gauss-Seidel sweep before and one backward after (still a symmetric V-cycle,
        # as CG needs) instead of a symmetric sweep each: 8 cheaper iterations for the default's 6,
        # 12% less work to the same tolerance (measured on benchmarks/bench_gen.py's blend).
        ml = pyamg.ruge_stuben_solver(A, presmoother=("gauss_seidel", {"sweep": "forward"}),
                                      postsmoother=("gauss_seidel", {"sweep": "backward"}))
        x = np.stack([ml.solve(b[:, c], tol=tol, accel="cg") for c in range(b.shape[1])], 1)
    else:
        raise ValueError(f"unknown Poisson solver {solver!r} (multigrid, pyamg or direct)")
    return x


def _seamless_clone(src: np.ndarray, dst: np.ndarray, mask: np.ndarray, gradients: str) -> np.ndarray:
    # seamlessClone cannot place a region touching the image border (its solver needs a one-pixel
    # frame around the mask's box): pad everything, clone, crop back.
    pad = 2
    srcp = cv2.copyMakeBorder(src, pad, pad, pad, pad, cv2.BORDER_REFLECT)
    dstp = cv2.copyMakeBorder(dst, pad, pad, pad, pad, cv2.BORDER_REFLECT)
    maskp = cv2.copyMakeBorder(mask.astype(np.uint8) * 255, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0)
    x, y, w, h = cv2.boundingRect(maskp)
    # cv2 puts the box's top-left corner at center - (w // 2, h // 2): this centre leaves it in place.
    center = (x + w // 2, y + h // 2)
    flag = cv2.NORMAL_CLONE if gradients == "normal" else cv2.MIXED_CLONE
    cloned = cv2.seamlessClone(srcp, dstp, maskp, center, flag)[pad:-pad, pad:-pad]
    # seamlessClone solves over the whole box and changes pixels just outside the mask a little:
    # keep the promise that only the mask region changes.
    out = dst.copy()
    out[mask] = cloned[mask]
    return out
