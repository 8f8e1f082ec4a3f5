"""Streaming loader: exact grid ground truth, TPS recomposition, skipping corrupt samples, determinism."""
import itertools
import multiprocessing
import signal
import time

import numpy as np
import pytest
import torch
from synthetic_shards import make_pair, write_synthetic_shards

from segswap.shards.format import FormatError
from segswap.train.augment import PairAugmenter, no_augment
from segswap.train.groundtruth import cell_centres, sample_flow
from segswap.train.stream import ShardStream, stop_workers, worker_init


def test_grid_ground_truth_is_exact_without_augmentation():
    rng = np.random.default_rng(0)
    pair = make_pair(rng, "000000-000000", size=128)
    item = no_augment(128)(pair, rng)
    block = (pair.mask0 / 255.0).reshape(8, 16, 8, 16).mean(axis=(1, 3))
    assert np.allclose(item["mask0"], block, atol=1e-6)
    dx, dy = pair.meta["segments"][0]["translation"]
    inside = block == 1.0
    expected = cell_centres(8, 8) + np.array([dx, dy]) / 128
    assert inside.sum() >= 4
    assert np.abs(item["flow01"][inside] - expected[inside]).max() < 1e-3  # float16 storage
    assert np.allclose(item["flow01_weight"][inside], 1.0)
    assert (item["flow01_weight"][block == 0] == 0).all()
    assert not item["pad1"].any()


def test_resizing_keeps_ground_truth_consistent():
    rng = np.random.default_rng(1)
    pair = make_pair(rng, "000000-000000", size=128)
    item = no_augment(64)(pair, rng)
    assert item["img0"].shape == (64, 64, 3) and item["mask0"].shape == (4, 4)
    block = (pair.mask0 / 255.0).reshape(4, 32, 4, 32).mean(axis=(1, 3))
    assert np.allclose(item["mask0"], block, atol=1e-3)


def _cycle_error(item, g):
    """For cells of image 0 fully in the mask: distance (in cells) of flow10(flow01(p)) from p."""
    f10 = np.where(item["flow10_weight"][..., None] > 0, item["flow10"], np.nan)
    back = sample_flow(f10, item["flow01"])
    sel = (item["flow01_weight"] > 0.99) & np.isfinite(back[..., 0])
    return np.abs(back[sel] - cell_centres(g, g)[sel]).max() * g if sel.any() else 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tps_warp_recomposes_ground_truth(seed):
    rng = np.random.default_rng(seed)
    pair = make_pair(rng, "000000-000000", size=128, min_side=56, max_side=64)
    aug = PairAugmenter(128, p_tps=1.0, p_swap=0.0, p_pad=0.0, p_style=0.0, tps_move=2.0)
    item = aug(pair, rng)
    assert not np.array_equal(item["img1"], pair.img1)  # the warp happened
    # flows still map inside the other mask and are cycle-consistent to within a cell
    assert _cycle_error(item, 8) < 1.0
    g1 = item["mask1"]
    ij = np.clip((item["flow01"] * 8).astype(int), 0, 7)
    sel = item["flow01_weight"] > 0.99
    assert (g1[ij[..., 1], ij[..., 0]][sel] > 0).mean() > 0.9


def test_swap_and_padding_follow_image_one():
    rng = np.random.default_rng(3)
    pair = make_pair(rng, "000000-000000", size=128)
    item = PairAugmenter(128, p_tps=0.0, p_swap=1.0, p_pad=1.0, p_style=0.0)(pair, rng)
    assert np.array_equal(item["img0"], pair.img1)
    assert np.array_equal(item["pad1"], item["mask1"] < 0.5)
    assert item["pad1"].any() and not item["pad1"].all()


def test_corrupt_samples_are_skipped_and_counted(tmp_path):
    url = write_synthetic_shards(tmp_path, n_shards=1, pairs_per_shard=4, size=64, corrupt=("000000-000001",))
    stream = ShardStream(url, no_augment(64), resampled=False)
    items = list(stream)
    assert [it["key"] for it in items] == ["000000-000000", "000000-000002", "000000-000003"]
    assert sum(it["skipped"] for it in items) == 1
    with pytest.raises(FormatError, match="000000-000001"):
        list(ShardStream(url, no_augment(64), resampled=False, strict=True))


def test_missing_shard_is_skipped_and_counted(tmp_path):
    url = write_synthetic_shards(tmp_path, n_shards=1, pairs_per_shard=2, size=64)
    stream = ShardStream([str(tmp_path / "train-000099.tar"), url], no_augment(64), resampled=False)
    items = list(stream)
    assert len(items) == 2
    assert sum(it["skipped"] for it in items) == 1


def test_resampled_stream_is_deterministic_per_seed(tmp_path):
    url = write_synthetic_shards(tmp_path, n_shards=2, pairs_per_shard=4, size=64)
    aug = PairAugmenter(64)

    def first(seed, n=6):
        return list(itertools.islice(iter(ShardStream(url, aug, seed=seed, shuffle_buffer=4)), n))

    a, b, c = first(5), first(5), first(6)
    assert [x["key"] for x in a] == [x["key"] for x in b]
    assert all(np.array_equal(x["img1"], y["img1"]) for x, y in zip(a, b))
    assert [x["key"] for x in a] != [x["key"] for x in c] or not all(
        np.array_equal(x["img1"], y["img1"]) for x, y in zip(a, c))


def test_pipe_urls_stream(tmp_path):
    url = write_synthetic_shards(tmp_path, n_shards=1, pairs_per_shard=2, size=64)
    items = list(ShardStream(f"pipe:cat {url}", no_augment(64), resampled=False))
    assert [it["key"] for it in items] == ["000000-000000", "000000-000001"]


def test_missing_local_shards_fail_fast_with_their_names(tmp_path, caplog):
    from segswap.train.augment import PairAugmenter
    from segswap.train.stream import ShardStream

    real = write_synthetic_shards(tmp_path / "real", n_shards=2, pairs_per_shard=2, size=64)
    with pytest.raises(FileNotFoundError, match=r"2 of 2 shards do not exist, e\.g\. .*nope/train-000000\.tar"):
        ShardStream(str(tmp_path / "nope" / "train-{000000..000001}.tar"), PairAugmenter(64))
    urls = sorted(str(p) for p in (tmp_path / "real").glob("*.tar")) + [str(tmp_path / "gone.tar")]
    with pytest.raises(FileNotFoundError, match="gone.tar"):
        ShardStream(urls, PairAugmenter(64), strict=True)
    with caplog.at_level("WARNING"):
        stream = ShardStream(urls, PairAugmenter(64))
    assert "1 of 3 shards do not exist" in caplog.text and len(stream.urls) == 2
    assert real


@pytest.mark.parametrize("seed", [0, 1])
def test_dense_tps_map_follows_the_spline_at_every_pixel(seed):
    """The image warp is interpolated from a lattice (the ground truth uses the spline itself): it must
    stay far below a 16 px feature cell everywhere, border rows and columns included."""
    import cv2

    from segswap.train.augment import random_warp, warp_dense

    tps = random_warp(np.random.default_rng(seed), (4, 6), 1.0)
    for h, w in ((480, 480), (128, 96)):
        map1, map2 = warp_dense(tps, h, w)
        got, _ = cv2.convertMaps(map1, map2, cv2.CV_32FC2)
        ys, xs = np.mgrid[0:h, 0:w]
        exact = tps(np.stack([(xs + 0.5) / w, (ys + 0.5) / h], -1)) * [w, h] - 0.5
        err = np.abs(got - exact).max(-1)
        assert got.shape == (h, w, 2)
        assert np.percentile(err, 99) < 1.0 and err.max() < 3.0, (np.percentile(err, 99), err.max())
        for edge in (err[0], err[-1], err[:, 0], err[:, -1]):
            assert np.median(edge) < 0.5


def test_matches_pushed_out_of_the_frame_lose_their_correspondence():
    rng = np.random.default_rng(4)
    pair = make_pair(rng, "000000-000000", size=128)
    # A warp that moves everything hard: some image-0 cells' matches must leave the frame.
    aug = PairAugmenter(128, p_tps=1.0, p_swap=0.0, p_pad=0.0, p_style=0.0, tps_move=6.0)
    for seed in range(20):
        item = aug(pair, np.random.default_rng(seed))
        w = item["flow01_weight"]
        assert ((item["flow01"] >= 0) & (item["flow01"] <= 1)).all()
        assert (w[item["mask0"] == 0] == 0).all()


def test_loader_workers_start_after_the_parent_used_opencv_threads(tmp_path):
    # OpenCV's thread pool is not fork-safe: after the parent ran parallel cv2 calls, forked loader
    # workers hung in cv2 (seen after unsupervised segment extraction in the same process). In a
    # subprocess with a time bound, so that a hang fails this test and not the CI run.
    import subprocess
    import sys

    url = write_synthetic_shards(tmp_path, n_shards=1, pairs_per_shard=4, size=64)
    code = (
        "import sys, cv2, numpy as np\n"
        "from segswap.train.augment import no_augment\n"
        "from segswap.train.stream import ShardStream, make_loader\n"
        "cv2.setNumThreads(2)\n"
        "big = np.random.rand(2000, 2000, 3).astype(np.float32)\n"
        "for _ in range(4):\n"
        "    for _ in range(3):\n"
        "        cv2.resize(big, (1000, 1000)); cv2.GaussianBlur(big, (7, 7), 2)\n"
        "    stream = ShardStream(sys.argv[1], no_augment(64), resampled=True, shuffle_buffer=1)\n"
        "    next(iter(make_loader(stream, batch_size=2, workers=1)))\n"
        "    cv2.setNumThreads(2)\n"
        "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code, url], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


class _StuckAfterOne(torch.utils.data.IterableDataset):
    """Worker 0 yields one item; then every worker blocks where SIGTERM cannot end it (ignored), as a
    worker stuck inside a C call does."""

    def __iter__(self):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if torch.utils.data.get_worker_info().id == 0:
            yield torch.zeros(1)
        time.sleep(60)
        yield torch.zeros(1)


def test_stop_workers_kills_stuck_workers_without_the_dataloader_calling_it_a_crash(monkeypatch):
    """stop_workers SIGKILLs a worker that SIGTERM does not end; the DataLoader's SIGCHLD handler must
    not then raise "worker is killed by signal" in the trainer. The join is made slow, so that the
    handler sees the dead worker before join() reaps it (the order that failed in CI)."""
    batches = iter(torch.utils.data.DataLoader(_StuckAfterOne(), batch_size=None, num_workers=2,
                                               worker_init_fn=worker_init, persistent_workers=True))
    next(batches)
    join = multiprocessing.Process.join

    def slow_join(self, timeout=None):
        time.sleep(0.3)
        return join(self, timeout)

    monkeypatch.setattr(multiprocessing.Process, "join", slow_join)
    started = time.monotonic()
    stop_workers(batches, wait_s=0.5)
    time.sleep(0.5)  # any SIGCHLD left is handled by now
    assert time.monotonic() - started < 10
    assert not any(w.is_alive() for w in batches._workers)

