"""Logging for batch jobs: a progress bar on a terminal, periodic log lines everywhere else.

Generation runs for hours under SLURM or Ray where stderr is a file: a bar redrawn with carriage
returns would fill it with garbage, so off a TTY :class:`Progress` writes one ``logging`` line every
``log_every_s`` seconds instead (done/total, rate, ETA). Workers never draw bars; only the driver does.
"""
from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("segswap.gen")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DEFAULT_LOG_EVERY_S = 30.0
BAR_WIDTH = 30


def setup_logging(verbose: bool = False, quiet: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format=LOG_FORMAT, datefmt="%H:%M:%S", stream=sys.stderr)
    logging.getLogger("segswap").setLevel(level)


def format_duration(seconds: float) -> str:
    seconds = int(round(max(seconds, 0)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """Counts finished units (shards) and extra quantities (pairs) and reports them.

    ``progress.update(1, pairs=32)``; ``progress.close()`` prints the final state. ``tty`` defaults to
    whether stderr is a terminal.
    """

    def __init__(self, total: int, desc: str = "shards", unit: str = "pairs", tty: bool | None = None,
                 log_every_s: float = DEFAULT_LOG_EVERY_S, stream=None):
        self.total, self.desc, self.unit = total, desc, unit
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.log_every_s = log_every_s
        self.done = 0
        self.count = 0
        self.start = time.perf_counter()
        self._last_log = self.start

    def _line(self) -> str:
        elapsed = time.perf_counter() - self.start
        rate = self.count / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) * elapsed / self.done if self.done else float("nan")
        eta_s = format_duration(eta) if self.done else "?"
        return (f"{self.done}/{self.total} {self.desc}, {self.count} {self.unit} "
                f"({rate:.2f} {self.unit}/s, elapsed {format_duration(elapsed)}, eta {eta_s})")

    def update(self, n: int = 1, count: int = 0) -> None:
        self.done += n
        self.count += count
        now = time.perf_counter()
        if self.tty:
            frac = self.done / self.total if self.total else 1.0
            filled = int(BAR_WIDTH * frac)
            bar = "#" * filled + "-" * (BAR_WIDTH - filled)
            self.stream.write(f"\r[{bar}] {self._line()}")
            self.stream.flush()
        elif now - self._last_log >= self.log_every_s or self.done == self.total:
            self._last_log = now
            log.info("progress: %s", self._line())

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
