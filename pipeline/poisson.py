"""The masked Poisson equation of the blend, on the pixel grid, and its multigrid solver.

The equation (Pérez et al. 2003, discretised as in :mod:`segswap.pipeline.blend`): for every pixel p of
the pasted region Ω, ``deg_p f_p - sum_{q in N_p ∩ Ω} f_q = b_p`` with N_p the 4-neighbours inside
the image, ``deg_p = |N_p|`` and ``b_p = sum_{q in N_p \\ Ω} dst_q + sum_{q in N_p} v_pq``.
:func:`grid_system` builds ``deg`` and ``b`` on the region's box; ``blend.poisson_system`` turns the same
arrays into a sparse matrix for the direct and pyamg solvers, so every solver solves this one system.

:func:`solve_poisson` solves it with conjugate gradients preconditioned by one multigrid V-cycle, all
three channels at once, in numba-compiled loops over the box (no sparse matrix, no setup per paste
beyond a few array passes). The hierarchy halves the box per level; a coarse cell stands for the
region pixels among its 2x2 children, and its operator is ``1/2 P^T A P`` for the piecewise-constant
``P`` (the 1/2 makes a cell-centred coarse Laplacian of the same scale as the fine one, and keeps the
exact boundary of Ω at every level) plus a Dirichlet term for the children outside Ω (see
:func:`_coarsen`). Corrections move between levels by bilinear interpolation and its
transpose (``R = P^T``), and the smoother is red-black Gauss-Seidel, red then black before the coarse
correction and black then red after: every piece is symmetric, as CG needs. Why not pyamg: its
Ruge-Stüben setup and Python-level V-cycles cost 3.3-3.5x one ``cv2.seamlessClone`` per paste, this
solver 0.81-0.87x (``benchmarks/bench_gen.py``, docs/generation-speed.md). The kernels are compiled
once per machine and cached next to this file (numba ``cache=True``).

The V-cycle runs in float32, CG in float64: a preconditioner only has to approximate the inverse,
while the residual and the dot products that decide convergence keep float64's accuracy. The levels'
weights and diagonals (small integers and halves) are exact in float32, and float32 fills twice the
SIMD lanes: on 64 pastes captured from the renderer the solve costs 22% less, with the same pixels and
the same iteration counts (7.4 at tol 1e-6; 13.2 against 13.25 at 1e-11).

Arrays are padded by one cell on every side: weights on the frame are zero and the values there stay
zero, so the loops need no bounds checks, and neither do they branch on the mask (cells outside Ω have
zero weights, zero right-hand side and a unit diagonal, so a sweep leaves them at zero).
"""
from __future__ import annotations

import numpy as np
from numba import njit

COARSEST = 8  # cells on the longer side of the coarsest level, solved by repeated smoothing
COARSEST_SWEEPS = 16
# The transfer weights, float32 like the V-cycle's arrays (a float64 literal would make numba compute in float64).
THREE_QUARTERS, QUARTER, ZERO = np.float32(0.75), np.float32(0.25), np.float32(0.0)


@njit(cache=True)
def _grid_system(src, dst, mask, mixed, deg, b):
    h, w, nc = src.shape
    for i in range(h):
        for j in range(w):
            if not mask[i, j]:
                continue
            for di, dj in ((-1, 0), (1, 0), (0, -1), (0, 1)):
                qi, qj = i + di, j + dj
                if qi < 0 or qi >= h or qj < 0 or qj >= w:
                    continue
                deg[i, j] += 1.0
                for c in range(nc):
                    v = float(src[i, j, c]) - float(src[qi, qj, c])
                    if mixed:
                        vd = float(dst[i, j, c]) - float(dst[qi, qj, c])
                        if abs(vd) > abs(v):
                            v = vd
                    if not mask[qi, qj]:
                        v += float(dst[qi, qj, c])
                    b[i, j, c] += v


def grid_system(src: np.ndarray, dst: np.ndarray, mask: np.ndarray, gradients: str = "normal"):
    """(deg [H, W], b [H, W, C]) of the equation above; both are zero outside ``mask``."""
    h, w = mask.shape
    deg = np.zeros((h, w))
    b = np.zeros((h, w, src.shape[2]))
    _grid_system(np.ascontiguousarray(src), np.ascontiguousarray(dst), np.ascontiguousarray(mask, dtype=np.bool_),
                 gradients == "mixed", deg, b)
    return deg, b


# --- the multigrid levels -------------------------------------------------------------------------
# A level: unk [H+2, W+2] (1.0 on cells that are unknowns), diag (1.0 off them), wx[i, j] the weight of
# the edge (i, j)-(i, j+1), wy[i, j] of (i, j)-(i+1, j), all in padded coordinates.


@njit(cache=True)
def _fine_level(mask, deg, unk, diag, wx, wy):
    h, w = mask.shape
    for i in range(h):
        for j in range(w):
            if mask[i, j]:
                unk[i + 1, j + 1] = 1.0
                diag[i + 1, j + 1] = deg[i, j]
                if j + 1 < w and mask[i, j + 1]:
                    wx[i + 1, j + 1] = 1.0
                if i + 1 < h and mask[i + 1, j]:
                    wy[i + 1, j + 1] = 1.0


@njit(cache=True)
def _coarsen(unk, diag, wx, wy, hc, wc, cunk, cdiag, cwx, cwy):
    """The coarse operator (padded coordinates: coarse cell ci, cj covers fine cells 2ci-1, 2ci and
    2cj-1, 2cj): ``1/2 P^T A P`` for the piecewise-constant P, plus 1 on the diagonal for every child
    inside the box that is not an unknown (it holds a Dirichlet value, zero for the correction).
    Mean CG iterations to tol 1e-8 on 64 of benchmarks/bench_gen.py's pastes: 16 without that term,
    9.9 with it, 38 with the plain Galerkin ``P^T A P``: the piecewise-constant coarse cell overstates
    how far a correction reaches into a cell that Ω only partly covers."""
    hp, wp = unk.shape
    for ci in range(1, hc + 1):
        for cj in range(1, wc + 1):
            i0, j0 = 2 * ci - 1, 2 * cj - 1
            u = unk[i0, j0] + unk[i0, j0 + 1] + unk[i0 + 1, j0] + unk[i0 + 1, j0 + 1]
            if u == 0.0:
                continue
            rows = 2.0 if i0 + 1 < hp - 1 else 1.0  # children inside the box, not on the frame
            cols = 2.0 if j0 + 1 < wp - 1 else 1.0
            d = (unk[i0, j0] * diag[i0, j0] + unk[i0, j0 + 1] * diag[i0, j0 + 1]
                 + unk[i0 + 1, j0] * diag[i0 + 1, j0] + unk[i0 + 1, j0 + 1] * diag[i0 + 1, j0 + 1])
            internal = wx[i0, j0] + wx[i0 + 1, j0] + wy[i0, j0] + wy[i0, j0 + 1]
            cunk[ci, cj] = 1.0
            cdiag[ci, cj] = 0.5 * (d - 2.0 * internal) + (rows * cols - u)
            cwx[ci, cj] = 0.5 * (wx[i0, j0 + 1] + wx[i0 + 1, j0 + 1])
            cwy[ci, cj] = 0.5 * (wy[i0 + 1, j0] + wy[i0 + 1, j0 + 1])


@njit(cache=True, inline="always")
def _neighbours(xc, wx, wy, i, j):
    """sum over the 4-neighbours q of cell (i, j) of w_pq x_q: the off-diagonal part of A x, negated."""
    return wx[i, j] * xc[i, j + 1] + wx[i, j - 1] * xc[i, j - 1] + wy[i - 1, j] * xc[i - 1, j] + wy[i, j] * xc[i + 1, j]


@njit(cache=True, inline="always")
def _coarse_rows(i):
    """The coarse row (or column) of padded fine row i and the next nearest one, the pair bilinear
    interpolation weighs 3/4 and 1/4 along this axis."""
    ci = (i + 1) // 2
    return ci, (ci - 1 if i % 2 == 1 else ci + 1)


@njit(cache=True, fastmath=True)
def _sweep(x, b, inv, wx, wy, color):
    """One half Gauss-Seidel sweep over the cells with (i + j) % 2 == color, every channel
    (``inv`` = 1 / diag: a product is cheaper than a division). Each row's update is computed for
    every cell into a buffer, then copied to the cells of this colour: the first loop reads no value it
    writes, so it runs on SIMD lanes (1.46x faster than updating the cells one by one, the same values:
    a cell's update reads only cells of the other colour)."""
    nc, hp, wp = x.shape
    row = np.empty(wp, x.dtype)
    for c in range(nc):
        xc, bc = x[c], b[c]
        for i in range(1, hp - 1):
            up, mid, down, bi, ii, wxi, wyu, wyi = xc[i - 1], xc[i], xc[i + 1], bc[i], inv[i], wx[i], wy[i - 1], wy[i]
            for j in range(1, wp - 1):
                row[j] = (bi[j] + wxi[j] * mid[j + 1] + wxi[j - 1] * mid[j - 1] + wyu[j] * up[j] + wyi[j] * down[j]) * ii[j]
            for j in range(1 + (i + 1 + color) % 2, wp - 1, 2):
                mid[j] = row[j]


@njit(cache=True, fastmath=True)
def _solve_coarsest(x, b, inv, wx, wy, sweeps):
    """``sweeps`` symmetric Gauss-Seidel sweeps (red, black, black, red): a symmetric stand-in for
    an exact solve on the few cells of the coarsest level."""
    for _ in range(sweeps):
        _sweep(x, b, inv, wx, wy, 0)
        _sweep(x, b, inv, wx, wy, 1)
        _sweep(x, b, inv, wx, wy, 1)
        _sweep(x, b, inv, wx, wy, 0)


@njit(cache=True, fastmath=True)
def _apply_dot(x, unk, diag, wx, wy, out, dots):
    """out = A x; dots[c] = x[c] . out[c]."""
    nc, hp, wp = x.shape
    for c in range(nc):
        xc, oc = x[c], out[c]
        s = 0.0
        for i in range(1, hp - 1):
            for j in range(1, wp - 1):
                v = diag[i, j] * unk[i, j] * xc[i, j] - _neighbours(xc, wx, wy, i, j)
                oc[i, j] = v
                s += v * xc[i, j]
        dots[c] = s


@njit(cache=True, fastmath=True)
def _restrict(x, b, diag, wx, wy, res, cunk, cb):
    """cb = R (b - A x) on the coarse unknowns, R the transpose of the bilinear interpolation: along
    each axis a coarse cell gathers its two children with weight 3/4 and the next fine cell on either
    side with 1/4 (9/16, 3/16, 3/16, 1/16 in 2D), along rows then along columns. The residual is zero
    on the frame (never written), so the gathers need no bounds checks but the last one."""
    nc, hp, wp = x.shape
    hcp, wcp = cunk.shape
    rows = np.empty((hp, wcp), x.dtype)
    for c in range(nc):
        xc, bc, rc, cbc = x[c], b[c], res[c], cb[c]
        for i in range(1, hp - 1):
            for j in range(1, wp - 1):
                rc[i, j] = bc[i, j] - diag[i, j] * xc[i, j] + _neighbours(xc, wx, wy, i, j)
        for i in range(hp):
            ri = rc[i]
            for cj in range(1, wcp - 1):
                j = 2 * cj - 1
                far = ri[j + 2] if j + 2 < wp else ZERO
                rows[i, cj] = THREE_QUARTERS * (ri[j] + ri[j + 1]) + QUARTER * (ri[j - 1] + far)
        for ci in range(1, hcp - 1):
            i = 2 * ci - 1
            for cj in range(1, wcp - 1):
                far = rows[i + 2, cj] if i + 2 < hp else ZERO
                cbc[ci, cj] = cunk[ci, cj] * (THREE_QUARTERS * (rows[i, cj] + rows[i + 1, cj])
                                              + QUARTER * (rows[i - 1, cj] + far))


@njit(cache=True, fastmath=True)
def _interpolate(x, unk, cx):
    """x += P cx (bilinear, cell-centred) on the fine unknowns: per fine row, the two nearest coarse
    rows mixed 3/4, 1/4, then along the row the two nearest coarse cells of that mix, the same way."""
    nc, hp, wp = x.shape
    mix = np.empty(cx.shape[2], x.dtype)
    for c in range(nc):
        xc, cxc = x[c], cx[c]
        for i in range(1, hp - 1):
            ci, ci2 = _coarse_rows(i)
            near, far, xi, ui = cxc[ci], cxc[ci2], xc[i], unk[i]
            for cj in range(len(mix)):
                mix[cj] = THREE_QUARTERS * near[cj] + QUARTER * far[cj]
            for j in range(1, wp - 1, 2):  # odd j: its coarse cell is (j + 1) / 2, the next nearest the one before
                xi[j] += ui[j] * (THREE_QUARTERS * mix[(j + 1) // 2] + QUARTER * mix[(j - 1) // 2])
            for j in range(2, wp - 1, 2):  # even j: coarse cell j / 2, then the one after
                xi[j] += ui[j] * (THREE_QUARTERS * mix[j // 2] + QUARTER * mix[j // 2 + 1])


@njit(cache=True, fastmath=True)
def _dot(a, b, out):
    nc, hp, wp = a.shape
    for c in range(nc):
        s = 0.0
        ac, bc = a[c], b[c]
        for i in range(hp):
            for j in range(wp):
                s += ac[i, j] * bc[i, j]
        out[c] = s


@njit(cache=True, fastmath=True)
def _step(x, r, p, ap, alpha, rr):
    """x += alpha p, r -= alpha A p, rr = |r|^2 per channel."""
    nc, hp, wp = x.shape
    for c in range(nc):
        a, s = alpha[c], 0.0
        xc, rc, pc, apc = x[c], r[c], p[c], ap[c]
        for i in range(hp):
            for j in range(wp):
                xc[i, j] += a * pc[i, j]
                v = rc[i, j] - a * apc[i, j]
                rc[i, j] = v
                s += v * v
        rr[c] = s


@njit(cache=True, fastmath=True)
def _direction(p, z, beta):
    nc, hp, wp = p.shape
    for c in range(nc):
        pc, zc, bt = p[c], z[c], beta[c]
        for i in range(hp):
            for j in range(wp):
                pc[i, j] = zc[i, j] + bt * pc[i, j]


@njit(cache=True)
def _plane(buf, offsets, hp, wp, k):
    """Level k's [H+2, W+2] array inside a flat buffer of every level's."""
    return buf[offsets[k]:offsets[k + 1]].reshape((hp[k], wp[k]))


@njit(cache=True)
def _planes(buf, offsets, nc, hp, wp, k):
    """Level k's [C, H+2, W+2] array inside a flat buffer of every level's."""
    return buf[offsets[k]:offsets[k + 1]].reshape((nc, hp[k], wp[k]))


@njit(cache=True)
def _vcycle(levels, xs, bs, res, nc):
    """xs[level 0] = one V-cycle applied to bs[level 0], from zero: red-black Gauss-Seidel before
    each coarse correction, black-red after, so the preconditioner is symmetric."""
    unk, diag, inv, wx, wy, hp, wp, o2, o3 = levels
    last = len(hp) - 1
    _planes(xs, o3, nc, hp, wp, 0)[:] = 0.0
    for k in range(last):
        x, b = _planes(xs, o3, nc, hp, wp, k), _planes(bs, o3, nc, hp, wp, k)
        iv, ex, ey = _plane(inv, o2, hp, wp, k), _plane(wx, o2, hp, wp, k), _plane(wy, o2, hp, wp, k)
        _sweep(x, b, iv, ex, ey, 0)
        _sweep(x, b, iv, ex, ey, 1)
        _restrict(x, b, _plane(diag, o2, hp, wp, k), ex, ey, _planes(res, o3, nc, hp, wp, k),
                  _plane(unk, o2, hp, wp, k + 1), _planes(bs, o3, nc, hp, wp, k + 1))
        _planes(xs, o3, nc, hp, wp, k + 1)[:] = 0.0
    _solve_coarsest(_planes(xs, o3, nc, hp, wp, last), _planes(bs, o3, nc, hp, wp, last),
                    _plane(inv, o2, hp, wp, last), _plane(wx, o2, hp, wp, last), _plane(wy, o2, hp, wp, last),
                    COARSEST_SWEEPS)
    for k in range(last - 1, -1, -1):
        x, b = _planes(xs, o3, nc, hp, wp, k), _planes(bs, o3, nc, hp, wp, k)
        iv, ex, ey = _plane(inv, o2, hp, wp, k), _plane(wx, o2, hp, wp, k), _plane(wy, o2, hp, wp, k)
        _interpolate(x, _plane(unk, o2, hp, wp, k), _planes(xs, o3, nc, hp, wp, k + 1))
        _sweep(x, b, iv, ex, ey, 1)
        _sweep(x, b, iv, ex, ey, 0)


@njit(cache=True)
def _pcg(x, rhs, r, p, ap, levels, xs, bs, res, limit, maxiter):
    """Conjugate gradients on every channel of x at once (each with its own step lengths), the
    V-cycle as preconditioner; returns (iterations, |r|^2 per channel), iterations = -1 if
    ``maxiter`` went by first. x, r, p, ap are float64; the V-cycle's buffers float32."""
    unk, diag, inv, wx, wy, hp, wp, o2, o3 = levels
    nc = x.shape[0]
    u0, d0, ex, ey = _plane(unk, o2, hp, wp, 0), _plane(diag, o2, hp, wp, 0), _plane(wx, o2, hp, wp, 0), \
        _plane(wy, o2, hp, wp, 0)
    b0, z = _planes(bs, o3, nc, hp, wp, 0), _planes(xs, o3, nc, hp, wp, 0)
    rr, rz, pap = np.empty(nc), np.empty(nc), np.empty(nc)
    _apply_dot(x, u0, d0, ex, ey, ap, pap)
    r[:] = rhs - ap
    _dot(r, r, rr)
    if (rr <= limit).all():
        return 0, rr
    b0[:] = r
    _vcycle(levels, xs, bs, res, nc)
    p[:] = z
    _dot(r, z, rz)
    for it in range(1, maxiter + 1):
        _apply_dot(p, u0, d0, ex, ey, ap, pap)
        _step(x, r, p, ap, rz / np.maximum(pap, 1e-300), rr)
        if (rr <= limit).all():
            return it, rr
        b0[:] = r
        _vcycle(levels, xs, bs, res, nc)
        rz_old = rz.copy()
        _dot(r, z, rz)
        _direction(p, z, rz / np.maximum(rz_old, 1e-300))
    return -1, rr


class _Multigrid:
    """The levels' operators and vectors, each kind in one flat buffer (one compiled call runs the
    whole solve; ``levels`` is the tuple the kernels take)."""

    def __init__(self, mask: np.ndarray, deg: np.ndarray, channels: int):
        shapes = [mask.shape]
        while max(shapes[-1]) > COARSEST:
            shapes.append(((shapes[-1][0] + 1) // 2, (shapes[-1][1] + 1) // 2))
        hp = np.array([h + 2 for h, _ in shapes], np.int64)
        wp = np.array([w + 2 for _, w in shapes], np.int64)
        o2 = np.concatenate([[0], np.cumsum(hp * wp)]).astype(np.int64)
        o3 = o2 * channels
        unk, diag, wx, wy = np.zeros(o2[-1]), np.ones(o2[-1]), np.zeros(o2[-1]), np.zeros(o2[-1])
        plane = lambda buf, k: buf[o2[k]:o2[k + 1]].reshape(hp[k], wp[k])  # noqa: E731
        _fine_level(mask, deg, *(plane(a, 0) for a in (unk, diag, wx, wy)))
        for k in range(1, len(shapes)):
            _coarsen(*(plane(a, k - 1) for a in (unk, diag, wx, wy)), *shapes[k],
                     *(plane(a, k) for a in (unk, diag, wx, wy)))
        # float32: see the module docstring (CG's own vectors, made in solve_poisson, stay float64).
        self.levels = tuple(a.astype(np.float32) for a in (unk, diag, 1.0 / diag, wx, wy)) + (hp, wp, o2, o3)
        self.x, self.b, self.res = (np.zeros(o3[-1], np.float32) for _ in range(3))


@njit(cache=True)
def _channels_first(mask, x0, b, x, rhs):
    """x, rhs [C, H+2, W+2] = x0, b [H, W, C] on Ω, zero elsewhere (x0 of any numeric type)."""
    h, w, nc = b.shape
    for i in range(h):
        for j in range(w):
            if mask[i, j]:
                for c in range(nc):
                    x[c, i + 1, j + 1] = x0[i, j, c]
                    rhs[c, i + 1, j + 1] = b[i, j, c]


def solve_poisson(mask: np.ndarray, deg: np.ndarray, b: np.ndarray, x0: np.ndarray, *, tol: float,
                  maxiter: int = 200) -> tuple[np.ndarray, int]:
    """Solve the equation above (``deg``, ``b`` from :func:`grid_system`) for every channel of ``b``
    [H, W, C], from ``x0`` [H, W, C] (any numeric type), to ``|b - A x| <= tol |b|`` per channel;
    returns (x [H, W, C], iterations). ``mask`` must leave at least one pixel of the image out (else A is singular)."""
    mask = np.ascontiguousarray(mask, dtype=np.bool_)
    h, w, nc = b.shape
    mg = _Multigrid(mask, np.ascontiguousarray(deg, dtype=np.float64), nc)
    # Channel-first with a zero frame: the loops run over contiguous rows. The loops never write
    # the frame, so every vector starts at zero.
    x, rhs = np.zeros((nc, h + 2, w + 2)), np.zeros((nc, h + 2, w + 2))
    _channels_first(mask, np.ascontiguousarray(x0), np.ascontiguousarray(b), x, rhs)
    limit = np.empty(nc)
    _dot(rhs, rhs, limit)
    limit = tol * tol * np.maximum(limit, 1e-300)
    iterations, rr = _pcg(x, rhs, np.zeros_like(x), np.zeros_like(x), np.zeros_like(x), mg.levels, mg.x, mg.b, mg.res,
                          limit, maxiter)
    if iterations < 0:
        raise RuntimeError(f"Poisson solve did not reach tol {tol} in {maxiter} iterations "
                           f"(relative residual {np.sqrt(rr / limit).max() * tol:.2e})")
    return np.moveaxis(x[:, 1:-1, 1:-1], 0, 2).copy(), iterations


def load_kernels() -> None:
    """Compile (first use on a machine) or load (cached) every kernel, by solving a tiny problem with
    the argument types of a real blend: 0.2-0.5 s, then nothing more in this process."""
    rng = np.random.default_rng(0)
    src, dst = rng.integers(0, 256, (2, 12, 12, 3), dtype=np.uint8)
    mask = np.zeros((12, 12), bool)
    mask[3:9, 2:10] = True
    deg, b = grid_system(src, dst, mask)  # "mixed" is a run-time flag of the same compiled loop
    solve_poisson(mask, deg, b, src, tol=1e-6)  # uint8 src, as poisson_blend passes it
