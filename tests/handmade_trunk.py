"""A hand-built, weight-free ResNet-50 conv4 trunk in the torchvision key layout, for learning checks.

A randomly initialised trunk is useless for matching: its stride-16 features are not stable under
sub-stride shifts, and on generator pairs a cell's nearest neighbour in the other image is its true
match only 15-25% of the time (colour means alone do better). Pretrained weights (MoCo v2) are a user
file, not something a test can download. This module *constructs* weights instead, so that the real
trunk (``nets/resnet.py``), loaded through the real torchvision-layout loader, computes features that
carry the information a matcher needs:

- ``conv1``: per colour channel, a Gaussian blur (both signs) and four oriented Gaussian derivatives
  (both signs): 30 of the 64 channels, the rest zero;
- every BatchNorm is the identity (weight 1, bias 0, running mean 0, variance 1);
- ``layer1``: the first block's shortcut copies the 30 channels, every residual branch is switched off
  (``bn3`` weight 0);
- ``layer2``/``layer3``: each block's residual branch is a per-channel 3x3 binomial blur (strided in the
  first block, whose shortcut is off), so the features are smoothed before each subsampling instead of
  aliased.

The result is a stride-16 map of blurred colour and oriented-gradient energy: a weak, but shift-stable,
local descriptor. It stands in for pretrained weights where only the training machinery is under test.
"""
from __future__ import annotations

import numpy as np
import torch

from segswap.nets.resnet import ResNet50Conv4

N_FEATURES = 30  # 3 colours x (blur, 4 derivatives) x 2 signs


def _gaussian_filters(sigma: float = 1.5, size: int = 7) -> list[np.ndarray]:
    r = np.arange(size) - size // 2
    yy, xx = np.meshgrid(r, r, indexing="ij")
    g = np.exp(-(xx ** 2 + yy ** 2) / (2 * sigma ** 2))
    g /= g.sum()
    dx, dy = -xx * g / sigma ** 2, -yy * g / sigma ** 2
    derivs = [dx, dy, (dx + dy) / np.sqrt(2), (dx - dy) / np.sqrt(2)]
    # Derivatives respond ~sigma times more weakly than the blur to a unit edge: rescale them to match.
    return [g] + [d * 4 * sigma for d in derivs]


def _identity_bn(sd: dict, prefix: str, n: int, weight: float = 1.0) -> None:
    sd[f"{prefix}.weight"] = torch.full((n,), weight)
    sd[f"{prefix}.bias"] = torch.zeros(n)
    sd[f"{prefix}.running_mean"] = torch.zeros(n)
    sd[f"{prefix}.running_var"] = torch.ones(n)
    sd[f"{prefix}.num_batches_tracked"] = torch.zeros((), dtype=torch.long)


def _embed(out_c: int, in_c: int) -> torch.Tensor:
    """1x1 conv weights copying the first N_FEATURES channels."""
    w = torch.zeros(out_c, in_c, 1, 1)
    idx = torch.arange(N_FEATURES)
    w[idx, idx, 0, 0] = 1.0
    return w


def _blur3(c: int) -> torch.Tensor:
    """3x3 binomial blur of each of the first N_FEATURES channels (a diagonal, depth-wise kernel)."""
    k = torch.tensor([1.0, 2.0, 1.0])
    k = torch.outer(k, k) / 16
    w = torch.zeros(c, c, 3, 3)
    idx = torch.arange(N_FEATURES)
    w[idx, idx] = k
    return w


def handmade_trunk_state_dict() -> dict:
    """The trunk's weights as a torchvision-layout state dict (keys conv1.*, bn1.*, layer1-3.*)."""
    net = ResNet50Conv4()
    sd = {k: torch.zeros_like(v) for k, v in net.state_dict().items()}
    conv1 = torch.zeros(64, 3, 7, 7)
    filters = _gaussian_filters()
    ch = 0
    for colour in range(3):
        for f in filters:
            for sign in (1.0, -1.0):
                conv1[ch, colour] = sign * torch.from_numpy(f).float()
                ch += 1
    assert ch == N_FEATURES
    sd["conv1.weight"] = conv1
    _identity_bn(sd, "bn1", 64)
    for layer, blocks in (("layer1", 3), ("layer2", 4), ("layer3", 6)):
        for b in range(blocks):
            p = f"{layer}.{b}"
            width = sd[f"{p}.conv2.weight"].shape[0]
            inplanes, outplanes = sd[f"{p}.conv1.weight"].shape[1], sd[f"{p}.conv3.weight"].shape[0]
            _identity_bn(sd, f"{p}.bn1", width)
            _identity_bn(sd, f"{p}.bn2", width)
            if layer == "layer1":
                # identity blocks: branch off, the first block's shortcut copies the features
                _identity_bn(sd, f"{p}.bn3", outplanes, weight=0.0)
                if b == 0:
                    sd[f"{p}.downsample.0.weight"] = _embed(outplanes, inplanes)
                    _identity_bn(sd, f"{p}.downsample.1", outplanes)
                continue
            sd[f"{p}.conv1.weight"] = _embed(width, inplanes)
            sd[f"{p}.conv2.weight"] = _blur3(width)
            sd[f"{p}.conv3.weight"] = _embed(outplanes, width)
            _identity_bn(sd, f"{p}.bn3", outplanes)
            if b == 0:  # strided block: only the blurred branch survives the subsampling
                _identity_bn(sd, f"{p}.downsample.1", outplanes, weight=0.0)
    return sd


def write_handmade_trunk(path) -> str:
    torch.save(handmade_trunk_state_dict(), path)
    return str(path)
