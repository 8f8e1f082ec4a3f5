"""Ground truth at the feature grid (``image_size / stride`` cells per side), from the stored full
resolution fields (see ``shards/format.py``):

- soft mask of a cell = mean of the full-resolution mask over the cell (area resampling);
- correspondence of a cell = the stored flow interpolated bilinearly at the cell centre, using only
  defined (finite) neighbours; undefined where none is;
- correspondence weight = soft mask x defined (the loss's ``W`` in Eq. 2).
"""
from __future__ import annotations

import functools

import cv2
import numpy as np


def grid_mask(mask: np.ndarray, gh: int, gw: int) -> np.ndarray:
    """Full-resolution mask (uint8 0/255 or float 0/1) -> soft [gh, gw] = mean over each cell."""
    m = mask.astype(np.float32)
    if mask.dtype == np.uint8:
        m /= 255.0
    return cv2.resize(m, (gw, gh), interpolation=cv2.INTER_AREA)


def _bilinear_neighbours(fh: int, fw: int, pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices [4, n] of the four flow cells around each normalised point, and their weights."""
    p = pts.reshape(-1, 2).astype(np.float64)
    u = p[:, 0] * fw - 0.5
    v = p[:, 1] * fh - 0.5
    j0, i0 = np.floor(u), np.floor(v)
    du, dv = u - j0, v - i0
    ii = np.clip(i0.astype(np.intp) + np.array([[0], [0], [1], [1]]), 0, fh - 1)
    jj = np.clip(j0.astype(np.intp) + np.array([[0], [1], [0], [1]]), 0, fw - 1)
    w = np.stack([(1 - dv) * (1 - du), (1 - dv) * du, dv * (1 - du), dv * du]).astype(np.float32)
    return ii * fw + jj, w


@functools.lru_cache(maxsize=16)
def _centre_neighbours(fh: int, fw: int, gh: int, gw: int) -> tuple[np.ndarray, np.ndarray]:
    # Every pair of a run samples its flows at the same cell centres: the table is built once.
    idx, w = _bilinear_neighbours(fh, fw, cell_centres(gh, gw))
    idx.flags.writeable = w.flags.writeable = False  # shared by every later call
    return idx, w


def _gather_flow(flow: np.ndarray, idx: np.ndarray, w: np.ndarray) -> np.ndarray:
    """NaN-aware bilinear combination of the flow cells ``idx`` [4, n] with weights ``w`` -> [n, 2]."""
    val = flow.reshape(-1, 2)[idx].astype(np.float32)  # [4, n, 2]: only the neighbours are converted
    ok = ~np.isnan(val[..., 0])
    w = w * ok
    val[~ok] = 0
    wsum = w.sum(axis=0)
    acc = (w[..., None] * val).sum(axis=0)
    out = np.full(acc.shape, np.nan, np.float32)
    good = wsum > 1e-6
    out[good] = acc[good] / wsum[good, None]
    return out


def sample_flow(flow: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Bilinear, NaN-aware sampling of a flow field [fh,fw,2] at normalised points [...,2] -> [...,2].

    Flow cell (i, j) has its centre at ((j+0.5)/fw, (i+0.5)/fh). Undefined (NaN) neighbours are left
    out and the remaining weights renormalised; a point with no defined neighbour gets NaN. Points
    outside the field take their nearest border cells.
    """
    fh, fw = flow.shape[:2]
    return _gather_flow(flow, *_bilinear_neighbours(fh, fw, pts)).reshape(*pts.shape[:-1], 2)


def sample_flow_at_centres(flow: np.ndarray, gh: int, gw: int) -> np.ndarray:
    """``sample_flow(flow, cell_centres(gh, gw))`` with the neighbour table cached: [gh, gw, 2]."""
    fh, fw = flow.shape[:2]
    return _gather_flow(flow, *_centre_neighbours(fh, fw, gh, gw)).reshape(gh, gw, 2)


def cell_centres(gh: int, gw: int) -> np.ndarray:
    """Normalised (x, y) of the centres of a gh x gw grid: [gh, gw, 2]."""
    x = (np.arange(gw) + 0.5) / gw
    y = (np.arange(gh) + 0.5) / gh
    return np.stack(np.meshgrid(x, y), axis=-1).astype(np.float32)
