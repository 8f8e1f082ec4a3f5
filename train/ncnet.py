"""Sparse NC-Net head (arch ``ncnet``): sparse correlation -> 4D neighbourhood consensus -> Eq. 1 read-out.

Same contract as the transformer head (docs/CONTRACTS.md)::

    head(feat0 [B,C,hA,wA], feat1 [B,C,hB,wB], pad1 [B,hB,wB] bool | None) -> dict
      mask0 [B,hA,wA] in (0,1), mask1 [B,hB,wB], flow01 [B,hA,wA,2] (x, y) in [0,1], flow10 [B,hB,wB,2]

``feat*`` are L2-normalised conv4 features, so a dot product is a cosine similarity.

1. Sparse correlation (:func:`sparse_correlation`, as Sparse NC-Net's ``corr_and_add``). For every cell a
   of image 0 the ``topk`` cells t of image 1 with the highest cosine similarity give entries (a, t); for
   every cell t of image 1 the ``topk`` cells a of image 0 give entries (a, t) too. The volume is the
   *union* of both lists; an entry present in both gets the *sum* of the two values (2 cos(a, t)), which
   is what MinkowskiUnion does. Each pair has between topk*max(NA, NB) and topk*(NA + NB) entries.
   Cells of image 1 marked in ``pad1`` take no part: they are never a top-k target and have no list.
2. Neighbourhood consensus (:class:`NCStack`): ReLU -> submanifold 4D conv -> ReLU -> ... -> ReLU, default
   channels (16, 1) with 3^4 kernels (SegSwap's Sparse NC-Net). In symmetric mode the stack also runs on the
   A/B-swapped volume and the two results are added, as Sparse NC-Net does; the swapped branch reuses the
   neighbour map with A/B-swapped kernels (:func:`segswap.train.sparse4d.swap_ab_kernel`).
3. Read-out (:func:`sparse_eq1_readout`), the paper's Eq. 1 applied to the sparse output seen as a dense
   volume that is zero wherever there is no entry (the convention of Sparse NC-Net's own scoring, which
   pads the missing entries with zeros before its softmax). For each cell a of image 0::

       P(t | a) = exp(v(a,t)) / (sum_{entries (a,t')} exp(v(a,t')) + (N1 - n_a) * exp(0))

   over the N1 valid cells of image 1 (n_a = number of entries of a); mask0(a) = max_t P(t | a) and
   flow01(a) = sum_t P(t | a) * centre(t), where the implicit zeros contribute their probability mass
   spread evenly over the cells without an entry. It is computed from the entries only (segment softmax
   with ``scatter_reduce`` / ``index_add``), never materialising the dense volume, and equals the dense
   Eq. 1 exactly. Symmetrically for image 1 over the N0 cells of image 0. A cell with no entry gets the
   uniform distribution: mask 1/N (about 0.001 on a 30x30 grid) and the flow of the grid's mean centre.
   Cell centres are at ((j+0.5)/w, (i+0.5)/h). Masks are clamped to [1e-7, 1-1e-7] like the transformer's.

Weights of the official Sparse NC-Net (``NeighConsensus.conv.{1,3,5..}.kernel`` [K^4, C_in, C_out] and
``.bias`` [1, C_out], MinkowskiEngine layout) load with :func:`load_sparse_ncnet_weights`.
"""
from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence

import torch
from torch import nn

from segswap.train.sparse4d import NeighbourMap, SubmanifoldConv4d

log = logging.getLogger(__name__)

MASK_EPS = 1e-7
# Upper bound on the similarity-matrix elements computed at once (per chunk of the batch), ~64 MB float32.
SIMILARITY_CHUNK_ELEMENTS = 16 * 1024 * 1024


def sparse_correlation(feat0: torch.Tensor, feat1: torch.Tensor, topk: int = 10,
                       pad1: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Union of the A->B and B->A top-k cosine lists, duplicates summed.

    Returns ``coords`` [N, 5] int64 (b, iA, jA, iB, jB), sorted, unique, and ``values`` [N] (differentiable
    in the features if they require grad).
    """
    if feat0.ndim != 4 or feat1.ndim != 4 or feat0.shape[:2] != feat1.shape[:2]:
        raise ValueError(f"features must be [B,C,h,w] with equal B and C, got {tuple(feat0.shape)} and {tuple(feat1.shape)}")
    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    b, c, h_a, w_a = feat0.shape
    h_b, w_b = feat1.shape[2:]
    n_a, n_b = h_a * w_a, h_b * w_b
    if pad1 is not None and tuple(pad1.shape) != (b, h_b, w_b):
        raise ValueError(f"pad1 must be [B,hB,wB] = {(b, h_b, w_b)}, got {tuple(pad1.shape)}")
    f0 = feat0.reshape(b, c, n_a)
    f1 = feat1.reshape(b, c, n_b)
    valid1 = None if pad1 is None else ~pad1.reshape(b, n_b).bool()
    chunk = max(1, SIMILARITY_CHUNK_ELEMENTS // (n_a * n_b))
    keys, values = [], []
    for s in range(0, b, chunk):
        e = min(b, s + chunk)
        sim = torch.bmm(f0[s:e].transpose(1, 2), f1[s:e])  # [b', NA, NB]
        batch = torch.arange(s, e, device=sim.device)
        if valid1 is not None:
            sim = sim.masked_fill(~valid1[s:e, None, :], float("-inf"))
        # A -> B: the topk best cells of image 1 for every cell of image 0.
        val_ab, t_ab = sim.topk(min(topk, n_b), dim=2)  # [b', NA, k]
        a_ab = torch.arange(n_a, device=sim.device).view(1, -1, 1).expand_as(t_ab)
        key_ab = (batch.view(-1, 1, 1) * n_a + a_ab) * n_b + t_ab
        # B -> A: the topk best cells of image 0 for every cell of image 1.
        val_ba, a_ba = sim.topk(min(topk, n_a), dim=1)  # [b', k, NB]
        t_ba = torch.arange(n_b, device=sim.device).view(1, 1, -1).expand_as(a_ba)
        key_ba = (batch.view(-1, 1, 1) * n_a + a_ba) * n_b + t_ba
        k_all = torch.cat([key_ab.reshape(-1), key_ba.reshape(-1)])
        v_all = torch.cat([val_ab.reshape(-1), val_ba.reshape(-1)])
        keep = torch.isfinite(v_all)  # padded cells of image 1 (-inf) take no part
        keys.append(k_all[keep])
        values.append(v_all[keep])
    keys_all = torch.cat(keys)
    values_all = torch.cat(values)
    uniq, inverse = torch.unique(keys_all, sorted=True, return_inverse=True)
    merged = values_all.new_zeros(uniq.shape[0]).index_add(0, inverse, values_all)
    t = uniq % n_b
    a = (uniq // n_b) % n_a
    bb = uniq // (n_a * n_b)
    coords = torch.stack([bb, a // w_a, a % w_a, t // w_b, t % w_b], dim=1)
    return coords, merged


class NCStack(nn.Module):
    """ReLU -> [submanifold conv -> ReLU] * L over a sparse 4D volume with one input channel.

    ``channels`` are the output channels of each layer (last must be 1), ``kernel_sizes`` their odd kernel
    sizes. Layers live in ``self.layers`` (``layers.{i}.weight`` [K^4, C_in, C_out], ``layers.{i}.bias``).
    """

    def __init__(self, channels: Sequence[int] = (16, 1), kernel_sizes: Sequence[int] = (3, 3)):
        super().__init__()
        channels, kernel_sizes = list(channels), list(kernel_sizes)
        if not channels or len(channels) != len(kernel_sizes):
            raise ValueError(f"channels {channels} and kernel_sizes {kernel_sizes} must be non-empty and of equal length")
        if channels[-1] != 1:
            raise ValueError(f"the last layer must have 1 output channel (a 4D score), got channels {channels}")
        c_in = [1] + channels[:-1]
        self.layers = nn.ModuleList(SubmanifoldConv4d(i, o, k) for i, o, k in zip(c_in, channels, kernel_sizes))

    @property
    def kernel_sizes(self) -> list[int]:
        return [layer.kernel_size for layer in self.layers]

    def forward(self, x: torch.Tensor, maps: dict[int, NeighbourMap], swap_ab: bool = False) -> torch.Tensor:
        """``x`` [N, 1], ``maps`` kernel size -> neighbour map of the volume; returns [N, 1]."""
        x = torch.relu(x)
        for layer in self.layers:
            x = torch.relu(layer(x, maps[layer.kernel_size], swap_ab=swap_ab))
        return x


def _segment_softmax_readout(seg: torch.Tensor, v: torch.Tensor, target_xy: torch.Tensor, num_segments: int,
                             num_targets: torch.Tensor, target_xy_sum: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 1 for one direction: per segment (source cell) softmax over its entries plus implicit zeros.

    seg [N] segment of each entry; v [N] scores; target_xy [N,2] target cell centre of each entry;
    num_targets [S] number of valid target cells of each segment; target_xy_sum [S,2] sum of their centres.
    Returns mask [S] and flow [S,2].
    """
    n_entries = torch.bincount(seg, minlength=num_segments).to(v.dtype)
    missing = num_targets.to(v.dtype) - n_entries  # implicit zero scores of each segment
    seg_max = v.new_full((num_segments,), float("-inf")).scatter_reduce(0, seg, v.detach(), "amax")
    # Softmax is shift-invariant: the shift only keeps exp() in range. Include the implicit 0 when present.
    shift = torch.where(missing > 0, seg_max.clamp(min=0), seg_max)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    e = torch.exp(v - shift[seg])
    e_zero = torch.exp(-shift) * (missing > 0)  # probability mass numerator of one implicit zero
    z = v.new_zeros(num_segments).index_add(0, seg, e) + missing * e_zero
    z = torch.where(z > 0, z, torch.ones_like(z))  # a segment with no targets at all (image 1 fully padded)
    p = e / z[seg]
    p_zero = e_zero / z
    mask = torch.maximum(v.new_zeros(num_segments).scatter_reduce(0, seg, p, "amax"), p_zero)
    entry_xy_sum = target_xy.new_zeros(num_segments, 2).index_add(0, seg, target_xy)
    flow = (target_xy.new_zeros(num_segments, 2).index_add(0, seg, p[:, None] * target_xy)
            + p_zero[:, None] * (target_xy_sum - entry_xy_sum))
    return mask, flow


def cell_centres(h: int, w: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """[h*w, 2] normalised (x, y) cell centres ((j+0.5)/w, (i+0.5)/h), row-major."""
    y = (torch.arange(h, device=device, dtype=dtype) + 0.5) / h
    x = (torch.arange(w, device=device, dtype=dtype) + 0.5) / w
    return torch.stack(torch.meshgrid(x, y, indexing="xy"), dim=-1).reshape(-1, 2)


def sparse_eq1_readout(coords: torch.Tensor, scores: torch.Tensor, batch_size: int,
                       shape0: tuple[int, int], shape1: tuple[int, int],
                       pad1: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Masks and soft-argmax correspondences (paper Eq. 1) from sparse 4D scores.

    ``coords`` [N,5] (b, iA, jA, iB, jB), ``scores`` [N]; missing entries count as score 0. Cells of image 1
    in ``pad1`` are not targets of image 0's softmax.
    """
    h_a, w_a = shape0
    h_b, w_b = shape1
    n_a, n_b = h_a * w_a, h_b * w_b
    dtype, device = scores.dtype, scores.device
    b, a = coords[:, 0], coords[:, 1] * w_a + coords[:, 2]
    t = coords[:, 3] * w_b + coords[:, 4]
    centres0 = cell_centres(h_a, w_a, device, dtype)
    centres1 = cell_centres(h_b, w_b, device, dtype)
    if pad1 is None:
        valid1 = torch.ones(batch_size, n_b, dtype=dtype, device=device)
    else:
        valid1 = (~pad1.reshape(batch_size, n_b).bool()).to(dtype)
    # Image 0 -> image 1: softmax over the valid cells of image 1.
    num_t = valid1.sum(1).repeat_interleave(n_a)
    xy_sum_t = (valid1 @ centres1).repeat_interleave(n_a, dim=0)
    mask0, flow01 = _segment_softmax_readout(b * n_a + a, scores, centres1[t], batch_size * n_a, num_t, xy_sum_t)
    # Image 1 -> image 0: softmax over all cells of image 0.
    num_s = torch.full((batch_size * n_b,), float(n_a), dtype=dtype, device=device)
    xy_sum_s = centres0.sum(0).expand(batch_size * n_b, 2)
    mask1, flow10 = _segment_softmax_readout(b * n_b + t, scores, centres0[a], batch_size * n_b, num_s, xy_sum_s)
    return {
        "mask0": mask0.clamp(MASK_EPS, 1 - MASK_EPS).reshape(batch_size, h_a, w_a),
        "mask1": mask1.clamp(MASK_EPS, 1 - MASK_EPS).reshape(batch_size, h_b, w_b),
        "flow01": flow01.clamp(0, 1).reshape(batch_size, h_a, w_a, 2),
        "flow10": flow10.clamp(0, 1).reshape(batch_size, h_b, w_b, 2),
    }


class SparseNCNet(nn.Module):
    """Sparse NC-Net co-segmentation head on L2-normalised conv4 features (see the module docstring).

    topk: length of each cell's top-k list in the sparse correlation (Sparse NC-Net: 10).
    channels / kernel_sizes: the 4D conv layers (default 1->16->1 with 3^4 kernels).
    symmetric: also run the stack on the A/B-swapped volume and add (Sparse NC-Net's symmetric mode).
    """

    def __init__(self, topk: int = 10, channels: Sequence[int] = (16, 1), kernel_sizes: Sequence[int] = (3, 3),
                 symmetric: bool = True):
        super().__init__()
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        self.topk = int(topk)
        self.symmetric = bool(symmetric)
        self.nc = NCStack(channels, kernel_sizes)

    def consensus(self, coords: torch.Tensor, values: torch.Tensor, spatial_shape) -> torch.Tensor:
        """Scores [N] after the neighbourhood-consensus stack (both orderings in symmetric mode)."""
        maps = {k: NeighbourMap.build(coords, spatial_shape, k) for k in set(self.nc.kernel_sizes)}
        x = values[:, None]
        out = self.nc(x, maps)
        if self.symmetric:
            out = out + self.nc(x, maps, swap_ab=True)
        return out[:, 0]

    def forward(self, feat0: torch.Tensor, feat1: torch.Tensor, pad1: torch.Tensor | None = None,
                return_tokens: bool = False) -> dict[str, torch.Tensor]:
        if return_tokens:
            raise ValueError("the ncnet head has no per-cell token features, so the pixel-contrast loss "
                             "cannot be used with arch ncnet; switch it off or use arch transformer")
        b = feat0.shape[0]
        h_a, w_a = feat0.shape[2:]
        h_b, w_b = feat1.shape[2:]
        # Sparse products and segment softmaxes run in float32 even under mixed-precision autocast.
        with torch.autocast(device_type=feat0.device.type, enabled=False):
            feat0, feat1 = feat0.float(), feat1.float()
            coords, values = sparse_correlation(feat0, feat1, self.topk, pad1)
            scores = self.consensus(coords, values, (h_a, w_a, h_b, w_b))
            return sparse_eq1_readout(coords, scores, b, (h_a, w_a), (h_b, w_b), pad1)


NCNET_DEFAULTS = {"topk": 10, "channels": (16, 1), "kernel_sizes": (3, 3), "symmetric": True}


def build_ncnet(cfg: dict | None = None) -> SparseNCNet:
    """SparseNCNet from a config dict (keys of NCNET_DEFAULTS); unknown keys are an error."""
    cfg = dict(cfg or {})
    unknown = sorted(set(cfg) - set(NCNET_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown ncnet config keys {unknown}; allowed: {sorted(NCNET_DEFAULTS)}")
    return SparseNCNet(**{**NCNET_DEFAULTS, **cfg})


class NCNetWeightsError(ValueError):
    """A Sparse NC-Net checkpoint that cannot be loaded; the message names the file and the problem."""


def convert_sparse_ncnet_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official Sparse NC-Net ``NeighConsensus.conv.{2i+1}.kernel/bias`` -> our ``nc.layers.{i}.weight/bias``.

    The official ``nn.Sequential`` is ReLU, conv, ReLU, conv, ReLU, ... so the i-th conv is at index 2i+1;
    kernels are already in our (MinkowskiEngine) layout; ME's bias is [1, C_out]. Batch-norm variants
    (``conv.{j}.0.kernel``) are not supported.
    """
    prefix = "NeighConsensus.conv."
    out = {}
    for key, value in sd.items():
        if not key.startswith(prefix):
            continue  # FeatureExtraction.* (their ResNet-101) is not part of the head
        index, _, name = key[len(prefix):].partition(".")
        if name not in ("kernel", "bias") or not index.isdigit() or int(index) % 2 != 1:
            raise NCNetWeightsError(f"unsupported Sparse NC-Net key {key!r} (batch-norm variants are not supported)")
        layer = (int(index) - 1) // 2
        out[f"nc.layers.{layer}.{'weight' if name == 'kernel' else 'bias'}"] = value.reshape(-1) if name == "bias" else value
    if not out:
        raise NCNetWeightsError("no NeighConsensus.conv.* keys: not a Sparse NC-Net checkpoint")
    return out


def load_sparse_ncnet_weights(module: SparseNCNet, path: str | os.PathLike) -> None:
    """Load an official Sparse NC-Net checkpoint (``{"state_dict": …, "args": Namespace}``) into ``module``.

    Read with ``weights_only=True``; ``argparse.Namespace`` (the stored training arguments) is the only
    class allowed besides tensors. Layer count, channels and kernel sizes must match ``module``.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise NCNetWeightsError(f"{path}: Sparse NC-Net checkpoint not found")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for bad files; re-raise with the name
        raise NCNetWeightsError(f"{path}: cannot read as a torch checkpoint ({type(e).__name__}: {e})") from e
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict):
        raise NCNetWeightsError(f"{path}: not a checkpoint dictionary")
    try:
        converted = convert_sparse_ncnet_state_dict(sd)
    except NCNetWeightsError as e:
        raise NCNetWeightsError(f"{path}: {e}") from None
    own = module.state_dict()
    missing = sorted(set(own) - set(converted))
    unexpected = sorted(set(converted) - set(own))
    bad = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in converted.items()
           if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if missing or unexpected or bad:
        raise NCNetWeightsError(
            f"{path}: layers do not match this SparseNCNet ({module.nc.kernel_sizes} kernels): missing {missing}, "
            f"unexpected {unexpected}, shape mismatches {bad} (build it with the checkpoint's ncons_channels "
            f"and ncons_kernel_sizes)")
    module.load_state_dict(converted)
    log.info("loaded Sparse NC-Net consensus weights from %s", path)
