"""What every application command shares: model options, model loading, logging, progress, JSON output."""
from __future__ import annotations

import argparse
import logging
import os

from segswap.core.atomic import atomic_write_json
from segswap.core.cli import DEVICE_HELP
from segswap.core.logs import Progress, setup_logging  # noqa: F401 - the apps' logging and progress

log = logging.getLogger("segswap.apps")


def model_parser(ckpt_required: bool = True) -> argparse.ArgumentParser:
    """Options of every command that runs the model (a parent parser: ``parents=[model_parser()]``).

    ``ckpt_required=False``: commands that also evaluate training-free baselines run without a checkpoint.
    """
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("model")
    g.add_argument("--ckpt", "--model", dest="ckpt", required=ckpt_required, default=None,
                   help="checkpoint from segswap-train, or an official SegSwap .pth"
                        + ("" if ckpt_required else " (optional: without it only the training-free baselines run)"))
    g.add_argument("--device", default="auto", help=DEVICE_HELP)
    g.add_argument("--batch-size", type=int, default=16, help="pairs per head call (default: 16)")
    g.add_argument("--feature-cache", default=None,
                   help="folder for an on-disk cache of backbone features (default: memory only)")
    g.add_argument("--mem-cache-items", type=int, default=2000,
                   help="images whose features stay in memory (least recently used leave first; default: 2000)")
    g.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def load(args):
    """(model in eval mode, FeatureCache) from the parsed model options."""
    import torch

    from segswap.apps.features_cache import FeatureCache
    from segswap.nets.device import resolve_device
    from segswap.train.checkpoint import load_model

    if not os.path.isfile(args.ckpt):
        raise FileNotFoundError(f"{args.ckpt}: checkpoint not found")
    args.device = resolve_device(args.device)  # ValueError (exit 2) for CUDA where there is none
    model = load_model(args.ckpt, device=args.device)
    model.eval()
    torch.set_grad_enabled(False)
    st = os.stat(args.ckpt)
    tag = f"{os.path.abspath(args.ckpt)}|{st.st_size}|{st.st_mtime_ns}"
    cache = FeatureCache(model, device=args.device, cache_dir=args.feature_cache, batch_size=args.batch_size,
                         max_items=args.mem_cache_items, tag=tag)
    return model, cache


def write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_json(path, obj, indent=1)


def table(rows: list[list], header: list[str]) -> str:
    """A plain text table (first column left-aligned, numbers right-aligned with 3 decimals)."""
    cells = [[f"{v:.3f}" if isinstance(v, float) else str(v) for v in r] for r in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    fmt = lambda r: "  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r))  # noqa: E731
    return "\n".join([fmt(header), "  ".join("-" * w for w in widths), *(fmt(r) for r in cells)])
