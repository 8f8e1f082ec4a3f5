"""The normalised VGG-19 encoder of AdaIN, in the public pytorch-AdaIN layout.

``vgg_normalised.pth`` (pytorch-AdaIN, converted from the Torch ``vgg_normalised.t7`` of the original
AdaIN code) is the ``state_dict`` of a 53-module ``nn.Sequential``: index 0 is a 1x1 convolution that
folds the input preprocessing (RGB in [0, 1] -> the mean-subtracted 0-255 BGR the Caffe VGG saw) into
the network, every 3x3 convolution is preceded by a 1-pixel reflection padding, and max pools use
``ceil_mode=True``. Its keys are ``{0,2,5,9,12,16,19,22,25,29,32,35,38,42,45,48,51}.{weight,bias}``.
AdaIN uses the slice ``[:31]`` (up to relu4_1); the style loss reads relu1_1, relu2_1, relu3_1, relu4_1
at the slice boundaries in :data:`RELU_SLICES`.

We build exactly that module so a user's existing weight file loads unchanged, and check the file
strictly: a missing file, a file that is not a tensor dictionary, missing or unexpected keys, and
shape mismatches all raise :class:`WeightsFileError` naming the file and the offending keys.
"""
from __future__ import annotations

import logging
import os

import torch
import torch.nn as nn

from segswap.nets.weights_io import WeightsFileError, load_weights_file  # noqa: F401 - re-exported

log = logging.getLogger(__name__)

# Conv layers of VGG-19 after the 1x1 preprocessing conv: (in, out) channels, with "M" for a max pool.
_VGG19_LAYERS = [(3, 64), (64, 64), "M", (64, 128), (128, 128), "M",
                 (128, 256), (256, 256), (256, 256), (256, 256), "M",
                 (256, 512), (512, 512), (512, 512), (512, 512), "M",
                 (512, 512), (512, 512), (512, 512), (512, 512)]
NUM_VGG_MODULES = 53
RELU4_1_END = 31  # encoder = full[:31]
# (start, end) Sequential indices of the four encoder stages, each ending at relu1_1 ... relu4_1.
RELU_SLICES = {"relu1_1": (0, 4), "relu2_1": (4, 11), "relu3_1": (11, 18), "relu4_1": (18, 31)}


def build_vgg_normalised(num_modules: int = NUM_VGG_MODULES) -> nn.Sequential:
    """The normalised VGG-19 (random weights), module indices as in pytorch-AdaIN: all 53 modules, or
    the first ``num_modules`` (31 = the relu4_1 encoder) without initialising the rest."""
    layers: list = [lambda: nn.Conv2d(3, 3, kernel_size=1)]
    for spec in _VGG19_LAYERS:
        if spec == "M":
            layers.append(lambda: nn.MaxPool2d(kernel_size=2, stride=2, padding=0, ceil_mode=True))
        else:
            # In-place ReLU saves a copy per layer; the conv's output is not needed by its backward.
            layers += [lambda: nn.ReflectionPad2d(1), lambda c=spec: nn.Conv2d(c[0], c[1], kernel_size=3),
                       lambda: nn.ReLU(inplace=True)]
    assert len(layers) == NUM_VGG_MODULES, len(layers)
    return nn.Sequential(*(make() for make in layers[:num_modules]))


def read_state_dict(path: str | os.PathLike, what: str) -> dict[str, torch.Tensor]:
    """Read a tensor dictionary with ``weights_only=True``; errors name the file and say what was expected."""
    obj = load_weights_file(path, what)
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsFileError(f"{path}: expected a state_dict (a dictionary of tensors) for the {what}, "
                               f"got {type(obj).__name__}")
    return obj


def check_state_dict(sd: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], path: str, what: str,
                     optional: frozenset[str] = frozenset()) -> None:
    """Raise :class:`WeightsFileError` unless ``sd`` has exactly the keys and shapes of ``expected``.

    Keys in ``optional`` may be present (and are then ignored by the caller) or absent.
    """
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected) - optional)
    if missing or unexpected:
        raise WeightsFileError(
            f"{path}: does not match the pytorch-AdaIN layout of the {what}: {len(missing)} missing keys "
            f"{missing[:6]}, {len(unexpected)} unexpected keys {unexpected[:6]}")
    bad = [f"{k}: file {tuple(sd[k].shape)} vs expected {tuple(v.shape)}"
           for k, v in expected.items() if tuple(sd[k].shape) != tuple(v.shape)]
    if bad:
        raise WeightsFileError(f"{path}: {what} shape mismatch for {len(bad)} keys: {'; '.join(bad[:4])}")


def load_vgg_encoder(path: str | os.PathLike) -> nn.Sequential:
    """The frozen relu4_1 encoder (``full[:31]``) with weights from ``vgg_normalised.pth``, in eval mode.

    Files holding the full 53-module network (the public file) and files holding only the first 31
    modules are both accepted; the layers after relu4_1 are never used.
    """
    path = os.fspath(path)
    sd = read_state_dict(path, "VGG encoder (vgg_normalised.pth)")
    encoder = build_vgg_normalised(RELU4_1_END)
    expected = encoder.state_dict()
    with torch.device("meta"):  # only the key names of the layers past relu4_1: allocate nothing
        beyond = frozenset(k for k in build_vgg_normalised().state_dict() if k not in expected)
    check_state_dict(sd, expected, path, "normalised VGG-19 (vgg_normalised.pth)", optional=beyond)
    encoder.load_state_dict({k: sd[k] for k in expected})
    encoder.eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    log.info("loaded VGG encoder from %s", path)
    return encoder
