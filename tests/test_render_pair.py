"""PairRenderer: format-valid pairs, exact correspondences, determinism, source choice, skips."""
import json

import cv2
import numpy as np
import pytest
from coco_fixture import write_coco_fixture

from segswap.pipeline.groundtruth import SkipPair
from segswap.pipeline.render import PairRenderer, build_renderer
from segswap.segments.coco import SegmentIndex
from segswap.shards.format import check_consistency, check_pair, decode_sample, encode_sample, sample_key

SIZE = 128
MIN_CELLS = 4  # 9 of 64 cells is a lot at 128 px; the rule itself is tested separately


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    return write_coco_fixture(tmp_path_factory.mktemp("render"), bad_entries=False, width=160, height=128)


@pytest.fixture(scope="module")
def index(fixture):
    return SegmentIndex.from_coco(fixture.json_path, fixture.images_dir)


def _renderer(index, fixture, **kw):
    opts = dict(size=SIZE, blend="none", min_cells=MIN_CELLS)
    opts.update(kw)
    return PairRenderer(index, fixture.background_files, **opts)


def _render_some(renderer, n, root=0):
    pairs, skips = [], []
    for i in range(n):
        try:
            pairs.append(renderer.render_pair(np.random.default_rng([root, i]), sample_key(root, i), seed=[root, i]))
        except SkipPair as e:
            skips.append(e.reason)
    return pairs, skips


@pytest.fixture(scope="module")
def pairs(index, fixture):
    got, _ = _render_some(_renderer(index, fixture), 16)
    assert len(got) >= 8
    return got


def test_pairs_pass_the_format_checks(pairs):
    kinds = set()
    for p in pairs:
        check_pair(p, min_cells=MIN_CELLS)
        check_consistency(p)
        kinds.add(p.meta["kind"])
        # and still after the JPEG/PNG/float16 round trip of a shard
        q = decode_sample(encode_sample(p))
        check_consistency(q)
        assert np.array_equal(q.mask0, p.mask0) and json.loads(json.dumps(q.meta)) == q.meta
    assert kinds == {"one-object", "two-object"}


def _bilinear(img, x, y):
    return cv2.remap(img.astype(np.float32), x.astype(np.float32)[:, None] - 0.5,
                     y.astype(np.float32)[:, None] - 0.5, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)[:, 0]


def test_flow_warps_image0_onto_image1(pairs):
    """Before blending and style (blend none), image 1 inside the pasted region is image 0 moved by the flow."""
    g = pairs[0].meta["flow_stride"]
    errs, shuffled = [], []
    rng = np.random.default_rng(0)
    for p in pairs:
        flow = p.flow10.astype(np.float32)
        ii, jj = np.nonzero(np.isfinite(flow[..., 0]))
        # stay a pixel away from the pasted region's rim, where bilinear sampling mixes in background
        inner = cv2.erode(p.mask1, np.ones((5, 5), np.uint8))[ii * g + g // 2, jj * g + g // 2] > 0
        ii, jj = ii[inner], jj[inner]
        cx, cy = (jj + 0.5) * g, (ii + 0.5) * g
        here = _bilinear(p.img1, cx, cy)
        there = _bilinear(p.img0, flow[ii, jj, 0] * SIZE, flow[ii, jj, 1] * SIZE)
        errs.append(np.abs(here - there).mean(1))
        perm = rng.permutation(len(ii))
        shuffled.append(np.abs(here - there[perm]).mean(1))
    err, base = np.concatenate(errs), np.concatenate(shuffled)
    assert len(err) > 100
    assert err.mean() < 2.5 and np.median(err) < 1.0, err.mean()
    assert base.mean() > 10 * err.mean()


def test_flows_are_inverse_of_each_other(pairs):
    for p in pairs:
        g = p.meta["flow_stride"]
        f01, f10 = p.flow01.astype(np.float32), p.flow10.astype(np.float32)
        ii, jj = np.nonzero(np.isfinite(f01[..., 0]))
        # go to image 1 and come back through flow10 (bilinear over the cell lattice)
        x1, y1 = f01[ii, jj, 0] * SIZE / g - 0.5, f01[ii, jj, 1] * SIZE / g - 0.5
        back = cv2.remap(np.nan_to_num(f10, nan=-10), x1[:, None], y1[:, None], cv2.INTER_LINEAR)[:, 0]
        ok = (back >= 0).all(1)
        start = np.stack([(jj + 0.5) * g / SIZE, (ii + 0.5) * g / SIZE], 1)
        dist = np.abs(back[ok] - start[ok]).max(1) * SIZE
        assert ok.mean() > 0.7 and np.median(dist) < 0.5


def test_same_seed_same_pair_whatever_came_before(index, fixture):
    a = _renderer(index, fixture, blend="multigrid")
    b = _renderer(index, fixture, blend="multigrid")
    _render_some(b, 3, root=7)  # b has other images cached and has rendered other pairs
    for i in range(3):
        try:
            pa = a.render_pair(np.random.default_rng([1, i]), sample_key(1, i))
        except SkipPair as e:
            with pytest.raises(SkipPair, match=e.reason):
                b.render_pair(np.random.default_rng([1, i]), sample_key(1, i))
            continue
        pb = b.render_pair(np.random.default_rng([1, i]), sample_key(1, i))
        for f in ("img0", "img1", "mask0", "mask1"):
            assert np.array_equal(getattr(pa, f), getattr(pb, f))
        for f in ("flow01", "flow10"):
            assert np.array_equal(getattr(pa, f), getattr(pb, f), equal_nan=True)
        assert pa.meta == pb.meta
    other = a.render_pair(np.random.default_rng([2, 0]), sample_key(2, 0))
    assert not np.array_equal(other.img1, pa.img1)


def test_provenance(pairs):
    for p in pairs:
        m = p.meta
        assert m["size"] == [SIZE, SIZE] and m["blend"]["method"] == "none" and m["style"] is None
        assert m["seed"] is not None and m["key"] == p.key
        assert m["source"]["file_name"].startswith("img_") and m["background"]["file_name"].startswith("bg_")
        assert len(m["segments"]) == (2 if m["kind"] == "two-object" else 1)
        for s in m["segments"]:
            for k in ("id", "category", "scale_x", "scale_y", "rotation_deg", "fit_ratio", "translation",
                      "dilation_px", "affine", "tps"):
                assert k in s
        if m["kind"] == "two-object":
            assert m["segments"][0]["category"] != m["segments"][1]["category"]


def test_source_category_is_absent_from_the_background(index, fixture):
    # Backgrounds from the index itself: each holds 2 or 3 of the 3 categories.
    r = PairRenderer(index, None, size=SIZE, blend="none", min_cells=MIN_CELLS, p_two_object=0.0)
    pairs, skips = _render_some(r, 24, root=3)
    assert pairs and set(skips) <= {"no_absent_category", "small_mask"}
    for p in pairs:
        bg_cats = index.categories_in_image(p.meta["background"]["id"])
        assert p.meta["segments"][0]["category"] not in bg_cats
        assert p.meta["source"]["id"] != p.meta["background"]["id"]


def test_category_free_sources_draw_from_other_images(tmp_path, fixture):
    data = json.loads(fixture.json_path.read_text())
    for a in data["annotations"]:
        a["category_id"] = 1
    data["categories"] = [{"id": 1, "name": "segment"}]
    path = tmp_path / "one_category.json"
    path.write_text(json.dumps(data))
    index = SegmentIndex.from_coco(path, fixture.images_dir)
    # Backgrounds given as plain paths are recognised as the index's images: never pasted on themselves.
    r = PairRenderer(index, [str(f) for f in fixture.image_files], size=SIZE, blend="none", min_cells=MIN_CELLS)
    assert all(b.id >= 0 for b in r.backgrounds)
    pairs, _ = _render_some(r, 12, root=4)
    assert pairs
    for p in pairs:
        assert p.meta["source"]["id"] != p.meta["background"]["id"]


def test_small_masks_and_bad_images_are_skips(tmp_path, index, fixture):
    r = _renderer(index, fixture, min_cells=60)
    _, skips = _render_some(r, 4)
    assert skips == ["small_mask"] * 4
    # A source image that turned unreadable after indexing: a counted skip naming the file.
    bad = write_coco_fixture(tmp_path / "bad", bad_entries=False, n_images=2, width=160, height=128)
    for f in bad.image_files:
        f.write_bytes(f.read_bytes()[:200])
    r = PairRenderer(SegmentIndex.from_coco(bad.json_path, bad.images_dir), bad.background_files,
                     size=SIZE, blend="none")
    with pytest.raises(SkipPair, match=r"bad_image.*img_00\d.jpg"):
        r.render_pair(np.random.default_rng(0), sample_key(0, 0))


def test_build_renderer_from_config(fixture):
    r = build_renderer({"coco_annotations": str(fixture.json_path), "images": str(fixture.images_dir),
                        "backgrounds": str(fixture.background_files[0].parent), "size": SIZE, "blend": "cv2",
                        "min_cells": MIN_CELLS, "min_area": 10})
    assert r.size == SIZE and r.blend == "cv2" and len(r.backgrounds) == len(fixture.background_files)
    pairs, _ = _render_some(r, 4)
    for p in pairs:
        check_consistency(p)
    with pytest.raises(ValueError, match="unknown renderer config key"):
        build_renderer({"coco_annotations": str(fixture.json_path), "sise": 128})
    with pytest.raises(ValueError, match="unknown blend"):
        build_renderer({"coco_annotations": str(fixture.json_path), "images": str(fixture.images_dir),
                        "blend": "magic"})
    for bad in (0, -1.0, "big", True):
        with pytest.raises(ValueError, match="max_fit_scale must be a number > 0"):
            build_renderer({"coco_annotations": str(fixture.json_path), "images": str(fixture.images_dir),
                            "max_fit_scale": bad})


def test_border_crop_pairs(index, fixture):
    # Without TPS the whole transformed context fits inside image 1, so mask0 is the full context.
    r = _renderer(index, fixture, p_border_crop=1.0, p_two_object=0.0, p_tps=0.0)
    pairs, _ = _render_some(r, 8, root=6)
    crops = [p for p in pairs if p.meta["source"]["border_crop"]]
    assert crops
    for p in crops:
        check_consistency(p)
        side = p.meta["source"]["border_crop"]["side"]
        edge = {"left": p.mask0[:, 0], "right": p.mask0[:, -1], "top": p.mask0[0], "bottom": p.mask0[-1]}[side]
        assert edge.any(), side


def test_occlusion_later_paste_wins_and_masks_stay_consistent():
    from segswap.pipeline.geometry import PasteWarp, dense_maps
    from segswap.pipeline.groundtruth import Paste, ground_truth, ownership
    from segswap.shards.format import Pair

    size, g = 96, 4
    yy, xx = np.mgrid[0:size, 0:size]
    ctx_a = (np.abs(xx - 24) < 14) & (np.abs(yy - 48) < 14)
    ctx_b = (np.abs(xx - 72) < 14) & (np.abs(yy - 48) < 14)
    # A (x 10..38) moves right by 20 px, B (x 58..86) left by 20 px: in image 1 A covers x 30..58 and
    # B x 38..66, so only A's strip x 10..18 stays visible.
    shift = lambda dx: np.array([[1, 0, dx], [0, 1, 0], [0, 0, 1.0]])  # noqa: E731
    pastes = [Paste(ctx_a, dense_maps(PasteWarp(shift(20)), size, g)),
              Paste(ctx_b, dense_maps(PasteWarp(shift(-20)), size, g))]
    owner = ownership(pastes, (size, size))
    assert (owner[48, 50] == 1) and (owner[48, 34] == 0)  # B, pasted last, covers A where both land
    mask0, mask1, f01, f10, counts = ground_truth(pastes, owner, flow_stride=g, min_cells=1)
    # A's pixels whose copy is hidden under B are not in mask0; B's all are.
    assert mask0[48, 12] > 0 and mask0[48, 20] == 0 and mask0[48, 36] == 0 and mask0[48, 60] > 0
    assert counts[0]["pixels0"] < ctx_a.sum() and counts[1]["pixels0"] == ctx_b.sum()
    pair = Pair(key="000000-000000", img0=np.zeros((size, size, 3), np.uint8), img1=np.zeros((size, size, 3), np.uint8),
                mask0=mask0, mask1=mask1, flow01=f01.astype(np.float16), flow10=f10.astype(np.float16),
                meta={"flow_stride": g})
    check_pair(pair)
    check_consistency(pair, tol=0.0)
    # the flow of a visible A cell is its shifted position
    i, j = 48 // g, 14 // g
    assert np.allclose(f01[i, j], [((j + 0.5) * g + 20) / size, (i + 0.5) * g / size], atol=1e-6)


def test_unsupervised_sources_pair_only_segments_whose_boxes_are_apart():
    """Nested unsupervised segments (same object, several boxes) are never drawn as a two-object pair."""
    from types import SimpleNamespace

    from segswap.pipeline.render import _pairs_apart

    segs = [SimpleNamespace(bbox=b) for b in ([0, 0, 50, 50], [10, 10, 20, 20], [60, 0, 30, 30], [0, 55, 40, 10])]
    assert _pairs_apart(segs) == [(0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    assert _pairs_apart(segs[:2]) == []


def _render_fields(renderer, n, root):
    out = []
    for i in range(n):
        try:
            p = renderer.render_pair(np.random.default_rng([root, i]), sample_key(root, i))
        except SkipPair as e:
            out.append(e.reason)
            continue
        out.append((p.img0, p.img1, p.mask0, p.mask1, p.flow01, p.flow10, p.meta))
    return out


# Not the multigrid blend: its hierarchy is laid on the box it is given, so on the whole image it takes
# another path to the same tolerance and may round a pixel differently; pyamg solves the same sparse
# system either way, which is what pins the box logic exactly.
@pytest.mark.parametrize("blend", ["cv2", "pyamg"])
def test_work_on_boxes_gives_the_whole_image_result(index, fixture, monkeypatch, blend):
    """Dilation, warp and blend on the region's box, the TPS only near the context, the ground
    truth's lookups only where they can matter: the same pairs as with all of it on whole images."""
    from segswap.pipeline import geometry, groundtruth, render

    kw = dict(blend=blend, p_tps=1.0)  # every paste with a TPS: the restricted evaluations are used
    fast = _render_fields(_renderer(index, fixture, **kw), 8, root=3)
    whole = lambda mask, margin: (slice(0, mask.shape[0]), slice(0, mask.shape[1]))  # noqa: E731
    monkeypatch.setattr(render, "box_around", whole)
    monkeypatch.setattr(groundtruth.Paste, "target_box", lambda self, shape: (slice(None), slice(None)))
    dense = geometry.dense_maps
    monkeypatch.setattr(render, "dense_maps", lambda *a, source_region=None, **k: dense(*a, **k))
    slow = _render_fields(_renderer(index, fixture, **kw), 8, root=3)
    assert sum(not isinstance(f, str) for f in fast) >= 4
    for a, b in zip(fast, slow):
        if isinstance(a, str) or isinstance(b, str):
            assert a == b
            continue
        for x, y in zip(a[:6], b[:6]):
            assert np.array_equal(x, y, equal_nan=True)
        assert a[6] == b[6]


def test_stage_cpu_is_recorded(index, fixture):
    from segswap.pipeline.render import RENDER_STAGES

    r = _renderer(index, fixture)
    got, _ = _render_some(r, 4)
    assert got and set(r.stage_cpu) <= set(RENDER_STAGES)
    assert {"segments", "geometry", "ground_truth", "blend"} <= set(r.stage_cpu)
    assert all(v >= 0 for v in r.stage_cpu.values())
