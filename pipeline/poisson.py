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
solver 0.58-0.61x (``benchmarks/bench_gen.py``'s blend per paste, warp included: 3 runs of 20 pairs,
against 0.81-0.87x for the solver before the fused passes below in runs between them, the figure in
docs/generation-speed.md). The kernels are compiled once per machine and cached next to this file
(numba ``cache=True``).

The V-cycle runs in float32, CG in float64: a preconditioner only has to approximate the inverse,
while the residual and the dot products that decide convergence keep float64's accuracy. The levels'
weights and diagonals (small integers and halves) are exact in float32, and float32 fills twice the
SIMD lanes: on 64 pastes captured from the renderer the solve costs 22% less, with the same pixels and
the same iteration counts (7.4 at tol 1e-6; 13.2 against 13.25 at 1e-11).

Arrays are padded by one cell on every side: weights on the frame are zero and the values there stay
zero, so the loops need no bounds checks, and neither do they branch on the mask (cells outside Ω have
zero weights, zero right-hand side and a unit diagonal, so a sweep leaves them at zero).

Each pass over a level's rows does all it can while they sit in the fastest caches: the way down a
level (red and black half sweeps from zero, the residual, its restriction) is one pass, the way up
(interpolation, black and red half sweeps) another, CG's update of x and p with A p and p . A p a
third (each stage a row or two behind the one before it), and its update of r with |r|^2 and the
V-cycle's float32 copy of r a fourth. The values are bit for bit those of separate passes (the same
operations on the same values, every sum in the same order), and with the buffers kept between
solves (:class:`_Buffers`) a solve costs 9.6 -> 5.8 ms on 70 pastes captured from the renderer (7.3
iterations on average at tol 1e-6, as before), 63 -> 29 ms on the largest (430x386; medians of 5
interleaved runs).
"""
from __future__ import annotations

import numpy as np
from numba import njit

COARSEST = 8  # cells on the longer side of the coarsest level, solved by repeated smoothing
COARSEST_SWEEPS = 16
# The transfer weights, float32 like the V-cycle's arrays (a float64 literal would make numba compute in float64).
THREE_QUARTERS, QUARTER = np.float32(0.75), np.float32(0.25)


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
# A level: unk [H+2, W+2] (1.0 on cells that are unknowns), diag (1.0 off them), inv = 1 / diag, wx[i, j]
# the weight of the edge (i, j)-(i, j+1), wy[i, j] of (i, j)-(i+1, j), all in padded coordinates and
# float32 (see the module docstring): built in float32 from the start, exactly the float64 values
# (inv: float64's 1 / diag rounded once to float32), so a solve copies none of them.


@njit(cache=True)
def _fine_level(mask, deg, unk, diag, inv, wx, wy):
    h, w = mask.shape
    for i in range(h):
        for j in range(w):
            if mask[i, j]:
                unk[i + 1, j + 1] = 1.0
                diag[i + 1, j + 1] = deg[i, j]
                inv[i + 1, j + 1] = 1.0 / deg[i, j]
                if j + 1 < w and mask[i, j + 1]:
                    wx[i + 1, j + 1] = 1.0
                if i + 1 < h and mask[i + 1, j]:
                    wy[i + 1, j + 1] = 1.0


@njit(cache=True)
def _coarsen(unk, diag, wx, wy, cunk, cdiag, cinv, cwx, cwy):
    """The coarse operator (padded coordinates: coarse cell ci, cj covers fine cells 2ci-1, 2ci and
    2cj-1, 2cj): ``1/2 P^T A P`` for the piecewise-constant P, plus 1 on the diagonal for every child
    inside the box that is not an unknown (it holds a Dirichlet value, zero for the correction).
    Mean CG iterations to tol 1e-8 on 64 of benchmarks/bench_gen.py's pastes: 16 without that term,
    9.9 with it, 38 with the plain Galerkin ``P^T A P``: the piecewise-constant coarse cell overstates
    how far a correction reaches into a cell that Ω only partly covers."""
    hp, wp = unk.shape
    hcp, wcp = cunk.shape
    for ci in range(1, hcp - 1):
        for cj in range(1, wcp - 1):
            i0, j0 = 2 * ci - 1, 2 * cj - 1
            u = unk[i0, j0] + unk[i0, j0 + 1] + unk[i0 + 1, j0] + unk[i0 + 1, j0 + 1]
            if u == 0.0:
                continue
            rows = 2.0 if i0 + 1 < hp - 1 else 1.0  # children inside the box, not on the frame
            cols = 2.0 if j0 + 1 < wp - 1 else 1.0
            d = (unk[i0, j0] * diag[i0, j0] + unk[i0, j0 + 1] * diag[i0, j0 + 1]
                 + unk[i0 + 1, j0] * diag[i0 + 1, j0] + unk[i0 + 1, j0 + 1] * diag[i0 + 1, j0 + 1])
            internal = wx[i0, j0] + wx[i0 + 1, j0] + wy[i0, j0] + wy[i0, j0 + 1]
            cd = 0.5 * (d - 2.0 * internal) + (rows * cols - u)
            cunk[ci, cj] = 1.0
            cdiag[ci, cj] = cd
            cinv[ci, cj] = 1.0 / cd
            cwx[ci, cj] = 0.5 * (wx[i0, j0 + 1] + wx[i0 + 1, j0 + 1])
            cwy[ci, cj] = 0.5 * (wy[i0 + 1, j0] + wy[i0 + 1, j0 + 1])


@njit(cache=True)
def _build_levels(mask, deg, levels):
    """Fill the levels (unk, wx, wy zero and diag, inv one on entry): the fine one from the mask, each
    coarser one from the one before."""
    unk, diag, inv, wx, wy, hp, wp, o2, o3 = levels
    _fine_level(mask, deg, _plane(unk, o2, hp, wp, 0), _plane(diag, o2, hp, wp, 0), _plane(inv, o2, hp, wp, 0),
                _plane(wx, o2, hp, wp, 0), _plane(wy, o2, hp, wp, 0))
    for k in range(1, len(hp)):
        _coarsen(_plane(unk, o2, hp, wp, k - 1), _plane(diag, o2, hp, wp, k - 1), _plane(wx, o2, hp, wp, k - 1),
                 _plane(wy, o2, hp, wp, k - 1), _plane(unk, o2, hp, wp, k), _plane(diag, o2, hp, wp, k),
                 _plane(inv, o2, hp, wp, k), _plane(wx, o2, hp, wp, k), _plane(wy, o2, hp, wp, k))


@njit(cache=True, inline="always")
def _coarse_rows(i):
    """The coarse row (or column) of padded fine row i and the next nearest one, the pair bilinear
    interpolation weighs 3/4 and 1/4 along this axis."""
    ci = (i + 1) // 2
    return ci, (ci - 1 if i % 2 == 1 else ci + 1)


@njit(cache=True, inline="always")
def _row_neighbours(up, mid, down, wxi, wyu, wyi, j):
    """sum over the 4-neighbours q of cell j of a row of w_pq x_q: the off-diagonal part of A x, negated
    (up, mid, down: the rows of x above, at and below it; wyu, wyi: the weights of the edges up and down)."""
    return wxi[j] * mid[j + 1] + wxi[j - 1] * mid[j - 1] + wyu[j] * up[j] + wyi[j] * down[j]


@njit(cache=True, inline="always")
def _apply_row(x, diag, wx, wy, i, out):
    """out[1:-1] = (A x) on row i of one channel, in a buffer that aliases nothing (the loop runs on SIMD lanes)."""
    up, mid, down, di, wxi, wyu, wyi = x[i - 1], x[i], x[i + 1], diag[i], wx[i], wy[i - 1], wy[i]
    for j in range(1, len(mid) - 1):
        out[j] = di[j] * mid[j] - _row_neighbours(up, mid, down, wxi, wyu, wyi, j)


@njit(cache=True, inline="always")
def _sweep_row(x, b, inv, wx, wy, i, color, row):
    """The Gauss-Seidel update of the cells of row i with (i + j) % 2 == color, one channel
    (``inv`` = 1 / diag: a product is cheaper than a division). The new row (updated cells, the others
    as they were) goes into a buffer, then back into the row: the first loop reads no value it writes,
    and neither loop steps by 2, so both run on SIMD lanes (1.46x faster than updating the cells one
    by one, and another 1.25x against copying the updated cells back by a stride of 2; the same values:
    a cell's update reads only cells of the other colour)."""
    up, mid, down, bi, ii, wxi, wyu, wyi = x[i - 1], x[i], x[i + 1], b[i], inv[i], wx[i], wy[i - 1], wy[i]
    wp, odd = len(mid), (i + color) & 1  # the parity of this colour's j
    for j in range(1, wp - 1):
        v = (bi[j] + _row_neighbours(up, mid, down, wxi, wyu, wyi, j)) * ii[j]
        row[j] = v if (j & 1) == odd else mid[j]
    for j in range(1, wp - 1):
        mid[j] = row[j]


@njit(cache=True, fastmath=True)
def _sweep(x, b, inv, wx, wy, color):
    """One half Gauss-Seidel sweep over the cells with (i + j) % 2 == color, every channel."""
    nc, hp, wp = x.shape
    row = np.empty(wp, x.dtype)
    for c in range(nc):
        for i in range(1, hp - 1):
            _sweep_row(x[c], b[c], inv, wx, wy, i, color, row)


@njit(cache=True, fastmath=True)
def _solve_coarsest(x, b, inv, wx, wy, sweeps):
    """``sweeps`` symmetric Gauss-Seidel sweeps (red, black, black, red) from x = 0: a symmetric
    stand-in for an exact solve on the few cells of the coarsest level."""
    x[:] = 0.0
    for _ in range(sweeps):
        _sweep(x, b, inv, wx, wy, 0)
        _sweep(x, b, inv, wx, wy, 1)
        _sweep(x, b, inv, wx, wy, 1)
        _sweep(x, b, inv, wx, wy, 0)


@njit(cache=True, inline="always")
def _red_from_zero(x, b, inv, i):
    """Row i's red update from x = 0 (its neighbours are zero: b * inv), written to every cell."""
    xi, bi, ii = x[i], b[i], inv[i]
    for j in range(1, len(xi) - 1):
        xi[j] = bi[j] * ii[j]


@njit(cache=True, fastmath=True)
def _smooth_restrict(x, b, inv, diag, wx, wy, cunk, cb):
    """The way down a level: from x = 0, a red then a black half sweep; then cb = R (b - A x) on the
    coarse unknowns, R the transpose of the bilinear interpolation: along each axis a coarse cell
    gathers its two children with weight 3/4 and the next fine cell on either side with 1/4 (9/16,
    3/16, 3/16, 1/16 in 2D), along rows then along columns.

    One pass over the rows, each stage a row behind the one before (it reads the rows around its own,
    which the stage before has finished): row i + 1 gets its red update, row i its black one, row i - 1
    its residual, gathered along the row at once; every second row completes a coarse row. The rows
    in flight stay in the fastest caches, every channel's, so the weights of a row are read once, and
    the residual needs no array of its own. From x = 0 the red update is b * inv; it is written to the
    black cells too, which the black update overwrites without reading them."""
    nc, hp, wp = x.shape
    hcp, wcp = cunk.shape
    row = np.empty(wp, x.dtype)
    res = np.zeros(wp + 1, x.dtype)  # one residual row, zero on the frame and beyond it (the last gathers' far cell)
    gathered = np.zeros((nc, 4, wcp), x.dtype)  # row k's residual gathered along the row, at k % 4 (0: the frame)
    last = 2 * hcp - 3  # the far fine row of the last coarse row: hp - 1 (the frame) or hp (beyond it)
    for c in range(nc):
        _red_from_zero(x[c], b[c], inv, 1)
    for i in range(1, last + 2):
        k = i - 1
        for c in range(nc):
            xc, bc = x[c], b[c]
            if i + 1 < hp - 1:
                _red_from_zero(xc, bc, inv, i + 1)
            if i < hp - 1:
                _sweep_row(xc, bc, inv, wx, wy, i, 1, row)
            if k < 1:
                continue
            gk = gathered[c, k % 4]
            if k < hp - 1:
                up, mid, down, bk, dk = xc[k - 1], xc[k], xc[k + 1], bc[k], diag[k]
                wxk, wyu, wyk = wx[k], wy[k - 1], wy[k]
                for j in range(1, wp - 1):
                    res[j] = bk[j] - dk[j] * mid[j] + _row_neighbours(up, mid, down, wxk, wyu, wyk, j)
                for cj in range(1, wcp - 1):
                    j = 2 * cj - 1
                    gk[cj] = THREE_QUARTERS * (res[j] + res[j + 1]) + QUARTER * (res[j - 1] + res[j + 2])
            else:
                gk[:] = 0.0
            if k % 2 == 1 and k >= 3:  # k = 2 ci + 1, the far row of coarse row ci (children 2 ci - 1, 2 ci)
                ci, k0, g = (k - 1) // 2, k - 2, gathered[c]
                g0, g1, g2, cu, cbi = g[(k0 - 1) % 4], g[k0 % 4], g[(k0 + 1) % 4], cunk[ci], cb[c, ci]
                for cj in range(1, wcp - 1):
                    cbi[cj] = cu[cj] * (THREE_QUARTERS * (g1[cj] + g2[cj]) + QUARTER * (g0[cj] + gk[cj]))


@njit(cache=True, fastmath=True)
def _interpolate_smooth(x, b, inv, unk, wx, wy, cx):
    """The way up a level: x += P cx (bilinear, cell-centred) on the fine unknowns, then a black and a
    red half sweep. P per fine row: the two nearest coarse rows mixed 3/4, 1/4, then along the row the
    two nearest coarse cells of that mix, the same way, both children of a coarse column in one step
    into a buffer, added to the row after (5x faster than adding to the odd and the even columns in
    two loops: stores with a stride of 2 do not use the SIMD lanes).
    One pass over the rows as in :func:`_smooth_restrict`: row i gets its correction, row i - 1 its
    black update, row i - 2 its red one."""
    nc, hp, wp = x.shape
    wcp = cx.shape[2]
    row = np.empty(wp, x.dtype)
    mix = np.empty(wcp, x.dtype)
    fine = np.empty(wp + 1, x.dtype)  # wp + 1: an odd width's last pair ends on the frame
    for i in range(1, hp + 1):
        for c in range(nc):
            xc, bc = x[c], b[c]
            if i < hp - 1:
                ci, ci2 = _coarse_rows(i)
                near, far, xi, ui = cx[c, ci], cx[c, ci2], xc[i], unk[i]
                for cj in range(wcp):
                    mix[cj] = THREE_QUARTERS * near[cj] + QUARTER * far[cj]
                for cj in range(1, (wp + 1) // 2):  # fine 2 cj - 1 (its next nearest: cj - 1) and 2 cj (cj + 1)
                    fine[2 * cj - 1] = THREE_QUARTERS * mix[cj] + QUARTER * mix[cj - 1]
                    fine[2 * cj] = THREE_QUARTERS * mix[cj] + QUARTER * mix[cj + 1]
                for j in range(1, wp - 1):
                    xi[j] += ui[j] * fine[j]
            if 1 <= i - 1 < hp - 1:
                _sweep_row(xc, bc, inv, wx, wy, i - 1, 1, row)
            if 1 <= i - 2:
                _sweep_row(xc, bc, inv, wx, wy, i - 2, 0, row)


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
def _residual(x, r, diag, wx, wy, b0):
    """r -= A x (r holds the right-hand side), and b0 = r in the V-cycle's float32."""
    nc, hp, wp = x.shape
    row = np.empty(wp)
    for i in range(1, hp - 1):
        for c in range(nc):
            _apply_row(x[c], diag, wx, wy, i, row)
            ri, bi = r[c, i], b0[c, i]
            for j in range(1, wp - 1):
                v = ri[j] - row[j]
                ri[j] = v
                bi[j] = v


@njit(cache=True, inline="always")
def _update_row(x, p, z, alpha, beta, i):
    """Row i of x += alpha p, then of p = z + beta p."""
    xi, pi, zi = x[i], p[i], z[i]
    for j in range(1, len(pi) - 1):
        xi[j] += alpha * pi[j]
        pi[j] = zi[j] + beta * pi[j]


@njit(cache=True, fastmath={"contract"})
def _row_dots(v, x, s):
    """s[c] += v[c] . x[c] over the row's cells j = 1 .. len - 2, one product after the other, each
    added in one rounding (FMA): without ``fastmath``'s reassociation, the sum of the scalar loop that
    computed p . A p before (a loop that did not vectorise), so the solution stays the same to the last
    bit. A reassociated sum would vectorise, 2% less per solve, but moves x by up to 2e-9, and a blended
    pixel could round the other way. A sum in order waits for the FMA's latency at every element, so
    three channels go through one loop, three sums in flight."""
    nc, wp = v.shape
    if nc == 3:
        s0, s1, s2 = s[0], s[1], s[2]
        v0, v1, v2, x0, x1, x2 = v[0], v[1], v[2], x[0], x[1], x[2]
        for j in range(1, wp - 1):
            s0 += v0[j] * x0[j]
            s1 += v1[j] * x1[j]
            s2 += v2[j] * x2[j]
        s[0], s[1], s[2] = s0, s1, s2
    else:
        for c in range(nc):
            t, vc, xc = s[c], v[c], x[c]
            for j in range(1, wp - 1):
                t += vc[j] * xc[j]
            s[c] = t


@njit(cache=True, fastmath=True)
def _update_apply(x, p, z, alpha, beta, diag, wx, wy, ap, pap):
    """x += alpha p (the last step's), p = z + beta p, ap = A p, pap[c] = p[c] . ap[c], in one pass
    over the rows: rows i + 1 of x and p are updated before row i of A p, which reads rows i - 1 to
    i + 1 of p. Moving the last step's update of x here saves :func:`_step` a read of p. Everything
    stays zero on the frame, and outside the region (z is), where A p needs no unknowns mask: A's
    diagonal there multiplies zero."""
    nc, hp, wp = p.shape
    rows = np.empty((nc, wp))
    pap[:] = 0.0
    for c in range(nc):
        _update_row(x[c], p[c], z[c], alpha[c], beta[c], 1)
    for i in range(1, hp - 1):
        for c in range(nc):
            pc, row = p[c], rows[c]
            if i + 1 < hp - 1:
                _update_row(x[c], pc, z[c], alpha[c], beta[c], i + 1)
            _apply_row(pc, diag, wx, wy, i, row)
            ai = ap[c, i]
            for j in range(1, wp - 1):
                ai[j] = row[j]
        _row_dots(rows, p[:, i], pap)


@njit(cache=True, fastmath=True)
def _step(r, ap, alpha, rr, b0):
    """r -= alpha A p, rr = |r|^2 per channel, and b0 = r in the V-cycle's float32."""
    nc, hp, wp = r.shape
    for c in range(nc):
        a, s = alpha[c], 0.0
        rc, apc, bc = r[c], ap[c], b0[c]
        for i in range(hp):
            for j in range(wp):
                v = rc[i, j] - a * apc[i, j]
                rc[i, j] = v
                bc[i, j] = v
                s += v * v
        rr[c] = s


@njit(cache=True, fastmath=True)
def _axpy(x, alpha, p):
    """x += alpha p per channel."""
    nc, hp, wp = x.shape
    for c in range(nc):
        xc, pc, a = x[c], p[c], alpha[c]
        for i in range(hp):
            for j in range(wp):
                xc[i, j] += a * pc[i, j]


@njit(cache=True)
def _plane(buf, offsets, hp, wp, k):
    """Level k's [H+2, W+2] array inside a flat buffer of every level's."""
    return buf[offsets[k]:offsets[k + 1]].reshape((hp[k], wp[k]))


@njit(cache=True)
def _planes(buf, offsets, nc, hp, wp, k):
    """Level k's [C, H+2, W+2] array inside a flat buffer of every level's."""
    return buf[offsets[k]:offsets[k + 1]].reshape((nc, hp[k], wp[k]))


@njit(cache=True)
def _vcycle(levels, xs, bs, nc):
    """xs[level 0] = one V-cycle applied to bs[level 0], from zero: red-black Gauss-Seidel before
    each coarse correction, black-red after, so the preconditioner is symmetric."""
    unk, diag, inv, wx, wy, hp, wp, o2, o3 = levels
    last = len(hp) - 1
    for k in range(last):
        _smooth_restrict(_planes(xs, o3, nc, hp, wp, k), _planes(bs, o3, nc, hp, wp, k), _plane(inv, o2, hp, wp, k),
                         _plane(diag, o2, hp, wp, k), _plane(wx, o2, hp, wp, k), _plane(wy, o2, hp, wp, k),
                         _plane(unk, o2, hp, wp, k + 1), _planes(bs, o3, nc, hp, wp, k + 1))
    _solve_coarsest(_planes(xs, o3, nc, hp, wp, last), _planes(bs, o3, nc, hp, wp, last),
                    _plane(inv, o2, hp, wp, last), _plane(wx, o2, hp, wp, last), _plane(wy, o2, hp, wp, last),
                    COARSEST_SWEEPS)
    for k in range(last - 1, -1, -1):
        _interpolate_smooth(_planes(xs, o3, nc, hp, wp, k), _planes(bs, o3, nc, hp, wp, k), _plane(inv, o2, hp, wp, k),
                            _plane(unk, o2, hp, wp, k), _plane(wx, o2, hp, wp, k), _plane(wy, o2, hp, wp, k),
                            _planes(xs, o3, nc, hp, wp, k + 1))


@njit(cache=True)
def _pcg(x, r, p, ap, levels, xs, bs, limit, maxiter):
    """Conjugate gradients on every channel of x at once (each with its own step lengths), the
    V-cycle as preconditioner; r holds the right-hand side on entry, the residual on return, p and ap
    are zero; returns (iterations, |r|^2 per channel), iterations = -1 if ``maxiter`` went by first.
    x, r, p, ap are float64; the V-cycle's buffers float32."""
    unk, diag, inv, wx, wy, hp, wp, o2, o3 = levels
    nc = x.shape[0]
    d0, ex, ey = _plane(diag, o2, hp, wp, 0), _plane(wx, o2, hp, wp, 0), _plane(wy, o2, hp, wp, 0)
    b0, z = _planes(bs, o3, nc, hp, wp, 0), _planes(xs, o3, nc, hp, wp, 0)
    rr, rz, pap = np.empty(nc), np.empty(nc), np.empty(nc)
    _residual(x, r, d0, ex, ey, b0)
    _dot(r, r, rr)
    if (rr <= limit).all():
        return 0, rr
    _vcycle(levels, xs, bs, nc)
    _dot(r, z, rz)
    alpha, beta = np.zeros(nc), np.zeros(nc)  # the first direction is z itself (p is zero)
    for it in range(1, maxiter + 1):
        _update_apply(x, p, z, alpha, beta, d0, ex, ey, ap, pap)
        alpha = rz / np.maximum(pap, 1e-300)
        _step(r, ap, alpha, rr, b0)
        if (rr <= limit).all():
            _axpy(x, alpha, p)
            return it, rr
        _vcycle(levels, xs, bs, nc)
        rz_old = rz.copy()
        _dot(r, z, rz)
        beta = rz / np.maximum(rz_old, 1e-300)
    _axpy(x, alpha, p)
    return -1, rr


class _Buffers:
    """Flat buffers kept from one solve to the next, handed out filled as ``np.zeros`` (or ``np.ones``)
    would. A large paste's solve takes tens of MB, which the allocator gives back to the system when
    the solve frees them, and fresh memory costs a page fault per 4 KiB on first use, about 10x the
    memset that refills a kept buffer: 34 -> 27 ms on the largest captured paste (430x386), 6.0 -> 5.6
    ms per solve on all 70. Each buffer grows to the largest solve's size (34 MiB for a 480x480 box, all
    buffers; one set per solve running at once)."""

    def __init__(self):
        self._kept = {}

    def filled(self, key: str, n: int, dtype, value: float = 0.0) -> np.ndarray:
        buf = self._kept.get(key)
        if buf is None or buf.size < n:
            buf = self._kept[key] = np.empty(n, dtype)
        out = buf[:n]
        out.fill(value)
        return out


_SPARE: list[_Buffers] = []  # sets no solve is using: a solve takes one (or makes one) and puts it back


class _Multigrid:
    """The levels' operators and vectors, each kind in one flat buffer (one compiled call runs the
    whole solve; ``levels`` is the tuple the kernels take)."""

    def __init__(self, mask: np.ndarray, deg: np.ndarray, channels: int, buffers: _Buffers):
        shapes = [mask.shape]
        while max(shapes[-1]) > COARSEST:
            shapes.append(((shapes[-1][0] + 1) // 2, (shapes[-1][1] + 1) // 2))
        hp = np.array([h + 2 for h, _ in shapes], np.int64)
        wp = np.array([w + 2 for _, w in shapes], np.int64)
        o2 = np.concatenate([[0], np.cumsum(hp * wp)]).astype(np.int64)
        o3 = o2 * channels
        f32 = np.float32
        self.levels = (buffers.filled("unk", o2[-1], f32), buffers.filled("diag", o2[-1], f32, 1.0),
                       buffers.filled("inv", o2[-1], f32, 1.0), buffers.filled("wx", o2[-1], f32),
                       buffers.filled("wy", o2[-1], f32), hp, wp, o2, o3)
        _build_levels(mask, deg, self.levels)
        self.x, self.b = buffers.filled("vx", o3[-1], f32), buffers.filled("vb", o3[-1], f32)


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
    try:
        buffers = _SPARE.pop()
    except IndexError:
        buffers = _Buffers()
    try:
        mg = _Multigrid(mask, np.ascontiguousarray(deg, dtype=np.float64), nc, buffers)
        # Channel-first with a zero frame: the loops run over contiguous rows and leave the frame at zero.
        n = nc * (h + 2) * (w + 2)
        x, r, p, ap = (buffers.filled(key, n, np.float64).reshape(nc, h + 2, w + 2) for key in ("x", "r", "p", "ap"))
        _channels_first(mask, np.ascontiguousarray(x0), np.ascontiguousarray(b), x, r)
        limit = np.empty(nc)
        _dot(r, r, limit)
        limit = tol * tol * np.maximum(limit, 1e-300)
        iterations, rr = _pcg(x, r, p, ap, mg.levels, mg.x, mg.b, limit, maxiter)
        if iterations < 0:
            raise RuntimeError(f"Poisson solve did not reach tol {tol} in {maxiter} iterations "
                               f"(relative residual {np.sqrt(rr / limit).max() * tol:.2e})")
        return np.moveaxis(x[:, 1:-1, 1:-1], 0, 2).copy(), iterations
    finally:
        _SPARE.append(buffers)


def load_kernels() -> None:
    """Compile (first use on a machine) or load (cached) every kernel, by solving a tiny problem with
    the argument types of a real blend: 0.2-0.5 s, then nothing more in this process."""
    rng = np.random.default_rng(0)
    src, dst = rng.integers(0, 256, (2, 12, 12, 3), dtype=np.uint8)
    mask = np.zeros((12, 12), bool)
    mask[3:9, 2:10] = True
    deg, b = grid_system(src, dst, mask)  # "mixed" is a run-time flag of the same compiled loop
    solve_poisson(mask, deg, b, src, tol=1e-6)  # uint8 src, as poisson_blend passes it
