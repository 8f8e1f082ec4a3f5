"""Dense 4D convolution: the reference the sparse engine is tested against, and a path for tiny grids.

A dense 4D volume is ``[B, C, hA, wA, hB, wB]``. :func:`dense_conv4d` is a 'same'-padded (zero padding
(K-1)/2), stride-1 cross-correlation with a kernel ``[C_out, C_in, K, K, K, K]`` over (iA, jA, iB, jB),
computed as K conv3d calls per output slice along iA (the way NC-Net's Conv4d does). Memory and time grow
with hA*wA*hB*wB, which is why Sparse NC-Net exists; use this only for checks and small grids.

:func:`densify` / :func:`sparsify` move between this layout and the sparse (coords, features) one of
:mod:`segswap.train.sparse4d`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def dense_conv4d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` [B, C_in, hA, wA, hB, wB], ``weight`` [C_out, C_in, K, K, K, K] -> [B, C_out, hA, wA, hB, wB]."""
    if x.ndim != 6 or weight.ndim != 6:
        raise ValueError(f"expected a 6D volume and a 6D kernel, got {tuple(x.shape)} and {tuple(weight.shape)}")
    b, c_in, h_a, w_a, h_b, w_b = x.shape
    c_out, _, k = weight.shape[:3]
    if k % 2 == 0:
        raise ValueError(f"kernel size must be odd for 'same' padding, got {k}")
    pad = (k - 1) // 2
    # Slices along iA become the batch of a conv3d over (jA, iB, jB); pad iA by hand.
    xp = F.pad(x, (0, 0, 0, 0, 0, 0, pad, pad))
    out = x.new_zeros(b, c_out, h_a, w_a, h_b, w_b)
    for u in range(k):
        # Output row i reads input row i + u - pad, i.e. padded row i + u.
        slab = xp[:, :, u:u + h_a].permute(0, 2, 1, 3, 4, 5).reshape(b * h_a, c_in, w_a, h_b, w_b)
        contrib = F.conv3d(slab, weight[:, :, u], padding=pad)
        out += contrib.reshape(b, h_a, c_out, w_a, h_b, w_b).permute(0, 2, 1, 3, 4, 5)
    if bias is not None:
        out += bias.view(1, -1, 1, 1, 1, 1)
    return out


def densify(coords: torch.Tensor, features: torch.Tensor, batch_size: int,
            spatial_shape: tuple[int, int, int, int]) -> torch.Tensor:
    """Sparse (coords [N,5], features [N,C]) -> dense [B, C, hA, wA, hB, wB], zero where no point is."""
    c = features.shape[1]
    out = features.new_zeros(batch_size, *spatial_shape, c)
    cl = coords.long()
    out = out.index_put((cl[:, 0], cl[:, 1], cl[:, 2], cl[:, 3], cl[:, 4]), features)
    return out.permute(0, 5, 1, 2, 3, 4)


def sparsify(dense: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Values of a dense [B, C, hA, wA, hB, wB] volume at ``coords`` [N,5] -> [N, C]."""
    cl = coords.long()
    return dense.permute(0, 2, 3, 4, 5, 1)[cl[:, 0], cl[:, 1], cl[:, 2], cl[:, 3], cl[:, 4]]


def swap_ab(dense: torch.Tensor) -> torch.Tensor:
    """[B, C, hA, wA, hB, wB] -> [B, C, hB, wB, hA, wA] (the A/B-transposed volume)."""
    return dense.permute(0, 1, 4, 5, 2, 3)
