"""The feature cache: what it stores, that its ground truth is the pixel path's, and training through it."""
import json

import numpy as np
import pytest
import torch
from synthetic_shards import write_synthetic_shards

from segswap.shards.reader import iter_pairs, iter_raw_samples
from segswap.train import cli
from segswap.train.augment import PairAugmenter, decode_choice, resize_square
from segswap.train.config import DEFAULTS
from segswap.train.feature_cache import (
    CachedFeatureAugmenter,
    FeatureCacheError,
    build_cache,
    cache_identity,
    check_cache,
    warp_feature_grid,
)
from segswap.train.model import build_model

SIZE = 64


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_synthetic_shards(tmp_path_factory.mktemp("fc") / "train", n_shards=2, pairs_per_shard=3,
                                  size=96, seed=3)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model({**DEFAULTS["model"], "transformer": {**DEFAULTS["model"]["transformer"], "model": "tiny"}}).eval()


@pytest.fixture(scope="module")
def cache(shards, model, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("cache") / "c")
    return folder, build_cache(folder, shards, model, SIZE, "resnet50", None, batch_size=4)


def test_cache_holds_every_view_at_the_training_size(cache, shards, model):
    folder, meta = cache
    store = np.load(f"{folder}/features.npy", allow_pickle=False)
    pairs = list(iter_pairs(shards))
    assert meta["n_rows"] == 4 * len(pairs) == store.shape[0] and store.dtype == np.float16
    assert store.shape[1:] == (1024, SIZE // 16, SIZE // 16)
    p = pairs[4]
    for view, row in zip(("img0", "img1", "sty0", "sty1"), meta["rows"][p.key]):
        with torch.no_grad():
            want = model.features(torch.from_numpy(resize_square(getattr(p, view), SIZE))[None])[0].numpy()
        np.testing.assert_allclose(store[row].astype(np.float32), want, atol=2e-3)


def test_a_mismatching_cache_is_refused_with_what_differs(cache, shards, tmp_path):
    folder, _ = cache
    with pytest.raises(FeatureCacheError, match="another image_size"):
        check_cache(folder, cache_identity(shards, "resnet50", None, 128))
    with pytest.raises(FeatureCacheError, match="another backbone"):
        check_cache(folder, cache_identity(shards, "vgg16", None, SIZE))
    other = write_synthetic_shards(tmp_path / "other", n_shards=1, pairs_per_shard=2, size=96, seed=9)
    with pytest.raises(FeatureCacheError, match="another shard list or shard sizes"):
        check_cache(folder, cache_identity(other, "resnet50", None, SIZE))


@pytest.mark.parametrize("p_tps", [0.0, 1.0])
def test_ground_truth_and_random_draws_are_the_pixel_paths(cache, shards, p_tps):
    folder, meta = cache
    kw = dict(p_style=0.5, p_tps=p_tps, p_swap=0.5, p_pad=0.5)
    pixel, cached = PairAugmenter(image_size=SIZE, **kw), CachedFeatureAugmenter(folder, meta, **kw)
    store = np.load(f"{folder}/features.npy", allow_pickle=False)
    for i, raw in enumerate(iter_raw_samples(shards)):
        r1, r2 = np.random.default_rng(i), np.random.default_rng(i)
        a = pixel(decode_choice(raw, pixel, r1), r1)
        b = cached(decode_choice(raw, cached, r2), r2)
        for k in ("mask0", "mask1", "flow01", "flow10", "flow01_weight", "flow10_weight", "pad1"):
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        assert r1.random() == r2.random()  # same number of draws
        assert b["feat0"].shape == (1024, SIZE // 16, SIZE // 16)
        if p_tps == 0:  # no warp: one of the cached rows, exactly
            rows = meta["rows"][raw["__key__"]]
            assert any(np.array_equal(b["feat0"], store[r].astype(np.float32)) for r in rows)


def test_feature_warp_reads_where_the_spline_sends_each_cell():
    g = 6
    feat = np.random.default_rng(0).standard_normal((8, g, g)).astype(np.float32)
    feat /= np.linalg.norm(feat, axis=0, keepdims=True)
    centres = np.stack(np.meshgrid((np.arange(g) + 0.5) / g, (np.arange(g) + 0.5) / g), -1).astype(np.float32)
    np.testing.assert_allclose(warp_feature_grid(feat, centres), feat, atol=1e-5)  # identity
    shifted = centres.copy()
    shifted[..., 0] = np.clip(shifted[..., 0] + 1 / g, 0, (g - 0.5) / g)  # read one cell to the right
    np.testing.assert_allclose(warp_feature_grid(feat, shifted)[:, :, :-1], feat[:, :, 1:], atol=1e-5)


def test_training_through_the_cache(shards, tmp_path):
    out, folder = tmp_path / "run", tmp_path / "cache"
    rc = cli.main(["--shards", shards, "--out", str(out), "--cache-features", str(folder), "--max-steps", "3",
                   "--model", "tiny", "--image-size", str(SIZE), "--batch-pos", "2", "--batch-neg", "2",
                   "--workers", "0", "--log-every", "1", "--warmup-steps", "2", "--shuffle-buffer", "4"])
    assert rc == 0
    meta = json.loads((folder / "cache.json").read_text())
    assert meta["image_size"] == SIZE and len(meta["rows"]) == 6
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3] and all(np.isfinite(x["loss/total"]) for x in lines)
    # a second run reuses the cache (same identity) and resumes at step 3 -> 4
    rc = cli.main(["--shards", shards, "--out", str(out), "--cache-features", str(folder), "--max-steps", "4",
                   "--model", "tiny", "--image-size", str(SIZE), "--batch-pos", "2", "--batch-neg", "2",
                   "--workers", "0", "--log-every", "1", "--warmup-steps", "2", "--shuffle-buffer", "4"])
    assert rc == 0 and "reusing" in (out / "train.log").read_text()


def test_learning_runs_untrained_model_is_the_trainers_step_0(shards, tmp_path):
    """benchmarks/learning_run.py rebuilds the step-0 model from the run's config; it must be the trainer's."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import learning_run

    from segswap.train.checkpoint import read_checkpoint
    out = tmp_path / "run"
    assert cli.main(["--shards", shards, "--out", str(out), "--max-steps", "1", "--ckpt-every", "1",
                     "--model", "tiny", "--image-size", str(SIZE), "--batch-pos", "2", "--batch-neg", "2",
                     "--workers", "0", "--lr", "0", "--warmup-steps", "0", "--shuffle-buffer", "4"]) == 0
    learning_run.write_untrained(str(out), str(tmp_path / "untrained.pth"))
    a = read_checkpoint(tmp_path / "untrained.pth")["model"]
    b = read_checkpoint(out / "last.pth")["model"]  # lr 0: one step leaves the weights where they started
    assert all(torch.equal(a[k], b[k]) for k in a)
