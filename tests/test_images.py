"""load_rgb on the odd files users have: each loads as upright uint8 RGB or raises BadImage naming it."""
import pickle

import numpy as np
import pytest
from PIL import Image

from segswap.core.images import BadImage, load_rgb


def _gradient(h=40, w=60):
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 4, y * 6, (x + y) * 2], axis=2).astype(np.uint8)


def test_plain_jpeg_and_png(tmp_path):
    rgb = _gradient()
    Image.fromarray(rgb).save(tmp_path / "a.png")
    Image.fromarray(rgb).save(tmp_path / "a.jpg", quality=98)
    assert np.array_equal(load_rgb(tmp_path / "a.png"), rgb)
    out = load_rgb(tmp_path / "a.jpg")
    assert out.dtype == np.uint8 and out.shape == (40, 60, 3)
    assert np.abs(out.astype(int) - rgb).mean() < 3


def test_truncated_and_zero_byte_jpeg(tmp_path):
    buf = tmp_path / "full.jpg"
    Image.fromarray(_gradient(200, 200)).save(buf, quality=90)
    data = buf.read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 3])
    (tmp_path / "zero.jpg").write_bytes(b"")
    with pytest.raises(BadImage, match="cut.jpg.*truncated"):
        load_rgb(tmp_path / "cut.jpg")
    with pytest.raises(BadImage, match=r"zero.jpg.*0 bytes"):
        load_rgb(tmp_path / "zero.jpg")


def test_missing_and_non_image_file(tmp_path):
    (tmp_path / "notes.jpg").write_text("this is not an image\n")
    with pytest.raises(BadImage, match="notes.jpg.*not an image"):
        load_rgb(tmp_path / "notes.jpg")
    with pytest.raises(BadImage, match="nothere.png"):
        load_rgb(tmp_path / "nothere.png")


def test_cmyk_jpeg(tmp_path):
    rgb = _gradient()
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=98)
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    out = load_rgb(tmp_path / "cmyk.jpg")
    assert out.shape == (40, 60, 3)
    assert np.abs(out.astype(int) - rgb).mean() < 6


def test_16bit_png_scaled_not_truncated(tmp_path):
    ramp = (np.arange(64 * 16).reshape(16, 64) * 64).astype(np.uint16)  # 0 .. 65472
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    out = load_rgb(tmp_path / "g16.png")
    want = np.rint(ramp / 257.0).astype(np.uint8)
    assert np.array_equal(out[..., 0], want) and np.array_equal(out[..., 2], want)


def test_rgba_composited_on_white(tmp_path):
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, :15, 3] = 255  # left half opaque red, right half fully transparent (black under it)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    out = load_rgb(tmp_path / "t.png")
    assert (out[:, :15] == [200, 0, 0]).all()
    assert (out[:, 15:] == 255).all()


def test_grayscale(tmp_path):
    g = _gradient()[..., 0]
    Image.fromarray(g, "L").save(tmp_path / "g.png")
    out = load_rgb(tmp_path / "g.png")
    assert out.shape == (40, 60, 3) and all(np.array_equal(out[..., c], g) for c in range(3))


def test_tiny_and_huge_images_refused(tmp_path):
    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
    with pytest.raises(BadImage, match=r"dot.png.*1x1"):
        load_rgb(tmp_path / "dot.png")
    assert load_rgb(tmp_path / "dot.png", min_side=1).shape == (1, 1, 3)
    Image.new("RGB", (300, 200)).save(tmp_path / "big.png")
    with pytest.raises(BadImage, match=r"big.png.*300x200 = 60000 pixels.*max_pixels"):
        load_rgb(tmp_path / "big.png", max_pixels=50_000)


def test_exif_rotation_applied(tmp_path):
    rgb = np.zeros((20, 40, 3), np.uint8)
    rgb[:, :20] = 255  # left half white
    im = Image.fromarray(rgb)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    im.save(tmp_path / "rot.jpg", exif=exif, quality=98)
    out = load_rgb(tmp_path / "rot.jpg")
    assert out.shape == (40, 20, 3)  # upright: portrait
    # After rotating 90 degrees clockwise the white left half becomes the top half.
    assert out[:20].mean() > 200 and out[20:].mean() < 50


def test_bad_image_pickles():
    err = pickle.loads(pickle.dumps(BadImage("/x/y.jpg", "broken")))
    assert isinstance(err, BadImage) and err.path == "/x/y.jpg" and "broken" in str(err)


def test_huge_image_refused_from_its_header(tmp_path):
    """A 20000x20000 PNG (400 MP) is refused by the default limit before any pixel is decoded."""
    import struct
    import zlib

    Image.new("RGB", (8, 8)).save(tmp_path / "small.png")
    data = bytearray((tmp_path / "small.png").read_bytes())
    # IHDR chunk: length(4) 'IHDR'(4) width(4) height(4) ... crc(4), right after the 8-byte signature.
    struct.pack_into(">II", data, 16, 20000, 20000)
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    (tmp_path / "huge.png").write_bytes(bytes(data))
    with pytest.raises(BadImage, match=r"huge.png.*400000000 pixels"):
        load_rgb(tmp_path / "huge.png")
