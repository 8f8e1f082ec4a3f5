"""Sparse NC-Net head: correlation merge, stack vs dense, Eq. 1 read-out vs dense, weights, training."""
import argparse

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from dense4d import dense_conv4d, densify, sparsify, swap_ab
from synthetic_shards import write_synthetic_shards

from segswap.train.ncnet import (
    NCNetWeightsError,
    SparseNCNet,
    build_ncnet,
    cell_centres,
    load_sparse_ncnet_weights,
    sparse_correlation,
    sparse_eq1_readout,
)
from segswap.train.sparse4d import me_kernel_to_dense


def _features(seed, b=2, c=8, shape=(3, 4)):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(b, c, *shape, generator=g, dtype=torch.float64), dim=1)


def _brute_force_correlation(f0, f1, topk, pad1=None):
    """{(b, a, t): value}: union of A->B and B->A top-k lists, entries in both summed."""
    out = {}
    b, c = f0.shape[:2]
    for i in range(b):
        sim = f0[i].reshape(c, -1).t() @ f1[i].reshape(c, -1)
        valid = torch.ones(sim.shape[1], dtype=torch.bool) if pad1 is None else ~pad1[i].reshape(-1)
        cols = valid.nonzero()[:, 0].tolist()
        for a in range(sim.shape[0]):
            best = sorted(cols, key=lambda t: -float(sim[a, t]))[:topk]
            for t in best:
                out[(i, a, t)] = out.get((i, a, t), 0.0) + float(sim[a, t])
        for t in cols:
            best = sorted(range(sim.shape[0]), key=lambda a: -float(sim[a, t]))[:topk]
            for a in best:
                out[(i, a, t)] = out.get((i, a, t), 0.0) + float(sim[a, t])
    return out


@pytest.mark.parametrize("with_pad", [False, True])
def test_sparse_correlation_is_the_union_with_duplicates_summed(with_pad):
    f0, f1 = _features(0, shape=(3, 4)), _features(1, shape=(4, 3))
    pad1 = None
    if with_pad:
        pad1 = torch.zeros(2, 4, 3, dtype=torch.bool)
        pad1[0, :2] = True
        pad1[1, 3, 1:] = True
    coords, values = sparse_correlation(f0, f1, topk=3, pad1=pad1)
    ref = _brute_force_correlation(f0, f1, 3, pad1)
    got = {(int(c[0]), int(c[1] * 4 + c[2]), int(c[3] * 3 + c[4])): float(v) for c, v in zip(coords, values)}
    assert got.keys() == ref.keys()
    for k, v in ref.items():
        assert got[k] == pytest.approx(v, abs=1e-12)
    assert any(abs(v) > 1.5 * abs(float(_pair_sim(f0, f1, *k))) for k, v in got.items())  # some summed twice
    assert len(ref) <= 2 * 3 * (12 + 12)  # batch * topk * (NA + NB)


def _pair_sim(f0, f1, b, a, t):
    c = f0.shape[1]
    return f0[b].reshape(c, -1)[:, a] @ f1[b].reshape(c, -1)[:, t]


def _dense_eq1(coords, scores, batch, shape0, shape1, pad1=None):
    """Paper Eq. 1 on the dense volume that is zero where there is no entry."""
    n0, n1 = shape0[0] * shape0[1], shape1[0] * shape1[1]
    vol = scores.new_zeros(batch, n0, n1)
    vol = vol.index_put((coords[:, 0], coords[:, 1] * shape0[1] + coords[:, 2], coords[:, 3] * shape1[1] + coords[:, 4]),
                        scores)
    c0 = cell_centres(*shape0, dtype=scores.dtype)
    c1 = cell_centres(*shape1, dtype=scores.dtype)
    v01 = vol if pad1 is None else vol.masked_fill(pad1.reshape(batch, 1, n1), float("-inf"))
    p01 = v01.softmax(dim=2)
    p10 = vol.softmax(dim=1)
    return {"mask0": p01.amax(2).reshape(batch, *shape0), "flow01": (p01 @ c1).reshape(batch, *shape0, 2),
            "mask1": p10.amax(1).reshape(batch, *shape1), "flow10": (p10.transpose(1, 2) @ c0).reshape(batch, *shape1, 2)}


@pytest.mark.parametrize("with_pad", [False, True])
def test_readout_equals_dense_eq1(with_pad):
    g = torch.Generator().manual_seed(3)
    shape0, shape1, batch = (3, 4), (2, 5), 2
    cells = torch.cartesian_prod(torch.arange(batch), torch.arange(3), torch.arange(4), torch.arange(2), torch.arange(5))
    keep = torch.rand(cells.shape[0], generator=g) < 0.3
    keep[(cells[:, 0] == 1) & (cells[:, 1] == 0) & (cells[:, 2] == 0)] = True  # one source cell with every target
    keep[(cells[:, 0] == 0) & (cells[:, 1] == 2) & (cells[:, 2] == 3)] = False  # and one with none
    pad1 = None
    if with_pad:
        pad1 = torch.zeros(batch, *shape1, dtype=torch.bool)
        pad1[0, 1, 2:] = True
        keep &= ~pad1[cells[:, 0], cells[:, 3], cells[:, 4]]  # padded cells never get entries
    coords = cells[keep]
    scores = (torch.randn(coords.shape[0], generator=g, dtype=torch.float64) * 3).requires_grad_()
    got = sparse_eq1_readout(coords, scores, batch, shape0, shape1, pad1)
    ref = _dense_eq1(coords, scores, batch, shape0, shape1, pad1)
    probe = {k: torch.rand(v.shape, generator=g, dtype=torch.float64) for k, v in ref.items()}
    for k in ref:
        torch.testing.assert_close(got[k], ref[k])
    g_got = torch.autograd.grad(sum((got[k] * probe[k]).sum() for k in ref), scores)[0]
    g_ref = torch.autograd.grad(sum((ref[k] * probe[k]).sum() for k in ref), scores)[0]
    torch.testing.assert_close(g_got, g_ref)
    # The source cell with no entry: uniform over the 10 targets (fewer when padded), flow = their mean centre.
    n_valid = 10 - (2 if with_pad else 0) - (1 if with_pad else 0)
    assert got["mask0"][0, 2, 3].item() == pytest.approx(1 / n_valid)


def _dense_stack(net, vol):
    """ReLU -> (dense conv -> ReLU) per layer, keeping only the active sites (what submanifold conv computes)."""
    active = (vol != 0).to(vol.dtype)
    x = torch.relu(vol)
    for layer in net.nc.layers:
        x = torch.relu(dense_conv4d(x, me_kernel_to_dense(layer.weight), layer.bias)) * active
    return x


@pytest.mark.parametrize("symmetric", [False, True])
def test_consensus_stack_equals_dense(symmetric):
    torch.manual_seed(0)
    net = SparseNCNet(topk=3, channels=(4, 3, 1), kernel_sizes=(3, 5, 3), symmetric=symmetric).double()
    with torch.no_grad():
        for layer in net.nc.layers:
            layer.bias.uniform_(-0.1, 0.3)
    f0, f1 = _features(5, b=2, c=6, shape=(4, 3)), _features(6, b=2, c=6, shape=(3, 5))
    coords, values = sparse_correlation(f0, f1, topk=3)
    shape = (4, 3, 3, 5)
    got = net.consensus(coords, values, shape)
    vol = densify(coords, values[:, None] + 1e-3, 2, shape)  # +eps: a zero cosine must still be an active site
    vol = vol - 1e-3 * (vol != 0)
    ref = _dense_stack(net, vol)
    if symmetric:
        ref = ref + swap_ab(_dense_stack(net, swap_ab(vol)))
    torch.testing.assert_close(got, sparsify(ref, coords)[:, 0])
    assert got.abs().sum() > 0


def test_forward_shapes_ranges_padding_and_gradients():
    torch.manual_seed(0)
    net = SparseNCNet(topk=4)
    f0 = F.normalize(torch.randn(3, 16, 5, 6), dim=1)
    f1 = F.normalize(torch.randn(3, 16, 4, 7), dim=1)
    pad1 = torch.zeros(3, 4, 7, dtype=torch.bool)
    pad1[1, :, :3] = True
    out = net(f0, f1, pad1)
    assert out["mask0"].shape == (3, 5, 6) and out["mask1"].shape == (3, 4, 7)
    assert out["flow01"].shape == (3, 5, 6, 2) and out["flow10"].shape == (3, 4, 7, 2)
    for k, v in out.items():
        assert torch.isfinite(v).all(), k
    assert (out["mask0"] > 0).all() and (out["mask0"] < 1).all() and (out["mask1"] > 0).all()
    assert (out["flow01"] >= 0).all() and (out["flow01"] <= 1).all() and (out["flow10"] <= 1).all()
    # Padded cells of image 1 have no entries: uniform over image 0, flow at the mean centre.
    torch.testing.assert_close(out["mask1"][1, :, :3], torch.full((4, 3), 1 / 30))
    torch.testing.assert_close(out["flow10"][1, :, :3], torch.full((4, 3, 2), 0.5))
    # ... and image 0 never points into the padded columns more than the uniform share of the rest.
    assert (out["flow01"][1, ..., 0] > 3 / 7 - 1e-6).all()
    sum(v.sum() for v in out.values()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_batch_items_are_independent():
    torch.manual_seed(1)
    net = SparseNCNet(topk=3, channels=(4, 1))
    f0 = F.normalize(torch.randn(3, 8, 4, 4), dim=1)
    f1 = F.normalize(torch.randn(3, 8, 4, 4), dim=1)
    full = net(f0, f1)
    one = net(f0[2:], f1[2:])
    for k in full:
        torch.testing.assert_close(full[k][2:], one[k])


def test_config_and_pixel_contrast_errors():
    assert build_ncnet({"topk": 5}).topk == 5
    with pytest.raises(ValueError, match="unknown ncnet config keys"):
        build_ncnet({"k": 5})
    with pytest.raises(ValueError, match="last layer"):
        SparseNCNet(channels=(16, 2))
    with pytest.raises(ValueError, match="pixel-contrast"):
        SparseNCNet()(torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 2), return_tokens=True)


def _official_checkpoint(path, channels=(16, 1), bn=False):
    """A file with the official Sparse NC-Net layout: Sequential(ReLU, conv, ReLU, conv, ReLU), ME tensors."""
    g = torch.Generator().manual_seed(0)
    sd = {"FeatureExtraction.model.0.weight": torch.randn(4, 3, 1, 1, generator=g)}
    c_in = 1
    for i, c in enumerate(channels):
        sd[f"NeighConsensus.conv.{2 * i + 1}.kernel"] = torch.randn(81, c_in, c, generator=g)
        sd[f"NeighConsensus.conv.{2 * i + 1}.bias"] = torch.randn(1, c, generator=g)
        c_in = c
    if bn:
        sd["NeighConsensus.conv.1.1.weight"] = torch.ones(16)
    torch.save({"state_dict": sd, "args": argparse.Namespace(ncons_channels=list(channels),
                                                              ncons_kernel_sizes=[3] * len(channels))}, path)
    return sd


def test_official_sparse_ncnet_weights_load(tmp_path):
    sd = _official_checkpoint(tmp_path / "sparsencnet.pth.tar")
    net = SparseNCNet()
    load_sparse_ncnet_weights(net, tmp_path / "sparsencnet.pth.tar")
    torch.testing.assert_close(net.nc.layers[0].weight, sd["NeighConsensus.conv.1.kernel"])
    torch.testing.assert_close(net.nc.layers[1].bias, sd["NeighConsensus.conv.3.bias"][0])
    with pytest.raises(NCNetWeightsError, match="other.pth.*do not match"):
        _official_checkpoint(tmp_path / "other.pth", channels=(10, 10, 1))
        load_sparse_ncnet_weights(SparseNCNet(), tmp_path / "other.pth")
    with pytest.raises(NCNetWeightsError, match="batch-norm"):
        _official_checkpoint(tmp_path / "bn.pth", bn=True)
        load_sparse_ncnet_weights(SparseNCNet(), tmp_path / "bn.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(NCNetWeightsError, match="junk.pth"):
        load_sparse_ncnet_weights(SparseNCNet(), tmp_path / "junk.pth")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_synthetic_shards(tmp_path_factory.mktemp("ncnet_shards"), n_shards=1, pairs_per_shard=6,
                                  size=128, seed=0)


def test_training_a_tiny_ncnet_reduces_the_loss(shards):
    """Frozen (random) conv4 features once, then the head alone, with the trainer's loss and negatives."""
    from segswap.nets.resnet import build_backbone, l2n, normalise_image
    from segswap.shards.reader import iter_pairs
    from segswap.train.augment import no_augment
    from segswap.train.loss import SegSwapLoss
    from segswap.train.trainer import negative_indices

    torch.manual_seed(0)
    aug = no_augment(128)
    rng = np.random.default_rng(0)
    items = [aug(p, rng) for p in iter_pairs(shards)]
    batch = {k: torch.as_tensor(np.stack([it[k] for it in items])) for k in items[0] if k != "key"}
    backbone = build_backbone(None)
    with torch.no_grad():
        f0 = l2n(backbone(normalise_image(batch["img0"])))
        f1 = l2n(backbone(normalise_image(batch["img1"])))
    n_pos = f0.shape[0]
    neg0, neg1 = negative_indices(n_pos, n_pos)
    feat0, feat1 = torch.cat([f0, f0[neg0]]), torch.cat([f1, f1[neg1]])
    net = SparseNCNet(topk=5, channels=(8, 1))
    loss_fn = SegSwapLoss()
    opt = torch.optim.Adam(net.parameters(), lr=3e-2, betas=(0.5, 0.999))
    losses = []
    for _ in range(20):
        terms = loss_fn(net(feat0, feat1), batch, n_pos=n_pos)
        opt.zero_grad()
        terms["total"].backward()
        opt.step()
        losses.append(terms["total"].item())
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses


def test_segswap_train_arch_ncnet_end_to_end(shards, tmp_path):
    from segswap.train import cli
    from segswap.train.checkpoint import load_model

    out = tmp_path / "run"
    rc = cli.main(["--shards", shards, "--out", str(out), "--arch", "ncnet", "--max-steps", "2", "--image-size", "64",
                   "--batch-pos", "2", "--batch-neg", "2", "--workers", "0", "--log-every", "1",
                   "--warmup-steps", "1", "--shuffle-buffer", "2"])
    assert rc == 0
    model = load_model(out / "last.pth")
    assert isinstance(model.head, SparseNCNet)
    img = torch.zeros(1, 3, 64, 64)
    pred = model(img, img)
    assert pred["mask0"].shape == (1, 4, 4) and pred["flow10"].shape == (1, 4, 4, 2)
