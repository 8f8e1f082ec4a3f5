"""A checkpoint of an untrained tiny model (64 px input, 4x4 feature grid), for tests that load one."""
from __future__ import annotations

import torch

from segswap.train.checkpoint import save_checkpoint
from segswap.train.config import resolve
from segswap.train.model import build_model


def write_tiny_checkpoint(path, image_size: int = 64, seed: int = 0):
    """Write ``path`` (one of our checkpoints, step 0) and return it."""
    cfg = resolve(None, {"data.shards": "x.tar", "train.out": str(path), "model.transformer.model": "tiny",
                         "data.image_size": image_size})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(cfg["model"])
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, {"step": 0, "config": cfg, "model": model.state_dict()})
    return path
