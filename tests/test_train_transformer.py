"""Cross-image transformer: output contract, and official-checkpoint compatibility against the reference formulas."""
import math

import pytest
import torch
from torch import nn

from segswap.train.checkpoint import load_model
from segswap.train.transformer import MODEL_SIZES, CrossImageTransformer, official_to_ours


def test_output_shapes_and_ranges():
    torch.manual_seed(0)
    head = CrossImageTransformer("tiny", feat_dim=32).eval()
    f0, f1 = torch.randn(3, 32, 4, 5), torch.randn(3, 32, 6, 3)
    out = head(f0, f1, return_tokens=True)
    assert out["mask0"].shape == (3, 4, 5) and out["mask1"].shape == (3, 6, 3)
    assert out["flow01"].shape == (3, 4, 5, 2) and out["flow10"].shape == (3, 6, 3, 2)
    assert out["tokens0"].shape == (3, MODEL_SIZES["tiny"][0], 4, 5)
    for k in ("mask0", "mask1", "flow01", "flow10"):
        assert torch.isfinite(out[k]).all()
        assert out[k].min() >= 1e-7 and out[k].max() <= 1 - 1e-7


def test_padding_hides_keys_and_never_nans():
    torch.manual_seed(0)
    head = CrossImageTransformer("tiny", feat_dim=16).eval()
    f0, f1 = torch.randn(2, 16, 3, 3), torch.randn(2, 16, 3, 3)
    pad = torch.zeros(2, 3, 3, dtype=torch.bool)
    pad[0, 0] = True
    base = head(f0, f1, pad)
    # Changing features of hidden cells of image 1 cannot change image 0's output (it only sees image 1 as keys).
    f1b = f1.clone()
    f1b[0, :, 0] += 5.0
    changed = head(f0, f1b, pad)
    assert torch.allclose(base["mask0"][0], changed["mask0"][0], atol=1e-6)
    # An all-hidden image 1 would make every cross-attention row empty: treated as no padding, no NaN.
    full = head(f0, f1, torch.ones(2, 3, 3, dtype=torch.bool))
    assert torch.isfinite(full["mask0"]).all()


# ------------------------------------------------------------------ official formulas, written independently

def official_pos(b, h, w, num_pos_feats):
    """DETR PositionEmbeddingSine over an all-valid mask, as the official PositionEncodingSine2D computes it."""
    not_mask = torch.ones(b, h, w)
    y_embed = not_mask.cumsum(1)
    x_embed = not_mask.cumsum(2)
    y_embed = y_embed / (y_embed[:, -1:, :] + 1e-6) * 2 * math.pi
    x_embed = x_embed / (x_embed[:, :, -1:] + 1e-6) * 2 * math.pi
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32)
    dim_t = 10000 ** (2 * (dim_t // 2) / num_pos_feats)
    pos_x = x_embed[:, :, :, None] / dim_t
    pos_y = y_embed[:, :, :, None] / dim_t
    pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
    pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
    return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


def official_reference(sd, x, y, y_mask, d_model, nhead, ffn, layer_types):
    """The official Encoder.forward in eval mode: one concatenated sequence per pair, block attention masks."""
    feat_proj = nn.Conv2d(x.shape[1], d_model, 1)
    feat_proj.load_state_dict({"weight": sd["net.feat_proj.weight"], "bias": sd["net.feat_proj.bias"]})
    final = nn.Conv2d(d_model, 3, 1)
    final.load_state_dict({"weight": sd["net.final_linear.weight"], "bias": sd["net.final_linear.bias"]})
    fx, fy = feat_proj(x), feat_proj(y)
    b, c, h, w = fx.shape
    n = h * w
    x_mask = torch.zeros(b, n, dtype=torch.bool)
    y_m = y_mask.flatten(1)
    for blk, pair in enumerate(layer_types.split(",")):
        for slot, kind in zip((1, 2), pair):
            if kind == "N":
                continue
            name = "inner" if kind == "I" else "cross"
            prefix = f"net.encoder_blocks.{blk}.layer{slot}.{name}_encoder_layer."
            layer = nn.TransformerEncoderLayer(d_model, nhead, ffn, dropout=0.1, activation="relu").eval()
            layer.load_state_dict({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)})
            if kind == "I":
                pos = official_pos(b, h, w, d_model // 2)
                fx, fy = fx + 0.1 * pos, fy + 0.1 * pos
                src_mask = torch.ones(2 * n, 2 * n, dtype=torch.bool)
                src_mask[:n, :n] = False
                src_mask[n:, n:] = False
            else:
                src_mask = torch.zeros(2 * n, 2 * n, dtype=torch.bool)
                src_mask[:n, :n] = True
                src_mask[n:, n:] = True
            seq = torch.cat([fx.flatten(2).permute(2, 0, 1), fy.flatten(2).permute(2, 0, 1)], dim=0)
            out = layer(seq, src_mask=src_mask, src_key_padding_mask=torch.cat([x_mask, y_m], dim=1))
            fx = out[:n].permute(1, 2, 0).reshape(b, c, h, w)
            fy = out[n:].permute(1, 2, 0).reshape(b, c, h, w)
    ox = torch.sigmoid(final(fx)).clamp(1e-7, 1 - 1e-7)
    oy = torch.sigmoid(final(fy)).clamp(1e-7, 1 - 1e-7)
    return ox, oy


def make_official_encoder_sd(feat_dim, d_model, ffn, layer_types, seed=0):
    """A state dict with the official TransEncoder key names and random values."""
    g = torch.Generator().manual_seed(seed)
    sd = {"net.feat_proj.weight": torch.randn(d_model, feat_dim, 1, 1, generator=g) * 0.05,
          "net.feat_proj.bias": torch.randn(d_model, generator=g) * 0.05,
          "net.final_linear.weight": torch.randn(3, d_model, 1, 1, generator=g) * 0.1,
          "net.final_linear.bias": torch.randn(3, generator=g) * 0.1}
    ref = nn.TransformerEncoderLayer(d_model, 2, ffn)
    for blk, pair in enumerate(layer_types.split(",")):
        for slot, kind in zip((1, 2), pair):
            if kind == "N":
                continue
            name = "inner" if kind == "I" else "cross"
            for k, v in ref.state_dict().items():
                sd[f"net.encoder_blocks.{blk}.layer{slot}.{name}_encoder_layer.{k}"] = torch.randn(v.shape, generator=g) * 0.1 + (1.0 if "norm" in k and k.endswith("weight") else 0.0)
    return sd


def test_official_layout_reproduces_reference_formulas():
    d_model, nhead, ffn, _ = MODEL_SIZES["tiny"]
    feat_dim, types = 64, "IC,IC,IN"
    sd = make_official_encoder_sd(feat_dim, d_model, ffn, types)
    ours, got_types = official_to_ours(sd)
    assert got_types == types
    head = CrossImageTransformer("tiny", feat_dim=feat_dim, layer_types=got_types).eval()
    head.load_state_dict(ours, strict=True)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(2, feat_dim, 4, 4, generator=g), torch.randn(2, feat_dim, 4, 4, generator=g)
    pad = torch.zeros(2, 4, 4, dtype=torch.bool)
    pad[1, :2] = True
    with torch.no_grad():
        out = head(x, y, pad)
        ox, oy = official_reference(sd, x, y, pad, d_model, nhead, ffn, types)
    assert torch.allclose(out["mask0"], ox[:, 2], atol=1e-5)
    assert torch.allclose(out["mask1"], oy[:, 2], atol=1e-5)
    assert torch.allclose(out["flow01"], ox[:, :2].permute(0, 2, 3, 1), atol=1e-5)
    assert torch.allclose(out["flow10"], oy[:, :2].permute(0, 2, 3, 1), atol=1e-5)


def test_official_checkpoint_file_loads_as_model(tmp_path):
    from segswap.nets.resnet import SEGSWAP_SEQUENTIAL_NAMES, ResNet50Conv4
    d_model, nhead, ffn, _ = MODEL_SIZES["small"]
    enc = make_official_encoder_sd(1024, d_model, ffn, "IC,IC,IN", seed=3)
    torch.manual_seed(0)
    trunk = ResNet50Conv4()
    inv = {v: k for k, v in SEGSWAP_SEQUENTIAL_NAMES.items()}
    backbone_sd = {}
    for k, v in trunk.state_dict().items():
        head, _, rest = k.partition(".")
        backbone_sd[f"{inv[head]}.{rest}"] = v
    path = tmp_path / "hard_mining_neg5.pth"
    torch.save({"backbone": backbone_sd, "encoder": enc, "optimiser": {}}, path)
    model = load_model(path)
    assert model.head.layer_types == "IC,IC,IN" and model.head.d_model == 256
    img = torch.randint(0, 255, (1, 64, 64, 3), dtype=torch.uint8)
    with torch.no_grad():
        out = model(img, img)
        f = model.features(img)
        ox, oy = official_reference(enc, f, f, torch.zeros(1, 4, 4, dtype=torch.bool), d_model, nhead, ffn, "IC,IC,IN")
    assert torch.allclose(out["mask0"], ox[:, 2], atol=1e-5)
    # the backbone came from the file, not from a fresh random init
    assert torch.equal(model.backbone.conv1.weight, trunk.conv1.weight)


def test_official_loader_rejects_foreign_keys():
    with pytest.raises(KeyError, match="unexpected key"):
        official_to_ours({"net.feat_proj.weight": torch.zeros(1), "decoder.x": torch.zeros(1)})
