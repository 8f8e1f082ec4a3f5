"""Reading images for the applications: the project's one loader and lister (:mod:`segswap.core.images`)."""
from __future__ import annotations

import logging
import os

import numpy as np

from segswap.core.images import BadImage, load_rgb
from segswap.core.images import resize_rgb as _resize
from segswap.core.listing import IMAGE_EXTENSIONS
from segswap.core.listing import list_images as _list_images

__all__ = ["BadImage", "read_rgb", "resize_rgb", "list_images", "IMAGE_EXTENSIONS"]
log = logging.getLogger("segswap.apps")


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """uint8 [H, W, 3] RGB of the image at ``path``; :class:`BadImage` names the file if unusable."""
    return load_rgb(path)


def resize_rgb(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize uint8 RGB to ``size`` = (width, height)."""
    return _resize(img, size[0], size[1])


def list_images(folder: str | os.PathLike) -> list[str]:
    """Sorted file names of the images directly inside ``folder``; entries named like images that are
    not readable files (a folder ``x.jpg``, a broken symlink) are logged and left out."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: not a directory")
    listing = _list_images(folder, recursive=False)
    for path, reason in listing.skipped:
        log.warning("skipped %s: %s", path, reason)
    return [p.name for p in listing.files]
