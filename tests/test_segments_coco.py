"""SegmentIndex on a real pycocotools-encoded fixture, including every kind of broken entry."""
import json

import numpy as np
import pytest
from coco_fixture import write_coco_fixture
from pycocotools import mask as mask_utils

from segswap.segments.coco import CocoFormatError, SegmentIndex, _rle_string_total


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    return write_coco_fixture(tmp_path_factory.mktemp("coco"))


def test_loads_good_segments_and_counts_bad_ones(fixture):
    index = SegmentIndex.from_coco(fixture.json_path, fixture.images_dir)
    assert len(index) == fixture.n_segments
    assert len(index.images) == fixture.n_images
    assert index.skipped == fixture.skipped
    assert index.categories == {1: "disc", 2: "box", 3: "triangle"}


def test_masks_match_the_annotations(fixture):
    data = json.loads(fixture.json_path.read_text())
    by_id = {a["id"]: a for a in data["annotations"]}
    index = SegmentIndex.from_coco(fixture.json_path, fixture.images_dir)
    kinds = set()
    for seg in index.segments:
        m = index.decode_mask(seg)
        im = index.images[seg.image_id]
        assert m.shape == (im.height, im.width) and m.dtype == np.uint8 and set(np.unique(m)) <= {0, 1}
        assert m.sum() == seg.area
        assert abs(m.sum() - by_id[seg.id]["area"]) <= 0.02 * seg.area + 2
        segm = by_id[seg.id]["segmentation"]
        kinds.add("polygon" if isinstance(segm, list) else type(segm["counts"]).__name__)
        ys, xs = np.nonzero(m)
        assert seg.bbox == (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
    assert kinds == {"polygon", "str", "list"}  # all three encodings exercised


def test_lookups(fixture):
    index = SegmentIndex.from_coco(fixture.json_path, fixture.images_dir)
    for iid in index.images_with_segments:
        segs = index.segments_of_image(iid)
        assert segs and all(s.image_id == iid for s in segs)
        assert index.categories_in_image(iid) == {s.category for s in segs}
    assert sum(len(index.segments_of_category(c)) for c in index.segment_categories) == len(index)


def test_filters(fixture):
    full = SegmentIndex.from_coco(fixture.json_path, fixture.images_dir)
    areas = sorted(s.area for s in full.segments)
    cut = areas[len(areas) // 2]
    big = SegmentIndex.from_coco(fixture.json_path, fixture.images_dir, min_area=cut)
    assert len(big) == sum(a >= cut for a in areas) and big.skipped["small_area"] == sum(a < cut for a in areas)
    discs = SegmentIndex.from_coco(fixture.json_path, fixture.images_dir, categories=["disc"])
    assert discs.segment_categories == [1] and discs.skipped["category_filtered"] > 0
    sides = sorted(min(s.bbox[2], s.bbox[3]) for s in full.segments)
    wide = SegmentIndex.from_coco(fixture.json_path, fixture.images_dir, min_side=sides[-1])
    assert len(wide) == sum(s >= sides[-1] for s in sides)
    with pytest.raises(ValueError, match="category 'zebra'"):
        SegmentIndex.from_coco(fixture.json_path, fixture.images_dir, categories=["zebra"])


def test_scores_and_min_score(tmp_path, fixture):
    data = json.loads(fixture.json_path.read_text())
    for k, a in enumerate(data["annotations"]):
        a["score"] = 0.1 if k % 2 else 0.9
    p = tmp_path / "scored.json"
    p.write_text(json.dumps(data))
    index = SegmentIndex.from_coco(p, fixture.images_dir, min_score=0.5)
    assert index.segments and all(s.score == 0.9 for s in index.segments)
    assert index.skipped["low_score"] > 0


def test_malformed_files_raise_naming_the_file(tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text("{not json")
    with pytest.raises(CocoFormatError, match="broken.json.*not valid JSON"):
        SegmentIndex.from_coco(bad)
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(CocoFormatError, match="broken.json.*'annotations' must be a list"):
        SegmentIndex.from_coco(bad)
    with pytest.raises(CocoFormatError, match="absent.json"):
        SegmentIndex.from_coco(tmp_path / "absent.json")


def test_rle_string_total_agrees_with_pycocotools():
    rng = np.random.default_rng(3)
    for _ in range(5):
        m = (rng.random((37, 23)) > 0.6).astype(np.uint8)
        rle = mask_utils.encode(np.asfortranarray(m))
        assert _rle_string_total(rle["counts"]) == 37 * 23
    assert _rle_string_total(b"not an rle!!") == -1


def test_embedded_backgrounds_are_written_once(tmp_path):
    from segswap.core.images import load_rgb
    from segswap.segments.embedded import TEXTURES, embedded_backgrounds

    paths = embedded_backgrounds(tmp_path)
    assert [p.stem for p in paths] == list(TEXTURES)
    stamp = [p.stat().st_mtime_ns for p in paths]
    assert embedded_backgrounds(tmp_path) == paths and [p.stat().st_mtime_ns for p in paths] == stamp
    assert all(load_rgb(p).shape[2] == 3 for p in paths)


@pytest.mark.slow
def test_embedded_corpus_has_segments(tmp_path):
    from segswap.segments.embedded import PHOTOS, embedded_coco

    index = SegmentIndex.from_coco(embedded_coco(tmp_path))
    assert len(index.images) == len(PHOTOS) and not index.skipped
    assert len(index) >= 2 * len(index.images_with_segments) and index.segment_categories == [1]
