"""Where a command runs: the CPUs it may use, and one reading of a ``--device`` option
(``auto``, ``cpu``, ``cuda`` or ``cuda:N``) for every command."""
from __future__ import annotations

import os


def available_cpus() -> int:
    """CPUs this process may use (SLURM and containers restrict the affinity mask, not cpu_count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def resolve_device(name: str, local_rank: int = 0):
    """``auto`` = this process's GPU when CUDA is available, else the CPU; a bare ``cuda`` means the
    GPU of this process's local rank (torchrun starts one process per GPU). Asking for CUDA where
    there is none is an error now rather than a failure deep inside the first forward pass."""
    import torch  # here, not at the top: the CPU-only generator and segment tools import this module

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    if name == "cuda":
        name = f"cuda:{local_rank}"
    return torch.device(name)
