"""``segswap-gen``: generate SegSwap training pairs into verified WebDataset shards.

    segswap-gen --out data/pairs                       # embedded photos, unsupervised segments
    segswap-gen --segments coco --images coco/train2017 \\
                --coco-annotations coco/annotations/instances_train2017.json \\
                --out data/coco-pairs --num-shards 1000 --pairs-per-shard 1000 --workers 32

Options: ``segswap-gen --help`` and README.md ("Generating training pairs"). Exit status: 0 when every selected
shard is finished, 1 when some shard produced no pair at all, 2 on bad options or input or an output
folder that is full or read-only, 128 + N on signal N (SIGTERM 143, SIGINT 130) after saying which
shards are finished (a rerun resumes from them). Errors are one line; ``--debug`` shows the traceback.
"""
from __future__ import annotations

import logging
import sys

from segswap.core.logs import setup_logging
from segswap.core.ray_driver import Interrupted, interruptible
from segswap.pipeline.config import ConfigError, get_parser, resolve

log = logging.getLogger("segswap.gen")


def main(argv=None) -> int:
    args = vars(get_parser().parse_args(argv))
    setup_logging(verbose=args.get("verbose", False), quiet=args.get("quiet", False))
    debug = args.get("debug", False)
    try:
        with interruptible():  # a signal during start-up (imports, Ray) ends as cleanly as one later
            cfg = resolve(args)
            from segswap.pipeline.run import OutputUnwritable, generate

            try:
                summary = generate(cfg)
            except OutputUnwritable as e:
                log.error("%s", e, exc_info=debug)
                return 2
    except Interrupted as e:
        finished = getattr(e, "finished", None)
        what = (f"{finished} of {e.selected} selected shards are finished and kept" if finished is not None
                else "nothing was generated yet")
        log.error("stopped by %s: %s; rerun the same command to resume", e, what, exc_info=debug)
        return 128 + e.signum
    except (ConfigError, ValueError, OSError) as e:
        # Bad options, bad input files (COCO json, images) and unreadable paths name themselves.
        log.error("%s", e, exc_info=debug)
        return 2
    return 1 if summary["shards_failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
