"""Submanifold sparse 4D convolution against the dense 4D reference: values, gradients, layouts, maps."""
import itertools

import pytest
import torch
from dense4d import dense_conv4d, densify, sparsify, swap_ab

from segswap.train import sparse4d
from segswap.train.sparse4d import (
    NeighbourMap,
    SubmanifoldConv4d,
    dense_kernel_to_me,
    kernel_offsets,
    me_kernel_to_dense,
    sparse_conv4d,
    swap_ab_kernel,
)

SHAPE = (4, 5, 3, 6)  # hA, wA, hB, wB: all different so a swapped axis cannot pass by accident
BATCH = 2


def _random_volume(seed: int, density: float = 0.3, shape=SHAPE, batch=BATCH):
    g = torch.Generator().manual_seed(seed)
    active = torch.rand(batch, *shape, generator=g) < density
    coords = active.nonzero()
    # Points in a random order: nothing may rely on the coordinates being sorted.
    return coords[torch.randperm(coords.shape[0], generator=g)], g


def _dense_at_sites(coords, x, weight, bias, shape=SHAPE, batch=BATCH):
    """Dense 4D conv of the zero-filled volume, read at the active sites (= submanifold conv)."""
    return sparsify(dense_conv4d(densify(coords, x, batch, shape), me_kernel_to_dense(weight), bias), coords)


def test_offsets_follow_minkowski_order():
    off = kernel_offsets(3)
    assert off.shape == (81, 4)
    for k, d in enumerate(off.tolist()):
        assert k == (d[0] + 1) + 3 * (d[1] + 1) + 9 * (d[2] + 1) + 27 * (d[3] + 1)
    assert off[40].tolist() == [0, 0, 0, 0]
    off5 = kernel_offsets(5)
    assert off5.shape == (625, 4) and off5.min() == -2 and off5.max() == 2
    for k, d in enumerate(off5.tolist()):
        assert k == sum((di + 2) * 5 ** i for i, di in enumerate(d))
    with pytest.raises(ValueError, match="odd"):
        kernel_offsets(4)


@pytest.mark.parametrize("strategy", ["auto", "gather", "transform"])
@pytest.mark.parametrize("c_in,c_out", [(1, 4), (3, 1), (4, 3), (8, 1)])  # covers all kernel-gradient paths
def test_sparse_conv_equals_dense_forward_and_gradients(monkeypatch, strategy, c_in, c_out):
    if strategy != "auto":  # force one of the two computations so both are checked on every shape
        monkeypatch.setattr(sparse4d, "_use_gather", lambda *a: strategy == "gather")
    coords, g = _random_volume(c_in * 10 + c_out)
    nmap = NeighbourMap.build(coords, SHAPE, 3)
    x = torch.randn(coords.shape[0], c_in, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(81, c_in, c_out, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(c_out, generator=g, dtype=torch.float64, requires_grad=True)
    y = sparse_conv4d(x, w, b, nmap)
    y_ref = _dense_at_sites(coords, x, w, b)
    torch.testing.assert_close(y, y_ref)
    probe = torch.randn(y.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((y * probe).sum(), (x, w, b))
    grads_ref = torch.autograd.grad((y_ref * probe).sum(), (x, w, b))
    for got, ref in zip(grads, grads_ref):
        torch.testing.assert_close(got, ref)


def test_gradcheck_small():
    coords, g = _random_volume(7, density=0.4, shape=(2, 3, 2, 3), batch=1)
    nmap = NeighbourMap.build(coords, (2, 3, 2, 3), 3)
    x = torch.randn(coords.shape[0], 2, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(81, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: sparse_conv4d(x, w, b, nmap), (x, w, b), fast_mode=True)


def test_kernel_size_five_equals_dense():
    coords, g = _random_volume(11, density=0.15, shape=(5, 5, 5, 5), batch=1)
    nmap = NeighbourMap.build(coords, (5, 5, 5, 5), 5)
    x = torch.randn(coords.shape[0], 2, generator=g, dtype=torch.float64)
    w = torch.randn(625, 2, 2, generator=g, dtype=torch.float64)
    torch.testing.assert_close(sparse_conv4d(x, w, None, nmap),
                               _dense_at_sites(coords, x, w, None, (5, 5, 5, 5), 1))


def test_batch_items_do_not_mix():
    coords, g = _random_volume(3)
    x = torch.randn(coords.shape[0], 2, generator=g, dtype=torch.float64)
    w = torch.randn(81, 2, 3, generator=g, dtype=torch.float64)
    full = sparse_conv4d(x, w, None, NeighbourMap.build(coords, SHAPE, 3))
    first = coords[:, 0] == 0
    alone = sparse_conv4d(x[first], w, None, NeighbourMap.build(coords[first], SHAPE, 3))
    torch.testing.assert_close(full[first], alone)


def test_minkowski_layout_single_tap_is_a_shift():
    """A kernel whose only non-zero is ME row k = (diA+1) + 3(djA+1) + 9(diB+1) + 27(djB+1) reads x at p + d."""
    coords = torch.tensor(list(itertools.product([0], range(3), range(3), range(3), range(3))))
    x = torch.arange(coords.shape[0], dtype=torch.float64)[:, None] + 1
    nmap = NeighbourMap.build(coords, (3, 3, 3, 3), 3)
    d = (1, 0, -1, 1)
    k = (d[0] + 1) + 3 * (d[1] + 1) + 9 * (d[2] + 1) + 27 * (d[3] + 1)
    w = torch.zeros(81, 1, 1, dtype=torch.float64)
    w[k] = 1.0
    y = sparse_conv4d(x, w, None, nmap)[:, 0]
    lookup = {tuple(c[1:].tolist()): float(v) for c, v in zip(coords, x[:, 0])}
    for c, got in zip(coords, y.tolist()):
        src = tuple(ci + di for ci, di in zip(c[1:].tolist(), d))
        assert got == lookup.get(src, 0.0)
    # The dense equivalent has the tap at [.., diA+1, djA+1, diB+1, djB+1].
    dense = me_kernel_to_dense(w)
    assert dense[0, 0, d[0] + 1, d[1] + 1, d[2] + 1, d[3] + 1] == 1 and dense.sum() == 1
    torch.testing.assert_close(dense_kernel_to_me(dense), w)


def test_me_dense_roundtrip_random():
    w = torch.randn(625, 3, 2)
    torch.testing.assert_close(dense_kernel_to_me(me_kernel_to_dense(w)), w)


def test_swapped_kernel_equals_dense_on_swapped_volume():
    coords, g = _random_volume(5)
    nmap = NeighbourMap.build(coords, SHAPE, 3)
    x = torch.randn(coords.shape[0], 2, generator=g, dtype=torch.float64)
    w = torch.randn(81, 2, 3, generator=g, dtype=torch.float64)
    b = torch.randn(3, generator=g, dtype=torch.float64)
    got = sparse_conv4d(x, swap_ab_kernel(w), b, nmap)
    vol = densify(coords, x, BATCH, SHAPE)
    ref = swap_ab(dense_conv4d(swap_ab(vol), me_kernel_to_dense(w), b))
    torch.testing.assert_close(got, sparsify(ref, coords))
    # Swapping twice is the identity.
    torch.testing.assert_close(swap_ab_kernel(swap_ab_kernel(w)), w)


def test_map_orderings_agree_and_pairs_are_mirrored():
    coords, _ = _random_volume(9)
    nmap = NeighbourMap.build(coords, SHAPE, 3)
    offsets = kernel_offsets(3)
    by_kernel = set()
    for k in range(81):
        src, dst = nmap.pairs(k)
        assert torch.equal(coords[src, 1:] - coords[dst, 1:], offsets[k].expand(src.numel(), 4))
        assert torch.equal(coords[src, 0], coords[dst, 0])
        by_kernel |= {(int(s), int(t), k) for s, t in zip(src, dst)}
    rows = torch.repeat_interleave(torch.arange(nmap.num_points), nmap.row_ptr.diff())
    by_out = {(int(s), int(t), int(k)) for s, t, k in zip(nmap.in_by_out, rows, nmap.k_by_out)}
    assert by_kernel == by_out
    assert {(t, s, 80 - k) for s, t, k in by_kernel} == by_kernel  # q = p + d  <=>  p = q - d
    # Inside each output row the kernel rows ascend (a valid CSR matrix).
    for r in range(nmap.num_points):
        ks = nmap.k_by_out[nmap.row_ptr[r]:nmap.row_ptr[r + 1]]
        assert bool((ks[1:] > ks[:-1]).all())


def test_map_rejects_bad_coordinates():
    with pytest.raises(ValueError, match="duplicate"):
        NeighbourMap.build(torch.tensor([[0, 1, 1, 1, 1], [0, 1, 1, 1, 1]]), SHAPE, 3)
    with pytest.raises(ValueError, match="outside"):
        NeighbourMap.build(torch.tensor([[0, 0, 5, 0, 0]]), SHAPE, 3)
    with pytest.raises(ValueError, match=r"\[N, 5\]"):
        NeighbourMap.build(torch.zeros(3, 4, dtype=torch.long), SHAPE, 3)


def test_empty_volume():
    nmap = NeighbourMap.build(torch.zeros(0, 5, dtype=torch.long), SHAPE, 3)
    layer = SubmanifoldConv4d(1, 4)
    assert layer(torch.zeros(0, 1), nmap).shape == (0, 4)


def test_layer_checks_kernel_and_channels():
    coords, _ = _random_volume(1)
    nmap = NeighbourMap.build(coords, SHAPE, 3)
    with pytest.raises(ValueError, match="kernel"):
        SubmanifoldConv4d(1, 2, kernel_size=5)(torch.zeros(coords.shape[0], 1), nmap)
    with pytest.raises(ValueError, match="weight must be"):
        SubmanifoldConv4d(2, 2)(torch.zeros(coords.shape[0], 1), nmap)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    coords, g = _random_volume(13)
    x = torch.randn(coords.shape[0], 4, generator=g)
    w = torch.randn(81, 4, 3, generator=g)
    cpu = sparse_conv4d(x, w, None, NeighbourMap.build(coords, SHAPE, 3))
    gpu = sparse_conv4d(x.cuda(), w.cuda(), None, NeighbourMap.build(coords.cuda(), SHAPE, 3))
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-4)
