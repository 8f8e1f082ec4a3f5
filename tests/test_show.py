"""segswap-show draws a contact sheet whose rows and panels follow the pairs it was given."""
import cv2
import numpy as np
from synthetic_shards import make_pair, write_synthetic_shards

from segswap.core import viz
from segswap.pipeline import show


def test_sheet_from_shard_directory(tmp_path):
    write_synthetic_shards(tmp_path / "ds", n_shards=2, pairs_per_shard=2, size=64, stylised=True)
    out = tmp_path / "sheet.png"
    assert show.main([str(tmp_path / "ds"), "--out", str(out), "--n", "3", "--tile", "64"]) == 0
    sheet = cv2.imread(str(out))
    tile, gap, header = 64, viz.GAP, viz.HEADER
    assert sheet.shape[0] == 3 * (header + tile + gap)  # three rows
    assert sheet.shape[1] == 4 * tile + 2 * gap + 2 * gap  # plain pair, separator, stylised pair


def test_without_style_rows_hold_one_pair(tmp_path):
    url = write_synthetic_shards(tmp_path / "ds", n_shards=1, pairs_per_shard=2, size=64, stylised=False)
    out = tmp_path / "sheet.png"
    assert show.main([url, "--out", str(out), "--n", "5", "--tile", "64"]) == 0
    sheet = cv2.imread(str(out))
    assert sheet.shape[:2] == (2 * (viz.HEADER + 64 + viz.GAP), 2 * 64 + viz.GAP)


def test_lines_start_in_mask0_and_end_in_mask1():
    pair = make_pair(np.random.default_rng(3), "000000-000000", size=64, stylised=False)
    lines = viz.sample_lines(pair.flow01, 10, np.random.default_rng(0))
    assert len(lines) == 10
    for x0, y0, x1, y1 in lines:
        assert pair.mask0[int(y0 * 64), int(x0 * 64)] == 255
        assert pair.mask1[min(int(y1 * 64), 63), min(int(x1 * 64), 63)] == 255


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    assert show.main([str(tmp_path / "missing.tar"), "--out", str(tmp_path / "x.png")]) == 2
    assert "missing.tar" in capsys.readouterr().err
