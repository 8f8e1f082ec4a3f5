"""Pixel contrast: loss properties, anchor sampling, memory queues, degenerate batches, determinism."""
import pytest
import torch
import torch.nn.functional as F

from segswap.train.pixel_contrast import (
    PixelContrastLoss,
    ProjectionHead,
    build_pixel_contrast,
)

P = 16  # embedding size in these tests


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _masks(b=3, h=6, w=6, seed=0):
    """Soft GT masks with a square repeated region in each image, and predictions that get a few cells wrong."""
    g = _gen(seed)
    gt0 = torch.zeros(b, h, w)
    gt1 = torch.zeros(b, h, w)
    gt0[:, 1:4, 1:4] = 0.9
    gt1[:, 2:5, 2:6] = 0.8
    pred0 = (gt0 * 0.8 + 0.1 + 0.3 * torch.rand(b, h, w, generator=g)).clamp(0.01, 0.99)
    pred1 = (gt1 * 0.8 + 0.1 + 0.3 * torch.rand(b, h, w, generator=g)).clamp(0.01, 0.99)
    return gt0, gt1, pred0, pred1


def _embeddings(gt0, gt1, separated: bool, seed=0):
    """Unit embeddings: clustered by label (two opposite directions + noise) or independent of it."""
    g = _gen(seed + 100)
    out = []
    for gt in (gt0, gt1):
        b, h, w = gt.shape
        noise = torch.randn(b, P, h, w, generator=g)
        if separated:
            centre = torch.zeros(P)
            centre[0] = 4.0
            sign = torch.where(gt > 0.5, 1.0, -1.0)[:, None]
            noise = noise * 0.3 + sign * centre[None, :, None, None]
        out.append(F.normalize(noise, dim=1))
    return out


def test_projection_head_shape_and_unit_norm():
    head = ProjectionHead(in_dim=8, proj_dim=P)
    out = head(torch.randn(2, 8, 5, 7))
    assert out.shape == (2, P, 5, 7)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2, 5, 7))
    with pytest.raises(ValueError, match="tokens"):
        head(torch.randn(2, 9, 5, 7))


def test_loss_lower_for_separated_than_mixed_embeddings():
    gt0, gt1, pred0, pred1 = _masks()
    losses = {}
    for separated in (True, False):
        loss_fn = PixelContrastLoss(temperature=0.1, queue_size=50, anchors_per_class=20, embed_dim=P)
        emb0, emb1 = _embeddings(gt0, gt1, separated)
        # Second batch sees the queue filled by the first, so memory terms count too.
        first = loss_fn(emb0, emb1, gt0, gt1, pred0, pred1, _gen(1))
        second = loss_fn(emb0, emb1, gt0, gt1, pred0, pred1, _gen(2))
        assert torch.isfinite(first) and torch.isfinite(second)
        losses[separated] = second.item()
    assert losses[True] < 0.5 * losses[False], losses


def test_split_counts_half_hard_half_easy_with_fill_in():
    split = PixelContrastLoss.split_counts
    assert split(100, 100, 10) == (5, 5)
    assert split(2, 100, 10) == (2, 8)      # hard short: easy fills in
    assert split(100, 3, 10) == (7, 3)      # easy short: hard fills in
    assert split(3, 4, 10) == (3, 4)        # class smaller than wanted: take all
    assert split(0, 0, 10) == (0, 0)
    assert split(100, 100, 11) == (5, 6)


def test_sample_anchors_counts_and_kinds():
    loss_fn = PixelContrastLoss(anchors_per_class=10, embed_dim=P, queue_size=0)
    labels = torch.tensor([1] * 30 + [0] * 50)
    hard = torch.zeros(80, dtype=torch.bool)
    hard[:3] = True        # 3 hard repeated-region tokens
    hard[30:50] = True     # 20 hard background tokens
    idx, lab = loss_fn.sample_anchors(labels, hard, _gen())
    assert idx.unique().numel() == idx.numel()
    assert (labels[idx] == lab).all()
    fg, bg = idx[lab == 1], idx[lab == 0]
    assert fg.numel() == 10 and hard[fg].sum() == 3          # all 3 hard, 7 easy
    assert bg.numel() == 10 and hard[bg].sum() == 5          # half and half


def test_queue_fifo_wraparound_and_sizes():
    loss_fn = PixelContrastLoss(queue_size=5, embed_dim=2)
    rows = torch.arange(14, dtype=torch.float32)[:, None].repeat(1, 2)
    args = (loss_fn.pixel_queue, loss_fn.pixel_ptr, loss_fn.pixel_count)
    loss_fn._push(*args, 1, rows[:3])
    assert loss_fn.pixel_count.tolist() == [0, 3] and loss_fn.pixel_ptr.tolist() == [0, 3]
    loss_fn._push(*args, 1, rows[3:7])                        # wraps: slots 3, 4, 0, 1
    assert loss_fn.pixel_count[1] == 5 and loss_fn.pixel_ptr[1] == 2
    assert loss_fn.pixel_queue[1, :, 0].tolist() == [5, 6, 2, 3, 4]   # 0 and 1, the oldest, are gone
    loss_fn._push(*args, 1, rows[7:14])                       # more than the queue: newest 5 kept
    assert sorted(loss_fn.pixel_queue[1, :, 0].tolist()) == [9, 10, 11, 12, 13]
    assert loss_fn.pixel_count.tolist() == [0, 5]
    assert loss_fn.pixel_queue[0].abs().sum() == 0            # the other class is untouched


def test_update_queues_pushes_pixels_and_region_means():
    b, h, w = 2, 4, 4
    gt0, gt1 = torch.zeros(b, h, w), torch.zeros(b, h, w)
    gt0[0, :2, :2] = 1.0            # only pair 0 has a repeated region (pair 1 is a negative)
    gt1[0, 2:, 2:] = 1.0
    emb0, emb1 = _embeddings(gt0, gt1, separated=True)
    loss_fn = PixelContrastLoss(queue_size=1000, pixels_per_image=3, embed_dim=P)
    loss_fn.update_queues(emb0, emb1, gt0, gt1, _gen())
    # 2 images hold the repeated region, all 4 hold background.
    assert loss_fn.pixel_count.tolist() == [4 * 3, 2 * 3]
    assert loss_fn.region_count.tolist() == [4, 2]
    # Region means are unit vectors on the right side of the separating direction.
    fg_regions = loss_fn.region_queue[1, :2]
    torch.testing.assert_close(fg_regions.norm(dim=1), torch.ones(2))
    assert (fg_regions[:, 0] > 0.5).all() and (loss_fn.region_queue[0, :4, 0] < -0.5).all()
    assert (loss_fn.pixel_queue[1, :6, 0] > 0).all() and (loss_fn.pixel_queue[0, :12, 0] < 0).all()


def test_gradient_reaches_embeddings_not_queue():
    gt0, gt1, pred0, pred1 = _masks()
    head = ProjectionHead(in_dim=8, proj_dim=P)
    loss_fn = PixelContrastLoss(queue_size=40, anchors_per_class=12, embed_dim=P)
    tokens0 = torch.randn(3, 8, 6, 6, generator=_gen(3))
    tokens1 = torch.randn(3, 8, 6, 6, generator=_gen(4))
    loss_fn(head(tokens0), head(tokens1), gt0, gt1, pred0, pred1, _gen(5))   # fill the queue
    queue_before = loss_fn.pixel_queue.clone()
    loss = loss_fn(head(tokens0), head(tokens1), gt0, gt1, pred0, pred1, _gen(6))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    assert not loss_fn.pixel_queue.requires_grad and loss_fn.pixel_queue.grad is None
    assert not loss_fn.region_queue.requires_grad
    assert not torch.equal(queue_before, loss_fn.pixel_queue)   # pushed after the loss
    assert list(loss_fn.parameters()) == []


def test_degenerate_batches_are_finite():
    b, h, w = 2, 4, 4
    zeros = torch.zeros(b, h, w)
    head = ProjectionHead(in_dim=8, proj_dim=P)
    tokens = torch.randn(b, 8, h, w, generator=_gen(7), requires_grad=True)
    loss_fn = PixelContrastLoss(queue_size=20, anchors_per_class=8, embed_dim=P)
    # Only negative pairs (everything background), empty queue: no negatives for any anchor.
    loss = loss_fn(head(tokens), head(tokens), zeros, zeros, zeros + 0.3, zeros + 0.7, _gen())
    assert torch.isfinite(loss) and abs(loss.item()) < 1e-6
    loss.backward()
    assert torch.isfinite(tokens.grad).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in head.parameters())
    # A single token per image: one anchor per class at most, no in-batch positives, empty queue.
    fresh = PixelContrastLoss(queue_size=0, anchors_per_class=2, embed_dim=P)
    e = F.normalize(torch.randn(1, P, 1, 1, generator=_gen(8)), dim=1).requires_grad_()
    one, zero = torch.ones(1, 1, 1), torch.zeros(1, 1, 1)
    loss = fresh(e, e, one, zero, one * 0.9, zero + 0.1, _gen())
    assert torch.isfinite(loss) and loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(e.grad).all()


def test_tiny_temperature_stays_finite():
    gt0, gt1, pred0, pred1 = _masks()
    emb0, emb1 = _embeddings(gt0, gt1, separated=False)
    emb0.requires_grad_()
    loss = PixelContrastLoss(temperature=1e-3, queue_size=0, anchors_per_class=20, embed_dim=P)(
        emb0, emb1, gt0, gt1, pred0, pred1, _gen())
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(emb0.grad).all()


def test_deterministic_with_seeded_generator_and_global_rng_untouched():
    gt0, gt1, pred0, pred1 = _masks()
    emb0, emb1 = _embeddings(gt0, gt1, separated=False)
    results = []
    for _ in range(2):
        loss_fn = PixelContrastLoss(queue_size=30, anchors_per_class=10, pixels_per_image=2, embed_dim=P)
        state = torch.get_rng_state()
        losses = [loss_fn(emb0, emb1, gt0, gt1, pred0, pred1, _gen(11 + i)) for i in range(2)]
        assert torch.equal(state, torch.get_rng_state())
        results.append((torch.stack(losses), loss_fn.state_dict()))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    for key, value in results[0][1].items():
        assert torch.equal(value, results[1][1][key]), key
    other = PixelContrastLoss(queue_size=30, anchors_per_class=10, pixels_per_image=2, embed_dim=P)
    assert other(emb0, emb1, gt0, gt1, pred0, pred1, _gen(99)) != results[0][0][0]


def test_bad_inputs_and_config_are_named():
    loss_fn = PixelContrastLoss(embed_dim=P, queue_size=4)
    gt0, gt1, pred0, pred1 = _masks()
    emb0, emb1 = _embeddings(gt0, gt1, separated=True)
    with pytest.raises(ValueError, match="pred_mask1"):
        loss_fn(emb0, emb1, gt0, gt1, pred0, pred1[:, :3], _gen())
    with pytest.raises(ValueError, match="embed_dim"):
        PixelContrastLoss(embed_dim=8)(emb0, emb1, gt0, gt1, pred0, pred1, _gen())
    with pytest.raises(ValueError, match="temperature"):
        PixelContrastLoss(temperature=0)
    with pytest.raises(ValueError, match="unknown config keys"):
        build_pixel_contrast({"temprature": 0.1}, in_dim=8)
    head, loss = build_pixel_contrast({"proj_dim": 32, "queue_size": 7}, in_dim=8)
    assert head.proj_dim == 32 and loss.pixel_queue.shape == (2, 7, 32)


def _ddp_worker(rank, world, store_path, result_path):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    try:
        b, h, w = 1, 3, 3
        gt = torch.zeros(b, h, w)
        gt[:, : rank + 1] = 1.0                      # ranks push different numbers of rows
        emb = F.normalize(torch.randn(b, P, h, w, generator=_gen(rank)), dim=1)
        loss_fn = PixelContrastLoss(queue_size=100, pixels_per_image=4, anchors_per_class=4, embed_dim=P)
        loss_fn(emb, emb, gt, gt, gt * 0.5, gt * 0.5, _gen(rank))
        torch.save(loss_fn.state_dict(), f"{result_path}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_ranks_hold_identical_queues(tmp_path):
    import torch.multiprocessing as mp
    world = 2
    mp.spawn(_ddp_worker, args=(world, str(tmp_path / "store"), str(tmp_path / "state")), nprocs=world)
    states = [torch.load(f"{tmp_path / 'state'}.{r}", weights_only=True) for r in range(world)]
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
    # rank 0: 3 fg cells/image, 6 bg; rank 1: 6 fg, 3 bg; 2 images each, pixels_per_image=4.
    assert states[0]["pixel_count"].tolist() == [2 * 4 + 2 * 3, 2 * 3 + 2 * 4]
    assert states[0]["region_count"].tolist() == [4, 4]



# ------------------------------------------------------------------ with the trainer (issue 5)
TRAIN_ARGS = ["--model", "tiny", "--image-size", "64", "--batch-pos", "2", "--batch-neg", "2", "--workers", "0",
              "--log-every", "1", "--seed", "5", "--warmup-steps", "1", "--lr", "1e-3"]


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory):
    from synthetic_shards import write_synthetic_shards
    return write_synthetic_shards(tmp_path_factory.mktemp("contrast_shards"), n_shards=1, pairs_per_shard=6, size=64)


def _train(out, shards, steps, *extra, global_seed=0):
    from segswap.train.cli import main
    # The trainer seeds torch's global RNG (dropout) from --seed; fork it so other tests' RNG is untouched.
    # Runs given different global states must still agree: the run seed alone decides the weights.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(global_seed)
        rc = main(["--shards", shards, "--out", str(out), "--max-steps", str(steps), "--no-resume", *TRAIN_ARGS, *extra])
    assert rc in (0, None)
    return torch.load(out / "last.pth", weights_only=True)


def test_weight_zero_is_bit_identical_to_plain_trainer(tmp_path, tiny_shards):
    plain = _train(tmp_path / "plain", tiny_shards, 2, global_seed=1)
    off = _train(tmp_path / "off", tiny_shards, 2, "--pixel-contrast", "0", "--contrast-queue", "7",
                 "--contrast-temperature", "0.5", "--contrast-warmup", "0", global_seed=2)
    assert "contrast" not in off
    assert plain["model"].keys() == off["model"].keys()
    for key, value in plain["model"].items():
        assert torch.equal(value, off["model"][key]), key
    # The runs did train: two optimiser steps on every head parameter.
    assert plain["step"] == 2
    adam_state = plain["optimizer"]["state"]
    assert adam_state and all(int(v["step"]) == 2 for v in adam_state.values())


def test_contrast_term_is_logged_and_checkpointed(tmp_path, tiny_shards):
    import json
    ck = _train(tmp_path / "on", tiny_shards, 2, "--pixel-contrast", "0.5", "--contrast-warmup", "1",
                "--contrast-queue", "64")
    records = [json.loads(line) for line in (tmp_path / "on" / "metrics.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r for r in records if "loss/contrast" in r}
    assert set(by_step) == {1, 2}
    assert by_step[1]["loss/contrast"] == 0.0                  # still in warm-up
    assert by_step[2]["loss/contrast"] > 0 and torch.isfinite(torch.tensor(by_step[2]["loss/contrast"]))
    state = ck["contrast"]["loss"]
    assert state["pixel_queue"].shape[1] == 64 and state["pixel_count"].sum() > 0
    assert ck["contrast"]["head"]


def test_negative_pairs_take_part_as_background(tmp_path, tiny_shards, monkeypatch):
    """The trainer hands the loss every pair of the step; negatives come with all-zero labels."""
    from segswap.train.pixel_contrast import PixelContrastLoss

    seen = []
    original = PixelContrastLoss.forward

    def spy(self, emb0, emb1, gt0, gt1, pred0, pred1, generator):
        seen.append((emb0.shape[0], gt0.flatten(1).amax(1).tolist()))
        return original(self, emb0, emb1, gt0, gt1, pred0, pred1, generator)

    monkeypatch.setattr(PixelContrastLoss, "forward", spy)
    _train(tmp_path / "neg", tiny_shards, 1, "--pixel-contrast", "0.5", "--contrast-warmup", "0")
    (n_pairs, gt_max), = seen
    n_pos = int(TRAIN_ARGS[TRAIN_ARGS.index("--batch-pos") + 1])
    assert n_pairs > n_pos                                   # negatives are in
    assert all(m == 0 for m in gt_max[n_pos:])               # ... as all background
    assert any(m > 0 for m in gt_max[:n_pos])
