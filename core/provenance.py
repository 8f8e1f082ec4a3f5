"""Provenance: which code made a result (package versions, git revision) and where it ran.

Recorded in the generator's manifests and the trainer's ``run.json``, so a dataset or a checkpoint
says what produced it.
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
import time

# Distribution names (what ``pip`` installs), not import names.
VERSIONED_PACKAGES = ("segswap", "numpy", "scipy", "torch", "opencv-contrib-python-headless", "pyamg", "numba",
                      "pycocotools", "webdataset", "ray", "scikit-image", "onnxruntime", "onnx",
                      "pillow")


def package_versions(packages=VERSIONED_PACKAGES) -> dict[str, str | None]:
    """``{"python": "3.11.7", "numpy": "2.1.0", ...}``; None for a package that is not installed."""
    versions = {"python": platform.python_version()}
    for name in packages:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_revision(path: str | None = None) -> str | None:
    """``<sha>`` or ``<sha>-dirty`` of the checkout holding segswap's code; None outside a checkout."""
    path = path or os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", path, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{sha}-dirty" if dirty else sha


def environment() -> dict:
    """Where and with what this process runs: packages, git revision, host, command line, start time."""
    return {"packages": package_versions(), "git_revision": git_revision(), "host": platform.node(),
            "argv": sys.argv, "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
