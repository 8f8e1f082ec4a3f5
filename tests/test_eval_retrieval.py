"""segswap-eval retrieval: ranking metrics on hand-made scores, the score variants, the CLI, bad inputs."""
import json

import cv2
import numpy as np
import pytest
import torch
from test_eval_pairs import _checkpoint, _texture

from segswap.apps import eval_cli, eval_retrieval


def _classes(root, rng, n_classes=3, per_class=3, size=64):
    """Each class: one texture seen with small shifts and noise; classes are unrelated textures."""
    for c in range(n_classes):
        base = _texture(rng, size + 16)
        (root / f"class{c}").mkdir(parents=True)
        for k in range(per_class):
            dx, dy = rng.integers(0, 8, 2)
            view = base[dy:dy + size, dx:dx + size].astype(int) + rng.integers(-10, 10, (size, size, 3))
            cv2.imwrite(str(root / f"class{c}" / f"v{k}.png"), np.clip(view, 0, 255).astype(np.uint8)[..., ::-1])


def test_rank_metrics_hand_computed():
    labels = ["a", "a", "b", "b"]
    s = np.array([[9, 1, 2, 0],      # query 0: b, a, b -> P@1 0, AP = 1/2
                  [3, 9, 1, 0],      # query 1: a first -> AP 1
                  [0, 0, 9, 1],      # query 2: b (score 1) above a, a -> AP 1
                  [2, 0, 1, 9]],     # query 3: a, b -> AP 1/2
                 dtype=float)
    m = eval_retrieval.rank_metrics(s, labels)
    assert m["P@1"] == pytest.approx(0.5) and m["mAP"] == pytest.approx((0.5 + 1 + 1 + 0.5) / 4)
    assert m["n_queries"] == 4 and m["hub_top1"] == 2 and m["hub_image"] == 0  # image 0 tops queries 1 and 3
    # a class of one is a distractor, not a query; chance = mean (class size - 1) / (N - 1)
    assert eval_retrieval.rank_metrics(s, ["a", "a", "b", "c"])["n_queries"] == 2
    assert eval_retrieval.chance_metrics(["a", "a", "b", "b"])["P@1"] == pytest.approx(1 / 3)


def test_ties_are_broken_at_random_not_by_position():
    labels = ["a"] * 10 + ["b"] * 10 + ["c"] * 10
    m = eval_retrieval.rank_metrics(np.zeros((30, 30)), labels)
    assert 0.1 < m["P@1"] < 0.6 and m["hub_top1"] < 10  # index order would always pick image 0 or 1


def test_normalised_scores():
    rng = np.random.default_rng(0)
    s = rng.random((5, 5)) + np.diag(np.full(5, 3.0))
    m = {"S": s, "W": np.full((5, 5), 2.0)}
    v = eval_retrieval.normalised_scores(m, rng.random((5, 5)))
    assert set(v) == set(eval_retrieval.SCORES)
    np.testing.assert_allclose(np.diag(v["eq3-norm"]), 1.0)
    np.testing.assert_allclose(v["eq3-sym"], v["eq3-sym"].T)
    np.testing.assert_allclose(v["eq3-mean"], s / 2)
    # a hub column (high score from every query) loses its lead under csls
    hub = s.copy()
    hub[:, 4] += 5
    np.testing.assert_allclose(eval_retrieval.normalised_scores({"S": hub, "W": m["W"]}, hub)["eq3-csls"][:, :4],
                               eval_retrieval.normalised_scores(m, s)["eq3-csls"][:, :4])


def test_mnn_score_is_the_pair_baseline_mask_mass(rng):
    from segswap.apps.eval_pairs import mutual_nn

    f = torch.nn.functional.normalize(torch.rand(3, 8, 4, 5), dim=1)
    s = eval_retrieval.mnn_scores(f)
    np.testing.assert_allclose(s, s.T)
    for i, j in ((0, 1), (2, 0)):
        assert s[i, j] == pytest.approx(float(mutual_nn(f[i], f[j])["mask0"].sum()), rel=1e-5)


def test_gem_of_constant_features_is_the_normalised_vector():
    f = torch.zeros(1, 4, 3, 3)
    f[0, 1] = 0.6
    f[0, 2] = 0.8
    np.testing.assert_allclose(eval_retrieval.gem(f)[0].numpy(), [0, 0.6, 0.8, 0], atol=1e-5)


def test_retrieval_without_checkpoint_finds_the_classes(tmp_path, rng):
    _classes(tmp_path / "db", rng)
    out = tmp_path / "r.json"
    torch.manual_seed(0)
    assert eval_cli.main(["retrieval", str(tmp_path / "db"), "--size", "64", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res["methods"]) == {"gem", "raw32", "mnn"} and res["n_images"] == 9
    assert res["methods"]["raw32"]["P@1"] == 1.0  # near-copies: the pixels alone find them


def test_retrieval_with_checkpoint_lists_every_score(tmp_path, rng, capsys):
    _classes(tmp_path / "db", rng, n_classes=2, per_class=2)
    out = tmp_path / "r.json"
    assert eval_cli.main(["retrieval", str(tmp_path / "db"), "--model", str(_checkpoint(tmp_path)),
                          "--score", "eq3", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(eval_retrieval.SCORES) <= set(res["methods"]) and res["score"] == "eq3"
    assert 0 <= res["calibration"]["M1_same_class"] <= 1
    assert "* eq3 " in capsys.readouterr().out


def test_bad_inputs(tmp_path, rng, capsys):
    assert eval_cli.main(["retrieval", str(tmp_path / "none")]) == 2
    assert "none: not a directory" in capsys.readouterr().err
    _classes(tmp_path / "one", rng, n_classes=1)
    assert eval_cli.main(["retrieval", str(tmp_path / "one"), "--size", "32"]) == 2
    assert "two class folders" in capsys.readouterr().err
    _classes(tmp_path / "db", rng, n_classes=2, per_class=2, size=32)
    (tmp_path / "db" / "class0" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    assert eval_cli.main(["retrieval", str(tmp_path / "db"), "--size", "32"]) == 0
    out = capsys.readouterr().out
    assert "skipped 1" in out and "broken.jpg" in out
