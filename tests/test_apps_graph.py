"""Eq. 4 graph against hand-computed weights (all four cases) and a brute-force loop; planted clusters."""
import itertools
import math

import numpy as np
import pytest
from synthetic_graph import make_planted, vertex_truth

from segswap.apps.collection import closing_pairs, top_pairs
from segswap.apps.graph import PairPredictions, build_graph, extract_vertices
from segswap.apps.spectral import first_eigenvector, kmeans, leading_eigenvectors, spectral_embedding

G = 4  # grid side of the hand-computed cases


def _empty(p):
    rng = np.random.default_rng(5)
    return (np.full((p, G, G), 0.1, np.float32), np.full((p, G, G), 0.1, np.float32),
            rng.random((p, G, G, 2)).astype(np.float32), rng.random((p, G, G, 2)).astype(np.float32))


def _three_image_case(flip01: bool, flip02: bool, flip12: bool) -> PairPredictions:
    """Vertex i: pair {0,1}, cell (row 0, col 0) of image 0 -> (1.5, 0.5) in image 1, mask 0.9.
    Vertex j: pair {0,2}, cell (row 0, col 1) of image 0 -> (2.5, 2.5) in image 2, mask 0.8.
    Third pair {1,2}: flow 1->2 at cell (0, 1) is (2.5, 2.5) (exact), flow 2->1 at cell (2, 2) is (1.5, 1.5)
    (one cell off). ``flip*`` stores a pair as (b, a) instead of (a, b), which turns the shared image from
    a source into a target: the four combinations of flip01/flip02 are Eq. 4's four cases."""
    m0, m1, f01, f10 = _empty(3)
    pairs = []

    def put(k, a, b, flip, cell_a, target_b, mask):
        # the vertex goes from image a, cell cell_a=(row, col), to target_b=(x, y) cell units in image b
        if flip:
            pairs.append((b, a))
            m1[k][cell_a] = mask
            f10[k][cell_a] = np.array(target_b) / G
        else:
            pairs.append((a, b))
            m0[k][cell_a] = mask
            f01[k][cell_a] = np.array(target_b) / G

    put(0, 0, 1, flip01, (0, 0), (1.5, 0.5), 0.9)
    put(1, 0, 2, flip02, (0, 1), (2.5, 2.5), 0.8)
    # third pair: no confident cells, only flows
    if flip12:
        pairs.append((2, 1))
        f10[2][0, 1] = np.array([2.5, 2.5]) / G    # from image 1 (its b) to image 2
        f01[2][2, 2] = np.array([1.5, 1.5]) / G    # from image 2 (its a) to image 1
    else:
        pairs.append((1, 2))
        f01[2][0, 1] = np.array([2.5, 2.5]) / G
        f10[2][2, 2] = np.array([1.5, 1.5]) / G
    return PairPredictions(np.array(pairs), m0, m1, f01, f10)


@pytest.mark.parametrize("flip01,flip02,flip12", list(itertools.product([False, True], repeat=3)))
def test_eq4_hand_computed_in_all_four_cases(flip01, flip02, flip12):
    preds = _three_image_case(flip01, flip02, flip12)
    verts = extract_vertices(preds, [0, 1, 2], threshold=0.5)
    assert len(verts) == 2
    sigma = 2.0
    adj, stats = build_graph(verts, preds, sigma=sigma, min_weight=0.0)
    # |x_i^0 - x_j^0| = 1 cell; cycle through image 2 -> 1: |(1.5,0.5) - (1.5,1.5)| = 1; 1 -> 2: exact (0)
    expected = 0.5 * 0.9 * 0.8 * math.exp(-1 / sigma) * (math.exp(-1 / sigma) + math.exp(0))
    assert adj.shape == (2, 2) and adj.nnz == 2
    assert adj[0, 1] == pytest.approx(expected, rel=1e-5) and adj[1, 0] == pytest.approx(expected, rel=1e-5)
    assert stats["blocks_without_third_pair"] == 0


def test_no_edge_without_the_third_pair_and_none_within_a_pair():
    preds = _three_image_case(False, False, False)
    two = PairPredictions(preds.pairs[:2], preds.mask0[:2], preds.mask1[:2], preds.flow01[:2], preds.flow10[:2])
    verts = extract_vertices(two, [0, 1], threshold=0.5)
    adj, stats = build_graph(verts, two, sigma=2.0, min_weight=0.0)
    assert adj.nnz == 0 and stats["blocks_without_third_pair"] == 1
    # two vertices of the same pair share two images: never connected
    m0, m1, f01, f10 = _empty(1)
    m0[0][0, 0] = m0[0][1, 1] = 0.9
    one = PairPredictions(np.array([[0, 1]]), m0, m1, f01, f10)
    assert build_graph(extract_vertices(one, [0], 0.5), one, sigma=1.0, min_weight=0.0)[0].nnz == 0


def _brute_force(verts, preds, sigma, min_weight):
    h, w = preds.grid
    n = len(verts)
    out = np.zeros((n, n))

    def flow(src, dst, pt):
        p = int(preds.lookup([src], [dst])[0])
        if p < 0:
            return None
        col, row = min(max(int(math.floor(pt[0])), 0), w - 1), min(max(int(math.floor(pt[1])), 0), h - 1)
        f = preds.flow01 if preds.pairs[p, 0] == src else preds.flow10
        return np.asarray(f[p, row, col], np.float64) * [w, h]

    for u in range(n):
        for v in range(u + 1, n):
            iu, iv = list(verts.img[u]), list(verts.img[v])
            shared = set(iu) & set(iv)
            if len(shared) != 1:
                continue
            c = shared.pop()
            xu = verts.pos[u, :2] if iu[0] == c else verts.pos[u, 2:]
            xv = verts.pos[v, :2] if iv[0] == c else verts.pos[v, 2:]
            ou, ov = (iu[1] if iu[0] == c else iu[0]), (iv[1] if iv[0] == c else iv[0])
            yu = verts.pos[u, 2:] if iu[0] == c else verts.pos[u, :2]
            yv = verts.pos[v, 2:] if iv[0] == c else verts.pos[v, :2]
            back_u, back_v = flow(ov, ou, yv), flow(ou, ov, yu)
            if back_u is None:
                continue
            wgt = 0.5 * verts.mask[u] * verts.mask[v] * math.exp(-np.linalg.norm(xu - xv) / sigma) * (
                math.exp(-np.linalg.norm(yu - back_u) / sigma) + math.exp(-np.linalg.norm(yv - back_v) / sigma))
            if wgt > min_weight:
                out[u, v] = out[v, u] = wgt
    return out


def test_vectorised_graph_matches_brute_force_and_chunking_changes_nothing():
    preds, _, _ = make_planted(3, 4, grid=(6, 6), pattern=2, noise_cells=2, cross_pairs=4, flow_noise=0.4, seed=3)
    # drop one pair so some blocks miss their third pair
    keep = np.arange(1, len(preds.pairs))
    preds = PairPredictions(preds.pairs[keep], preds.mask0[keep], preds.mask1[keep], preds.flow01[keep],
                            preds.flow10[keep])
    verts = extract_vertices(preds, np.arange(len(preds.pairs)), 0.5)
    adj, stats = build_graph(verts, preds, sigma=1.5, min_weight=0.01)
    ref = _brute_force(verts, preds, 1.5, 0.01)
    assert stats["blocks_without_third_pair"] > 0 and adj.nnz > 50
    np.testing.assert_allclose(adj.toarray(), ref, rtol=1e-4, atol=1e-6)
    small, _ = build_graph(verts, preds, sigma=1.5, min_weight=0.01, chunk_entries=7)
    np.testing.assert_allclose(small.toarray(), adj.toarray(), rtol=1e-6)


def test_discovery_recovers_planted_clusters():
    from sklearn.metrics import adjusted_rand_score

    preds, group, offset = make_planted(12, 5, grid=(12, 12), pattern=3, noise_cells=2, cross_pairs=40, seed=1)
    verts = extract_vertices(preds, np.arange(len(preds.pairs)), 0.5)
    adj, _ = build_graph(verts, preds, sigma=1.0)
    truth = vertex_truth(verts, group, offset, 3)
    labels = kmeans(spectral_embedding(adj, 12), 12, seed=0)
    planted = truth >= 0
    assert planted.sum() > 0.7 * len(verts)
    assert adjusted_rand_score(truth[planted], labels[planted]) > 0.95


@pytest.mark.parametrize("dense_max", [1500, 20])  # 20: every component takes the ARPACK path
def test_eigen_solvers_agree_and_first_eigenvector_is_positive(monkeypatch, dense_max):
    from segswap.apps import spectral

    monkeypatch.setattr(spectral, "DENSE_MAX", dense_max)
    monkeypatch.setattr(spectral, "LARGE_PROBE", 1)
    preds, _, _ = make_planted(6, 5, grid=(10, 10), pattern=3, noise_cells=0, seed=2)
    verts = extract_vertices(preds, np.arange(len(preds.pairs)), 0.5)
    adj, _ = build_graph(verts, preds, sigma=1.0)
    for k in (3, 6, 8):
        va, ua = leading_eigenvectors(adj, k, method="eigsh", tol=1e-10)
        vb, ub = leading_eigenvectors(adj, k, method="components")
        np.testing.assert_allclose(va, vb, atol=1e-8)
        # eigenvectors: same subspace (projection of one basis on the other is the identity)
        np.testing.assert_allclose(ua @ (ua.T @ ub), ub, atol=1e-6)
    # the components solver is exact: A u = lambda u
    from segswap.apps.spectral import operator
    np.testing.assert_allclose(operator(adj) @ ub, ub * vb, atol=1e-8)
    v = first_eigenvector(adj)
    assert v.sum() > 0 and (v > -1e-6).mean() > 0.99


def test_top_and_closing_pairs():
    s = np.array([[np.nan, 3, 1, 2], [3, np.nan, 0, 5], [1, 0, np.nan, 4], [2, 5, 4, np.nan]], float)
    tp = top_pairs(s, 1)
    assert tp.tolist() == [[0, 1], [1, 3], [2, 3]]
    assert closing_pairs(tp).tolist() == [[0, 3], [1, 2]]
