"""Co-segmentation (potentials, GrabCut, Internet layout) and the segswap-discover / segswap-eval CLIs
end to end with the toy matcher (the model loader is replaced; it is tested by the trainer's tests)."""
import json
import os

import cv2
import numpy as np
import pytest
from toy_model import ToyMatcher, toy_scene

from segswap.apps import cli_common
from segswap.apps.coseg import foreground_potentials, grabcut_mask
from segswap.apps.features_cache import FeatureCache
from segswap.apps.graph import Vertices


def _write(path, rgb):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    cv2.imwrite(str(path), np.ascontiguousarray(rgb[..., ::-1]))


def test_foreground_potentials_sum_both_ends():
    v = Vertices(img=np.array([[0, 1], [0, 2], [1, 2]]),
                 pos=np.array([[0.5, 0.5, 1.5, 1.5], [0.7, 0.2, 1.1, 0.1], [1.5, 1.9, 0.5, 0.5]], np.float32),
                 mask=np.ones(3, np.float32), pair=np.arange(3))
    pot = foreground_potentials(v, np.array([1.0, 2.0, -5.0]), 3, (2, 2))
    assert pot[0].tolist() == [[3.0, 0.0], [0.0, 0.0]]   # both vertices' source ends in cell (0, 0)
    assert pot[1].tolist() == [[0.0, 0.0], [0.0, 0.0]]   # 1 - 5 in cell (1, 1), clipped at 0
    assert pot[2].tolist() == [[0.0, 2.0], [0.0, 0.0]]   # -5 in cell (0, 0) clipped; 2 in cell (0, 1)


def test_grabcut_from_a_coarse_potential_finds_the_object():
    img = np.full((96, 96, 3), (40, 120, 40), np.uint8)
    img += np.random.default_rng(0).integers(0, 20, img.shape, dtype=np.uint8)
    img[24:72, 30:66] = (220, 60, 60)
    gt = np.zeros((96, 96), bool)
    gt[24:72, 30:66] = True
    pot = np.zeros((6, 6))
    pot[2:4, 2:4] = 1.0          # the centre of the object only
    pot[1, 2] = 0.3
    mask = grabcut_mask(img, pot)
    iou = (mask & gt).sum() / (mask | gt).sum()
    assert iou > 0.9
    assert not grabcut_mask(img, np.zeros((6, 6))).any()


def _toy_load(model):
    def load(args):
        return model, FeatureCache(model, batch_size=args.batch_size, cache_dir=args.feature_cache, tag="toy")
    return load


def _collection(folder, rng, n_with=4, n_without=2, size=128, masks=True):
    patch = toy_scene(rng, (48, 32))
    spots = [(16, 16), (64, 48), (32, 80), (80, 16), (48, 64)]
    for i in range(n_with + n_without):
        a = spots[i % len(spots)] if i < n_with else None
        _write(os.path.join(folder, f"im{i}.jpg" if not masks else f"im{i}.png"),
               toy_scene(rng, (size, size), patch if a else None, a))
        if masks:
            m = np.zeros((size, size, 3), np.uint8)
            if a:
                m[a[0]:a[0] + 32, a[1]:a[1] + 48] = 255
            _write(os.path.join(folder, "GroundTruth", f"im{i}.png"), m)


def test_discover_cli_finds_the_repeated_detail_and_resumes(tmp_path, monkeypatch):
    from segswap.apps import discover

    _collection(str(tmp_path / "imgs"), np.random.default_rng(3), masks=False)
    (tmp_path / "imgs" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    model = ToyMatcher()
    monkeypatch.setattr(cli_common, "load", _toy_load(model))
    out = tmp_path / "out"
    argv = [str(tmp_path / "imgs"), "--ckpt", "unused", "--out", str(out), "--size", "128", "--top-k", "3",
            "--n-eig", "4", "--clusters", "3", "--sheets", "2"]
    assert discover.main(argv) == 0
    res = json.loads((out / "clusters.json").read_text())
    assert len(res["skipped_images"]) == 1 and "broken.jpg" in res["skipped_images"][0]
    top = res["clusters"][0]
    assert {r["image"] for r in top["regions"]} == {f"im{i}.jpg" for i in range(4)}
    for r in top["regions"]:                    # boxes in original pixels, around the pasted detail
        x1, y1, x2, y2 = r["box"]
        assert x2 - x1 <= 64 and y2 - y1 <= 48
    assert (out / top["sheet"]).exists() and cv2.imread(str(out / top["sheet"])) is not None
    assert res["stats"]["blocks_without_third_pair"] == 0
    calls = dict(model.calls)
    assert discover.main(argv) == 0                          # resumed: nothing recomputed
    assert model.calls == calls
    assert json.loads((out / "clusters.json").read_text())["clusters"] == res["clusters"]


def test_eval_internet_reports_p_and_j_per_class(tmp_path, monkeypatch):
    from segswap.apps import eval_cli

    rng = np.random.default_rng(4)
    _collection(str(tmp_path / "Internet" / "Airplane100"), rng, n_with=4, n_without=0)
    _collection(str(tmp_path / "Internet" / "Car100"), rng, n_with=4, n_without=0)
    os.remove(tmp_path / "Internet" / "Car100" / "GroundTruth" / "im3.png")     # counted, not fatal
    monkeypatch.setattr(eval_cli, "load", _toy_load(ToyMatcher()))
    out = tmp_path / "internet.json"
    assert eval_cli.main(["internet", str(tmp_path / "Internet"), "--ckpt", "unused", "--out", str(out),
                          "--size", "128", "--top-k", "3", "--threshold", "0.5"]) == 0
    res = json.loads(out.read_text())
    assert set(res["per_class"]) == {"Airplane100", "Car100"}
    assert res["per_class"]["Car100"]["skipped"]["no_mask"] == 1
    assert res["per_class"]["Car100"]["n_scored"] == 3
    for v in res["per_class"].values():
        assert v["P"] > 0.9 and v["J"] > 0.6


def test_eval_brueghel_cli_writes_json_and_table(tmp_path, monkeypatch, capsys):
    from segswap.apps import eval_cli

    rng = np.random.default_rng(5)
    patch = toy_scene(rng, (32, 32))
    names = []
    for i, a in enumerate([(16, 16), (48, 64), None]):
        names.append(f"p{i}.png")
        _write(str(tmp_path / "img" / names[-1]), toy_scene(rng, (128, 128), patch if a else None, a))
    (tmp_path / "l.json").write_text(json.dumps({"3": [{"query": ["p0.png", [16, 16, 48, 48]],
                                                        "gt": [["p1.png", [64, 48, 96, 80]]]}]}))
    monkeypatch.setattr(eval_cli, "load", _toy_load(ToyMatcher()))
    out = tmp_path / "r.json"
    eval_cli.main(["brueghel", "--labels", str(tmp_path / "l.json"), "--images", str(tmp_path / "img"),
                   "--ckpt", "x", "--out", str(out), "--size", "128", "--query-box-size", "32"])
    assert json.loads(out.read_text())["map"] == pytest.approx(1.0)
    text = capsys.readouterr().out
    assert "AP SegSwap" in text and "mean" in text


def test_candidate_prefilter_scores_fewer_pairs_and_finds_the_same_neighbours(tmp_path):
    from segswap.apps.collection import Collection

    folder = str(tmp_path / "imgs")
    _collection(folder, np.random.default_rng(6), n_with=3, n_without=3, masks=False)
    paths = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".jpg"))
    model = ToyMatcher()
    full = Collection(model, paths, (128, 128), str(tmp_path / "w1"), FeatureCache(model)).neighbour_pairs(1)
    heads = model.calls["head"]
    pre = Collection(model, paths, (128, 128), str(tmp_path / "w2"), FeatureCache(model)).neighbour_pairs(1, 2)
    assert model.calls["head"] - heads < heads
    with_detail = {tuple(p) for p in full.tolist() if max(p) < 3}
    assert with_detail and with_detail <= {tuple(p) for p in pre.tolist()}
    with pytest.raises(ValueError, match="another image list"):
        Collection(model, paths[:3], (128, 128), str(tmp_path / "w1"), FeatureCache(model))
