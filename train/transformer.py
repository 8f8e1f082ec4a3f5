"""The cross-image transformer (paper §3.2), weight-compatible with the official SegSwap encoder.

Architecture (official "small"): a 1x1 conv projects each image's conv4 features (1024) to ``d_model``,
followed by Dropout2d; then blocks of two post-norm ``nn.TransformerEncoderLayer`` s, each either

- ``I`` (inner): attention within each image; its input, residual included, is ``feat + 0.1 * pos``
  (DETR sine encoding, ``d_model / 2`` features per axis, temperature 10000, normalised, scale 2π);
- ``C`` (cross): each image attends only to the other image, no positional encoding;
- ``N``: nothing.

The official "small" stacks ``IC IC IN``. A 1x1 conv maps the last tokens to 3 channels (x, y, mask),
then sigmoid and a clamp to [1e-7, 1 - 1e-7].

The official code runs both images as one concatenated sequence with a block attention mask; here
each layer calls its attention module on the two images separately (inner: each image with itself;
cross: queries of one image, keys/values of the other). With the masked keys' weights exactly zero the
two are the same function, while this costs a quarter of the attention FLOPs and memory;
``tests/test_train_transformer.py`` checks the equality against the concatenated formulation.

Official checkpoints (``{'encoder': state_dict}``, keys ``net.feat_proj.weight``,
``net.encoder_blocks.0.layer1.inner_encoder_layer.self_attn.in_proj_weight``, …) load through
:func:`official_to_ours`.
"""
from __future__ import annotations

import math
import re

import torch
from torch import nn

# name: (d_model, nhead, dim_feedforward, number of blocks); the official TransEncoder sizes.
MODEL_SIZES = {
    "tiny": (128, 2, 256, 3),
    "small": (256, 2, 256, 3),
    "base": (512, 8, 2048, 3),
    "large": (512, 8, 2048, 6),
}
OUTPUT_EPS = 1e-7


def default_layer_types(num_blocks: int) -> str:
    """Alternate inner/cross, the last block inner only: 3 blocks -> "IC,IC,IN" (the official default)."""
    return ",".join(["IC"] * (num_blocks - 1) + ["IN"])


def sine_position_encoding(h: int, w: int, num_pos_feats: int, device=None, dtype=torch.float32,
                           temperature: float = 10000.0) -> torch.Tensor:
    """DETR's normalised 2D sine encoding: [2 * num_pos_feats, h, w] (y features first, then x)."""
    eps, scale = 1e-6, 2 * math.pi
    y = torch.arange(1, h + 1, dtype=torch.float32, device=device)[:, None].expand(h, w)
    x = torch.arange(1, w + 1, dtype=torch.float32, device=device)[None, :].expand(h, w)
    y = y / (h + eps) * scale
    x = x / (w + eps) * scale
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)
    px = x[:, :, None] / dim_t
    py = y[:, :, None] / dim_t
    px = torch.stack((px[:, :, 0::2].sin(), px[:, :, 1::2].cos()), dim=3).flatten(2)
    py = torch.stack((py[:, :, 0::2].sin(), py[:, :, 1::2].cos()), dim=3).flatten(2)
    return torch.cat((py, px), dim=2).permute(2, 0, 1).to(dtype)


class AttentionLayer(nn.Module):
    """One post-norm encoder layer applied to a pair of token sets, inner (``I``) or cross (``C``)."""

    def __init__(self, kind: str, d_model: int, nhead: int, dim_feedforward: int, dropout: float,
                 activation: str, pos_weight: float, feat_weight: float):
        super().__init__()
        if kind not in ("I", "C"):
            raise ValueError(f"layer kind must be 'I' or 'C', got {kind!r}")
        self.kind = kind
        self.pos_weight = pos_weight
        self.feat_weight = feat_weight
        self.encoder_layer = nn.TransformerEncoderLayer(
            d_model=d_model, nhead=nhead, dim_feedforward=dim_feedforward, dropout=dropout,
            activation=activation, batch_first=True)

    def _block(self, q: torch.Tensor, kv: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
        # nn.TransformerEncoderLayer's post-norm forward, with keys/values from `kv`.
        m = self.encoder_layer
        sa = m.self_attn(q, kv, kv, key_padding_mask=pad, need_weights=False)[0]
        x = m.norm1(q + m.dropout1(sa))
        ff = m.linear2(m.dropout(m.activation(m.linear1(x))))
        return m.norm2(x + m.dropout2(ff))

    def forward(self, x0, x1, pad0, pad1):
        """x*: [B, D, h, w]; pad*: [B, h*w] bool (True = ignored as a key) or None."""
        b, d, h0, w0 = x0.shape
        _, _, h1, w1 = x1.shape
        if self.kind == "I":
            x0 = self.feat_weight * x0 + self.pos_weight * sine_position_encoding(h0, w0, d // 2, x0.device, x0.dtype)
            x1 = self.feat_weight * x1 + self.pos_weight * sine_position_encoding(h1, w1, d // 2, x1.device, x1.dtype)
        t0 = x0.flatten(2).transpose(1, 2)
        t1 = x1.flatten(2).transpose(1, 2)
        if self.kind == "I":
            o0, o1 = self._block(t0, t0, pad0), self._block(t1, t1, pad1)
        else:
            o0, o1 = self._block(t0, t1, pad1), self._block(t1, t0, pad0)
        return (o0.transpose(1, 2).reshape(b, d, h0, w0), o1.transpose(1, 2).reshape(b, d, h1, w1))


class CrossImageTransformer(nn.Module):
    """Co-segmentation head on conv4 features (docs/CONTRACTS.md, "Co-segmentation heads")."""

    def __init__(self, model: str = "small", feat_dim: int = 1024, layer_types: str | None = None,
                 dropout: float = 0.1, drop_feat: float = 0.1, activation: str = "relu",
                 pos_weight: float = 0.1, feat_weight: float = 1.0):
        super().__init__()
        if model not in MODEL_SIZES:
            raise ValueError(f"unknown transformer size {model!r}; choose from {sorted(MODEL_SIZES)}")
        d_model, nhead, dim_ff, num_blocks = MODEL_SIZES[model]
        layer_types = layer_types or default_layer_types(num_blocks)
        blocks = [b.strip() for b in layer_types.split(",")]
        if len(blocks) != num_blocks or any(len(b) != 2 or set(b) - set("ICN") for b in blocks):
            raise ValueError(f"layer_types {layer_types!r}: want {num_blocks} comma-separated pairs of I/C/N "
                             f"for model {model!r} (e.g. {default_layer_types(num_blocks)!r})")
        self.layer_types = ",".join(blocks)
        self.d_model = d_model
        self.feat_proj = nn.Conv2d(feat_dim, d_model, kernel_size=1)
        self.drop_feat = nn.Dropout2d(p=drop_feat)
        self.blocks = nn.ModuleList()
        for block in blocks:
            layers = nn.ModuleDict()
            for slot, kind in zip(("first", "second"), block):
                if kind != "N":
                    layers[slot] = AttentionLayer(kind, d_model, nhead, dim_ff, dropout, activation,
                                                  pos_weight, feat_weight)
            self.blocks.append(layers)
        self.final_linear = nn.Conv2d(d_model, 3, kernel_size=1)

    def forward(self, feat0: torch.Tensor, feat1: torch.Tensor, pad1: torch.Tensor | None = None,
                return_tokens: bool = False) -> dict:
        """feat*: [B,C,h,w] L2-normalised conv4 features; pad1: [B,h,w] bool, image 1 cells hidden as keys.

        Returns mask0/mask1 [B,h,w] in (0,1), flow01/flow10 [B,h,w,2] normalised (x, y) in the other
        image, and with ``return_tokens`` tokens0/tokens1 [B,D,h,w] (the last hidden features).
        """
        x0 = self.drop_feat(self.feat_proj(feat0))
        x1 = self.drop_feat(self.feat_proj(feat1))
        if pad1 is not None:
            pad1 = pad1.flatten(1).bool()
            # A query whose every key is hidden would get NaN attention: never hide all of an image.
            pad1 = pad1 & ~pad1.all(dim=1, keepdim=True)
        for block in self.blocks:
            for layer in block.values():
                x0, x1 = layer(x0, x1, None, pad1)
        out = {}
        for name, x, other in (("0", x0, "1"), ("1", x1, "0")):
            y = torch.sigmoid(self.final_linear(x)).clamp(OUTPUT_EPS, 1 - OUTPUT_EPS)
            out["mask" + name] = y[:, 2]
            out["flow" + name + other] = y[:, :2].permute(0, 2, 3, 1)
            if return_tokens:
                out["tokens" + name] = x
        return out


_OFFICIAL_LAYER = re.compile(r"^net\.encoder_blocks\.(\d+)\.layer([12])\.(inner|cross)_encoder_layer\.(.+)$")


def official_to_ours(encoder_sd: dict) -> tuple[dict, str]:
    """Map an official ``TransEncoder`` state dict to ours; returns (state dict, layer types string).

    The layer types are read off the keys (a block slot with no parameters is ``N``), so checkpoints
    trained with a non-default ``--layer-type`` load too.
    """
    out, kinds = {}, {}
    for k, v in encoder_sd.items():
        if k.startswith("module."):
            k = k[len("module."):]
        m = _OFFICIAL_LAYER.match(k)
        if m:
            block, slot, kind, rest = int(m.group(1)), int(m.group(2)), m.group(3), m.group(4)
            kinds[(block, slot)] = "I" if kind == "inner" else "C"
            out[f"blocks.{block}.{'first' if slot == 1 else 'second'}.encoder_layer.{rest}"] = v
        elif k.startswith("net.") and k[4:].split(".")[0] in ("feat_proj", "final_linear"):
            out[k[4:]] = v
        else:
            raise KeyError(f"unexpected key {k!r} in an official SegSwap encoder state dict")
    if not kinds:
        raise KeyError("no transformer layers found in the official encoder state dict")
    num_blocks = max(b for b, _ in kinds) + 1
    types = ",".join(kinds.get((b, 1), "N") + kinds.get((b, 2), "N") for b in range(num_blocks))
    return out, types


def infer_official_size(sd: dict, num_blocks: int) -> str:
    """The model size name from ours-format weights (d_model, FFN width, number of blocks)."""
    d_model = sd["feat_proj.weight"].shape[0]
    ffn = next(v.shape[0] for k, v in sd.items() if k.endswith("linear1.weight"))
    for name, (d, _, f, n) in MODEL_SIZES.items():
        if (d, f, n) == (d_model, ffn, num_blocks):
            return name
    raise ValueError(f"no model size has d_model={d_model}, FFN={ffn}, {num_blocks} blocks")
