"""``segswap-gen``: generate SegSwap training pairs into verified WebDataset shards.

    segswap-gen --out data/pairs                       # embedded photos, unsupervised segments
    segswap-gen --segments coco --images coco/train2017 \\
                --coco-annotations coco/annotations/instances_train2017.json \\
                --out data/coco-pairs --num-shards 1000 --pairs-per-shard 1000 --workers 32

Options: ``segswap-gen --help`` and README.md ("Generating training pairs"). Exit status: 0 when every selected
shard is finished, 1 when some shard produced no pair at all, 2 on bad options or input.
"""
from __future__ import annotations

import logging
import sys

from segswap.core.logs import setup_logging
from segswap.pipeline.config import ConfigError, get_parser, resolve

log = logging.getLogger("segswap.gen")


def main(argv=None) -> int:
    args = vars(get_parser().parse_args(argv))
    setup_logging(verbose=args.get("verbose", False), quiet=args.get("quiet", False))
    try:
        cfg = resolve(args)
        from segswap.pipeline.run import generate

        summary = generate(cfg)
    except (ConfigError, FileNotFoundError, NotADirectoryError) as e:
        log.error("%s", e)
        return 2
    except ValueError as e:  # bad input files (COCO json, images) name themselves in the message
        log.error("%s", e)
        return 2
    return 1 if summary["shards_failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
