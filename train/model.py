"""Backbone + co-segmentation head, the model the trainer optimises and the apps run.

``CoSegModel(backbone, head)``: ``features(img)`` runs the frozen backbone (``nets/backbones.py``:
ResNet-50 conv4 or VGG16 pool4) on images normalised its way and L2-normalises each location; ``forward(img0, img1)`` runs the head on both. The
head is one of the architectures of docs/CONTRACTS.md, built by :func:`build_head` from the config:

- ``arch: transformer`` -> :class:`segswap.train.transformer.CrossImageTransformer` (``transformer:`` section)
- ``arch: ncnet`` -> ``segswap.train.ncnet.SparseNCNet(**cfg["ncnet"])`` (imported only when asked for)
"""
from __future__ import annotations

import torch
from torch import nn

from segswap.nets.backbones import build_backbone
from segswap.nets.resnet import CONV4_CHANNELS, l2n

ARCHS = ("transformer", "ncnet")
TRANSFORMER_DEFAULTS = {"model": "small", "layer_types": None, "dropout": 0.1, "drop_feat": 0.1,
                        "activation": "relu", "pos_weight": 0.1, "feat_weight": 1.0}


class CoSegModel(nn.Module):
    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def train(self, mode: bool = True):
        # The backbone is frozen and always in eval mode (BatchNorm statistics must not move).
        super().train(mode)
        self.backbone.eval()
        return self

    @torch.no_grad()
    def features(self, img: torch.Tensor) -> torch.Tensor:
        """img: uint8 [B,H,W,3] (or [H,W,3]) RGB, or float [B,3,H,W] already normalised by
        ``backbone.normalise`` -> [B, backbone.channels, H/16, W/16], unit L2 norm per location."""
        if img.dtype == torch.uint8:
            img = self.backbone.normalise(img, device=next(self.backbone.parameters()).device)
        return l2n(self.backbone(img).float())

    def forward(self, img0: torch.Tensor, img1: torch.Tensor, pad1: torch.Tensor | None = None) -> dict:
        return self.head(self.features(img0), self.features(img1), pad1)


def build_head(arch: str, transformer_cfg: dict | None = None, ncnet_cfg: dict | None = None,
               feat_dim: int = CONV4_CHANNELS) -> nn.Module:
    if arch == "transformer":
        from segswap.train.transformer import CrossImageTransformer
        return CrossImageTransformer(feat_dim=feat_dim, **{**TRANSFORMER_DEFAULTS, **(transformer_cfg or {})})
    if arch == "ncnet":
        from segswap.train.ncnet import SparseNCNet  # issue 6; heavy sparse machinery only when asked
        return SparseNCNet(**(ncnet_cfg or {}))
    raise ValueError(f"unknown arch {arch!r}; choose from {ARCHS}")


def build_model(cfg: dict, backbone_weights: str | None = None) -> CoSegModel:
    """``cfg`` is the ``model`` section of the training config (arch, backbone, backbone_weights, transformer,
    ncnet)."""
    weights = backbone_weights if backbone_weights is not None else cfg.get("backbone_weights")
    backbone = build_backbone(cfg.get("backbone", "resnet50"), weights)
    head = build_head(cfg["arch"], cfg.get("transformer"), cfg.get("ncnet"), feat_dim=backbone.channels)
    return CoSegModel(backbone, head)
