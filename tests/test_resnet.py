"""The conv4 trunk: torchvision layout, the three real checkpoint formats, and clear errors."""
import pytest
import torch

from segswap.nets.resnet import (
    BackboneWeightsError,
    ResNet50Conv4,
    build_backbone,
    l2n,
    load_backbone_weights,
    normalise_image,
)

# torchvision resnet50: 25,557,032 parameters, of which layer4 14,964,736 and fc 2,049,000.
TRUNK_PARAMS = 25_557_032 - 14_964_736 - 2_049_000


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    net = ResNet50Conv4().eval()
    for m in net.modules():  # non-trivial BN statistics so a wrong mapping shows in the output
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        y = net(x)
    return net, x, y


def _extras():
    return {"layer4.0.conv1.weight": torch.zeros(512, 1024, 1, 1), "fc.weight": torch.zeros(1000, 2048),
            "fc.bias": torch.zeros(1000)}


def test_layout_matches_torchvision(reference):
    net, x, y = reference
    assert sum(p.numel() for p in net.parameters()) == TRUNK_PARAMS
    assert y.shape == (1, 1024, 4, 4)
    assert net.layer2[0].conv2.stride == (2, 2) and net.layer2[0].conv1.stride == (1, 1)  # v1.5


@pytest.mark.parametrize("kind", ["moco", "torchvision", "segswap"])
def test_checkpoint_formats_load_and_reproduce(tmp_path, reference, kind):
    net, x, y = reference
    sd = {**net.state_dict(), **_extras()}
    if kind == "moco":
        obj = {"epoch": 800, "arch": "resnet50", "state_dict": {
            **{"module.encoder_q." + k: v for k, v in sd.items()},
            "module.encoder_q.fc.0.weight": torch.zeros(2048, 2048),
            "module.encoder_k.conv1.weight": torch.zeros(64, 3, 7, 7),
            "module.queue": torch.zeros(128, 10), "module.queue_ptr": torch.zeros(1, dtype=torch.long)}}
    elif kind == "torchvision":
        obj = sd
    else:
        names = {"conv1": "0", "bn1": "1", "layer1": "4", "layer2": "5", "layer3": "6"}
        back = {names[k.split(".")[0]] + k[k.index("."):]: v for k, v in net.state_dict().items()}
        obj = {"backbone": back, "encoder": {"layer.0.weight": torch.zeros(1)}, "optimiser": {}}
    path = tmp_path / f"{kind}.pth"
    torch.save(obj, path)
    fresh = ResNet50Conv4().eval()
    assert load_backbone_weights(fresh, path) == kind
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), y)


def test_wrong_files_are_named(tmp_path, reference):
    net, _, _ = reference
    with pytest.raises(BackboneWeightsError, match="not found"):
        load_backbone_weights(ResNet50Conv4(), tmp_path / "nope.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneWeightsError, match="junk.pth"):
        load_backbone_weights(ResNet50Conv4(), junk)
    partial = tmp_path / "partial.pth"
    torch.save({k: v for k, v in net.state_dict().items() if not k.startswith("layer3")}, partial)
    with pytest.raises(BackboneWeightsError, match="partial.pth.*missing"):
        load_backbone_weights(ResNet50Conv4(), partial)
    other = tmp_path / "other.pth"
    torch.save({**net.state_dict(), "head.weight": torch.zeros(3)}, other)
    with pytest.raises(BackboneWeightsError, match="unexpected"):
        load_backbone_weights(ResNet50Conv4(), other)
    shape = tmp_path / "shape.pth"
    torch.save({**net.state_dict(), "conv1.weight": torch.zeros(64, 3, 3, 3)}, shape)
    with pytest.raises(BackboneWeightsError, match="shape mismatch.*conv1.weight"):
        load_backbone_weights(ResNet50Conv4(), shape)


def test_build_backbone_is_frozen_and_warns_without_weights(caplog):
    with caplog.at_level("WARNING"):
        net = build_backbone(None)
    assert "RANDOM weights" in caplog.text
    assert not net.training and not any(p.requires_grad for p in net.parameters())


def test_normalise_and_l2n():
    img = torch.full((2, 8, 8, 3), 255, dtype=torch.uint8)
    x = normalise_image(img)
    assert x.shape == (2, 3, 8, 8)
    torch.testing.assert_close(x[0, :, 0, 0], torch.tensor([(1 - 0.485) / 0.229, (1 - 0.456) / 0.224, (1 - 0.406) / 0.225]))
    f = l2n(torch.randn(2, 16, 3, 3))
    torch.testing.assert_close(f.norm(dim=1), torch.ones(2, 3, 3))


def test_handmade_trunk_loads_as_torchvision_layout(tmp_path):
    """The learning check's stand-in for pretrained weights goes through the real loader and computes
    its 30 blurred colour / gradient channels and nothing else."""
    import numpy as np
    import torch
    from handmade_trunk import N_FEATURES, write_handmade_trunk

    from segswap.nets.resnet import ResNet50Conv4, build_backbone, load_backbone_weights, normalise_image

    path = write_handmade_trunk(tmp_path / "trunk.pth")
    assert load_backbone_weights(ResNet50Conv4(), path) == "torchvision"
    img = (np.random.default_rng(0).random((128, 128, 3)) * 255).astype(np.uint8)
    with torch.no_grad():
        feat = build_backbone(path)(normalise_image(img))
    assert feat.shape == (1, 1024, 8, 8) and torch.isfinite(feat).all()
    assert feat[:, :N_FEATURES].abs().sum() > 0 and (feat[:, N_FEATURES:] == 0).all()
