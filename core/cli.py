"""What every segswap command shares on its command line: ``--version``, the wording of ``--device``
and ``--workers``, and the exit codes (docs/cli.md is the user's page for all three).

Exit codes: 0 done; 2 a user error (bad option, missing or malformed input: one line naming the file
and the problem, no traceback); 1 an internal failure (a bug, or a batch job where items failed).
"""
from __future__ import annotations

import argparse

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
DEVICE_HELP = "auto (default: CUDA when available, else CPU), cpu, cuda or cuda:N"
WORKERS_HELP = ("worker processes besides this one; 0 = all work in this process "
                "(default: the CPUs this process may use)")


def version() -> str:
    """The installed segswap version (the one setup.cfg declares)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("segswap")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def add_version(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Give a command ``--version`` (prints ``PROG VERSION`` and exits 0)."""
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    return parser
