"""Checkpoints: our training checkpoints and the official SegSwap ones, loaded without unpickling.

Ours (``last.pth``, ``ckpt-00010000.pth``)::

    {"format": "segswap-train", "version": 1, "step": int, "config": resolved config (plain dict),
     "model": CoSegModel state dict (backbone.* and head.*), "optimizer": …, "scheduler": …,
     "contrast": {"head": …, "loss": …} (only when pixel contrast is on)}

The backbone is stored too (it is frozen, but a checkpoint must predict on its own, without the
weights file it was trained from).

Official (``hard_mining_neg5.pth``)::

    {"backbone": nn.Sequential(conv1, bn1, relu, maxpool, layer1, layer2, layer3) state dict,
     "encoder": TransEncoder state dict (net.feat_proj…, net.encoder_blocks.…, net.final_linear…),
     "optimiser": …}

Everything is read with ``torch.load(weights_only=True)``; files are written to a temporary name and
renamed, so a crash never leaves a half-written ``last.pth``.
"""
from __future__ import annotations

import glob
import logging
import os
import re

import torch

from segswap.core.atomic import atomic_save
from segswap.nets.backbones import bare_backbone
from segswap.nets.resnet import SEGSWAP_SEQUENTIAL_NAMES, ResNet50Conv4
from segswap.train.model import CoSegModel, build_head

log = logging.getLogger(__name__)

FORMAT_NAME = "segswap-train"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file."""


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        # Nothing partial is left, under the final name or the temporary one.
        atomic_save(path, lambda tmp: torch.save({"format": FORMAT_NAME, "version": FORMAT_VERSION, **state}, tmp),
                    fsync=True)
    except (OSError, RuntimeError) as e:
        # torch reports a full disk as RuntimeError ("... file write failed"): name the file
        raise CheckpointError(f"{path}: cannot save checkpoint ({type(e).__name__}: {e})") from e


def read_checkpoint(path: str | os.PathLike, device="cpu") -> dict:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        obj = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds; name the file
        raise CheckpointError(f"{path}: cannot read as a torch checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not a checkpoint dictionary")
    return obj


def checkpoint_kind(obj: dict) -> str:
    if obj.get("format") == FORMAT_NAME:
        return "segswap-train"
    if "encoder" in obj and "backbone" in obj:
        return "official"
    raise CheckpointError("neither a segswap-train checkpoint ({'format', 'model', ...}) nor an official "
                          "SegSwap one ({'backbone', 'encoder'})")


def official_backbone_to_ours(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        head, _, rest = k.partition(".")
        if head not in SEGSWAP_SEQUENTIAL_NAMES:
            raise CheckpointError(f"unexpected key {k!r} in the official backbone Sequential")
        out[f"{SEGSWAP_SEQUENTIAL_NAMES[head]}.{rest}"] = v
    return out


def official_head(encoder_sd: dict):
    """(CrossImageTransformer with the official weights, its transformer config)."""
    from segswap.train.transformer import CrossImageTransformer, infer_official_size, official_to_ours

    sd, layer_types = official_to_ours(encoder_sd)
    size = infer_official_size(sd, len(layer_types.split(",")))
    head = CrossImageTransformer(model=size, layer_types=layer_types, feat_dim=sd["feat_proj.weight"].shape[1])
    head.load_state_dict(sd, strict=True)
    return head, {"model": size, "layer_types": layer_types}


def _official_backbone(sd: dict, path: str) -> ResNet50Conv4:
    """The official checkpoint's ResNet-50 trunk, frozen (``bare_backbone``) with its weights loaded."""
    net = bare_backbone("resnet50")
    missing, unexpected = net.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise CheckpointError(f"{path}: backbone weights do not fit ResNet-50 conv4 "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return net


def load_model(path: str | os.PathLike, device="cpu") -> CoSegModel:
    """A ready-to-run model (eval mode) from one of our checkpoints or an official SegSwap one."""
    path = os.fspath(path)
    obj = read_checkpoint(path)
    try:
        kind = checkpoint_kind(obj)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if kind == "official":
        try:
            head, _ = official_head(obj["encoder"])
            backbone = _official_backbone(official_backbone_to_ours(obj["backbone"]), path)
        except (KeyError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path}: official checkpoint does not load: {e}") from e
        model = CoSegModel(backbone, head)
    else:
        mcfg = obj["config"]["model"]
        # Checkpoints from before the backbone option are ResNet-50 ones.
        try:
            backbone = bare_backbone(mcfg.get("backbone", "resnet50"))
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from None
        head = build_head(mcfg["arch"], mcfg.get("transformer"), mcfg.get("ncnet"), feat_dim=backbone.channels)
        model = CoSegModel(backbone, head)
        try:
            model.load_state_dict(obj["model"], strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"{path}: weights do not match the model in its own config: {e}") from e
    model.config = obj.get("config")  # image size etc. for apps; None for official checkpoints
    return model.to(device).eval()


def init_weights(model: CoSegModel, path: str | os.PathLike, replace_backbone: bool) -> str:
    """``--init``: copy head (and, if asked, backbone) weights from a checkpoint of either kind."""
    path = os.fspath(path)
    obj = read_checkpoint(path)
    kind = checkpoint_kind(obj)
    if kind == "official":
        head, tcfg = official_head(obj["encoder"])
        try:
            model.head.load_state_dict(head.state_dict(), strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"{path}: the official encoder is a {tcfg['model']!r} transformer with layers "
                                  f"{tcfg['layer_types']!r}; set the same --model / layer_types ({e})") from e
        if replace_backbone:
            model.backbone.load_state_dict(official_backbone_to_ours(obj["backbone"]), strict=False)
    else:
        sd = obj["model"]
        head_sd = {k[len("head."):]: v for k, v in sd.items() if k.startswith("head.")}
        try:
            model.head.load_state_dict(head_sd, strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"{path}: head weights do not fit the configured model: {e}") from e
        if replace_backbone:
            model.backbone.load_state_dict({k[len("backbone."):]: v for k, v in sd.items()
                                            if k.startswith("backbone.")}, strict=True)
    log.info("initialised %s from %s checkpoint %s%s", "head and backbone" if replace_backbone else "head",
             kind, path, "" if replace_backbone else " (backbone kept)")
    return kind


def read_resume_checkpoint(out_dir: str, last_name: str, ckpt_glob: str, device="cpu") -> tuple[str, dict]:
    """(path, checkpoint) to resume from: ``last_name``, or when it cannot be read (a truncated copy, a
    full disk at the wrong moment) the newest intact numbered checkpoint beside it, with a warning
    naming both. No intact one: a :class:`CheckpointError` saying so."""
    last = os.path.join(out_dir, last_name)
    try:
        return last, _usable(read_checkpoint(last, device=device), last)
    except CheckpointError as e:
        damage = e

    def number(path):
        found = re.findall(r"\d+", os.path.basename(path))
        return int(found[-1]) if found else -1

    for path in sorted(glob.glob(os.path.join(out_dir, ckpt_glob)), key=number, reverse=True):
        try:
            ck = _usable(read_checkpoint(path, device=device), path)
        except CheckpointError as e:
            log.warning("%s is damaged too: %s", path, e)
            continue
        log.warning("%s cannot be read (%s); resuming from %s (step %d) instead", last, damage, path, ck["step"])
        return path, ck
    raise CheckpointError(f"{damage} and no intact {ckpt_glob} beside it; start afresh with --no-resume "
                          f"(or another --out)") from None


def _usable(obj: dict, path: str) -> dict:
    missing = [k for k in ("step", "model", "optimizer", "scheduler") if k not in obj]
    if obj.get("format") != FORMAT_NAME or missing:
        raise CheckpointError(f"{path}: not a complete segswap-train checkpoint (missing {missing or ['format']})")
    return obj

