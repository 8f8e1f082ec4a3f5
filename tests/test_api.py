"""The public Python API (``import segswap``), exercised through its public names only.

The fixtures make their inputs with test helpers (a tiny untrained checkpoint, a tiny COCO dataset);
everything under test is reached as ``segswap.<name>``.
"""
import subprocess
import sys
from importlib.metadata import version

import cv2
import numpy as np
import pytest
import torch
from coco_fixture import write_coco_fixture
from PIL import Image
from tiny_checkpoint import write_tiny_checkpoint

import segswap


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return segswap.load_model(write_tiny_checkpoint(tmp_path_factory.mktemp("ck") / "tiny.pth"), device="cpu")


def _photo(h, w, seed=0):
    rng = np.random.default_rng(seed)
    return cv2.resize(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), (w, h), interpolation=cv2.INTER_LINEAR)


def test_public_names_and_version():
    assert {"load_model", "Predictor", "generate", "open_shards", "Pair", "viz", "__version__"} <= set(dir(segswap))
    assert segswap.__version__ == version("segswap")
    with pytest.raises(AttributeError):
        segswap.not_a_name  # noqa: B018


def test_import_segswap_does_not_load_torch():
    code = "import sys, segswap, segswap.shards.format; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False"


def test_predict_returns_each_inputs_size(model):
    img0 = _photo(70, 100)                                   # numpy uint8, not square
    img1 = Image.fromarray(_photo(90, 50, seed=1))           # PIL
    out = model.predict(img0, img1)
    assert out["mask0"].shape == (70, 100) and out["flow01"].shape == (70, 100, 2)
    assert out["mask1"].shape == (90, 50) and out["flow10"].shape == (90, 50, 2)
    for k in ("mask0", "mask1", "flow01", "flow10"):
        assert out[k].dtype == np.float32 and np.all((out[k] >= 0) & (out[k] <= 1)), k


def test_tensor_float_and_grey_inputs_give_the_same_prediction(model):
    img = _photo(64, 64)
    as_numpy = model.predict(img, img)
    chw = torch.as_tensor(img).permute(2, 0, 1).float() / 255        # [3, H, W] float in [0, 1]
    as_tensor = model.predict(chw, img.astype(np.float32) / 255)     # and [H, W, 3] float
    for k in as_numpy:
        np.testing.assert_allclose(as_tensor[k], as_numpy[k], atol=1e-5)
    grey = model.predict(img[..., 0], img[..., 0])
    assert grey["mask0"].shape == (64, 64)


def test_image_outputs_interpolate_the_grid_at_cell_centres(model):
    # 12 px input, 4x4 grid: cell (i, j) covers 3x3 pixels and its centre is pixel (3i + 1, 3j + 1).
    img0, img1 = _photo(12, 12), _photo(12, 12, seed=2)
    grid = model.predict(img0, img1, resolution="grid")
    full = model.predict(img0, img1)
    assert grid["mask0"].shape == (model.size // 16,) * 2 == (4, 4)
    np.testing.assert_allclose(full["mask0"][1::3, 1::3], grid["mask0"], atol=1e-5)
    np.testing.assert_allclose(full["flow10"][1::3, 1::3], grid["flow10"], atol=1e-5)


def test_score_is_a_number_and_a_region_restricts_it(model):
    a, b = _photo(64, 64), _photo(64, 64, seed=3)
    whole = model.score(a, b)
    corner = model.score(a, b, region=(0, 0, 16, 16))
    assert np.isfinite(whole) and whole >= 0
    assert 0 <= corner <= whole + 1e-6  # one cell of the query can only add less than all of them


def test_bad_inputs_are_value_errors_naming_the_problem(model, tmp_path):
    with pytest.raises(ValueError, match="shape"):
        model.predict(np.zeros(5), np.zeros(5))
    with pytest.raises(ValueError, match="resolution"):
        model.predict(_photo(16, 16), _photo(16, 16), resolution="cells")
    with pytest.raises(ValueError, match="missing.pth"):
        segswap.load_model(tmp_path / "missing.pth")


def test_generate_then_open_shards(tmp_path):
    coco = write_coco_fixture(tmp_path / "coco", n_images=6, width=128, height=96, bad_entries=False)
    summary = segswap.generate(tmp_path / "pairs", segments="coco", images=str(coco.images_dir),
                               coco_annotations=str(coco.json_path), num_shards=2, pairs_per_shard=2, size=64,
                               min_cells=1, style="none", workers=0)
    assert summary["shards_failed"] == [] and summary["dataset_pairs"] == 4
    pairs = list(segswap.open_shards(str(tmp_path / "pairs")))
    assert len(pairs) == 4 and all(isinstance(p, segswap.Pair) for p in pairs)
    assert pairs[0].img0.shape == (64, 64, 3) and pairs[0].mask0.shape == (64, 64)
    first_shard = sorted((tmp_path / "pairs").glob("*.tar"))[:1]
    assert len(list(segswap.open_shards([str(p) for p in first_shard]))) == 2  # a list of URLs works too
    with pytest.raises(ValueError, match="size"):
        segswap.generate(tmp_path / "bad", size="big")


def test_viz_draws_a_pair(tmp_path):
    img0, img1 = np.full((40, 60, 3), 128, np.uint8), _photo(50, 50, seed=1)
    mask0 = np.zeros((40, 60), bool)
    mask0[10:30, 10:40] = True
    lines = [(0.5, 0.5, 0.25, 0.75)]
    panel = segswap.viz.ground_truth_panel(img0, img1, mask0, mask0[:, :50], lines, tile=64)
    assert panel.shape == (64, 2 * 64 + segswap.viz.GAP, 3)
    # masked pixels are tinted towards image 0's colour (green), the rest dimmed
    inside, outside = panel[20, 20].astype(int), panel[2, 2].astype(int)
    assert inside[1] > 128 > inside[0] and (outside < 128).all()
    path = segswap.viz.write_png(tmp_path / "p.png", panel)
    assert cv2.imread(path).shape == panel.shape
