"""Training augmentations of a decoded pair, and the item they make (images + feature-grid ground truth).

Augmentations (the official loader's, each an independent draw from the item's generator):

- per image, the stylised rendering instead of the plain one with ``p_style`` (when the shard has one);
- thin-plate-spline warp of image 1 with ``p_tps`` (control grid 4x4 or 6x6, each point moved by up to
  ``tps_move / (4 * grid)`` of the image size, the official loader's range); mask1 is warped with it,
  flow10 is re-sampled through the warp and flow01 is pushed through its exact (Newton) inverse, so the
  ground truth stays exact; a match pushed out of the frame loses its correspondence;
- swap of images 0 and 1 with ``p_swap``;
- image 1's background cells hidden as attention keys (``pad1``) with ``p_pad``.

The ground truth itself is ``train/groundtruth.py``'s.
"""
from __future__ import annotations

import cv2
import numpy as np

from segswap.core.tps import ThinPlateSpline, lattice_points, random_tps, upsample_lattice
from segswap.shards.format import ALL_FIELDS, FormatError, Pair, decode_sample
from segswap.train.groundtruth import cell_centres, grid_mask, sample_flow, sample_flow_at_centres

AUGMENT_DEFAULTS = {
    "p_style": 0.5,
    "p_tps": 0.5,
    "tps_grids": [4, 6],
    "tps_move": 1.0,
    "p_swap": 0.5,
    "p_pad": 0.5,
}
# The TPS image map is evaluated on a lattice of about this many points per side and upsampled: 16 px
# apart at 480 px, where it is within 0.6 px of the spline at 99% of the pixels (see warp_dense).
TPS_LATTICE = 30

# ------------------------------------------------------------------------------------------- TPS

def random_warp(rng: np.random.Generator, grids, move: float) -> ThinPlateSpline:
    """T: warped-image coordinates -> original coordinates, normalised to [0, 1]^2.

    The generator's spline (``core/tps.py``, also the one with the exact Newton inverse) with the
    official loader's draw: an n x n control grid (n from ``grids``), each point moved by
    U(-0.5, 0.5) / n in [-1, 1] units, i.e. U(-0.25, 0.25) * move / n in [0, 1] units.
    """
    return random_tps(rng, 0.0, 0.0, 1.0, 1.0, points_per_side=tuple(grids), jitter=0.25 * move)[0]


def warp_dense(tps: ThinPlateSpline, h: int, w: int) -> np.ndarray:
    """cv2.remap map (fixed point, ``CV_16SC2`` + ``CV_16UC1``): for every pixel of the warped image, where
    to read it in the original.

    The spline is evaluated on a lattice of cell centres every ``min(h, w) // TPS_LATTICE`` pixels and
    upsampled bilinearly (``core.tps.upsample_lattice``, the generator's dense maps). Fixed point is
    what cv2.remap converts float maps to internally for bilinear sampling (1/32 px), so converting once
    here loses nothing and makes every later remap cheaper.

    Against the spline at every pixel (default warps, 480 px): median 0.1 px, 99th percentile 0.6 px,
    at most about 1.5 px next to a control point, where the kernel's curvature peaks. The ground truth
    does not go through this map: it uses the spline and its exact inverse at the cell centres.
    """
    step = max(1, min(h, w) // TPS_LATTICE)
    size = np.array([w, h], np.float64)
    mapped = tps(lattice_points(h, w, step) / size) * size - 0.5  # remap addresses pixel centres by integer coordinates
    return cv2.convertMaps(upsample_lattice(mapped, h, w, step), None, cv2.CV_16SC2)


# ------------------------------------------------------------------------------------ augmenting

def resize_square(img: np.ndarray, size: int) -> np.ndarray:
    """The training resize, for images and masks alike (and the feature cache's images): area
    interpolation to size x size, nothing when the size is already right."""
    if img.shape[0] == size and img.shape[1] == size:
        return img
    return cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)


class PairAugmenter:
    """Pair -> training item (numpy arrays) at ``image_size`` with feature-grid ground truth."""

    def __init__(self, image_size: int = 480, stride: int = 16, p_style: float = 0.5, p_tps: float = 0.5,
                 tps_grids=(4, 6), tps_move: float = 1.0, p_swap: float = 0.5, p_pad: float = 0.5):
        if image_size % stride:
            raise ValueError(f"image_size {image_size} must be a multiple of the feature stride {stride}")
        self.size = int(image_size)
        self.grid = self.size // stride
        self.p_style, self.p_tps, self.p_swap, self.p_pad = p_style, p_tps, p_swap, p_pad
        self.tps_grids = tuple(int(g) for g in tps_grids)
        self.tps_move = float(tps_move)

    def choose_fields(self, raw: dict, rng: np.random.Generator) -> dict:
        """Keep one rendering per image (stylised with p_style) before decoding: decode only what is used."""
        out = {k: v for k, v in raw.items() if not k.startswith("sty")}
        for i in ("0", "1"):
            sty = raw.get(f"sty{i}.jpg")
            if sty is not None and rng.random() < self.p_style:
                out[f"img{i}.jpg"] = sty
        return out

    def _resize(self, img: np.ndarray) -> np.ndarray:
        return resize_square(img, self.size)

    def __call__(self, pair: Pair, rng: np.random.Generator) -> dict:
        return self.augment(pair, self._resize(pair.img0), self._resize(pair.img1), rng, "img", warp_image)

    def augment(self, pair: Pair, view0, view1, rng: np.random.Generator, name: str, warp1) -> dict:
        """The augmentations and the grid ground truth around two views of the pair's images (pixels, or
        cached features: ``train/feature_cache.py``). ``warp1(view1, tps, map1, map2)`` applies the TPS to
        image 1's view; the ground truth is the same whatever the view. Items carry the views as
        ``{name}0`` / ``{name}1``."""
        s, g = self.size, self.grid
        # Masks stay uint8 {0, 255} until grid_mask averages them over each cell.
        m0, m1 = self._resize(pair.mask0), self._resize(pair.mask1)
        f01 = sample_flow_at_centres(pair.flow01, g, g)
        if rng.random() < self.p_tps:
            tps = random_warp(rng, self.tps_grids, self.tps_move)
            map1, map2 = warp_dense(tps, s, s)
            view1 = warp1(view1, tps, map1, map2)
            # Nearest keeps the mask binary (as stored) and costs half a bilinear remap.
            m1 = cv2.remap(m1, map1, map2, cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
            f10 = sample_flow(pair.flow10, tps(cell_centres(g, g)))  # warped cell -> original cell -> image 0
            ok = np.isfinite(f01[..., 0])
            # image 0 -> original image 1 -> warped image 1; a match the warp pushes out of the frame
            # (or where Newton does not converge: NaN) has no correspondence any more.
            moved = tps.inverse(f01[ok]).astype(np.float32)
            moved[~np.all((moved >= 0) & (moved <= 1), axis=1)] = np.nan
            f01[ok] = moved
        else:
            f10 = sample_flow_at_centres(pair.flow10, g, g)
        gm0, gm1 = grid_mask(m0, g, g), grid_mask(m1, g, g)
        if rng.random() < self.p_swap:
            view0, view1, gm0, gm1, f01, f10 = view1, view0, gm1, gm0, f10, f01
        pad1 = (gm1 < 0.5) if rng.random() < self.p_pad else np.zeros((g, g), bool)
        w01 = gm0 * np.isfinite(f01[..., 0])
        w10 = gm1 * np.isfinite(f10[..., 0])
        return {
            "key": pair.key,
            f"{name}0": np.ascontiguousarray(view0), f"{name}1": np.ascontiguousarray(view1),
            "mask0": gm0.astype(np.float32), "mask1": gm1.astype(np.float32),
            "flow01": np.nan_to_num(f01, nan=0.0).astype(np.float32),
            "flow10": np.nan_to_num(f10, nan=0.0).astype(np.float32),
            "flow01_weight": w01.astype(np.float32), "flow10_weight": w10.astype(np.float32),
            "pad1": pad1,
        }


def warp_image(img: np.ndarray, _tps, map1: np.ndarray, map2: np.ndarray) -> np.ndarray:
    """The pixel path's TPS on image 1: bilinear remap through the dense map, reflected at the borders."""
    return cv2.remap(img, map1, map2, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


def no_augment(image_size: int, stride: int = 16) -> PairAugmenter:
    """The validation / pool view: plain images, no warp, no swap, no padding."""
    return PairAugmenter(image_size, stride, p_style=0.0, p_tps=0.0, p_swap=0.0, p_pad=0.0)


# --------------------------------------------------------------------------------------- stream

def decode_choice(raw: dict, augment: PairAugmenter, rng: np.random.Generator) -> Pair:
    """Whitelist the raw sample, pick renderings, decode through the shard format's checked decoder."""
    key = raw.get("__key__", "?")
    unknown = sorted(k for k in raw if not k.startswith("__") and k not in ALL_FIELDS)
    if unknown:
        raise FormatError(f"sample {key}: unknown field(s) {unknown}")
    return decode_sample(augment.choose_fields(raw, rng))
