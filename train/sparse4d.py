"""Submanifold sparse 4D convolution in plain PyTorch (the engine of Sparse NC-Net).

A sparse 4D volume is a set of N points with integer coordinates ``(b, iA, jA, iB, jB)`` (batch, row and
column in image A, row and column in image B) and a feature matrix ``[N, C]``. A *submanifold*
convolution produces outputs only at the input points::

    out[p] = bias + sum over offsets d with p + d active:  x[p + d] @ W[d]

This is cross-correlation, as in ``torch.nn.Conv*`` and MinkowskiEngine's ``MinkowskiConvolution``.

How it is computed
    1. :meth:`NeighbourMap.build` hashes every coordinate to one int64 key (row-major over
       ``(b, iA, jA, iB, jB)``), sorts the keys once, and for every kernel offset finds the neighbour
       ``p + d`` with ``torch.searchsorted``. The result is a list of (input, output) index pairs grouped
       by offset. The map depends only on the coordinates, so it is built once per volume and reused by
       every layer of the stack (and by the A/B-swapped branch of symmetric mode, see
       :func:`swap_ab_kernel`). Pairs for offset ``-d`` are the mirror of those for ``d``, so only half
       of the offsets are searched.
    2. :func:`sparse_conv4d` runs gather -> GEMM -> scatter per offset: ``x[in] @ W[d]`` is added to
       ``out[out]`` with ``index_add_``. A custom autograd function keeps only ``x`` and the map for the
       backward pass (no per-offset gathered copies), and computes the input gradient with the same
       gather -> GEMM -> scatter on the transposed kernel.
       In practice each layer is one or two library calls rather than a loop over the K^4 offsets
       (``index_add_`` is serial on CPU and dominated the time): the *gather* strategy forms the sparse
       "im2col" matrix G [N, K^4*C_in] in CSR and computes ``G @ W``; the *transform* strategy computes
       ``Y = x @ [W_0 .. W_{K^4-1}]`` densely and sums ``Y[p + d_k, k]`` per output. The one that
       materialises fewer numbers is used (gather for 1->16 and 16->16, transform for 16->1).

Kernel layout (MinkowskiEngine's, so Sparse NC-Net weights convert unchanged)
    ``weight``: ``[K**4, C_in, C_out]``; ``bias``: ``[C_out]``. The offset of kernel row ``k`` is
    ``d = (u0, u1, u2, u3) - (K - 1) // 2`` with ``k = u0 + K*u1 + K**2*u2 + K**3*u3``: the first spatial
    coordinate (iA) varies fastest. For K = 3: ``k = (diA+1) + 3(djA+1) + 9(diB+1) + 27(djB+1)``, the
    centre tap is ``k = 40``. :func:`me_kernel_to_dense` / :func:`dense_kernel_to_me` convert to and from the
    dense ``[C_out, C_in, K, K, K, K]`` layout of the dense oracle ``tests/dense4d.py``.

Everything is device-agnostic (CPU and CUDA); float32 and float64 features are supported.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn

SPATIAL_DIMS = 4
# Bound on the [offsets x points] elements searched at once while building a neighbour map.
MAP_BUILD_ELEMENTS = 64 * 1024
# Pair and point indices are stored as int32: half the memory of the map, which is most of the memory
# of a sparse NC-Net step (a volume would need 2**31 points to overflow them).
INDEX_DTYPE = torch.int32


def kernel_offsets(kernel_size: int, device=None) -> torch.Tensor:
    """``[K**4, 4]`` int64 offsets (diA, djA, diB, djB) in MinkowskiEngine order (first dim fastest)."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd and positive for a submanifold convolution, got {kernel_size}")
    r = torch.arange(kernel_size, device=device) - (kernel_size - 1) // 2
    # meshgrid with "ij" makes the LAST axis fastest; build (u3, u2, u1, u0) and flip so u0 is fastest.
    g = torch.meshgrid(r, r, r, r, indexing="ij")
    return torch.stack([g[3], g[2], g[1], g[0]], dim=-1).reshape(-1, SPATIAL_DIMS)


def me_kernel_to_dense(weight: torch.Tensor) -> torch.Tensor:
    """``[K**4, C_in, C_out]`` (MinkowskiEngine order) -> dense ``[C_out, C_in, K, K, K, K]`` over (iA, jA, iB, jB)."""
    k4, c_in, c_out = weight.shape
    k = _kernel_size_of(k4)
    # Row index k = u0 + K u1 + K^2 u2 + K^3 u3, so a C-order reshape gives axes (u3, u2, u1, u0).
    w = weight.reshape(k, k, k, k, c_in, c_out)
    return w.permute(5, 4, 3, 2, 1, 0).contiguous()


def dense_kernel_to_me(weight: torch.Tensor) -> torch.Tensor:
    """Dense ``[C_out, C_in, K, K, K, K]`` -> ``[K**4, C_in, C_out]`` in MinkowskiEngine order."""
    c_out, c_in, k = weight.shape[0], weight.shape[1], weight.shape[2]
    return weight.permute(5, 4, 3, 2, 1, 0).reshape(k ** 4, c_in, c_out).contiguous()


def swap_ab_kernel(weight: torch.Tensor) -> torch.Tensor:
    """The kernel that, applied to a volume, equals applying ``weight`` to its A/B-swapped copy and swapping back.

    Swapping A and B maps coordinate (iA, jA, iB, jB) to (iB, jB, iA, jA); a point keeps its identity, and
    the neighbour at offset d in the swapped volume is the neighbour at swap(d) in the original. So the
    symmetric branch reuses the original neighbour map with ``W'[d] = W[swap(d)]``.
    """
    k4, c_in, c_out = weight.shape
    k = _kernel_size_of(k4)
    w = weight.reshape(k, k, k, k, c_in, c_out)  # axes (u3=jB, u2=iB, u1=jA, u0=iA)
    return w.permute(2, 3, 0, 1, 4, 5).reshape(k4, c_in, c_out)


def _kernel_size_of(kernel_volume: int) -> int:
    k = round(kernel_volume ** (1 / SPATIAL_DIMS))
    if k ** SPATIAL_DIMS != kernel_volume:
        raise ValueError(f"kernel has {kernel_volume} rows, not K**4 for an integer K")
    return k


def coordinate_keys(coords: torch.Tensor, spatial_shape: tuple[int, int, int, int]) -> torch.Tensor:
    """Row-major int64 key of each ``(b, iA, jA, iB, jB)`` row; unique per point within the bounds."""
    strides = _strides(spatial_shape, coords.device)
    return coords[:, 0] * strides[0] + (coords[:, 1:] * strides[1:]).sum(1)


def _strides(spatial_shape, device) -> torch.Tensor:
    h_a, w_a, h_b, w_b = spatial_shape
    return torch.tensor([h_a * w_a * h_b * w_b, w_a * h_b * w_b, h_b * w_b, w_b, 1], dtype=torch.int64, device=device)


@dataclass(frozen=True)
class NeighbourMap:
    """(input, output) point-index pairs of a submanifold 4D convolution.

    Two orderings of the same M pairs are kept, both built without a sort of the pairs:

    * grouped by kernel row: ``in_index[starts[k]:starts[k+1]]`` feed ``out_index[...]`` through row k;
    * grouped by output point (CSR rows, kernel row ascending inside a row): ``row_ptr`` [N+1],
      ``in_by_out`` [M], ``k_by_out`` [M]. This is the sparsity pattern of the "im2col" matrix
      G[p, k] = x[p + d_k] used by the gather strategy.

    ``in_rows`` (grouped by kernel row) indexes the [N*K^4, C] layout of the transform strategy.
    """

    num_points: int
    kernel_size: int
    in_index: torch.Tensor   # [M] int32, grouped by kernel row
    out_index: torch.Tensor  # [M] int32
    starts: tuple[int, ...]  # K**4 + 1 python ints (so slicing never synchronises a GPU)
    row_ptr: torch.Tensor    # [N+1] int32
    in_by_out: torch.Tensor  # [M] int32
    k_by_out: torch.Tensor   # [M] int32
    in_rows: torch.Tensor    # [M] int32 in_index * K^4 + k: row of the [N*K^4, C] layout of the transform strategy

    @property
    def num_pairs(self) -> int:
        return self.starts[-1]

    @property
    def kernel_volume(self) -> int:
        return self.kernel_size ** SPATIAL_DIMS

    def pairs(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        s, e = self.starts[k], self.starts[k + 1]
        return self.in_index[s:e], self.out_index[s:e]

    @classmethod
    def build(cls, coords: torch.Tensor, spatial_shape: tuple[int, int, int, int],
              kernel_size: int = 3) -> NeighbourMap:
        """Neighbour pairs of ``coords`` ([N, 5] integer (b, iA, jA, iB, jB)) inside ``spatial_shape`` (hA, wA, hB, wB).

        Coordinates must be unique and inside the bounds; a ValueError says which row is not.
        """
        if coords.ndim != 2 or coords.shape[1] != 1 + SPATIAL_DIMS:
            raise ValueError(f"coords must be [N, 5] (b, iA, jA, iB, jB), got {tuple(coords.shape)}")
        coords = coords.long()
        n = coords.shape[0]
        device = coords.device
        bounds = torch.tensor(spatial_shape, dtype=torch.int64, device=device)
        if n:
            bad = (coords[:, 1:] < 0).any(1) | (coords[:, 1:] >= bounds).any(1) | (coords[:, 0] < 0)
            if bool(bad.any()):
                row = int(bad.nonzero()[0])
                raise ValueError(f"coordinate row {row} {coords[row].tolist()} is outside the volume {tuple(spatial_shape)}")
        keys = coordinate_keys(coords, spatial_shape)
        sorted_keys, order = torch.sort(keys)
        if n > 1 and bool((sorted_keys[1:] == sorted_keys[:-1]).any()):
            dup = int((sorted_keys[1:] == sorted_keys[:-1]).nonzero()[0])
            raise ValueError(f"duplicate coordinate {coords[order[dup]].tolist()} in a sparse volume")

        offsets = kernel_offsets(kernel_size, device)
        k4 = offsets.shape[0]
        centre = k4 // 2  # offset 0; rows k and k4-1-k are mirror offsets (d and -d)
        strides = _strides(spatial_shape, device)[1:]
        point_index = torch.arange(n, device=device, dtype=INDEX_DTYPE)
        # Search the first half of the offsets, several at a time (bounded memory); the rest are mirrors.
        half_in: list[torch.Tensor] = []
        half_out: list[torch.Tensor] = []
        group = max(1, MAP_BUILD_ELEMENTS // max(n, 1))
        for g0 in range(0, centre, group):
            d = offsets[g0:min(centre, g0 + group)]                     # [G, 4]
            inside = torch.ones(d.shape[0], n, dtype=torch.bool, device=device)
            for dim in range(SPATIAL_DIMS):  # one [G, N] plane at a time keeps the transient small
                moved = coords[None, :, 1 + dim] + d[:, dim, None]
                inside &= (moved >= 0) & (moved < spatial_shape[dim])
            del moved
            nkeys = keys[None, :] + (d * strides).sum(1)[:, None]      # [G, N]
            pos = torch.searchsorted(sorted_keys, nkeys.reshape(-1)).clamp_(max=max(n - 1, 0)).view_as(nkeys)
            hit = inside & (sorted_keys[pos] == nkeys) if n else inside
            counts = hit.sum(1).tolist()
            gi, pi = hit.nonzero(as_tuple=True)                        # sorted by offset, then point
            in_pts = order[pos[gi, pi]].to(INDEX_DTYPE)
            pi = pi.to(INDEX_DTYPE)
            half_in += list(in_pts.split(counts))
            half_out += list(pi.split(counts))
        # Row k < centre: (in, out) as found; centre: identity; row k4-1-k: the mirror (p = q + d <=> q = p - d).
        in_groups = half_in + [point_index] + half_out[::-1]
        out_groups = half_out + [point_index] + half_in[::-1]
        counts = [int(t.numel()) for t in in_groups]
        starts = (0, *torch.tensor(counts).cumsum(0).tolist())
        in_index = torch.cat(in_groups)
        out_index = torch.cat(out_groups)

        # CSR by output point without a sort: (out, k) is unique per pair, so writing each pair's index into
        # a [N, K^4] table and reading the table's filled cells in row-major order lists the pairs by
        # output point, kernel row ascending. A few large ops rather than a loop over K^4 rows, which
        # matters on oversubscribed CPUs where every parallel op waits for a descheduled thread.
        k_rows = torch.repeat_interleave(torch.arange(k4, device=device, dtype=INDEX_DTYPE),
                                         torch.tensor(counts, device=device))
        table = torch.full((n * k4,), -1, dtype=INDEX_DTYPE, device=device)
        table[out_index.long() * k4 + k_rows] = torch.arange(starts[-1], device=device, dtype=INDEX_DTYPE)
        filled = table.view(n, k4) >= 0
        by_out = table.view(n, k4)[filled]
        del table
        row_ptr = torch.zeros(n + 1, dtype=torch.int64, device=device)
        row_ptr[1:] = filled.sum(1).cumsum(0)
        in_by_out = in_index[by_out]
        k_by_out = k_rows[by_out]
        del by_out, filled
        in_rows = in_index * k4 + k_rows
        return cls(num_points=n, kernel_size=kernel_size, in_index=in_index, out_index=out_index,
                   starts=tuple(int(s) for s in starts), row_ptr=row_ptr.to(INDEX_DTYPE), in_by_out=in_by_out,
                   k_by_out=k_by_out, in_rows=in_rows)


def _use_gather(nmap: NeighbourMap, c_in: int, c_out: int) -> bool:
    """Gather strategy materialises M*C_in values, transform strategy N*K^4*C_out: take the smaller."""
    return nmap.num_pairs * c_in <= nmap.num_points * nmap.kernel_volume * c_out


def _conv_gather(x: torch.Tensor, weight: torch.Tensor, nmap: NeighbourMap) -> torch.Tensor:
    """out = G(x) @ W_flat with G the sparse [N, K^4*C_in] im2col matrix (CSR, one sparse x dense product)."""
    k4, c_in, c_out = weight.shape
    n = nmap.num_points
    values = x.index_select(0, nmap.in_by_out).reshape(-1)
    if c_in == 1:
        cols, row_ptr = nmap.k_by_out, nmap.row_ptr
    else:
        cols = (nmap.k_by_out[:, None] * c_in + torch.arange(c_in, device=x.device, dtype=INDEX_DTYPE)).reshape(-1)
        row_ptr = nmap.row_ptr * c_in
    with warnings.catch_warnings():
        # torch labels CSR "beta"; the two operations used here (construction, CSR @ dense) are tested
        # against the dense reference, so the notice would only be noise in users' logs.
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        g = torch.sparse_csr_tensor(row_ptr, cols, values, (n, k4 * c_in), check_invariants=False)
    return g @ weight.reshape(k4 * c_in, c_out)


def _conv_transform(x: torch.Tensor, weight: torch.Tensor, nmap: NeighbourMap) -> torch.Tensor:
    """out[p] = sum_k Y[p + d_k, k] with Y = x @ [W_0 .. W_K4-1]: one dense GEMM, one gather, one scatter-add."""
    k4, c_in, c_out = weight.shape
    y = (x @ weight.permute(1, 0, 2).reshape(c_in, k4 * c_out)).reshape(-1, c_out)
    return x.new_zeros(nmap.num_points, c_out).index_add_(0, nmap.out_index, y.index_select(0, nmap.in_rows))


def _conv_values(x: torch.Tensor, weight: torch.Tensor, nmap: NeighbourMap) -> torch.Tensor:
    if nmap.num_points == 0:
        return x.new_zeros(0, weight.shape[2])
    if _use_gather(nmap, weight.shape[1], weight.shape[2]):
        return _conv_gather(x, weight, nmap)
    return _conv_transform(x, weight, nmap)


def _transposed_kernel(weight: torch.Tensor) -> torch.Tensor:
    """Kernel of the adjoint convolution: pairs at offset d are the mirror of those at -d (row K^4-1-k)."""
    return weight.flip(0).transpose(1, 2)


def _kernel_grad(x: torch.Tensor, grad_out: torch.Tensor, nmap: NeighbourMap) -> torch.Tensor:
    """dL/dW[k] = sum over pairs of row k of x[in]^T grad_out[out]  -> [K^4, C_in, C_out]."""
    k4 = nmap.kernel_volume
    c_in, c_out = x.shape[1], grad_out.shape[1]
    n = nmap.num_points
    if n * k4 * c_out <= nmap.num_pairs * c_in:
        # Scatter grad_out into the [N, K^4*C_out] layout of the transform strategy (each (in, k) is unique).
        g = grad_out.new_zeros(n * k4, c_out)
        g[nmap.in_rows] = grad_out.index_select(0, nmap.out_index)
        return (x.t() @ g.reshape(n, k4 * c_out)).reshape(c_in, k4, c_out).permute(1, 0, 2).contiguous()
    device = x.device
    if c_in == 1:  # G^T as CSR: rows are the kernel rows, and the grouped-by-kernel-row order is its CSR order
        row_ptr = torch.tensor(nmap.starts, dtype=INDEX_DTYPE, device=device)
        values = x.index_select(0, nmap.in_index).reshape(-1)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            gt = torch.sparse_csr_tensor(row_ptr, nmap.out_index, values, (k4, n), check_invariants=False)
        return (gt @ grad_out).reshape(k4, 1, c_out)
    # Several input channels: one small GEMM per kernel row on gathered slices. (A CSR G^T with rows
    # (k, c) needs an int64 position array C_in times the pair count to build, which was slower.)
    grad_w = x.new_zeros(k4, c_in, c_out)
    for k in range(k4):
        src, dst = nmap.pairs(k)
        if src.numel():
            grad_w[k] = x.index_select(0, src).t() @ grad_out.index_select(0, dst)
    return grad_w


class _SparseConv4dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, nmap):
        ctx.nmap = nmap
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight)
        out = _conv_values(x, weight, nmap)
        if bias is not None:
            out = out + bias
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        nmap: NeighbourMap = ctx.nmap
        grad_out = grad_out.contiguous()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _conv_values(grad_out, _transposed_kernel(weight), nmap)
        if ctx.needs_input_grad[1]:
            grad_w = _kernel_grad(x, grad_out, nmap)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.sum(0)
        return grad_x, grad_w, grad_b, None


def sparse_conv4d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  nmap: NeighbourMap) -> torch.Tensor:
    """Submanifold 4D convolution: ``x`` [N, C_in], ``weight`` [K**4, C_in, C_out], ``bias`` [C_out] -> [N, C_out]."""
    if x.ndim != 2 or x.shape[0] != nmap.num_points:
        raise ValueError(f"features must be [N={nmap.num_points}, C], got {tuple(x.shape)}")
    if weight.ndim != 3 or weight.shape[0] != nmap.kernel_volume or weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight must be [{nmap.kernel_volume}, {x.shape[1]}, C_out], got {tuple(weight.shape)}")
    return _SparseConv4dFunction.apply(x.contiguous(), weight, bias, nmap)


class SubmanifoldConv4d(nn.Module):
    """A submanifold 4D convolution layer with MinkowskiEngine-layout parameters.

    ``weight``: [K**4, in_channels, out_channels]; ``bias``: [out_channels]. Initialised like
    ``torch.nn.Conv*`` (kaiming-uniform with a=sqrt(5), i.e. bound 1/sqrt(fan_in), fan_in = C_in * K**4).
    ``forward(x, nmap, swap_ab=False)``; with ``swap_ab`` the layer acts as if on the A/B-swapped volume.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, bias: bool = True):
        super().__init__()
        _ = kernel_offsets(kernel_size)  # validates: odd and positive
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.empty(kernel_size ** SPATIAL_DIMS, in_channels, out_channels))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.in_channels * self.kernel_size ** SPATIAL_DIMS)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor, nmap: NeighbourMap, swap_ab: bool = False) -> torch.Tensor:
        if nmap.kernel_size != self.kernel_size:
            raise ValueError(f"neighbour map built for kernel {nmap.kernel_size}, layer has kernel {self.kernel_size}")
        weight = swap_ab_kernel(self.weight) if swap_ab else self.weight
        return sparse_conv4d(x, weight, self.bias, nmap)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"bias={self.bias is not None}")
