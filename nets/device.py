"""One reading of a ``--device`` option for every command: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""
from __future__ import annotations

import torch


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` = this process's GPU when CUDA is available, else the CPU; a bare ``cuda`` means the
    GPU of this process's local rank (torchrun starts one process per GPU). Asking for CUDA where
    there is none is an error now rather than a failure deep inside the first forward pass."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    if name == "cuda":
        name = f"cuda:{local_rank}"
    return torch.device(name)
