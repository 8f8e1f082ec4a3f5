"""segswap-adain-train: a tiny CPU run writes a usable checkpoint, resumes exactly, and refuses bad input."""
import json
import re

import cv2
import numpy as np
import pytest
import skimage.data
import torch

from segswap.nets.adain import build_decoder, load_adain, load_decoder
from segswap.nets.adain_train import CropBatches, adain_losses, list_images, main
from segswap.nets.vgg import build_vgg_normalised


def he_init(module, generator):
    sd = module.state_dict()
    for k, v in sd.items():
        sd[k] = (torch.randn(v.shape, generator=generator) * (2.0 / v[0].numel()) ** 0.5 if k.endswith("weight")
                 else torch.zeros(v.shape))
    return sd


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("adain_train")
    content, style = root / "content", root / "style"
    content.mkdir()
    style.mkdir()
    for name in ("astronaut", "coffee", "chelsea"):
        cv2.imwrite(str(content / f"{name}.jpg"), cv2.resize(getattr(skimage.data, name)(), (64, 56))[..., ::-1])
    rng = np.random.default_rng(0)
    for i in range(2):  # 'paintings': smooth colour fields
        field = cv2.resize(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8), (60, 60), interpolation=cv2.INTER_CUBIC)
        cv2.imwrite(str(style / f"p{i}.png"), field)
    (style / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    torch.save(he_init(build_vgg_normalised()[:31], torch.Generator().manual_seed(0)), root / "vgg_normalised.pth")
    return root


def args(data, out, *extra):
    return ["--content-dir", str(data / "content"), "--style-dir", str(data / "style"),
            "--vgg", str(data / "vgg_normalised.pth"), "--out", str(out), "--batch-size", "2", "--crop", "24",
            "--load-size", "32", "--workers", "0", "--log-every", "1", "--sample-every", "1", "--save-every", "1",
            "--seed", "3", *extra]


def test_train_writes_checkpoint_samples_and_resumes_exactly(data, tmp_path, capsys):
    assert main(args(data, tmp_path / "straight", "--iters", "2")) == 0
    straight = load_decoder(tmp_path / "straight" / "decoder.pth")

    assert main(args(data, tmp_path / "resumed", "--iters", "1")) == 0
    ckpt = torch.load(tmp_path / "resumed" / "checkpoint.pth", weights_only=True)
    assert ckpt["step"] == 1 and ckpt["config"]["style_weight"] == 10.0
    assert main(args(data, tmp_path / "resumed", "--iters", "2")) == 0
    resumed = load_decoder(tmp_path / "resumed" / "decoder.pth")
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    assert torch.load(tmp_path / "resumed" / "checkpoint.pth", weights_only=True)["step"] == 2
    assert main(args(data, tmp_path / "resumed", "--iters", "3", "--style-weight", "5")) == 2  # a user error: one line on stderr, exit 2
    assert re.search(r"different options", capsys.readouterr().err)

    out = tmp_path / "straight"
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step_0000001.png", "step_0000002.png"]
    grid = cv2.imread(str(out / "samples" / "step_0000002.png"))
    assert grid.shape == (3 * 24, 2 * 24, 3)  # rows content/style/output, one column per sample image
    assert json.loads((out / "train_config.json").read_text())["seed"] == 3
    # the run folder is directly usable as --adain-weights, and training moved the weights
    model = load_adain(out / "vgg_normalised.pth", out / "decoder.pth")
    init = build_decoder()
    assert not torch.equal(model.decoder[1].weight, init[1].weight)
    assert not list((out).glob("*.tmp"))


def test_training_lowers_the_style_loss(data):
    """A few steps on one fixed batch: the loss the optimiser sees goes down."""
    from segswap.nets.adain import AdaIN
    from segswap.nets.vgg import load_vgg_encoder

    files_c, files_s = list_images(data / "content", "content"), list_images(data / "style", "style")
    batches = CropBatches(files_c, files_s, batch_size=2, load_size=32, crop=24, seed=0, num_steps=1)
    content, style, bad = batches[0]
    assert content.shape == style.shape == (2, 3, 24, 24) and 0 <= bad
    again = batches[0]
    assert torch.equal(content, again[0]) and torch.equal(style, again[1])
    torch.manual_seed(0)  # only the decoder's random init in this test
    model = AdaIN(load_vgg_encoder(data / "vgg_normalised.pth"), build_decoder()).train()
    opt = torch.optim.Adam(model.decoder.parameters(), lr=1e-3)
    first = None
    for _ in range(4):
        losses, out = adain_losses(model, content, style)
        total = losses["content"] + 10 * losses["style"]
        first = total.item() if first is None else first
        opt.zero_grad()
        total.backward()
        opt.step()
    assert out.shape == content.shape
    assert total.item() < first


def test_bad_inputs_are_named(data, tmp_path, capsys):
    assert main(args(data, tmp_path, "--content-dir", str(data / "nope"))) == 2  # a user error: one line on stderr, exit 2
    assert re.search(r"nope: content folder not found", capsys.readouterr().err)
    assert main(args(data, tmp_path, "--load-size", "20")) == 2  # a user error: one line on stderr, exit 2
    assert re.search(r"--crop 24 is larger than --load-size 20", capsys.readouterr().err)
    assert main(args(data, tmp_path, "--vgg", str(tmp_path / "missing.pth"))) == 2  # a user error: one line on stderr, exit 2
    assert re.search(r"missing.pth: VGG encoder .* not found", capsys.readouterr().err)
