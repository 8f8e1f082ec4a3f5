"""Backbones are handed out frozen: eval mode (fixed batch-norm statistics, no dropout) and no gradients."""
from __future__ import annotations

from torch import nn


def frozen(net: nn.Module) -> nn.Module:
    """``net`` in eval mode with every parameter's ``requires_grad`` off; returns it."""
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net
