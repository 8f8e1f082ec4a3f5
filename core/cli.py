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
# Commands that feed a network through a DataLoader: each worker holds decoded images and a shuffle
# buffer, so more than a few only costs memory.
LOADER_WORKERS_HELP = ("data-loading processes besides this one; 0 = load in this process "
                       "(default: the CPUs this process may use, at most 4)")


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


class _HelpAll(argparse.Action):
    """``--help-all``: put back the help of the hidden groups, print the full help, exit 0."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        for action, text in getattr(parser, "_segswap_hidden", []):
            action.help = text
        parser.print_help()
        parser.exit()


def hide_rarely_used(parser: argparse.ArgumentParser, *group_titles: str) -> argparse.ArgumentParser:
    """Keep ``--help`` to one screen: the options of the named argument groups are left out of it
    (they still work) and ``--help-all`` shows everything."""
    groups = {g.title: g for g in parser._action_groups}
    unknown = [t for t in group_titles if t not in groups]
    if unknown:
        raise KeyError(f"no argument group {unknown} in {parser.prog}")
    hidden = getattr(parser, "_segswap_hidden", [])
    for title in group_titles:
        for action in groups[title]._group_actions:
            hidden.append((action, action.help))
            action.help = argparse.SUPPRESS
    parser._segswap_hidden = hidden
    parser.add_argument("--help-all", action=_HelpAll,
                        help=f"show every option, also the rarely used ({', '.join(group_titles)})")
    return parser
