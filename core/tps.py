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

DEFAULT_JITTER = 0.25
DEFAULT_POINTS_PER_SIDE = (4, 6)


def _kernel(d2: np.ndarray) -> np.ndarray:
    """TPS radial basis U(r) = r^2 log r^2 (with U(0) = 0), from squared distances."""
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

    def __call__(self, pts: np.ndarray) -> np.ndarray:
        pts = np.asarray(pts, np.float64)
        shape = pts.shape
        p = (pts.reshape(-1, 2) - self._shift) / self._scale
        out = np.empty_like(p)
        for s in range(0, len(p), 65536):  # chunks bound the [N, n] kernel matrix
            q = p[s:s + 65536]
            d2 = (q[:, 0:1] - self._c[:, 0]) ** 2 + (q[:, 1:2] - self._c[:, 1]) ** 2
            out[s:s + 65536] = self._a[0] + q @ self._a[1:] + _kernel(d2) @ self._w
        return out.reshape(shape)

    def jacobian(self, pts: np.ndarray) -> np.ndarray:
        """[..., 2, 2] with J[..., i, j] = d f_i / d p_j."""
        pts = np.asarray(pts, np.float64)
        p = (pts.reshape(-1, 2) - self._shift) / self._scale
        jac = np.empty((len(p), 2, 2))
        for s in range(0, len(p), 65536):
            q = p[s:s + 65536]
            diff = q[:, None, :] - self._c[None, :, :]  # [N, n, 2]
            d2 = diff[..., 0] ** 2 + diff[..., 1] ** 2
            with np.errstate(divide="ignore", invalid="ignore"):
                g = np.where(d2 > 0, 2.0 * (np.log(d2) + 1.0), 0.0)  # dU/d(p_j) = g * diff_j
            # J_ij = A[1 + j, i] + sum_n w[n, i] * g[n] * diff[n, j], then undo the input scaling.
            for j in range(2):
                jac[s:s + 65536, :, j] = (self._a[1 + j] + (g * diff[..., j]) @ self._w) / self._scale
        return jac.reshape(pts.shape[:-1] + (2, 2))

    def inverse(self, pts: np.ndarray, *, tol: float = 1e-4, max_iter: int = 30) -> np.ndarray:
        """Solve ``f(p) = q`` for every q in ``pts``; NaN where Newton does not reach ``tol``."""
        q = np.asarray(pts, np.float64)
        shape = q.shape
        q = q.reshape(-1, 2)
        p = q - (self(q) - q)  # first-order guess: f is the identity plus a small displacement
        active = np.arange(len(q))
        for _ in range(max_iter):
            if not len(active):
                break
            pa = p[active]
            r = self(pa) - q[active]
            done = np.hypot(r[:, 0], r[:, 1]) < tol
            active, pa, r = active[~done], pa[~done], r[~done]
            if not len(active):
                break
            jac = self.jacobian(pa)
            det = jac[:, 0, 0] * jac[:, 1, 1] - jac[:, 0, 1] * jac[:, 1, 0]
            det = np.where(np.abs(det) < 1e-12, 1e-12, det)
            dx = (jac[:, 1, 1] * r[:, 0] - jac[:, 0, 1] * r[:, 1]) / det
            dy = (-jac[:, 1, 0] * r[:, 0] + jac[:, 0, 0] * r[:, 1]) / det
            step = np.stack([dx, dy], 1)
            # Damp steps larger than a few pixels (far outside the warped region the map is wild).
            norm = np.hypot(step[:, 0], step[:, 1])[:, None]
            step = np.where(norm > 8.0, step * (8.0 / np.maximum(norm, 1e-12)), step)
            p[active] = pa - step
        else:
            r = self(p[active]) - q[active]
            bad = np.hypot(r[:, 0], r[:, 1]) >= tol
            p[active[bad]] = np.nan
        return p.reshape(shape)


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
