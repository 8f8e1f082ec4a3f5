"""Pictures of training: validation sheets in the run directory and segswap-plot's curves."""
import json

import cv2
import pytest
from synthetic_shards import write_synthetic_shards

from segswap.apps import plot
from segswap.core import viz
from segswap.train import cli
from segswap.train.evaluate import SHEET_PAIRS, SHEET_TILE

TINY = ["--model", "tiny", "--image-size", "64", "--batch-pos", "2", "--batch-neg", "2", "--workers", "0",
        "--log-every", "1", "--warmup-steps", "2", "--shuffle-buffer", "4", "--ckpt-every", "0"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("plot")
    train = write_synthetic_shards(d / "train", n_shards=1, pairs_per_shard=6, size=64, seed=0)
    val = write_synthetic_shards(d / "val", n_shards=1, pairs_per_shard=4, size=64, seed=1, first_shard=7)
    out = d / "run"
    assert cli.main(["--shards", train, "--val-shards", val, "--out", str(out), "--max-steps", "5",
                     "--val-every", "2", "--val-pairs", "4", *TINY]) == 0
    return out


def test_every_validation_writes_a_sheet(run_dir):
    steps = [json.loads(line)["step"] for line in (run_dir / "val.jsonl").read_text().splitlines()]
    assert steps == [0, 2, 4, 5]
    sheets = sorted(p.name for p in (run_dir / "val").iterdir())
    assert sheets == [f"step-{s:06d}.png" for s in steps]
    sheet = cv2.imread(str(run_dir / "val" / "step-000005.png"))
    # SHEET_PAIRS rows of [ground truth pair | prediction pair], each panel titled
    row = viz.HEADER + SHEET_TILE + viz.GAP
    assert sheet.shape == (SHEET_PAIRS * row, 4 * SHEET_TILE + 2 * viz.GAP + 2 * viz.GAP, 3)
    assert sheet.std() > 10  # pictures, not a blank canvas


def test_plot_writes_one_png_of_the_curves(run_dir, tmp_path):
    out = tmp_path / "curves.png"
    assert plot.main([str(run_dir), "--out", str(out)]) == 0
    assert out.stat().st_size > 10_000
    img = cv2.imread(str(out))
    assert img.shape == (700, 1100, 3)  # figsize 11 x 7 in at 100 dpi
    assert plot.main([str(run_dir)]) == 0 and (run_dir / "curves.png").is_file()  # default: inside the run


def test_plot_reads_a_torn_last_line_and_names_a_missing_file(run_dir, tmp_path, capsys):
    torn = tmp_path / "torn"
    torn.mkdir()
    lines = (run_dir / "metrics.jsonl").read_text()
    (torn / "metrics.jsonl").write_text(lines + '{"step": 6, "loss/to')
    assert plot.read_run(str(torn))[0][-1]["step"] == 5
    assert plot.main([str(tmp_path / "nowhere")]) == 2
    assert "nowhere/metrics.jsonl" in capsys.readouterr().err


def test_tensorboard_gets_the_sheet_that_is_written(run_dir, tmp_path):
    from segswap.train.checkpoint import load_model
    from segswap.train.evaluate import write_validation_sheet

    class Writer:  # the one SummaryWriter method the sheet uses
        def add_image(self, tag, img, step, dataformats):
            self.got = (tag, img, step, dataformats)

    tb = Writer()
    val = sorted((run_dir.parent / "val").glob("*.tar"))
    path = write_validation_sheet(load_model(run_dir / "last.pth"), [str(v) for v in val], 64, "cpu",
                                  str(tmp_path), 7, tb)
    tag, img, step, fmt = tb.got
    assert (tag, step, fmt) == ("val/sheet", 7, "HWC")
    assert (cv2.imread(path)[:, :, ::-1] == img).all()
