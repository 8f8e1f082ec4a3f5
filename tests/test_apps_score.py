"""Eq. 3 (retrieval score) against hand-computed toy predictions, and the feature cache."""
import numpy as np
import pytest
import torch
from toy_model import ToyMatcher, toy_scene

from segswap.apps.features_cache import FeatureCache
from segswap.apps.pairs import score_query
from segswap.apps.score import cell_index, refine_query_mask, retrieval_scores


def _flow_to(cells_xy, w, h):
    """Flow [1, 1, n, 2] pointing each query cell at the centre of the given target (col, row)."""
    return torch.tensor([[[[(c + 0.5) / w, (r + 0.5) / h] for c, r in cells_xy]]], dtype=torch.float32)


def test_cell_index_centres_edges_and_clamping():
    pts = torch.tensor([[0.125, 0.125], [0.875, 0.625], [0.5, 0.5], [-0.3, 1.7], [0.9999, 0.0]])
    assert cell_index(pts, 4, 4).tolist() == [0, 2 * 4 + 3, 2 * 4 + 2, 3 * 4 + 0, 3]


def test_retrieval_score_hand_computed():
    # Query grid 1x2 (cells q0=[1,0], q1=[0,1]); targets are 1x2 grids.
    qf = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])                      # [C=2, 1, 2]
    t = torch.tensor([[[1.0, 0.6]], [[0.0, 0.8]]])                       # t0=[1,0], t1=[0.6,0.8]
    tneg = torch.tensor([[[-1.0, 0.6]], [[0.0, 0.8]]])                   # t0=[-1,0]
    feats = torch.stack([t, t, t, tneg])
    mask0 = torch.tensor([[[0.5, 1.0]]]).expand(4, 1, 2)
    mask1 = torch.tensor([[[0.8, 0.4]]]).expand(4, 1, 2)
    flow = torch.cat([_flow_to([(0, 0), (0, 0)], 2, 1),   # both query cells -> target cell 0
                      _flow_to([(1, 0), (1, 0)], 2, 1),   # both -> target cell 1
                      _flow_to([(0, 0), (1, 0)], 2, 1),   # q0 -> t0, q1 -> t1
                      _flow_to([(0, 0), (1, 0)], 2, 1)])  # same, but cos(q0, t0) = -1
    pred = {"mask0": mask0, "mask1": mask1, "flow01": flow}
    s = retrieval_scores(qf, torch.ones(1, 2), feats, pred)
    # 1: cell0 0.5*0.8*1 = 0.4, cell1 1*0.8*0 = 0 -> same target cell, max = 0.4
    # 2: 0.5*0.4*0.6 = 0.12 and 1*0.4*0.8 = 0.32 on one target cell -> 0.32
    # 3: 0.4 + 0.32 = 0.72;  4: negative similarity floored at 0 -> 0 + 0.32
    assert s.tolist() == pytest.approx([0.4, 0.32, 0.72, 0.32], abs=1e-6)
    # The query mask multiplies the weights; cells outside it count for nothing.
    s2 = retrieval_scores(qf, torch.tensor([[0.5, 0.0]]), feats, pred)
    assert s2.tolist() == pytest.approx([0.2, 0.06, 0.2, 0.0], abs=1e-6)


def test_refine_query_mask_hand_computed():
    # Self pair with identity flows: refined = (box*m0) * (box*m0) * m1 ; with a swap flow it mixes cells.
    box = torch.tensor([[1.0, 1.0, 0.0]])
    m0 = torch.tensor([[[0.5, 0.8, 0.9]]])
    m1 = torch.tensor([[[0.6, 1.0, 0.7]]])
    ident = _flow_to([(0, 0), (1, 0), (2, 0)], 3, 1)
    r = refine_query_mask(box, {"mask0": m0, "mask1": m1, "flow01": ident, "flow10": ident})
    assert r[0].tolist() == pytest.approx([0.5 * 0.5 * 0.6, 0.8 * 0.8 * 1.0, 0.0])
    swap = _flow_to([(1, 0), (0, 0), (2, 0)], 3, 1)  # cells 0 and 1 exchanged both ways
    r = refine_query_mask(box, {"mask0": m0, "mask1": m1, "flow01": swap, "flow10": swap})
    # a = [0.5, 0.8, 0]; there[j] = a[swap(j)] * m1[j] = [0.8*0.6, 0.5*1.0, 0]; back[i] = there[swap(i)]
    assert r[0].tolist() == pytest.approx([0.5 * 0.5, 0.8 * 0.48, 0.0])


def test_score_ranks_the_image_with_the_repeated_detail_first():
    rng = np.random.default_rng(0)
    patch = toy_scene(rng, (48, 48))
    imgs = [toy_scene(rng, (128, 128), patch, (16, 32)), toy_scene(rng, (128, 128)),
            toy_scene(rng, (128, 128), patch, (64, 64)), toy_scene(rng, (128, 128))]
    model = ToyMatcher()
    feats = FeatureCache(model).compute(imgs)
    box = torch.zeros(8, 8)
    box[1:4, 2:5] = 1
    scores, refined = score_query(model, feats[0], box, feats[1:], batch_size=2)
    assert int(torch.argmax(scores)) == 1
    assert scores[1] > 8 * scores[[0, 2]].max()
    assert refined[box == 0].abs().max() == 0


def test_feature_cache_computes_each_image_once_and_reuses_disk(tmp_path):
    import cv2

    rng = np.random.default_rng(1)
    paths = []
    for i in range(3):
        p = str(tmp_path / f"im{i}.png")
        cv2.imwrite(p, toy_scene(rng, (64, 48)))
        paths.append(p)
    model = ToyMatcher()
    cache = FeatureCache(model, cache_dir=str(tmp_path / "cache"), batch_size=2, max_items=2)
    a = cache.get_many(paths, (64, 48))
    b = cache.get_many(paths[::-1], (64, 48))
    assert a.shape == (3, 48, 3, 4)
    assert model.calls["features"] == 3                       # second call: memory or disk, never the model
    assert torch.allclose(a, b.flip(0), atol=2e-3)            # float16 storage
    fresh = FeatureCache(ToyMatcher(), cache_dir=str(tmp_path / "cache"))
    fresh.get_many(paths, (64, 48))
    assert fresh.stats["disk_hits"] == 3 and fresh.model.calls["features"] == 0
    other_tag = FeatureCache(ToyMatcher(), cache_dir=str(tmp_path / "cache"), tag="another checkpoint")
    other_tag.get_many(paths[:1], (64, 48))
    assert other_tag.stats["computed"] == 1
