"""Brueghel and place-recognition protocols: file formats, AP / Recall@N by hand, end-to-end on toy data."""
import json
import os

import cv2
import numpy as np
import pytest
from toy_model import ToyMatcher, toy_scene

from segswap.apps import brueghel, placerec
from segswap.apps.features_cache import FeatureCache
from segswap.apps.metrics import average_precision, precision_jaccard, recall_at_n


def _write(path, rgb):
    cv2.imwrite(str(path), np.ascontiguousarray(rgb[..., ::-1]))
    return str(path)


def test_average_precision_hand_computed():
    # relevant at ranks 1 and 3 out of 3 relevant: (1/1 + 2/3) / 3
    assert average_precision([True, False, True, False], 3) == pytest.approx((1 + 2 / 3) / 3)
    assert average_precision([False, True], 1) == pytest.approx(0.5)
    assert average_precision([True, True, False], 2) == 1.0
    with pytest.raises(ValueError):
        average_precision([True, True], 1)


def test_recall_at_n_and_spatial_nms_hand_computed():
    d = [np.array([30.0, 10.0, 50.0]), np.array([40.0, 40.0, 40.0, 40.0, 40.0, 5.0]), np.array([1.0])]
    assert recall_at_n(d, 25.0, (1, 5, 10)) == {1: pytest.approx(1 / 3), 5: pytest.approx(2 / 3), 10: 1.0}
    # places of 12 views: indices 0-11 place 0, 12-23 place 1 ...
    assert placerec.spatial_nms(np.array([13, 2, 14, 5, 30, 0]), 12).tolist() == [13, 2, 30]
    assert placerec.spatial_nms(np.array([3, 1]), 1).tolist() == [3, 1]


def test_precision_jaccard_known_masks():
    gt = np.zeros((4, 4), bool)
    gt[:2, :2] = True                      # 4 px
    pred = np.zeros((4, 4), bool)
    pred[:2, 1:3] = True                   # 4 px, overlap 2
    p, j = precision_jaccard(pred, gt)
    assert p == pytest.approx(12 / 16) and j == pytest.approx(2 / 6)
    assert precision_jaccard(np.zeros((2, 2)), np.zeros((2, 2))) == (1.0, None)


def _brueghel_fixture(tmp_path, rng):
    """6 images; images 0, 2, 4 share a detail (the query is on image 0), the others do not."""
    d = tmp_path / "Image"
    d.mkdir()
    patch = toy_scene(rng, (32, 32))
    at = [(16, 32), None, (64, 80), None, (32, 16), None]
    names = []
    for i, a in enumerate(at):
        names.append(f"painting_{i}.png")
        _write(d / names[-1], toy_scene(rng, (128, 128), patch if a else None, a))
    labels = {"7": [{"query": [names[0], [32, 16, 64, 48]],
                     "gt": [[names[2], [80, 64, 112, 96]], [names[4], [16, 32, 48, 64]]]}],
              "0001": [{"query": [names[2], [80, 64, 112, 96]],
                        "gt": [[names[0], [32, 16, 64, 48]], [names[4], [16, 32, 48, 64]]]}]}
    lp = tmp_path / "brueghelTest.json"
    lp.write_text(json.dumps(labels))
    return str(d), str(lp)


def test_brueghel_end_to_end_with_a_toy_matcher(tmp_path):
    img_dir, label_path = _brueghel_fixture(tmp_path, np.random.default_rng(0))
    labels = brueghel.load_labels(label_path)
    assert [q.category for q in labels] == ["0001", "7"]
    model = ToyMatcher()
    res = brueghel.evaluate(model, labels, img_dir, FeatureCache(model), size=128, query_box_size=32)
    assert res["map"] == pytest.approx(1.0)
    assert set(res["per_category"]) == {"0001", "7"}
    # query image never ranked; both relevant images first
    q0 = [p for p in res["per_query"] if p["category"] == "7"][0]
    assert "painting_0.png" not in q0["top10"] and set(q0["top10"][:2]) == {"painting_2.png", "painting_4.png"}
    # re-ranking only the top 2 of the cosine baseline gives the same full ranking length
    res2 = brueghel.evaluate(model, labels, img_dir, FeatureCache(model), size=128, query_box_size=32, rerank_topk=2)
    assert len(res2["per_query"][0]["top10"]) == 5


def test_brueghel_query_crop_keeps_the_box():
    img = np.zeros((300, 500, 3), np.uint8)
    crop, box = brueghel.preprocess_query(img, (400, 20, 480, 60), query_box_size=64, size=256)
    assert crop.shape == (256, 256, 3)
    x1, y1, x2, y2 = box
    assert 0 <= x1 < x2 <= 256 and 0 <= y1 < y2 <= 256
    assert max(x2 - x1, y2 - y1) == pytest.approx(64, abs=2)


@pytest.mark.parametrize("bad,msg", [
    ("[1, 2]", "category"),
    ('{"c": [{"query": ["a.png", [1, 2, 3]], "gt": [["b.png", [0, 0, 5, 5]]]}]}', "box must be"),
    ('{"c": [{"query": ["a.png", [5, 5, 1, 1]], "gt": [["b.png", [0, 0, 5, 5]]]}]}', "empty box"),
    ('{"c": [{"query": ["a.png", [0, 0, 5, 5]]}]}', "expected {'query'"),
    ("{not json", "not valid JSON"),
])
def test_brueghel_label_errors_name_the_file(tmp_path, bad, msg):
    p = tmp_path / "labels.json"
    p.write_text(bad)
    with pytest.raises(brueghel.LabelFileError, match=msg) as e:
        brueghel.load_labels(str(p))
    assert str(p) in str(e.value)


def _place_fixture(tmp_path, rng):
    root = tmp_path / "pitts"
    (root / "db").mkdir(parents=True)
    (root / "q").mkdir()
    db, utm_db = [], []
    scenes = [toy_scene(rng, (96, 64)) for _ in range(8)]
    for i, s in enumerate(scenes):
        db.append(f"db/{i:03d}.png")
        _write(root / db[-1], s)
        utm_db.append([1000.0 + 100 * i, 5000.0])
    queries = ["q/a.png", "q/b.png"]
    # query a shows place 5 (same view shifted by one cell), query b shows place 2
    _write(root / queries[0], np.roll(scenes[5], 16, axis=1))
    _write(root / queries[1], scenes[2])
    (tmp_path / "index.txt").write_text("\n".join(db) + "\n")
    (tmp_path / "query.txt").write_text("\n".join(queries) + "\n")
    np.savez(tmp_path / "gt.npz", utmQ=np.array([[1000.0 + 500 + 3, 5000.0], [1200.0, 5010.0]]),
             utmDb=np.array(utm_db), posDistThr=25)
    # NetVLAD ranked the right place 4th and 3rd; kapture lines carry the dataset-root prefix
    order = {0: [0, 1, 2, 5, 6], 1: [7, 6, 2, 3, 4]}
    lines = ["# kapture format: 1.0", "# query_image, map_image"]
    for qi, cand in order.items():
        lines += [f"{root}/{queries[qi]}, {root}/{db[j]}" for j in cand]
    (tmp_path / "NetVLAD_predictions.txt").write_text("\n".join(lines) + "\n")
    return str(root), queries, db, order


def test_place_recognition_reranking_end_to_end(tmp_path):
    root, queries, db, order = _place_fixture(tmp_path, np.random.default_rng(1))
    q = placerec.read_image_list(str(tmp_path / "query.txt"))
    d = placerec.read_image_list(str(tmp_path / "index.txt"))
    utm_q, utm_db, thr = placerec.read_ground_truth(str(tmp_path / "gt.npz"), len(q), len(d))
    assert thr == 25
    cands = placerec.read_candidates(str(tmp_path / "NetVLAD_predictions.txt"), q, d, root, topk=100)
    assert [c.tolist() for c in cands] == [order[0], order[1]]
    with open(os.path.join(root, d[6]), "wb") as f:   # a corrupt database image: ranked last, reported
        f.write(b"\x89PNG truncated")
    model = ToyMatcher()
    res = placerec.evaluate(model, q, d, root, cands, utm_q, utm_db, FeatureCache(model), dataset="pitts",
                            size=(96, 64), dist=thr)
    assert res["skipped"]["unreadable_candidates"] == [d[6]]
    assert res["recall_input"]["R@1"] == 0.0 and res["recall_input"]["R@5"] == 1.0
    assert res["recall"]["R@1"] == 1.0
    assert res["per_query"][0]["top10"][0] == "db/005.png"


def test_candidate_formats_npy_and_errors(tmp_path):
    q, d = ["q0.jpg", "q1.jpg"], [f"d{i}.jpg" for i in range(4)]
    np.save(tmp_path / "idx.npy", np.array([[3, 1, 0], [2, 2, 1]]))
    assert [c.tolist() for c in placerec.read_candidates(str(tmp_path / "idx.npy"), q, d, "", 2)] == [[3, 1], [2, 2]]
    np.save(tmp_path / "scores.npy", np.array([[0.1, 0.9, 0.5, 0.0], [1.0, 0.0, 0.2, 0.3]]))
    got = placerec.read_candidates(str(tmp_path / "scores.npy"), q, d, "", 3)
    assert [c.tolist() for c in got] == [[1, 2, 0], [0, 3, 2]]
    np.save(tmp_path / "oob.npy", np.array([[9], [0]]))
    with pytest.raises(brueghel.LabelFileError, match="out of range"):
        placerec.read_candidates(str(tmp_path / "oob.npy"), q, d, "", 2)
    (tmp_path / "p.txt").write_text("q0.jpg, d1.jpg\nq1.jpg, nope.jpg\n")
    with pytest.raises(brueghel.LabelFileError, match=r"p.txt:2: database image 'nope.jpg'"):
        placerec.read_candidates(str(tmp_path / "p.txt"), q, d, "", 2)
    np.savez(tmp_path / "gt.npz", utmQ=np.zeros((3, 2)), utmDb=np.zeros((4, 2)))
    with pytest.raises(brueghel.LabelFileError, match="utmQ has shape"):
        placerec.read_ground_truth(str(tmp_path / "gt.npz"), 2, 4)
    assert os.path.exists(tmp_path / "gt.npz")
