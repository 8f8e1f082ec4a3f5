"""``segswap-gen`` options: one parser, one table of defaults, YAML config files, validation.

Precedence: the defaults below < ``--config FILE`` (YAML, keys spelled like the flags with ``_``) <
flags given on the command line. Unknown keys in a config file are errors, not silently ignored.

The resolved config is split in two when it is recorded (see :func:`dataset_config`): the keys that
decide *what* is generated (seed, segments, renderer and style settings) and the keys that only
decide *how* this invocation runs (output folder, workers, Ray address, which shards). Every part of
a dataset must agree on the first group; the second may differ between parts (a SLURM array, a
resumed run on another machine).
"""
from __future__ import annotations

import argparse
import os
import re

from segswap.core.cli import WORKERS_HELP, add_version, hide_rarely_used
from segswap.core.config import ConfigError, load_config, set_path
from segswap.nets.device import available_cpus
from segswap.nets.magenta import ENGINES as STYLE_ENGINES
from segswap.pipeline.blend import BLEND_METHODS, DEFAULT_BLEND
from segswap.pipeline.style import STYLE_CHOICES

SEGMENT_SOURCES = ("coco", "unsupervised")
BLEND_CHOICES = tuple(m for m in BLEND_METHODS if m != "direct")  # the direct solve is the tests' reference

# The default run (`segswap-gen --out data/pairs`) on the embedded corpus: 8 shards x 16 pairs at
# 480x480 takes about two minutes on 2 cores (benchmarks/bench_gen.py measures the rate) and is
# enough to smoke-test training; real runs raise --num-shards.
DEFAULTS = {
    # what is generated
    "segments": "unsupervised",     # coco: --coco-annotations; unsupervised: extracted from --images
    "images": None,                 # image folder (default: the embedded sample photos)
    "coco_annotations": None,       # COCO instances json (needed by --segments coco)
    "unsupervised": {},             # options of segswap.segments.unsupervised.run_extraction
    "min_area": 0.0,                # segment filters of SegmentIndex.from_coco (pixels)
    "min_segment_side": 0.0,
    "categories": None,             # list of category ids or names to keep (None: all)
    "seed": 0,
    "pairs_per_shard": 16,
    "size": 480,
    "p_two_object": 0.5,
    "min_cells": 9,
    "flow_stride": 4,
    "blend": DEFAULT_BLEND,
    "render": {},                   # further keyword options of the renderer (geometry ranges, ...)
    "max_attempts_per_pair": 20,    # give a shard up to pairs_per_shard x this many draws
    "style": "magenta",             # the paper finds style critical (Table 3); no download needed
    "style_images": None,
    "adain_weights": None,
    "style_strength": None,         # "LO:HI" (default: the styliser's own)
    "style_batch": 8,               # pairs rendered, then stylised together
    "style_device": None,           # "cpu", "cuda", "cuda:N" (None: the styliser's own default)
    "style_scale": None,            # magenta built-in styles: the scale the network runs at (None: 2/3)
    "style_engine": None,           # magenta built-in styles: auto, onnxruntime or openvino (None: auto)
    # how this invocation runs
    "out": "data/pairs",
    "num_shards": 8,
    "shard_range": None,            # "A:B": shards A..B-1 only
    "task_index": None,             # with num_tasks: this task's contiguous slice of the shards
    "num_tasks": None,
    "workers": None,                # Ray worker processes (None: the CPUs this process may use); 0 = in-process
    "no_ray": False,
    "ray_address": None,
    "overwrite": False,
    "verify_existing": True,        # resume: md5 (or full verify) of finished shards before keeping them
}
RUN_KEYS = ("out", "num_shards", "shard_range", "task_index", "num_tasks", "workers", "no_ray",
            "ray_address", "overwrite", "verify_existing")
DICT_KEYS = ("unsupervised", "render")
PATH_KEYS = ("images", "coco_annotations", "style_images", "adain_weights")


def get_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The one definition of the options; wrappers (SLURM/Ray launchers) reuse it with add_help=False.

    Defaults are suppressed here so that only flags actually given override the config file; the
    real defaults are :data:`DEFAULTS`.
    """
    p = argparse.ArgumentParser(prog="segswap-gen", add_help=add_help, argument_default=argparse.SUPPRESS,
                                description="Generate SegSwap training pairs into WebDataset shards.")
    src = p.add_argument_group("segments and images")
    src.add_argument("--segments", choices=SEGMENT_SOURCES,
                     help=f"segment source (default {DEFAULTS['segments']}: extracted from --images without labels)")
    src.add_argument("--images", metavar="DIR", help="image folder: sources and backgrounds (default: embedded photos)")
    src.add_argument("--coco-annotations", metavar="FILE", help="COCO instances json for --segments coco")
    src.add_argument("--min-area", type=float, help="drop segments smaller than this many pixels")
    src.add_argument("--min-segment-side", type=float, help="drop segments whose bbox is thinner than this (px)")
    src.add_argument("--categories", nargs="+", metavar="CAT", help="keep only these category ids or names")

    gen = p.add_argument_group("pairs")
    gen.add_argument("--seed", type=int, help=f"root seed (default {DEFAULTS['seed']})")
    gen.add_argument("--pairs-per-shard", type=int, metavar="N", help=f"default {DEFAULTS['pairs_per_shard']}")
    gen.add_argument("--size", type=int, help=f"image side in pixels, multiple of 16 (default {DEFAULTS['size']})")
    gen.add_argument("--p-two-object", type=float, metavar="P", help=f"probability of a two-object pair (default {DEFAULTS['p_two_object']})")
    gen.add_argument("--min-cells", type=int, metavar="N", help=f"drop pairs whose masks cover fewer 16-px cells (default {DEFAULTS['min_cells']})")
    gen.add_argument("--flow-stride", type=int, metavar="G", help=f"pixels per stored correspondence cell (default {DEFAULTS['flow_stride']})")
    gen.add_argument("--blend", choices=BLEND_CHOICES, help=f"default {DEFAULTS['blend']}")
    gen.add_argument("--max-attempts-per-pair", type=int, metavar="N", help=f"draw budget per pair (default {DEFAULTS['max_attempts_per_pair']})")

    sty = p.add_argument_group("style")
    sty.add_argument("--style", choices=STYLE_CHOICES, help=f"default {DEFAULTS['style']}")
    sty.add_argument("--style-images", metavar="DIR", help="paintings to take styles from")
    sty.add_argument("--adain-weights", metavar="DIR", help="folder with vgg_normalised.pth and decoder.pth")
    sty.add_argument("--style-strength", metavar="LO:HI", help="style strength drawn uniformly in [LO, HI)")
    sty.add_argument("--style-batch", type=int, metavar="N", help=f"pairs stylised together (default {DEFAULTS['style_batch']})")
    sty.add_argument("--style-device", metavar="DEV", help="where the styliser runs: adain cpu, auto, cuda or cuda:N "
                     "(default auto: CUDA when there is one), magenta cpu or cuda (default cpu)")
    sty.add_argument("--style-scale", type=float, metavar="S",
                     help="magenta's built-in styles: run the network on the image scaled by S, 0 < S <= 1 (default "
                          "2/3; its cost goes with S^2, its strokes grow as 1/S)")
    sty.add_argument("--style-engine", choices=STYLE_ENGINES, help="magenta's built-in styles: what runs the network "
                     "(default auto: openvino in bfloat16 on a CPU that computes it natively, 0.45x the CPU time, "
                     "else onnxruntime in float32)")

    run = p.add_argument_group("running")
    run.add_argument("--out", metavar="DIR", help=f"output folder (default {DEFAULTS['out']})")
    run.add_argument("--num-shards", type=int, metavar="N", help=f"shards in the whole dataset (default {DEFAULTS['num_shards']})")
    run.add_argument("--shard-range", metavar="A:B", help="generate shards A..B-1 only (SLURM arrays, several machines)")
    run.add_argument("--task-index", type=int, metavar="I", help="with --num-tasks: generate this task's slice")
    run.add_argument("--num-tasks", type=int, metavar="N", help="split the shards into N contiguous slices")
    run.add_argument("--workers", type=int, metavar="N", help=WORKERS_HELP + "; Ray processes")
    run.add_argument("--no-ray", action="store_true", help="run in this process (same as --workers 0)")
    run.add_argument("--ray-address", metavar="ADDR", help="join this Ray cluster (default: $RAY_ADDRESS, else a local one)")
    run.add_argument("--overwrite", action="store_true", help="delete the selected shards and start over (default: resume)")
    run.add_argument("--no-verify-existing", dest="verify_existing", action="store_false",
                     help="on resume keep finished shards after a size check only (default: md5 against "
                          "the record, or a full verification when there is none)")
    # The extractor's own flags (--features, --box-quantile, ...), shared with segswap-segments; they
    # land in cfg["unsupervised"].
    from segswap.segments.cli import add_extraction_arguments

    add_extraction_arguments(p)
    p.set_defaults(features=None)  # unset unless given, so a config file's `unsupervised: {features}` holds
    p.add_argument("--config", metavar="FILE", help="YAML file of options (flags override it)")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    add_version(p)
    hide_rarely_used(p, "unsupervised segment extraction")
    return p


def extraction_keys() -> list[str]:
    """Options of the unsupervised extractor (``unsupervised:`` in YAML, flags on the command line)."""
    import dataclasses

    from segswap.segments.params import ExtractionParams

    return ["features", "chunk_size", *(f.name for f in dataclasses.fields(ExtractionParams))]


def parse_range(text: str, what: str = "--shard-range") -> tuple[float, float] | tuple[int, int]:
    try:
        lo, hi = str(text).split(":")
        return lo, hi
    except ValueError as e:
        raise ConfigError(f"{what} must look like A:B, got {text!r}") from e


def resolve(args: dict) -> dict:
    """Merge defaults, the YAML file named by ``args["config"]`` and the flags; validate."""
    args = dict(args)
    for k in ("verbose", "quiet", "debug"):
        args.pop(k, None)
    config_file = args.pop("config", None)
    cfg = load_config(DEFAULTS, config_file, open_sections={(k,) for k in DICT_KEYS})
    extraction = {k: args.pop(k) for k in extraction_keys() if k in args}
    cfg["unsupervised"] = {**(cfg["unsupervised"] or {}), **{k: v for k, v in extraction.items() if v is not None}}
    for key, value in args.items():  # flags given (argparse suppresses the others), None included
        set_path(cfg, key, value)
    return validate(cfg, source=config_file or "options")


def validate(cfg: dict, source: str = "options") -> dict:
    """Check types and ranges; normalise ``style_strength`` to [lo, hi] and ``shard_range`` to [a, b]."""
    def fail(key, msg):
        raise ConfigError(f"{source}: {key}: {msg}")

    unknown = sorted(set(cfg) - set(DEFAULTS))
    if unknown:
        fail(unknown[0], f"unknown key(s) {unknown}")
    for key in ("seed", "pairs_per_shard", "size", "min_cells", "flow_stride", "max_attempts_per_pair",
                "style_batch", "num_shards"):
        if not isinstance(cfg[key], int) or isinstance(cfg[key], bool):
            fail(key, f"must be an integer, got {cfg[key]!r}")
    if cfg["seed"] < 0:
        fail("seed", "must be >= 0")
    for key in ("pairs_per_shard", "max_attempts_per_pair", "style_batch", "flow_stride"):
        if cfg[key] < 1:
            fail(key, f"must be >= 1, got {cfg[key]}")
    if cfg["num_shards"] < 0:
        fail("num_shards", "must be >= 0")
    if cfg["size"] < 32 or cfg["size"] % 16:
        fail("size", f"must be a multiple of 16 and >= 32, got {cfg['size']}")
    if cfg["size"] % cfg["flow_stride"]:
        fail("flow_stride", f"{cfg['flow_stride']} does not divide size {cfg['size']}")
    if not 0.0 <= float(cfg["p_two_object"]) <= 1.0:
        fail("p_two_object", f"must be in [0, 1], got {cfg['p_two_object']}")
    if cfg["segments"] not in SEGMENT_SOURCES:
        fail("segments", f"choose one of {SEGMENT_SOURCES}, got {cfg['segments']!r}")
    if cfg["blend"] not in BLEND_CHOICES:
        fail("blend", f"choose one of {BLEND_CHOICES}, got {cfg['blend']!r}")
    if cfg["style"] not in STYLE_CHOICES:
        fail("style", f"choose one of {STYLE_CHOICES}, got {cfg['style']!r}")
    device = cfg["style_device"]
    if device is not None and not (isinstance(device, str) and re.fullmatch(r"cpu|auto|cuda(:\d+)?", device)):
        fail("style_device", f"must be cpu, auto, cuda or cuda:N, got {device!r}")
    if device is not None and cfg["style"] == "none":
        fail("style_device", "--style none runs no styliser; drop --style-device or choose a style")
    if device is not None and cfg["style"] == "magenta" and device not in ("cpu", "cuda"):
        fail("style_device", f"--style magenta runs on cpu or cuda, got {device!r}")
    scale = cfg["style_scale"]
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale <= 1:
            fail("style_scale", f"must be a number in (0, 1], got {scale!r}")
        if cfg["style"] != "magenta" or cfg["style_images"]:
            fail("style_scale", "sets the scale of --style magenta's built-in styles (the style-image "
                                "transformer runs at its fixed 384 px, AdaIN at full size); drop it or use them")
    engine = cfg["style_engine"]
    if engine is not None:
        if engine not in STYLE_ENGINES:
            fail("style_engine", f"choose one of {STYLE_ENGINES}, got {engine!r}")
        if cfg["style"] != "magenta" or cfg["style_images"]:
            fail("style_engine", "sets what runs --style magenta's built-in styles (the style-image transformer "
                                 "and AdaIN have one engine each); drop it or use them")
        if engine == "openvino" and cfg["style_device"] == "cuda":
            fail("style_engine", "openvino runs on the CPU; with --style-device cuda use onnxruntime")
    for key in DICT_KEYS:
        if cfg[key] is None:
            cfg[key] = {}
        if not isinstance(cfg[key], dict):
            fail(key, "must be a mapping of option: value")
    unknown = sorted(set(cfg["unsupervised"]) - set(extraction_keys()))
    if unknown:
        fail("unsupervised", f"unknown key(s) {unknown}; known: {extraction_keys()}")
    if cfg["coco_annotations"] and cfg["segments"] != "coco":
        fail("coco_annotations", "is only used with --segments coco")
    if cfg["style_strength"] is not None:
        s = cfg["style_strength"]
        lo, hi = parse_range(s, "--style-strength") if isinstance(s, str) else (s if len(s) == 2 else (None, None))
        try:
            lo, hi = float(lo), float(hi)
        except (TypeError, ValueError):
            fail("style_strength", f"must be LO:HI with numbers, got {s!r}")
        if not 0.0 <= lo <= hi <= 1.0:
            fail("style_strength", f"need 0 <= LO <= HI <= 1, got {lo}:{hi}")
        cfg["style_strength"] = [lo, hi]
    if cfg["categories"] is not None:
        if not isinstance(cfg["categories"], (list, tuple)):
            fail("categories", "must be a list of ids or names")
        cfg["categories"] = [int(c) if isinstance(c, str) and c.isdigit() else c for c in cfg["categories"]]
    # Absolute paths: the recorded config must mean the same files whatever folder a rerun starts in.
    for key in PATH_KEYS:
        if cfg[key] is not None:
            cfg[key] = os.path.abspath(os.path.expanduser(str(cfg[key])))
    if cfg["no_ray"]:
        cfg["workers"] = 0
    if cfg["workers"] is None:
        cfg["workers"] = available_cpus()
    if not isinstance(cfg["workers"], int) or cfg["workers"] < 0:
        fail("workers", f"must be an integer >= 0, got {cfg['workers']!r}")
    if cfg["shard_range"] is not None and (cfg["task_index"] is not None or cfg["num_tasks"] is not None):
        fail("shard_range", "give either --shard-range or --task-index/--num-tasks, not both")
    if cfg["shard_range"] is not None:
        r = cfg["shard_range"]
        a, b = parse_range(r) if isinstance(r, str) else r
        try:
            a, b = int(a), int(b)
        except (TypeError, ValueError):
            fail("shard_range", f"must be A:B with integers, got {r!r}")
        if not 0 <= a <= b:
            fail("shard_range", f"need 0 <= A <= B, got {a}:{b}")
        cfg["shard_range"] = [a, b]
    if (cfg["task_index"] is None) != (cfg["num_tasks"] is None):
        fail("task_index", "--task-index and --num-tasks go together")
    if cfg["num_tasks"] is not None:
        if cfg["num_tasks"] < 1 or not 0 <= cfg["task_index"] < cfg["num_tasks"]:
            fail("task_index", f"need 0 <= task_index < num_tasks, got {cfg['task_index']}/{cfg['num_tasks']}")
    return cfg


def selected_shards(cfg: dict) -> list[int]:
    """The shard ids this invocation generates (all, a range, or a task's contiguous slice)."""
    n = cfg["num_shards"]
    if cfg["shard_range"] is not None:
        a, b = cfg["shard_range"]
        return list(range(a, b))
    if cfg["num_tasks"] is not None:
        per, extra = divmod(n, cfg["num_tasks"])
        i = cfg["task_index"]
        start = i * per + min(i, extra)
        return list(range(start, start + per + (1 if i < extra else 0)))
    return list(range(n))


def dataset_config(cfg: dict) -> dict:
    """The keys that decide the content of the shards (every part of a dataset must agree on them)."""
    return {k: v for k, v in cfg.items() if k not in RUN_KEYS}
