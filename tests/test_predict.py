"""segswap-predict: PNG + raw arrays from a checkpoint; clear errors for bad inputs."""
import cv2
import numpy as np
from synthetic_shards import make_pair
from tiny_checkpoint import write_tiny_checkpoint

from segswap.apps import predict


def _checkpoint(tmp_path):
    return write_tiny_checkpoint(tmp_path / "ck.pth")


def test_predict_writes_png_and_arrays(tmp_path):
    pair = make_pair(np.random.default_rng(0), "000000-000000", size=96)
    p0, p1 = tmp_path / "a.png", tmp_path / "b.jpg"
    cv2.imwrite(str(p0), pair.img0[:, :, ::-1])
    cv2.imwrite(str(p1), pair.img1[:, :, ::-1])
    out = tmp_path / "vis" / "pred.png"
    assert predict.main([str(p0), str(p1), "--ckpt", str(_checkpoint(tmp_path)), "--out", str(out),
                         "--device", "cpu", "--threshold", "0"]) == 0
    vis = cv2.imread(str(out))
    assert vis.shape == (64, 128, 3)  # the checkpoint's image size, two panels
    with np.load(tmp_path / "vis" / "pred.npz", allow_pickle=False) as z:
        assert z["mask0"].shape == (4, 4) and z["flow01"].shape == (4, 4, 2)
        assert ((z["mask1"] > 0) & (z["mask1"] < 1)).all()
        assert list(z["size"]) == [64, 64]


def test_predict_names_the_bad_file(tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    assert predict.main([str(bad), str(bad), "--ckpt", str(tmp_path / "none.pth")]) == 2
    assert "bad.png" in capsys.readouterr().err
