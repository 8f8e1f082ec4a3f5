"""Poisson blending: the iterative solvers against the sparse direct solve, the equation itself, and
the basic promises of every method."""
import numpy as np
import pytest

from segswap.pipeline.blend import BLEND_METHODS, blend, poisson_system
from segswap.pipeline.poisson import grid_system, solve_poisson


def _scene(h=96, w=112, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    dst = np.stack([xx * 2, yy * 2, 80 + 40 * np.sin(xx / 7.0)], 2).clip(0, 255).astype(np.uint8)
    src = np.stack([200 - yy, 60 + 30 * np.cos(yy / 5.0) + xx / 3, xx + yy], 2).clip(0, 255).astype(np.uint8)
    src = (src.astype(int) + rng.integers(-6, 7, src.shape)).clip(0, 255).astype(np.uint8)
    mask = ((yy - 50) ** 2 / 30 ** 2 + (xx - 60) ** 2 / 38 ** 2) < 1
    mask[:, :4] = mask[:, :4] | (np.abs(yy - 40) < 10)[:, :4]  # a part touching the left border
    return src, dst, mask


def _odd_masks():
    """Shapes the multigrid hierarchy must survive: odd sizes, a one-pixel-wide line, a lone pixel,
    two components, a region covering most of the image and touching three borders."""
    src, dst, _ = _scene(h=37, w=51, seed=3)
    yy, xx = np.mgrid[0:37, 0:51]
    line = (np.abs(yy - 2 * xx / 3 - 3) < 0.6) & (xx > 2) & (xx < 48)
    lone = np.zeros((37, 51), bool)
    lone[18, 25] = True
    two = ((yy - 10) ** 2 + (xx - 12) ** 2 < 40) | ((yy - 28) ** 2 + (xx - 40) ** 2 < 60)
    most = ~(((yy - 20) ** 2 + (xx - 25) ** 2) < 9) & (yy > 0)
    return [(src, dst, m) for m in (line, lone, two, most)]


@pytest.mark.parametrize("method", ["multigrid", "pyamg"])
@pytest.mark.parametrize("gradients", ["normal", "mixed"])
def test_iterative_solvers_match_direct_solve(method, gradients):
    for src, dst, mask in [_scene()] + _odd_masks():
        out = blend(method, src, dst, mask, gradients=gradients)
        ref = blend("direct", src, dst, mask, gradients=gradients)
        # Same system, tol 1e-6: rounding to uint8 may differ by one level on a handful of pixels.
        diff = np.abs(out.astype(int) - ref.astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01



def test_multigrid_buffers_kept_between_solves_change_nothing():
    """The solver keeps its buffers from one solve to the next (pipeline/poisson.py, _Buffers): a solve
    after a larger and a differently shaped one gives exactly what it gives on fresh buffers, even
    when the kept buffers hold another problem's values."""
    from segswap.pipeline import poisson

    problems = [_scene()] + _odd_masks() + [_scene(h=61, w=40, seed=9)]
    systems = [(mask, *grid_system(src, dst, mask), src) for src, dst, mask in problems]
    fresh = []
    for mask, deg, b, src in systems:
        poisson._SPARE.clear()
        fresh.append(solve_poisson(mask, deg, b, src, tol=1e-6))
    poisson._SPARE.clear()
    for (mask, deg, b, src), (x, iterations) in zip(systems[::-1] + systems, fresh[::-1] + fresh):
        again, its = solve_poisson(mask, deg, b, src, tol=1e-6)
        assert its == iterations and np.array_equal(again, x)

@pytest.mark.parametrize("gradients", ["normal", "mixed"])
def test_grid_system_is_the_documented_equation(gradients):
    # b_p and |N_p| straight from the definition in pipeline/blend.py, pixel by pixel, on a region
    # that touches the image border (fewer neighbours there) and has holes (Dirichlet inside).
    rng = np.random.default_rng(5)
    src, dst = rng.integers(0, 256, (2, 6, 7, 3), dtype=np.uint8)
    mask = rng.random((6, 7)) < 0.6
    deg, b = grid_system(src, dst, mask, gradients)
    s, d = src.astype(float), dst.astype(float)
    for i, j in zip(*np.nonzero(mask)):
        want_b, want_deg = np.zeros(3), 0
        for qi, qj in ((i - 1, j), (i + 1, j), (i, j - 1), (i, j + 1)):
            if not (0 <= qi < 6 and 0 <= qj < 7):
                continue
            want_deg += 1
            v = s[i, j] - s[qi, qj]
            if gradients == "mixed":
                vd = d[i, j] - d[qi, qj]
                v = np.where(np.abs(vd) > np.abs(v), vd, v)
            want_b += v + (0 if mask[qi, qj] else d[qi, qj])
        assert deg[i, j] == want_deg and np.allclose(b[i, j], want_b)
    assert not deg[~mask].any() and not b[~mask].any()


def test_multigrid_reaches_the_tolerance_and_says_when_it_cannot():
    src, dst, mask = _scene()
    A, b, idx = poisson_system(src, dst, mask)
    deg, b_grid = grid_system(src, dst, mask)
    x, iterations = solve_poisson(mask, deg, b_grid, src.astype(float), tol=1e-10)
    x = x.reshape(-1, 3)[idx]
    assert np.linalg.norm(A @ x - b, axis=0).max() <= 1e-10 * np.linalg.norm(b, axis=0).min() * 1.001
    assert iterations < 30  # a multigrid preconditioner: tens of iterations, not hundreds
    with pytest.raises(RuntimeError, match="did not reach tol 1e-12 in 2 iterations"):
        solve_poisson(mask, deg, b_grid, np.zeros_like(b_grid), tol=1e-12, maxiter=2)


def test_solution_satisfies_the_poisson_equation():
    src, dst, mask = _scene()
    A, b, idx = poisson_system(src, dst, mask)
    out = blend("direct", src, dst, mask).reshape(-1, 3)[idx].astype(np.float64)
    # Residual of the rounded solution: at most the rounding, 0.5 per pixel times the 4 + 4 stencil,
    # on rows where no value was clipped to [0, 255].
    unclipped = ((out > 0) & (out < 255)).all(1)
    rows = np.asarray((A != 0).astype(int) @ (~unclipped).astype(int)) == 0
    resid = np.abs(A @ out - b)[rows]
    assert rows.mean() > 0.5 and resid.max() <= 4.0
    assert resid.mean() < 1.0


def test_constant_offset_is_absorbed():
    # Pasting dst + 40 into dst with normal gradients must give dst back: the guidance field equals
    # dst's own gradient and the boundary values are dst's.
    _, dst, mask = _scene()
    dst_safe = (dst.astype(int).clip(0, 215)).astype(np.uint8)
    src = dst_safe + 40
    for method in ("multigrid", "pyamg"):
        out = blend(method, src, dst_safe, mask)
        assert np.abs(out.astype(int) - dst_safe.astype(int)).max() <= 1


@pytest.mark.parametrize("method", BLEND_METHODS)
def test_outside_the_mask_is_untouched(method):
    src, dst, mask = _scene()
    out = blend(method, src, dst, mask)
    assert out.dtype == np.uint8 and out.shape == dst.shape
    assert np.array_equal(out[~mask], dst[~mask])
    if method == "none":
        assert np.array_equal(out[mask], src[mask])
    else:  # blended interior follows src's gradients, not dst's values
        inner = mask.copy()
        inner[1:-1, 1:-1] &= mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
        gy_out = np.diff(out.astype(int), axis=0)[inner[1:] & inner[:-1]]
        gy_src = np.diff(src.astype(int), axis=0)[inner[1:] & inner[:-1]]
        assert np.abs(gy_out - gy_src).mean() < 3


def test_bad_arguments():
    src, dst, mask = _scene()
    with pytest.raises(ValueError, match="unknown blend method 'magic'"):
        blend("magic", src, dst, mask)
    with pytest.raises(ValueError, match="one size"):
        blend("multigrid", src[:10], dst, mask)
    assert np.array_equal(blend("multigrid", src, dst, np.zeros_like(mask)), dst)
