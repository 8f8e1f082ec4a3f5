"""AdaIN styliser: user weight folder, paintings, batching, determinism and clear errors."""
import cv2
import numpy as np
import pytest
import skimage.data
import torch

from segswap.nets.adain import build_decoder
from segswap.nets.vgg import WeightsFileError, build_vgg_normalised
from segswap.pipeline.style import build_styliser


def he_init(module, generator):
    """Random weights that keep the signal alive through the layers (PyTorch's default init shrinks it
    so much that a random decoder outputs a constant image)."""
    sd = module.state_dict()
    for k, v in sd.items():
        if k.endswith("weight"):
            fan_in = v[0].numel()
            sd[k] = torch.randn(v.shape, generator=generator) * (2.0 / fan_in) ** 0.5
        else:
            sd[k] = torch.randn(v.shape, generator=generator) * 0.01
    return sd


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    d = tmp_path_factory.mktemp("adain_weights")
    # The encoder part only (up to relu4_1), which the loader accepts: a quarter of the full file's size.
    torch.save(he_init(build_vgg_normalised()[:31], g), d / "vgg_normalised.pth")
    torch.save(he_init(build_decoder(), g), d / "decoder.pth")
    return d


@pytest.fixture(scope="module")
def paintings(tmp_path_factory):
    d = tmp_path_factory.mktemp("paintings")
    (d / "sub").mkdir()
    cv2.imwrite(str(d / "coffee.jpg"), cv2.resize(skimage.data.coffee(), (80, 64))[..., ::-1])
    cv2.imwrite(str(d / "sub" / "chelsea.png"), cv2.resize(skimage.data.chelsea(), (72, 64))[..., ::-1])
    return d


@pytest.fixture(scope="module")
def images():
    a = cv2.resize(skimage.data.astronaut(), (48, 48), interpolation=cv2.INTER_AREA)
    r = cv2.resize(skimage.data.rocket(), (52, 44), interpolation=cv2.INTER_AREA)  # not a multiple of 8
    return [a, r, a[::-1].copy()]


def make(weights_dir, paintings, **kw):
    return build_styliser("adain", adain_weights=str(weights_dir), style_images=str(paintings),
                          device="cpu", style_size=48, **kw)


def test_outputs_sizes_and_provenance(weights_dir, paintings, images):
    sty = make(weights_dir, paintings, strength=(0.25, 0.75), batch_size=8)
    out, infos = sty.stylise(images, np.random.default_rng(1))
    assert [o.shape for o in out] == [im.shape for im in images]
    assert all(o.dtype == np.uint8 for o in out)
    assert {i["style_id"] for i in infos} <= {"coffee.jpg", "sub/chelsea.png"}
    assert all(i["styliser"] == "adain" and 0.25 <= i["strength"] < 0.75 for i in infos)


def test_deterministic_and_batch_size_independent(weights_dir, paintings, images):
    out1, infos1 = make(weights_dir, paintings, batch_size=1).stylise(images, np.random.default_rng(5))
    out8, infos8 = make(weights_dir, paintings, batch_size=8).stylise(images, np.random.default_rng(5))
    again, infos_again = make(weights_dir, paintings, batch_size=8).stylise(images, np.random.default_rng(5))
    assert infos1 == infos8 == infos_again
    assert all(np.array_equal(a, b) for a, b in zip(out8, again))
    # batched convolutions may differ from single ones in the last float bit: at most 1 grey level
    assert all(np.abs(a.astype(int) - b).max() <= 1 for a, b in zip(out1, out8))
    other, _ = make(weights_dir, paintings).stylise(images, np.random.default_rng(6))
    assert any(not np.array_equal(a, b) for a, b in zip(out8, other))


def test_alpha_zero_equals_reconstruction(weights_dir, paintings, images):
    """With alpha 0 the style image cannot matter: every painting gives the same output."""
    sty = make(weights_dir, paintings, strength=(0.0, 0.0))
    out, infos = sty.stylise([images[0]] * 4, np.random.default_rng(2))
    assert len({i["style_id"] for i in infos}) == 2
    assert all(np.array_equal(o, out[0]) for o in out)


def test_clear_errors(tmp_path, weights_dir, paintings):
    with pytest.raises(ValueError, match="needs --adain-weights"):
        build_styliser("adain", style_images=str(paintings))
    with pytest.raises(ValueError, match="needs --style-images"):
        build_styliser("adain", adain_weights=str(weights_dir))
    with pytest.raises(FileNotFoundError, match=r"missing vgg_normalised\.pth, decoder\.pth"):
        build_styliser("adain", adain_weights=str(tmp_path), style_images=str(paintings))
    with pytest.raises(TypeError):
        make(weights_dir, paintings, alpha=0.5)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "vgg_normalised.pth").write_bytes((weights_dir / "vgg_normalised.pth").read_bytes())
    torch.save({"0.weight": torch.zeros(3)}, bad / "decoder.pth")
    with pytest.raises(WeightsFileError, match=r"bad/decoder\.pth: does not match"):
        make(bad, paintings)
