"""AdaIN network: the AdaIN layer's statistics, alpha blending, the public weight layout and its errors."""
import pytest
import torch
import torch.nn.functional as F

from segswap.nets.adain import AdaIN, adain, build_decoder, calc_mean_std, load_adain, load_decoder
from segswap.nets.vgg import WeightsFileError, build_vgg_normalised, load_vgg_encoder

# The public pytorch-AdaIN layout, written out independently of nets/: conv index -> (in, out, kernel).
VGG_CONVS = {0: (3, 3, 1), 2: (3, 64, 3), 5: (64, 64, 3), 9: (64, 128, 3), 12: (128, 128, 3),
             16: (128, 256, 3), 19: (256, 256, 3), 22: (256, 256, 3), 25: (256, 256, 3), 29: (256, 512, 3),
             32: (512, 512, 3), 35: (512, 512, 3), 38: (512, 512, 3), 42: (512, 512, 3), 45: (512, 512, 3),
             48: (512, 512, 3), 51: (512, 512, 3)}
VGG_POOL_AFTER = {5, 12, 25}  # max pool (ceil mode) after these convs' ReLUs, up to relu4_1
DECODER_CONVS = {1: (512, 256), 5: (256, 256), 8: (256, 256), 11: (256, 256), 14: (256, 128), 18: (128, 128),
                 21: (128, 64), 25: (64, 64), 28: (64, 3)}
DECODER_UPSAMPLE_AFTER = {1, 14, 21}


def random_state_dict(convs, generator):
    sd = {}
    for i, (cin, cout, *k) in convs.items():
        k = k[0] if k else 3
        scale = (2.0 / (cin * k * k)) ** 0.5
        sd[f"{i}.weight"] = torch.randn(cout, cin, k, k, generator=generator) * scale
        sd[f"{i}.bias"] = torch.randn(cout, generator=generator) * 0.01
    return sd


def reference_encode(sd, x):
    """relu4_1 of the normalised VGG written with functional ops from the state dict alone."""
    for i in sorted(k for k in VGG_CONVS if k < 31):
        w, b = sd[f"{i}.weight"], sd[f"{i}.bias"]
        if w.shape[-1] == 3:
            x = F.pad(x, (1, 1, 1, 1), mode="reflect")
        x = F.conv2d(x, w, b)
        if i > 0:
            x = F.relu(x)
        if i in VGG_POOL_AFTER:
            x = F.max_pool2d(x, 2, 2, ceil_mode=True)
    return x


def reference_decode(sd, x):
    for i in sorted(DECODER_CONVS):
        x = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), sd[f"{i}.weight"], sd[f"{i}.bias"])
        if i != 28:
            x = F.relu(x)
        if i in DECODER_UPSAMPLE_AFTER:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
    return x


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    d = tmp_path_factory.mktemp("adain")
    vgg_sd, dec_sd = random_state_dict(VGG_CONVS, g), random_state_dict(DECODER_CONVS, g)
    torch.save(vgg_sd, d / "vgg_normalised.pth")
    torch.save(dec_sd, d / "decoder.pth")
    return d, vgg_sd, dec_sd


def test_adain_layer_gives_content_the_style_statistics():
    g = torch.Generator().manual_seed(1)
    content = torch.randn(3, 16, 9, 11, generator=g) * 3 + 2
    style = torch.rand(3, 16, 7, 5, generator=g) * torch.arange(1, 17).view(1, 16, 1, 1) - 4
    t = adain(content, style)
    t_mean, t_std = calc_mean_std(t)
    s_mean, s_std = calc_mean_std(style)
    torch.testing.assert_close(t_mean, s_mean, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(t_std, s_std, atol=1e-3, rtol=1e-3)
    # and keeps the content's spatial pattern: a per-channel affine map of it
    for b in range(3):
        for c in range(16):
            corr = torch.corrcoef(torch.stack([t[b, c].flatten(), content[b, c].flatten()]))[0, 1]
            assert corr > 0.999


def test_std_is_unbiased_with_eps():
    feat = torch.tensor([1.0, 2.0, 4.0, 7.0]).view(1, 1, 2, 2)
    mean, std = calc_mean_std(feat)
    assert mean.item() == pytest.approx(3.5)
    assert std.item() == pytest.approx((feat.flatten().var(unbiased=True).item() + 1e-5) ** 0.5)


def test_shapes_match_the_public_layout():
    vgg, dec = build_vgg_normalised(), build_decoder()
    assert len(vgg) == 53 and len(dec) == 29
    assert {k: tuple(v.shape) for k, v in vgg.state_dict().items() if k.endswith("weight")} == {
        f"{i}.weight": (o, c, k, k) for i, (c, o, k) in VGG_CONVS.items()}
    assert {k: tuple(v.shape) for k, v in dec.state_dict().items() if k.endswith("weight")} == {
        f"{i}.weight": (o, c, 3, 3) for i, (c, o) in DECODER_CONVS.items()}
    assert isinstance(vgg[1], torch.nn.ReflectionPad2d) and vgg[7].ceil_mode


def test_weight_files_load_and_reproduce_a_forward_pass(weight_files):
    d, vgg_sd, dec_sd = weight_files
    model = load_adain(d / "vgg_normalised.pth", d / "decoder.pth")
    g = torch.Generator().manual_seed(2)
    content, style = torch.rand(2, 3, 36, 44, generator=g), torch.rand(1, 3, 40, 40, generator=g)
    with torch.no_grad():
        got = model(content, style, alpha=torch.tensor([1.0, 0.4]))
        f_c, f_s = reference_encode(vgg_sd, content), reference_encode(vgg_sd, style)
        torch.testing.assert_close(model.encode(content), f_c, atol=1e-4, rtol=1e-4)
        t = adain(f_c, f_s)
        alpha = torch.tensor([1.0, 0.4]).view(2, 1, 1, 1)
        want = reference_decode(dec_sd, alpha * t + (1 - alpha) * f_c)[..., :36, :44]
    assert got.shape == (2, 3, 36, 44)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_alpha_zero_returns_content_features(weight_files):
    d, _, _ = weight_files
    model = load_adain(d / "vgg_normalised.pth", d / "decoder.pth")
    g = torch.Generator().manual_seed(3)
    f_c = torch.rand(2, 512, 5, 6, generator=g)
    captured = []
    model.decoder.register_forward_pre_hook(lambda m, inp: captured.append(inp[0]))
    mean, std = torch.rand(2, 512, generator=g), torch.rand(2, 512, generator=g) + 0.5
    with torch.no_grad():
        model.decode_mixed(f_c, mean, std, alpha=0.0)
    torch.testing.assert_close(captured[0], f_c)


def test_truncated_vgg_file_is_accepted(tmp_path, weight_files):
    _, vgg_sd, _ = weight_files
    torch.save({k: v for k, v in vgg_sd.items() if int(k.split(".")[0]) < 31}, tmp_path / "vgg.pth")
    enc = load_vgg_encoder(tmp_path / "vgg.pth")
    assert len(enc) == 31 and not any(p.requires_grad for p in enc.parameters())


def test_missing_file_is_named(tmp_path):
    with pytest.raises(WeightsFileError, match=r"decoder\.pth: AdaIN decoder .* not found"):
        load_decoder(tmp_path / "decoder.pth")


def test_wrong_keys_are_named(tmp_path, weight_files):
    _, vgg_sd, dec_sd = weight_files
    bad = dict(dec_sd)
    bad["module.1.weight"] = bad.pop("1.weight")
    torch.save(bad, tmp_path / "decoder.pth")
    with pytest.raises(WeightsFileError, match=r"decoder\.pth.*missing keys \['1\.weight'\].*'module\.1\.weight'"):
        load_decoder(tmp_path / "decoder.pth")
    # a VGG file given as the decoder: every key mismatches
    torch.save(vgg_sd, tmp_path / "swapped.pth")
    with pytest.raises(WeightsFileError, match=r"swapped\.pth: does not match the pytorch-AdaIN layout of the AdaIN decoder"):
        load_decoder(tmp_path / "swapped.pth")


def test_wrong_shapes_are_named(tmp_path, weight_files):
    _, vgg_sd, _ = weight_files
    bad = dict(vgg_sd)
    bad["2.weight"] = torch.zeros(64, 3, 5, 5)
    torch.save(bad, tmp_path / "vgg_normalised.pth")
    with pytest.raises(WeightsFileError, match=r"vgg_normalised\.pth: .*shape mismatch .*2\.weight: file \(64, 3, 5, 5\)"):
        load_vgg_encoder(tmp_path / "vgg_normalised.pth")


def test_not_a_weights_file(tmp_path):
    (tmp_path / "decoder.pth").write_text("hello")
    with pytest.raises(WeightsFileError, match=r"decoder\.pth: cannot read"):
        load_decoder(tmp_path / "decoder.pth")
    torch.save({"decoder": {"1.weight": torch.zeros(1)}, "step": 3}, tmp_path / "ckpt.pth")
    with pytest.raises(WeightsFileError, match=r"ckpt\.pth: expected a state_dict"):
        load_decoder(tmp_path / "ckpt.pth")


def test_encoder_stays_frozen_in_train_mode(weight_files):
    d, _, _ = weight_files
    model = AdaIN(load_vgg_encoder(d / "vgg_normalised.pth"), build_decoder()).train()
    assert not model.encoder.training and model.decoder.training
    assert all(not p.requires_grad for p in model.encoder.parameters())
    assert all(p.requires_grad for p in model.decoder.parameters())
