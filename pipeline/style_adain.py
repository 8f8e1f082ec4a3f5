"""The paper's styliser: AdaIN with a user's pytorch-AdaIN weights and a folder of paintings.

``--style adain --adain-weights DIR --style-images PAINTINGS``. DIR holds ``vgg_normalised.pth`` and
``decoder.pth`` in the public pytorch-AdaIN layout (the released files, or a decoder trained on your
paintings with ``segswap-adain-train``, as the paper trained on Brueghel). For each image a painting is
drawn uniformly from PAINTINGS and a strength α uniformly from ``strength`` (paper: α ~ U[0, 1)); the
output is ``decoder(α·AdaIN(f_c, f_s) + (1 − α)·f_c)`` at the image's own size.

Each painting is resized so its shorter side is ``style_size`` (512, as pytorch-AdaIN's test script)
and reduced to the mean and std of its relu4_1 features, cached per worker: a painting costs one VGG
pass however often it is drawn. Content images are stylised in batches of ``batch_size`` (consecutive
images of the same size). Runs on CUDA when available (``device="auto"``), else CPU.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import cv2
import numpy as np
import torch

from segswap.nets.adain import load_adain
from segswap.nets.device import resolve_device
from segswap.pipeline.style_magenta import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_STRENGTH,
    StyleImageFolder,
    check_batch_size,
    check_images,
    check_strength,
)

log = logging.getLogger(__name__)

VGG_FILE = "vgg_normalised.pth"
DECODER_FILE = "decoder.pth"
DEFAULT_STYLE_SIZE = 512


def resize_shorter_side(image: np.ndarray, side: int) -> np.ndarray:
    h, w = image.shape[:2]
    scale = side / min(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if size == (w, h):
        return image
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)


def to_tensor(images: list[np.ndarray], device: torch.device) -> torch.Tensor:
    """uint8 HxWx3 images of one size -> float [B,3,H,W] in [0,1], channels-last in memory (oneDNN and
    cuDNN convolutions run faster on it: 0.77x the time of the default layout here on CPU)."""
    x = torch.from_numpy(np.stack(images)).to(device)
    return x.permute(0, 3, 1, 2).float().div_(255.0).contiguous(memory_format=torch.channels_last)


def to_images(x: torch.Tensor) -> list[np.ndarray]:
    """float [B,3,H,W] (clamped to [0,1]) -> uint8 HxWx3 images."""
    x = (x.clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return list(x)


class AdainStyliser:
    """AdaIN styliser (see the module docstring). Loaded once per worker.

    Options: ``adain_weights`` (folder with ``vgg_normalised.pth`` and ``decoder.pth``; required),
    ``style_images`` (folder of paintings; required), ``strength`` ((lo, hi) range of α, default (0, 1)),
    ``batch_size`` (default: 8 on CUDA, 1 on CPU, where batches were ~10% slower per image in
    ``benchmarks/bench_style.py``: the activations of 480 px images outgrow the caches), ``device`` ("auto", "cpu", "cuda", "cuda:N"; default "auto"),
    ``style_size`` (shorter side of the paintings, default 512).
    """

    name = "adain"

    def __init__(self, *, adain_weights: str | os.PathLike | None = None,
                 style_images: str | os.PathLike | None = None, strength=DEFAULT_STRENGTH,
                 batch_size: int | None = None, device: str = "auto", style_size: int = DEFAULT_STYLE_SIZE):
        if adain_weights is None:
            raise ValueError(f"--style adain needs --adain-weights DIR holding {VGG_FILE} and {DECODER_FILE} "
                             "(the pytorch-AdaIN files, or a decoder from segswap-adain-train)")
        if style_images is None:
            raise ValueError("--style adain needs --style-images DIR: a folder of paintings to take styles from")
        weights_dir = Path(adain_weights)
        if not weights_dir.is_dir():
            raise FileNotFoundError(f"{weights_dir}: AdaIN weights folder not found")
        missing = [f for f in (VGG_FILE, DECODER_FILE) if not (weights_dir / f).is_file()]
        if missing:
            present = sorted(p.name for p in weights_dir.iterdir())[:10]
            raise FileNotFoundError(f"{weights_dir}: missing {', '.join(missing)} (AdaIN needs {VGG_FILE} and "
                                    f"{DECODER_FILE}); the folder holds {present}")
        if not isinstance(style_size, int) or style_size < 16:
            raise ValueError(f"style_size must be an integer >= 16, got {style_size!r}")
        self.strength = check_strength(strength)
        self.style_size = style_size
        self.device = resolve_device(device)
        if batch_size is None:
            batch_size = DEFAULT_BATCH_SIZE if self.device.type == "cuda" else 1
        self.batch_size = check_batch_size(batch_size)
        self.styles = StyleImageFolder(style_images)
        self.model = load_adain(weights_dir / VGG_FILE, weights_dir / DECODER_FILE).to(self.device).eval()
        self.model.to(memory_format=torch.channels_last)

    @property
    def skipped(self) -> int:
        """Unreadable style images met so far (logged once each, never drawn again)."""
        return self.styles.skipped

    def _style_stats(self, painting: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        x = to_tensor([resize_shorter_side(painting, self.style_size)], self.device)
        mean, std = self.model.style_stats(x)
        return mean[0], std[0]

    @torch.no_grad()
    def stylise(self, images: list[np.ndarray], rng: np.random.Generator) -> tuple[list[np.ndarray], list[dict]]:
        """uint8 HxWx3 RGB images -> (stylised images of the same sizes, provenance dicts)."""
        check_images(images)
        lo, hi = self.strength
        draws = []
        for _ in images:  # style then strength per image, in image order: batch-size independent
            index, stats = self.styles.draw_cached(rng, self._style_stats)
            draws.append((index, stats, float(rng.uniform(lo, hi))))
        out: list[np.ndarray] = []
        start = 0
        while start < len(images):
            # A batch: up to batch_size consecutive images of the same size.
            end = start + 1
            while end < len(images) and end - start < self.batch_size and images[end].shape == images[start].shape:
                end += 1
            batch = draws[start:end]
            mean = torch.stack([stats[0] for _, stats, _ in batch])
            std = torch.stack([stats[1] for _, stats, _ in batch])
            alpha = torch.tensor([a for _, _, a in batch], device=self.device)
            y = self.model.stylise_with_stats(to_tensor(images[start:end], self.device), mean, std, alpha)
            out.extend(to_images(y))
            start = end
        infos = [{"styliser": self.name, "style_id": self.styles.files[index], "strength": round(a, 6)}
                 for index, _, a in draws]
        return out, infos
