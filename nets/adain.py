"""AdaIN arbitrary style transfer (Huang & Belongie, ICCV 2017) in the public pytorch-AdaIN layout.

SegSwap stylises its generated pairs with AdaIN (paper §3.1; Table 3 shows it is critical). The network:

- encoder: the normalised VGG-19 up to relu4_1 (:mod:`segswap.nets.vgg`, ``vgg_normalised.pth``);
- AdaIN layer: ``t = σ_s · (f_c − μ_c) / σ_c + μ_s`` with per-channel mean and std over the spatial
  positions, std = sqrt(var + 1e-5) with the unbiased variance, exactly as pytorch-AdaIN's
  ``calc_mean_std``;
- decoder: 29-module ``nn.Sequential`` mirroring the encoder (reflection padding, nearest upsampling),
  keys ``{1,5,8,11,14,18,21,25,28}.{weight,bias}`` (``decoder.pth``);
- output: ``decoder(α·t + (1 − α)·f_c)``; α = 0 reconstructs the content.

Images are float RGB in [0, 1], ``[B, 3, H, W]``; the encoder's first 1x1 conv does the rest of the
preprocessing. Since AdaIN only needs the style's feature mean and std, :meth:`AdaIN.style_stats`
computes them once per style image so callers can cache them.
"""
from __future__ import annotations

import logging
import os

import torch
import torch.nn as nn

from segswap.nets.vgg import (
    RELU_SLICES,
    WeightsFileError,
    check_state_dict,
    load_vgg_encoder,
    read_state_dict,
)

log = logging.getLogger(__name__)

EPS = 1e-5
ENCODER_STRIDE = 8  # relu4_1 is after three 2x2 pools
# The decoder's conv layers in order: (in, out) channels, "U" for a 2x nearest upsampling.
_DECODER_LAYERS = [(512, 256), "U", (256, 256), (256, 256), (256, 256), (256, 128), "U",
                   (128, 128), (128, 64), "U", (64, 64), (64, 3)]
NUM_DECODER_MODULES = 29

__all__ = ["AdaIN", "WeightsFileError", "adain", "adain_with_stats", "build_decoder", "calc_mean_std",
           "load_adain", "load_decoder"]


def build_decoder() -> nn.Sequential:
    """The 29-module AdaIN decoder (random weights), module indices as in pytorch-AdaIN."""
    layers: list[nn.Module] = []
    for i, spec in enumerate(_DECODER_LAYERS):
        if spec == "U":
            layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
            continue
        layers += [nn.ReflectionPad2d(1), nn.Conv2d(spec[0], spec[1], kernel_size=3)]
        if i < len(_DECODER_LAYERS) - 1:  # no ReLU after the last conv: the output is the image
            layers.append(nn.ReLU(inplace=True))
    net = nn.Sequential(*layers)
    assert len(net) == NUM_DECODER_MODULES, len(net)
    return net


def calc_mean_std(feat: torch.Tensor, eps: float = EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample, per-channel mean and std over positions of ``[B, C, H, W]`` -> two ``[B, C, 1, 1]``."""
    if feat.ndim != 4:
        raise ValueError(f"expected features [B, C, H, W], got shape {tuple(feat.shape)}")
    b, c = feat.shape[:2]
    flat = feat.reshape(b, c, -1)
    if flat.shape[2] < 2:
        raise ValueError("features need at least 2 positions for a standard deviation (image too small)")
    std = (flat.var(dim=2) + eps).sqrt().view(b, c, 1, 1)
    mean = flat.mean(dim=2).view(b, c, 1, 1)
    return mean, std


def adain_with_stats(content_feat: torch.Tensor, style_mean: torch.Tensor, style_std: torch.Tensor) -> torch.Tensor:
    """Give ``content_feat`` [B,C,H,W] the per-channel ``style_mean``/``style_std`` ([B,C,1,1] or [C])."""
    c = content_feat.shape[1]
    style_mean = style_mean.reshape(-1, c, 1, 1)
    style_std = style_std.reshape(-1, c, 1, 1)
    content_mean, content_std = calc_mean_std(content_feat)
    return (content_feat - content_mean) / content_std * style_std + style_mean


def adain(content_feat: torch.Tensor, style_feat: torch.Tensor) -> torch.Tensor:
    """The AdaIN layer on two feature maps (batch sizes equal, or style batch 1)."""
    if content_feat.shape[1] != style_feat.shape[1]:
        raise ValueError(f"channel mismatch: content {tuple(content_feat.shape)} vs style {tuple(style_feat.shape)}")
    return adain_with_stats(content_feat, *calc_mean_std(style_feat))


class AdaIN(nn.Module):
    """Encoder (frozen, relu4_1) + decoder. ``forward(content, style, alpha)`` returns images.

    ``alpha`` is a float or a ``[B]`` tensor (one strength per image).
    """

    def __init__(self, encoder: nn.Sequential, decoder: nn.Sequential):
        super().__init__()
        if len(encoder) != RELU_SLICES["relu4_1"][1]:
            raise ValueError(f"encoder must be the normalised VGG sliced to relu4_1 ({RELU_SLICES['relu4_1'][1]} "
                             f"modules), got {len(encoder)}")
        self.encoder = encoder
        self.decoder = decoder
        self._stages = [encoder[a:b] for a, b in RELU_SLICES.values()]  # views sharing the same modules
        for p in encoder.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()  # the encoder is never trained
        return self

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] in [0,1] -> relu4_1 features [B,512,ceil(H/8),ceil(W/8)]."""
        return self.encoder(images)

    def encode_with_intermediate(self, images: torch.Tensor) -> list[torch.Tensor]:
        """relu1_1, relu2_1, relu3_1, relu4_1 features (the style loss's layers)."""
        feats = []
        x = images
        for stage in self._stages:
            x = stage(x)
            feats.append(x)
        return feats

    @torch.no_grad()
    def style_stats(self, style: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std of the style images' relu4_1 features, ``[B, 512]`` each (cacheable)."""
        mean, std = calc_mean_std(self.encode(style))
        return mean.flatten(1), std.flatten(1)

    def decode_mixed(self, content_feat: torch.Tensor, style_mean: torch.Tensor, style_std: torch.Tensor,
                     alpha: float | torch.Tensor = 1.0) -> torch.Tensor:
        """decoder(α·AdaIN(f_c, style stats) + (1−α)·f_c)."""
        t = adain_with_stats(content_feat, style_mean, style_std)
        alpha = torch.as_tensor(alpha, dtype=t.dtype, device=t.device).reshape(-1, 1, 1, 1)
        return self.decoder(alpha * t + (1 - alpha) * content_feat)

    def stylise_with_stats(self, content: torch.Tensor, style_mean: torch.Tensor, style_std: torch.Tensor,
                           alpha: float | torch.Tensor = 1.0) -> torch.Tensor:
        """Stylised images [B,3,H,W] (not clamped) of the content images' size."""
        h, w = content.shape[-2:]
        out = self.decode_mixed(self.encode(content), style_mean, style_std, alpha)
        # ceil-mode pools make the decoder's output up to 7 px larger when H or W is not a multiple of 8.
        return out[..., :h, :w]

    def forward(self, content: torch.Tensor, style: torch.Tensor, alpha: float | torch.Tensor = 1.0) -> torch.Tensor:
        mean, std = calc_mean_std(self.encode(style))
        return self.stylise_with_stats(content, mean, std, alpha)


def load_decoder(path: str | os.PathLike) -> nn.Sequential:
    """The decoder with weights from ``decoder.pth`` (a pytorch-AdaIN ``state_dict``), strictly checked."""
    path = os.fspath(path)
    sd = read_state_dict(path, "AdaIN decoder (decoder.pth)")
    decoder = build_decoder()
    check_state_dict(sd, decoder.state_dict(), path, "AdaIN decoder (decoder.pth)")
    decoder.load_state_dict(sd)
    log.info("loaded AdaIN decoder from %s", path)
    return decoder


def load_adain(vgg_path: str | os.PathLike, decoder_path: str | os.PathLike | None) -> AdaIN:
    """AdaIN from ``vgg_normalised.pth`` and ``decoder.pth``; ``decoder_path=None`` gives a random decoder
    (only for training from scratch and timing)."""
    decoder = load_decoder(decoder_path) if decoder_path is not None else build_decoder()
    return AdaIN(load_vgg_encoder(vgg_path), decoder)
