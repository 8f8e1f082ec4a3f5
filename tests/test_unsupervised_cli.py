"""segswap-segments command line and the contact sheet of segments."""
import argparse
import json

import cv2
import numpy as np
import pytest
from unsupervised_scenes import planted_scene

from segswap.segments.cli import add_extraction_arguments, extraction_options, main
from segswap.segments.params import ExtractionParams
from segswap.segments.show import draw_segments


@pytest.fixture
def folder(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for seed in (0, 1):
        assert cv2.imwrite(str(photos / f"scene{seed}.png"), planted_scene(seed)[0][..., ::-1])
    (photos / "readme.txt").write_text("not an image")
    return photos


def test_flags_cover_every_setting_and_default_to_none():
    parser = add_extraction_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--box-quantile", "0.6", "--ss-mode", "single", "--max-boxes", "7"])
    opts = extraction_options(args)
    assert set(opts) == {f for f in ExtractionParams.__dataclass_fields__}
    assert ExtractionParams.from_options(**opts) == ExtractionParams(box_quantile=0.6, ss_mode="single", max_boxes=7)
    with pytest.raises(SystemExit):
        parser.parse_args(["--ss-mode", "slow"])


def test_cli_writes_coco_and_show_draws_it(folder, tmp_path, capsys):
    out = tmp_path / "out" / "segments.json"
    assert main([str(folder), "--out", str(out), "--max-boxes", "6", "--min-score", "0.5", "--seed", "3"]) == 0
    coco = json.loads(out.read_text())
    prov = coco["info"]["provenance"]
    assert prov["params"]["max_boxes"] == 6 and prov["params"]["min_score"] == 0.5 and prov["seed"] == 3
    assert prov["counters"]["skipped_by_reason"] == {"not_image": 1}
    assert len(coco["images"]) == 2 and all(a["score"] >= 0.5 for a in coco["annotations"])

    sheet = draw_segments(out, None, tmp_path / "sheet.png", n=4, tile_height=120)  # images dir from the file
    drawn = cv2.imread(str(sheet))
    assert drawn.shape[0] >= 120 and drawn.shape[1] >= 2 * 160
    # Masks are drawn in colour over the photo: the sheet is not just the two photos side by side.
    assert np.count_nonzero(np.ptp(drawn.astype(int), axis=2) > 100) > 500


def test_cli_errors(tmp_path, capsys):
    assert main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "s.json")]) == 2
    assert "not a folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), "--out", str(tmp_path / "s.json")]) == 2
    assert "no image files" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--out", str(tmp_path / "s.json"), "--box-quantile", "high"])


def test_without_images_the_embedded_corpus_is_written_next_to_the_output(tmp_path, monkeypatch):
    import segswap.segments.embedded as embedded

    written = []

    def small_corpus(dest_dir):  # stands in for the 15 scikit-image photos (slow to segment in a test)
        dest_dir.mkdir(parents=True, exist_ok=True)
        path = dest_dir / "scene.png"
        cv2.imwrite(str(path), planted_scene(4)[0][..., ::-1])
        written.append(dest_dir)
        return [path]

    monkeypatch.setattr(embedded, "embedded_images", small_corpus)
    out = tmp_path / "demo" / "segments.json"
    assert main(["--out", str(out), "--max-boxes", "4"]) == 0
    assert written == [tmp_path / "demo" / "embedded-images"]
    coco = json.loads(out.read_text())
    assert [im["file_name"] for im in coco["images"]] == ["scene.png"]
    assert coco["info"]["provenance"]["images_dir"] == str(written[0].resolve())
