"""``segswap-plot RUN_DIR``: training curves of a ``segswap-train`` run as one PNG.

    segswap-plot runs/demo                  # writes runs/demo/curves.png
    segswap-plot runs/demo --out curves.png

Reads ``RUN_DIR/metrics.jsonl`` (the loss terms and the learning rate, logged every ``--log-every``
steps) and, when present, ``RUN_DIR/val.jsonl`` (held-out mask IoU, correspondence error, mean mask
on foreground / background / negative pairs at every validation). Four panels against the step:
loss terms (log scale), learning rate, held-out masks (IoU and the threshold-free means), held-out
correspondence error in pixels. Needs matplotlib: ``pip install -e ".[plot]"``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from segswap.core.atomic import atomic_save
from segswap.core.cli import EXIT_USAGE, add_version

LOSS_PREFIX = "loss/"
VAL_MASK_KEYS = (("iou", "mask IoU (> 0.5)"), ("fg_mask", "mean mask on true region"),
                 ("bg_mask", "mean mask on background"), ("neg_mask", "mean mask on negative pairs"))


class RunDirError(ValueError):
    """The run directory lacks what a plot needs; the message names the file."""


def read_jsonl(path: str) -> list[dict]:
    """Records of a JSON-lines log; a torn last line (a run killed mid-write) is left out."""
    records = []
    with open(path) as f:
        lines = f.read().splitlines()
    for k, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if k == len(lines) - 1:
                break
            raise RunDirError(f"{path}: line {k + 1} is not JSON ({e.msg})") from None
        if isinstance(rec, dict) and "step" in rec:
            records.append(rec)
    return records


def read_run(run_dir: str) -> tuple[list[dict], list[dict]]:
    """(training records with a loss, validation records) of a run directory."""
    metrics = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(metrics):
        raise RunDirError(f"{metrics}: no such file (is {run_dir} a segswap-train run directory?)")
    train = [r for r in read_jsonl(metrics) if any(k.startswith(LOSS_PREFIX) for k in r)]
    if not train:
        raise RunDirError(f"{metrics}: no training records yet")
    val_path = os.path.join(run_dir, "val.jsonl")
    val = read_jsonl(val_path) if os.path.isfile(val_path) else []
    return train, val


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], float(r[key])) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_run(run_dir: str, out: str, title: str | None = None) -> str:
    """Draw the four panels of ``run_dir`` into the PNG ``out`` (written through a temporary name)."""
    try:
        import matplotlib
    except ImportError:
        raise RunDirError('segswap-plot needs matplotlib: pip install -e ".[plot]"') from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, val = read_run(run_dir)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), constrained_layout=True)
    ax = axes[0, 0]
    loss_keys = sorted({k for r in train for k in r if k.startswith(LOSS_PREFIX)},
                       key=lambda k: (k != LOSS_PREFIX + "total", k))
    for key in loss_keys:
        steps, vals = series(train, key)
        ax.plot(steps, vals, label=key[len(LOSS_PREFIX):], lw=2 if key.endswith("/total") else 1)
    if any(v > 0 for k in loss_keys for v in series(train, k)[1]):
        ax.set_yscale("log")
    ax.set_title("training loss terms (Eq. 2)")
    ax.legend(fontsize=8)
    ax = axes[0, 1]
    ax.plot(*series(train, "lr"), color="tab:purple")
    ax.set_title("learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    ax = axes[1, 0]
    for key, name in VAL_MASK_KEYS:
        steps, vals = series(val, key)
        if steps:
            ax.plot(steps, vals, marker="o", ms=3, label=name)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("held-out masks" if val else "held-out masks (no val.jsonl: run with --val-shards)")
    if val:
        ax.legend(fontsize=8)
    ax = axes[1, 1]
    steps, vals = series(val, "corr_err_px")
    ax.plot(steps, vals, marker="o", ms=3, color="tab:red")
    ax.set_title("held-out correspondence error (px)")
    for ax in axes.flat:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title or os.path.basename(os.path.abspath(run_dir)))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    try:
        atomic_save(out, lambda tmp: fig.savefig(tmp, dpi=100))
    finally:
        plt.close(fig)
    return out


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("segswap-plot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="a segswap-train --out directory")
    p.add_argument("--out", help="PNG to write (default RUN_DIR/curves.png)")
    p.add_argument("--title", help="figure title (default: the run directory's name)")
    add_version(p)
    return p


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    try:
        out = plot_run(args.run_dir, args.out or os.path.join(args.run_dir, "curves.png"), args.title)
    except (RunDirError, OSError) as e:
        print(f"segswap-plot: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
