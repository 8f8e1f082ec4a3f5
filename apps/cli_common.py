"""What every application command shares: model options, model loading, logging, progress, JSON output."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

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
    g.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    g.add_argument("--batch-size", type=int, default=16, help="pairs per head call (default: 16)")
    g.add_argument("--feature-cache", default=None,
                   help="folder for an on-disk cache of backbone features (default: memory only)")
    g.add_argument("--mem-cache-items", type=int, default=2000,
                   help="images whose features stay in memory (least recently used leave first; default: 2000)")
    g.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def load(args):
    """(model in eval mode, FeatureCache) from the parsed model options."""
    import torch

    from segswap.apps.features_cache import FeatureCache
    from segswap.train.checkpoint import load_model

    if not os.path.isfile(args.ckpt):
        raise FileNotFoundError(f"{args.ckpt}: checkpoint not found")
    model = load_model(args.ckpt, device=args.device)
    model.eval()
    torch.set_grad_enabled(False)
    st = os.stat(args.ckpt)
    tag = f"{os.path.abspath(args.ckpt)}|{st.st_size}|{st.st_mtime_ns}"
    cache = FeatureCache(model, device=args.device, cache_dir=args.feature_cache, batch_size=args.batch_size,
                         max_items=args.mem_cache_items, tag=tag)
    return model, cache


class Progress:
    """A bar on a terminal, a log line every ``every`` seconds otherwise."""

    def __init__(self, what: str, every: float = 30.0):
        self.what, self.every, self.t0, self.last = what, every, time.time(), 0.0
        self.tty = sys.stderr.isatty()

    def __call__(self, done: int, total: int) -> None:
        now = time.time()
        eta = (now - self.t0) / max(done, 1) * (total - done)
        if self.tty:
            width = 30
            fill = int(width * done / max(total, 1))
            sys.stderr.write(f"\r{self.what} [{'#' * fill}{'.' * (width - fill)}] {done}/{total} eta {eta:.0f}s")
            if done == total:
                sys.stderr.write("\n")
            sys.stderr.flush()
        elif now - self.last > self.every or done == total:
            log.info("%s %d/%d (eta %.0f s)", self.what, done, total, eta)
            self.last = now


def write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def table(rows: list[list], header: list[str]) -> str:
    """A plain text table (first column left-aligned, numbers right-aligned with 3 decimals)."""
    cells = [[f"{v:.3f}" if isinstance(v, float) else str(v) for v in r] for r in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    fmt = lambda r: "  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r))  # noqa: E731
    return "\n".join([fmt(header), "  ".join("-" * w for w in widths), *(fmt(r) for r in cells)])
