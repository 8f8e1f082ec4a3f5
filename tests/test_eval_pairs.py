"""segswap-eval pairs: metrics on cases with a known answer, the folder layout, bad inputs."""
import json

import cv2
import numpy as np
import pytest
import torch

from segswap.apps import eval_cli, eval_pairs
from segswap.apps.metrics import precision_jaccard
from segswap.train.checkpoint import save_checkpoint
from segswap.train.config import resolve
from segswap.train.model import build_model

SIZE = 128  # 8 x 8 grid


def _texture(rng, size=SIZE):
    """Blocky random colours: every 16-px cell looks different, so features of different cells differ."""
    small = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
    return cv2.resize(small, (size, size), interpolation=cv2.INTER_NEAREST)


def _write_pair(folder, img0, img1, mask0=None, mask1=None, h01=None, disp=None):
    folder.mkdir(parents=True)
    cv2.imwrite(str(folder / "img0.png"), img0[..., ::-1])
    cv2.imwrite(str(folder / "img1.png"), img1[..., ::-1])
    for name, m in (("mask0.png", mask0), ("mask1.png", mask1)):
        if m is not None:
            cv2.imwrite(str(folder / name), m.astype(np.uint8) * 255)
    if h01 is not None:
        np.savetxt(folder / "H01.txt", h01)
    if disp is not None:
        np.save(folder / "disp01.npy", disp)


def _checkpoint(tmp_path):
    cfg = resolve(None, {"data.shards": "x.tar", "train.out": str(tmp_path), "model.transformer.model": "tiny",
                         "data.image_size": 64})
    torch.manual_seed(0)
    path = tmp_path / "ck.pth"
    save_checkpoint(path, {"step": 0, "config": cfg, "model": build_model(cfg["model"]).state_dict()})
    return path


def test_threshold_counts_agree_with_precision_jaccard(rng):
    score = rng.random((20, 20)).astype(np.float32)
    gt = rng.random((20, 20)) > 0.6
    counts = eval_pairs.threshold_counts(score, gt)
    for k in (0, 17, 50, 100):
        t = eval_pairs.THRESHOLDS[k]
        p, j = precision_jaccard(score > t, gt)
        tp, fp, fn, tn = counts[k]
        assert (tp + tn) / gt.size == pytest.approx(p) and tp / (tp + fp + fn) == pytest.approx(j)


def test_trivial_baselines_have_their_known_scores():
    gt = eval_pairs.centre_box(SIZE) > 0
    frac = gt.mean()
    full, empty = np.ones((SIZE, SIZE)), np.zeros((SIZE, SIZE))
    m = eval_pairs.mask_metrics([full], [gt])
    assert m["P"] == pytest.approx(frac) and m["J"] == pytest.approx(frac) and m["auc"] == pytest.approx(0.5)
    m = eval_pairs.mask_metrics([empty], [gt])
    assert m["P"] == pytest.approx(1 - frac) and m["J"] == 0.0
    m = eval_pairs.mask_metrics([eval_pairs.centre_box(SIZE)], [gt])
    assert m["P"] == 1.0 and m["J"] == 1.0 and m["auc"] == 1.0
    # a soft score whose best threshold is not 0.5: the sweep finds it
    soft = np.where(gt, 0.3, 0.1)
    m = eval_pairs.mask_metrics([soft], [gt])
    assert m["J"] == 0.0 and m["J_best"] == 1.0 and 0.1 <= m["best_threshold"] < 0.3


def test_ground_truth_matches_of_homography_and_disparity_agree():
    h0, w0 = 64, 96
    shift = np.array([[1, 0, -16.0], [0, 1, 0], [0, 0, 1]])  # x1 = x0 - 16
    m_h, v_h = eval_pairs.gt_matches(("homography", shift), (h0, w0), (h0, w0), (4, 6))
    m_d, v_d = eval_pairs.gt_matches(("disparity", np.full((h0, w0), 16.0)), (h0, w0), (h0, w0), (4, 6))
    m_f, v_f = eval_pairs.gt_matches(("flow", np.dstack([np.full((h0, w0), -16.0), np.zeros((h0, w0))])),
                                     (h0, w0), (h0, w0), (4, 6))
    assert (v_h == v_d).all() and (v_h == v_f).all() and not v_h[:, 0].any() and v_h[:, 1:].all()
    np.testing.assert_allclose(m_h[v_h], m_d[v_d])
    np.testing.assert_allclose(m_h[v_h], m_f[v_f])
    np.testing.assert_allclose(m_h[0, 1], [(16 + 0.5 * 16 - 16) / w0, 8 / h0])  # one cell to the left
    bad = np.full((h0, w0), np.nan)
    assert not eval_pairs.gt_matches(("disparity", bad), (h0, w0), (h0, w0), (4, 6))[1].any()


def test_mnn_on_identical_images_with_identity_homography_is_exact(tmp_path, rng):
    img = _texture(rng)
    mask = eval_pairs.centre_box(SIZE) > 0
    _write_pair(tmp_path / "pairs" / "same", img, img, mask, mask, h01=np.eye(3))
    out = tmp_path / "res.json"
    assert eval_cli.main(["pairs", str(tmp_path / "pairs"), "--size", str(SIZE), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    mnn = res["methods"]["mnn"]
    assert mnn["geometry"]["acc@1"] == 1.0 and mnn["geometry"]["median_cells"] == 0.0
    assert mnn["geometry"]["n_cells"] == int(eval_pairs.cells_inside(mask, (8, 8)).sum())
    assert res["methods"]["identity"]["geometry"]["acc@1"] == 1.0
    full = res["methods"]["all-foreground"]["masks"]
    assert full["P"] == pytest.approx(mask.mean()) and full["n_images"] == 2
    assert res["methods"]["centre-box"]["masks"]["J"] == 1.0


def test_shifted_pair_identity_baseline_is_off_by_the_shift(tmp_path, rng):
    big = _texture(rng, SIZE + 32)
    img0, img1 = big[:SIZE, 32:32 + SIZE], big[:SIZE, :SIZE]  # img1 = img0 moved right by 32 px = 2 cells
    _write_pair(tmp_path / "pairs" / "shift", img0, img1, h01=np.array([[1, 0, 32.0], [0, 1, 0], [0, 0, 1]]))
    res = eval_pairs.evaluate(_backbone_only(), str(tmp_path / "pairs"), SIZE)
    ident = res["methods"]["identity"]["geometry"]
    assert ident["acc@1"] == 0.0 and ident["acc@2"] == 1.0
    assert ident["median_cells"] == pytest.approx(2.0) and ident["median_px"] == pytest.approx(32.0)
    assert ident["n_cells"] == 8 * 6  # the two right columns map outside image 1
    assert "masks" not in res["methods"]["mnn"]  # no GT masks: no mask metrics


def _backbone_only():
    from segswap.apps.eval_backbone import open_networks

    torch.manual_seed(0)
    return open_networks(None)


def test_checkpoint_row_and_sheet(tmp_path, rng):
    img = _texture(rng, 64)
    mask = np.zeros((64, 64), bool)
    mask[16:48, 16:48] = True
    _write_pair(tmp_path / "pairs" / "a", img, img[:, ::-1].copy(), mask, mask[:, ::-1],
                h01=np.array([[-1, 0, 63.0], [0, 1, 0], [0, 0, 1]]))
    _write_pair(tmp_path / "pairs" / "nogt", img, img)
    ck = _checkpoint(tmp_path)
    sheet, out = tmp_path / "sheet", tmp_path / "r.json"
    assert eval_cli.main(["pairs", str(tmp_path / "pairs"), "--model", str(ck), "--sheet", str(sheet),
                          "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["size"] == 64 and res["n_pairs"] == 2
    row = res["methods"]["ck.pth"]
    assert 0 <= row["masks"]["P"] <= 1 and 0 <= row["geometry"]["acc@4"] <= 1
    assert cv2.imread(str(sheet / "a.png")).shape == (3 * 64, 128, 3)     # GT, model, mnn
    assert cv2.imread(str(sheet / "nogt.png")).shape == (2 * 64, 128, 3)  # model, mnn


def test_bad_inputs_one_line_exit_2_or_named_skip(tmp_path, rng, capsys):
    assert eval_cli.main(["pairs", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert "missing" in err and len(err.splitlines()) == 1
    root = tmp_path / "pairs"
    (root / "only0").mkdir(parents=True)
    cv2.imwrite(str(root / "only0" / "img0.png"), _texture(rng, 32))
    assert eval_cli.main(["pairs", str(root), "--size", "32"]) == 2
    err = capsys.readouterr().err.strip()
    assert "only0" in err and "img1" in err and len(err.splitlines()) == 1
    img = _texture(rng, 32)
    _write_pair(root / "good", img, img)
    (root / "broken").mkdir()
    cv2.imwrite(str(root / "broken" / "img0.png"), img)
    (root / "broken" / "img1.png").write_bytes(b"not a png")
    assert eval_cli.main(["pairs", str(root), "--size", "32"]) == 0
    out = capsys.readouterr().out
    assert "skipped 2" in out and "only0" in out and "broken" in out and "img1.png" in out
    assert eval_cli.main(["pairs", str(root), "--size", "30"]) == 2
    assert "multiple of 16" in capsys.readouterr().err
