"""Reading user-supplied weight files safely, with errors that name the file.

Every pretrained network in ``nets/`` reads its weights through :func:`load_weights_file`: never
unpickled (``weights_only=True``), always on the CPU first, and any failure re-raised as one error
type whose message starts with the file's path.
"""
from __future__ import annotations

import os

import torch


class WeightsFileError(ValueError):
    """A weights file that cannot be used; the message names the file and the problem."""


def load_weights_file(path: str | os.PathLike, what: str, error: type[WeightsFileError] = WeightsFileError):
    """``torch.load(path, weights_only=True)`` on the CPU, or ``error`` naming ``path`` and ``what``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise error(f"{path}: {what} file not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for bad files; re-raise with the name
        raise error(f"{path}: cannot read as a torch weights file ({type(e).__name__}: {e})") from e
