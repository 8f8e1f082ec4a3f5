"""``segswap-shards``: verify a dataset directory or rebuild its index and manifest.

    segswap-shards verify DIR [--all] [--min-cells N] [--no-consistency]
    segswap-shards index DIR [--rehash]

``verify`` exits 0 when every shard checks out, 1 otherwise, printing the first bad shard and sample
(``--all`` checks everything and prints every problem). ``index`` rebuilds ``index.json`` from the
shards present and merges ``manifests/*.json`` into ``manifest.json``: run it after the last task of
a SLURM array, or after copying shards between directories.
"""
from __future__ import annotations

import argparse
import logging
import sys

from segswap.core.cli import add_version
from segswap.shards.format import MIN_MASK_CELLS
from segswap.shards.index import rebuild
from segswap.shards.verify import dataset_min_cells, verify_dir


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="segswap-shards", description=__doc__.split("\n")[0])
    add_version(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("verify", help="check every shard against index.json and the format")
    v.add_argument("dir", help="dataset directory (holds train-*.tar and index.json)")
    v.add_argument("--all", action="store_true", help="keep going after the first bad shard/sample")
    v.add_argument("--min-cells", type=int, default=None,
                   help="minimum 16-px grid cells per mask (default: the manifest's min_cells, else "
                        f"{MIN_MASK_CELLS})")
    v.add_argument("--no-consistency", action="store_true", help="skip the mask/flow consistency check")
    v.add_argument("-q", "--quiet", action="store_true", help="print only problems and the summary")
    i = sub.add_parser("index", help="rebuild index.json and manifest.json from the shards present")
    i.add_argument("dir")
    i.add_argument("--rehash", action="store_true",
                   help="recompute every md5 from the files (default: keep the md5s recorded when each "
                        "shard was written, so verify still catches later damage)")
    return parser


def main(argv=None) -> int:
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if getattr(args, "quiet", False) else logging.INFO,
                        format="%(message)s")
    if args.command == "index":
        index, manifest = rebuild(args.dir, rehash=args.rehash)
        print(f"{args.dir}: indexed {len(index['shardlist'])} shards, {manifest['counts']['pairs']} pairs")
        return 0
    min_cells = args.min_cells if args.min_cells is not None else dataset_min_cells(args.dir, MIN_MASK_CELLS)
    try:
        reports = verify_dir(args.dir, min_cells=min_cells, consistency=not args.no_consistency,
                             keep_going=args.all)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    bad = [r for r in reports if not r.ok]
    for report in bad:
        for key, msg in report.problems:
            where = f"sample {key}" if key else "shard"
            print(f"BAD {report.path}: {where}: {msg}", file=sys.stderr)
    nsamples = sum(r.nsamples for r in reports)
    if bad:
        print(f"{args.dir}: {len(bad)} bad shard(s); first: {bad[0].first_problem()}", file=sys.stderr)
        return 1
    print(f"{args.dir}: {len(reports)} shards, {nsamples} samples verified")
    return 0


if __name__ == "__main__":
    sys.exit(main())
