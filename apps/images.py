"""Reading images for the applications: the project's one loader, resized to the evaluation size."""
from __future__ import annotations

import os

import numpy as np

from segswap.core.images import BadImage, load_rgb
from segswap.core.images import resize_rgb as _resize

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

__all__ = ["BadImage", "read_rgb", "resize_rgb", "list_images", "IMAGE_EXTENSIONS"]


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """uint8 [H, W, 3] RGB of the image at ``path``; :class:`BadImage` names the file if unusable."""
    return load_rgb(path)


def resize_rgb(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize uint8 RGB to ``size`` = (width, height)."""
    return _resize(img, size[0], size[1])


def list_images(folder: str | os.PathLike) -> list[str]:
    """Sorted file names of the images directly inside ``folder``."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: not a directory")
    return sorted(f for f in os.listdir(folder)
                  if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(folder, f)))
