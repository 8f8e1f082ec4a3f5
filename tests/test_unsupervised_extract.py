"""Unsupervised extraction: planted objects are found, the COCO file round-trips, bad inputs are
skipped and counted, the chunked job resumes, and Ray gives the same file as in-process."""
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from unsupervised_scenes import planted_scene

import segswap.segments.extract as extract_mod
import segswap.segments.unsupervised as unsup
from segswap.nets.dense_features import build_feature_extractor
from segswap.segments.extract import extract_image
from segswap.segments.params import ExtractionParams
from segswap.segments.unsupervised import run_extraction


def _iou(a, b):
    return (a & b).sum() / max((a | b).sum(), 1)


def _write(path: Path, rgb: np.ndarray) -> Path:
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return path


@pytest.mark.parametrize("seed", [0, 3])
def test_planted_object_is_the_top_segment(seed):
    image, mask = planted_scene(seed)
    result = extract_image(image, build_feature_extractor("default"), ExtractionParams(), rng_seed=seed)
    assert result.segments, result.rejected
    masks = [mask_utils.decode(s["segmentation"]).astype(bool) for s in result.segments]
    assert max(_iou(m, mask) for m in masks) > 0.8
    assert _iou(masks[0], mask) > 0.8  # ranked first: the planted object has the most salient mass
    for seg, m in zip(result.segments, masks):
        assert seg["area"] == m.sum() and 0.0 <= seg["score"] <= 1.0
        x, y, w, h = seg["bbox"]
        rows, cols = np.nonzero(m)
        assert (x, y, x + w - 1, y + h - 1) == (cols.min(), rows.min(), cols.max(), rows.max())


def test_masks_come_back_at_the_original_resolution():
    image, mask = planted_scene(1, height=150, width=200)
    params = ExtractionParams(work_side=128)  # work on a smaller copy, return full-size masks
    result = extract_image(image, build_feature_extractor("default"), params, rng_seed=1)
    assert result.segments
    masks = [mask_utils.decode(s["segmentation"]).astype(bool) for s in result.segments]
    assert all(m.shape == (150, 200) for m in masks)
    assert max(_iou(m, mask) for m in masks) > 0.7


@pytest.fixture
def image_folder(tmp_path):
    """Two scenes, one noise image (no segment), and one file for every kind of bad input."""
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    scenes = {}
    for seed, name in ((0, "a.png"), (3, "sub/b.jpg")):
        image, mask = planted_scene(seed)
        _write(folder / name, image)
        scenes[name] = mask
    rng = np.random.default_rng(0)
    _write(folder / "noise.png", np.clip(128 + rng.normal(0, 20, (120, 160, 3)), 0, 255).astype(np.uint8))
    _write(folder / "tiny.png", planted_scene(1)[0][:40, :40])
    _write(folder / "blank.png", np.full((100, 120, 3), 255, np.uint8))
    _write(folder / "red.png", np.tile(np.uint8([200, 10, 10]), (90, 100, 1)))
    _write(folder / "huge.png", planted_scene(2, height=200, width=200)[0])  # over max_pixels below
    (folder / "notes.txt").write_text("not a picture")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    (folder / ".hidden.png").write_bytes(b"ignored: hidden files are not listed")
    return folder, scenes


# 160x120 scenes pass, the 200x200 one is "huge"; fewer GrabCut runs keep the job tests quick.
OPTS = dict(max_pixels=30_000, max_boxes=4, ss_mode="single")


def test_folder_to_coco_round_trip_and_bad_inputs(image_folder, tmp_path):
    folder, scenes = image_folder
    out = run_extraction(folder, tmp_path / "segments.json", chunk_size=3, seed=5, **OPTS)
    coco = json.loads(out.read_text())
    prov = coco["info"]["provenance"]
    counters = prov["counters"]
    assert counters["skipped_by_reason"] == {"blank": 2, "corrupt": 1, "huge": 1, "not_image": 1, "tiny": 1}
    assert counters["images_total"] == 9 and counters["images_ok"] == 3
    assert {s["file_name"] for s in prov["skipped"]} == {"tiny.png", "blank.png", "red.png", "huge.png",
                                                        "notes.txt", "broken.jpg"}
    assert all("png" in s["reason"] or "image" in s["reason"] or "px" in s["reason"] for s in prov["skipped"])
    assert prov["without_segments"] == ["noise.png"]  # reported, and still an image (usable background)
    assert prov["features"] == build_feature_extractor("default").spec and prov["params"]["box_quantile"] == ExtractionParams().box_quantile
    assert not (tmp_path / "segments.json.parts").exists()

    api = COCO(str(out))  # pycocotools reads it as an ordinary instances file
    assert api.loadCats(api.getCatIds()) == [{"id": 1, "name": "segment", "supercategory": "segment"}]
    files = {img["file_name"]: img for img in api.dataset["images"]}
    assert set(files) == {"a.png", "sub/b.jpg", "noise.png"}
    for name, gt in scenes.items():
        anns = api.loadAnns(api.getAnnIds(imgIds=files[name]["id"]))
        masks = [api.annToMask(a).astype(bool) for a in anns]
        assert max(_iou(m, gt) for m in masks) > 0.8
        for a, m in zip(anns, masks):
            assert a["area"] == m.sum() and a["category_id"] == 1 and a["iscrowd"] == 0
            np.testing.assert_allclose(mask_utils.toBbox(a["segmentation"]), a["bbox"])

    from segswap.segments.coco import SegmentIndex

    index = SegmentIndex.from_coco(out, folder)  # the renderer's reader takes the file as it is
    assert len(index.segments) == len(coco["annotations"]) and not index.skipped


def _annotations(path):
    coco = json.loads(Path(path).read_text())
    return coco["images"], coco["annotations"]


def test_interrupted_job_resumes_and_matches_an_uninterrupted_run(image_folder, tmp_path, monkeypatch):
    folder, _ = image_folder
    files = sorted(p for p in folder.rglob("*.png") if p.name in ("a.png", "noise.png")) + [folder / "sub/b.jpg"]
    reference = run_extraction(files, tmp_path / "ref.json", chunk_size=1, images_dir=folder, **OPTS)

    calls = []
    real = unsup._extract_chunk_to_file

    def crash_after_two(part_path, *args):
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated crash")
        calls.append(part_path)
        return real(part_path, *args)

    monkeypatch.setattr(unsup, "_extract_chunk_to_file", crash_after_two)
    out = tmp_path / "resumed.json"
    with pytest.raises(KeyboardInterrupt):
        run_extraction(files, out, chunk_size=1, images_dir=folder, **OPTS)
    assert not out.exists() and len(list((tmp_path / "resumed.json.parts").glob("part-*.json"))) == 2

    calls.clear()
    monkeypatch.setattr(unsup, "_extract_chunk_to_file", lambda p, *a: calls.append(p) or real(p, *a))
    run_extraction(files, out, chunk_size=1, images_dir=folder, **OPTS)
    assert [Path(p).name for p in calls] == ["part-000002.json"]  # only the unfinished chunk ran
    assert _annotations(out) == _annotations(reference)

    calls.clear()
    run_extraction(files, out, chunk_size=1, images_dir=folder, **OPTS)  # complete: nothing to do
    assert calls == []
    run_extraction(files, out, chunk_size=1, images_dir=folder, box_quantile=0.5, **OPTS)  # new settings: rerun
    assert len(calls) == 3


def test_chunking_does_not_change_results(image_folder, tmp_path):
    folder, _ = image_folder
    one = run_extraction(folder, tmp_path / "one.json", chunk_size=1, **OPTS)
    many = run_extraction(folder, tmp_path / "many.json", chunk_size=4, **OPTS)
    assert _annotations(one) == _annotations(many)


def test_ray_job_matches_in_process(image_folder, tmp_path, ray_local):
    folder, _ = image_folder
    files = [folder / "a.png", folder / "notes.txt", folder / "sub/b.jpg"]
    local = run_extraction(files, tmp_path / "local.json", chunk_size=2, images_dir=folder, **OPTS)
    remote = run_extraction(files, tmp_path / "ray.json", chunk_size=2, images_dir=folder, workers=2, **OPTS)
    assert _annotations(local) == _annotations(remote)


def test_option_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown segment extraction option"):
        run_extraction([tmp_path / "x.png"], tmp_path / "o.json", box_quantil=0.5)
    with pytest.raises(ValueError, match="box_quantile"):
        ExtractionParams(box_quantile=1.5)
    with pytest.raises(ValueError, match="min_fill"):
        ExtractionParams(min_fill=0.9, max_fill=0.5)
    with pytest.raises(ValueError, match="no image files"):
        run_extraction([], tmp_path / "o.json")


def test_an_image_that_breaks_extraction_is_skipped_and_counted(image_folder, tmp_path, monkeypatch):
    folder, _ = image_folder
    real = extract_mod.extract_image

    def fail_on_noise(rgb, *args, **kwargs):
        if rgb[..., 0].mean() > 100:  # only the grey noise image is this red; the scenes are green
            raise cv2.error("simulated OpenCV failure")
        return real(rgb, *args, **kwargs)

    monkeypatch.setattr(extract_mod, "extract_image", fail_on_noise)
    files = [folder / "a.png", folder / "noise.png"]
    out = run_extraction(files, tmp_path / "s.json", images_dir=folder, **OPTS)
    prov = json.loads(out.read_text())["info"]["provenance"]
    assert prov["counters"]["skipped_by_reason"] == {"extraction_error": 1}
    assert prov["skipped"][0]["file_name"] == "noise.png" and "simulated" in prov["skipped"][0]["reason"]
    assert prov["counters"]["images_ok"] == 1
