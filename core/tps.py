"""Thin-plate-spline warps with an exact (numerical) inverse.

A TPS maps the plane smoothly so that chosen control points land on chosen targets. The forward map
is a closed form; its inverse is not a TPS, so fitting a second spline from the targets back to the
controls (as the official data loader does) gives correspondences that are off by up to a few pixels.
Here the inverse is solved numerically: Newton's method on ``f(p) = q`` with the spline's analytic
Jacobian, started from the first-order guess ``q - (f(q) - q)``, until the residual is below
``tol`` pixels (points that do not converge are reported as NaN).

Random warps (:func:`random_tps`): ``k x k`` control points (k = 4 or 6 per side, as in the official
code) on a regular grid over a rectangle, each moved independently by ``U(-jitter, jitter) * extent / k``
along x and y (extent = the rectangle's width or height). The default jitter 0.25 equals the official
loader's ``(rand - 0.5) / k`` in [-1, 1] units: at most a quarter of a grid cell's share of the
extent, which keeps the map one-to-one.

Dense maps (:func:`lattice_points`, :func:`upsample_lattice`): a warp evaluated exactly at the cell
centres of a stride-s lattice (plus one ring outside the image) and interpolated bilinearly to every
pixel centre by ``cv2.resize``. The generator draws its pastes with them, the trainer its TPS
augmentation.
"""
from __future__ import annotations

import cv2
import numpy as np
from numba import njit

DEFAULT_JITTER = 0.25
DEFAULT_POINTS_PER_SIDE = (4, 6)


def _kernel(d2: np.ndarray) -> np.ndarray:
    """TPS radial basis U(r) = r^2 log r^2 (with U(0) = 0), from squared distances (for the fit; the
    compiled loops below evaluate it point by point)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        out = d2 * np.log(d2)
    return np.where(d2 > 0, out, 0.0)


class ThinPlateSpline:
    """``f(p) = a0 + A p + sum_i w_i U(|p - c_i|)`` interpolating ``controls -> targets`` exactly.

    Points are float arrays [..., 2] of (x, y) in any consistent unit (pixels here).
    """

    def __init__(self, controls: np.ndarray, targets: np.ndarray):
        self.controls = np.asarray(controls, np.float64).reshape(-1, 2)
        self.targets = np.asarray(targets, np.float64).reshape(-1, 2)
        n = len(self.controls)
        if n < 3 or self.targets.shape != self.controls.shape:
            raise ValueError("a TPS needs at least 3 control points and as many targets")
        # Centre and scale the controls: the linear system is then well conditioned at any image size.
        self._shift = self.controls.mean(0)
        self._scale = max(float(np.abs(self.controls - self._shift).max()), 1e-9)
        c = (self.controls - self._shift) / self._scale
        k = _kernel(((c[:, None, :] - c[None, :, :]) ** 2).sum(-1))
        p = np.hstack([np.ones((n, 1)), c])
        system = np.zeros((n + 3, n + 3))
        system[:n, :n], system[:n, n:], system[n:, :n] = k, p, p.T
        rhs = np.zeros((n + 3, 2))
        rhs[:n] = self.targets
        sol = np.linalg.solve(system, rhs)
        self._w, self._a = sol[:n], sol[n:]  # kernel weights [n, 2], affine [3, 2]
        self._c = c

    def _normalised(self, pts: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray((np.asarray(pts, np.float64).reshape(-1, 2) - self._shift) / self._scale)

    def __call__(self, pts: np.ndarray) -> np.ndarray:
        pts = np.asarray(pts, np.float64)
        out = np.empty((pts.size // 2, 2))
        _evaluate(self._normalised(pts), self._c, self._a, self._w, out)
        return out.reshape(pts.shape)

    def jacobian(self, pts: np.ndarray) -> np.ndarray:
        """[..., 2, 2] with J[..., i, j] = d f_i / d p_j."""
        pts = np.asarray(pts, np.float64)
        jac = np.empty((pts.size // 2, 2, 2))
        _jacobian(self._normalised(pts), self._c, self._a, self._w, self._scale, jac)
        return jac.reshape(pts.shape[:-1] + (2, 2))

    def inverse(self, pts: np.ndarray, *, tol: float = 1e-4, max_iter: int = 30) -> np.ndarray:
        """Solve ``f(p) = q`` for every q in ``pts``; NaN where Newton does not reach ``tol``."""
        q = np.ascontiguousarray(np.asarray(pts, np.float64).reshape(-1, 2))
        p = np.empty_like(q)
        _inverse(q, self._shift, self._scale, self._c, self._a, self._w, tol, max_iter, p)
        return p.reshape(np.shape(pts))


# The spline's loops, compiled (numba, cached next to this file): one pass over the control points per
# point, where numpy built [points, controls, 2] temporaries; the Newton inverse runs each point to its
# own convergence. The spline was most of a paste's geometry (~10 ms a pair, 3 ms now: bench_gen.py).

@njit(cache=True, inline="always")
def _value_and_jacobian(x, y, c, a, w, with_jacobian):
    """f and (if asked) d f / d p at one normalised point: (fx, fy, jxx, jxy, jyx, jyy)."""
    fx = a[0, 0] + x * a[1, 0] + y * a[2, 0]
    fy = a[0, 1] + x * a[1, 1] + y * a[2, 1]
    jxx, jxy, jyx, jyy = a[1, 0], a[2, 0], a[1, 1], a[2, 1]
    for i in range(c.shape[0]):
        dx, dy = x - c[i, 0], y - c[i, 1]
        d2 = dx * dx + dy * dy
        if d2 > 0.0:
            log_d2 = np.log(d2)
            u = d2 * log_d2  # U(r) = r^2 log r^2
            fx += w[i, 0] * u
            fy += w[i, 1] * u
            if with_jacobian:
                g = 2.0 * (log_d2 + 1.0)  # dU/dp_j = g * (p - c)_j
                jxx += w[i, 0] * g * dx
                jxy += w[i, 0] * g * dy
                jyx += w[i, 1] * g * dx
                jyy += w[i, 1] * g * dy
    return fx, fy, jxx, jxy, jyx, jyy


@njit(cache=True)
def _evaluate(p, c, a, w, out):
    for k in range(p.shape[0]):
        fx, fy, _, _, _, _ = _value_and_jacobian(p[k, 0], p[k, 1], c, a, w, False)
        out[k, 0], out[k, 1] = fx, fy


@njit(cache=True)
def _jacobian(p, c, a, w, scale, jac):
    for k in range(p.shape[0]):
        _, _, jxx, jxy, jyx, jyy = _value_and_jacobian(p[k, 0], p[k, 1], c, a, w, True)
        jac[k, 0, 0], jac[k, 0, 1], jac[k, 1, 0], jac[k, 1, 1] = jxx / scale, jxy / scale, jyx / scale, jyy / scale


@njit(cache=True)
def _inverse(q, shift, scale, c, a, w, tol, max_iter, out):
    """Newton on f(p) = q from the first-order guess q - (f(q) - q), steps damped to 8 pixels."""
    for k in range(q.shape[0]):
        qx, qy = q[k, 0], q[k, 1]
        fx, fy, _, _, _, _ = _value_and_jacobian((qx - shift[0]) / scale, (qy - shift[1]) / scale, c, a, w, False)
        px, py = qx - (fx - qx), qy - (fy - qy)
        converged = False
        for _ in range(max_iter + 1):
            fx, fy, jxx, jxy, jyx, jyy = _value_and_jacobian((px - shift[0]) / scale, (py - shift[1]) / scale,
                                                             c, a, w, True)
            rx, ry = fx - qx, fy - qy
            if np.hypot(rx, ry) < tol:
                converged = True
                break
            jxx, jxy, jyx, jyy = jxx / scale, jxy / scale, jyx / scale, jyy / scale
            det = jxx * jyy - jxy * jyx
            if abs(det) < 1e-12:
                det = 1e-12
            sx = (jyy * rx - jxy * ry) / det
            sy = (-jyx * rx + jxx * ry) / det
            norm = np.hypot(sx, sy)
            if norm > 8.0:  # far outside the warped region the map is wild
                sx, sy = sx * (8.0 / norm), sy * (8.0 / norm)
            px, py = px - sx, py - sy
        out[k, 0], out[k, 1] = (px, py) if converged else (np.nan, np.nan)


def load_kernels() -> None:
    """Compile (first use on a machine) or load (cached) the spline's kernels on a tiny warp."""
    controls = grid_controls(0, 0, 8, 8, 3)
    spline, pts = ThinPlateSpline(controls, controls + 0.5), np.ones((2, 2))
    spline.jacobian(pts)
    spline.inverse(spline(pts))


def grid_controls(x0: float, y0: float, x1: float, y1: float, per_side: int) -> np.ndarray:
    """[per_side**2, 2] control points on a regular grid over the rectangle, corners included."""
    xs, ys = np.meshgrid(np.linspace(x0, x1, per_side), np.linspace(y0, y1, per_side))
    return np.stack([xs.ravel(), ys.ravel()], 1)


def random_tps(rng: np.random.Generator, x0: float, y0: float, x1: float, y1: float, *,
               points_per_side=DEFAULT_POINTS_PER_SIDE, jitter: float = DEFAULT_JITTER):
    """Draw a random TPS over a rectangle; returns (spline, params dict for the provenance json)."""
    k = int(rng.choice(np.asarray(points_per_side)))
    controls = grid_controls(x0, y0, x1, y1, k)
    extent = np.array([x1 - x0, y1 - y0], np.float64)
    moves = rng.uniform(-jitter, jitter, size=controls.shape) * extent / k
    targets = controls + moves
    params = {"points_per_side": k, "jitter": jitter,
              "controls": np.round(controls, 3).tolist(), "targets": np.round(targets, 3).tolist()}
    return ThinPlateSpline(controls, targets), params


def lattice_points(h: int, w: int, stride: int) -> np.ndarray:
    """[ceil(h/s) + 2, ceil(w/s) + 2, 2] pixel (x, y) of the centres of the stride-s cells, with one
    extra ring outside the image."""
    xs = (np.arange(-1, -(-w // stride) + 1) + 0.5) * stride
    ys = (np.arange(-1, -(-h // stride) + 1) + 0.5) * stride
    gx, gy = np.meshgrid(xs, ys)
    return np.stack([gx, gy], -1)


def upsample_lattice(values: np.ndarray, h: int, w: int, stride: int) -> np.ndarray:
    """Bilinear interpolation of a lattice_points-shaped field at every pixel centre: float32 [h, w, C].

    ``cv2.resize`` of the ring lattice to ``stride`` pixels per node puts every output pixel centre at
    exactly its fractional lattice index (half-pixel-centre convention on both sides), so border pixels
    are interpolated, never clamped; float images get float interpolation weights. NaN nodes make
    their neighbouring pixels NaN. The result is a view into the upsampled lattice.
    """
    ny, nx = values.shape[:2]
    up = cv2.resize(values.astype(np.float32), (nx * stride, ny * stride), interpolation=cv2.INTER_LINEAR)
    return up[stride:stride + h, stride:stride + w]
