"""A trained model for Python users: images of any size and type in, full-resolution arrays out.

``segswap.load_model(path)`` returns a :class:`Predictor`. It accepts each image as a uint8 or float
numpy array (``[H, W, 3]`` RGB or ``[H, W]`` grey; floats in [0, 1]), a PIL image, a torch tensor
(``[3, H, W]`` or ``[H, W, 3]``, uint8 or float in [0, 1]) or a file path, resizes both images to the
model's input size (a square, ``predictor.size`` px: the checkpoint's training size, 480 for an
official checkpoint), runs the model and resizes its feature-grid outputs back to each input's size.

Coordinate conventions (the same as the shards and every head, docs/CONTRACTS.md): a correspondence is
the normalised ``(x, y)`` position of the match in the *other* image, x to the right and y down, both
in [0, 1] of that image's width and height; multiply by ``(W1, H1)`` to get pixels of image 1. Because
positions are normalised, resizing a non-square input to the model's square and back changes nothing
in their meaning.
"""
from __future__ import annotations

import os

import cv2
import numpy as np
import torch

from segswap.apps.pairs import HEAD_KEYS, score_query
from segswap.nets.device import resolve_device

DEFAULT_SIZE = 480  # the paper's (and an official checkpoint's) input side
STRIDE = 16


def model_size(model, requested: int | None = None) -> int:
    """The input side: ``requested``, else the checkpoint's training size, else 480; a multiple of 16."""
    if requested:
        size = int(requested)
    else:
        cfg = getattr(model, "config", None) or {}
        size = int(cfg.get("data", {}).get("image_size", DEFAULT_SIZE))
    if size % STRIDE:
        raise ValueError(f"size {size} must be a multiple of {STRIDE}")
    return size


def as_rgb(img) -> np.ndarray:
    """Any supported image (see the module docstring) -> uint8 RGB ``[H, W, 3]``."""
    if isinstance(img, (str, os.PathLike)):
        from segswap.core.images import load_rgb

        return load_rgb(img)
    if hasattr(img, "convert") and hasattr(img, "size"):  # a PIL image, without importing PIL
        img = np.asarray(img.convert("RGB"))
    elif torch.is_tensor(img):
        img = img.detach().cpu()
        if img.ndim == 3 and img.shape[0] in (1, 3) and img.shape[-1] not in (1, 3):
            img = img.permute(1, 2, 0)
        img = img.numpy()
    arr = np.asarray(img)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
        raise ValueError(f"an image must be [H, W, 3] RGB or [H, W] grey, got shape {arr.shape}")
    arr = arr[..., :3]
    if arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.floating):
            raise ValueError(f"an image must be uint8, or float in [0, 1]; got {arr.dtype}")
        arr = np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(arr)


def to_image_size(grid: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of a grid field ``[h, w]`` or ``[h, w, 2]`` to ``[height, width(, 2)]``.

    OpenCV's half-pixel convention puts grid cell (i, j) at ((j + 0.5) / w, (i + 0.5) / h) of the image,
    which is where the heads define it.
    """
    return cv2.resize(np.ascontiguousarray(grid, np.float32), (width, height), interpolation=cv2.INTER_LINEAR)


class Predictor:
    """A co-segmentation model with its input size and device; see :func:`load_model`.

    ``predictor.model`` is the underlying :class:`segswap.train.model.CoSegModel` (eval mode).
    """

    def __init__(self, model, device: torch.device, size: int):
        self.model, self.device, self.size = model, device, int(size)

    def resized(self, img) -> np.ndarray:
        """The image as the model sees it: uint8 RGB [size, size, 3]."""
        return cv2.resize(as_rgb(img), (self.size, self.size), interpolation=cv2.INTER_AREA)

    def _input(self, img) -> tuple[torch.Tensor, tuple[int, int]]:
        rgb = as_rgb(img)
        return torch.as_tensor(self.resized(rgb))[None].to(self.device), rgb.shape[:2]

    @torch.no_grad()
    def predict(self, img0, img1, resolution: str = "image") -> dict:
        """Repeated-region masks and dense correspondences of a pair.

        Returns float32 numpy arrays, with (H0, W0) and (H1, W1) the input sizes:

        - ``mask0`` [H0, W0], ``mask1`` [H1, W1]: probability in [0, 1] that a pixel shows content
          repeated in the other image;
        - ``flow01`` [H0, W0, 2]: for each pixel of image 0, the normalised (x, y) of its match in image 1;
        - ``flow10`` [H1, W1, 2]: the same from image 1 into image 0.

        ``resolution="grid"`` returns the model's own outputs instead, on the ``size/16`` x ``size/16``
        feature grid (``[h, w]`` and ``[h, w, 2]``), cell (i, j) centred at ((j + 0.5) / w, (i + 0.5) / h).
        """
        if resolution not in ("image", "grid"):
            raise ValueError(f"resolution must be 'image' or 'grid', got {resolution!r}")
        (t0, hw0), (t1, hw1) = self._input(img0), self._input(img1)
        out = self.model(t0, t1)
        grid = {k: out[k][0].float().cpu().numpy() for k in HEAD_KEYS}
        if resolution == "grid":
            return grid
        sizes = {"mask0": hw0, "flow01": hw0, "mask1": hw1, "flow10": hw1}
        return {k: to_image_size(grid[k], *sizes[k]) for k in HEAD_KEYS}

    @torch.no_grad()
    def score(self, img0, img1, region=None) -> float:
        """The paper's retrieval score (Eq. 3) of image 1 for the query image 0 (higher: more shared).

        ``region``: optional box ``(x1, y1, x2, y2)`` in pixels of image 0 to restrict the query to
        (default: the whole image). The query mask is refined on the pair (query, query) first, as the
        official evaluation does (:mod:`segswap.apps.score`).
        """
        (t0, hw0), (t1, _) = self._input(img0), self._input(img1)
        f0, f1 = self.model.features(t0), self.model.features(t1)
        h, w = f0.shape[-2:]
        query = torch.zeros(h, w, device=f0.device)
        if region is None:
            query[:] = 1
        else:
            x1, y1, x2, y2 = (float(v) for v in region)
            sx, sy = w / hw0[1], h / hw0[0]  # input pixels -> grid cells
            c1, r1 = int(np.floor(x1 * sx)), int(np.floor(y1 * sy))
            c2, r2 = int(np.ceil(x2 * sx)), int(np.ceil(y2 * sy))
            query[max(r1, 0):max(min(r2, h), r1 + 1), max(c1, 0):max(min(c2, w), c1 + 1)] = 1
        scores, _ = score_query(self.model, f0[0], query, f1)
        return float(scores[0])


def load_model(path: str | os.PathLike, device: str | torch.device | None = None, size: int | None = None) -> Predictor:
    """Load one of our checkpoints (``last.pth``) or an official SegSwap one (``hard_mining_neg5.pth``).

    device: ``None``/``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
    size: model input side in pixels, a multiple of 16 (default: the checkpoint's training size, else 480).
    Raises :class:`segswap.train.checkpoint.CheckpointError` (a ValueError) naming the file when it
    is not a checkpoint segswap can read.
    """
    from segswap.train.checkpoint import load_model as load_checkpoint

    dev = resolve_device(str(device) if device is not None else "auto")
    model = load_checkpoint(path, device=dev)
    return Predictor(model, dev, model_size(model, size))
