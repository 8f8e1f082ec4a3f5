"""Run logging and progress for every segswap program: a bar on a terminal, periodic lines elsewhere.

Generation, segment extraction, training and the applications run for hours under SLURM or Ray,
where stderr is a file: a bar redrawn with carriage returns would fill it with garbage, so off a TTY
:class:`Progress` writes one ``logging`` line every ``log_every_s`` seconds instead (done/total, rate,
ETA); on a TTY it draws a tqdm bar. Workers never draw bars; only the driver does.

:class:`SkipLog` is how batch jobs name what they skip: the first few items per reason are logged with
their message, the rest only counted, and the counts go to the summary. Workers (Ray or in-process)
return their counts and first examples; the driver feeds them to one SkipLog, so the log reads the same
whichever executor ran the work.
"""
from __future__ import annotations

import logging
import sys
import time
from collections import Counter

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DEFAULT_LOG_EVERY_S = 30.0
# Items named per skip reason before the log only counts them.
SKIP_EXAMPLES = 3


def setup_logging(verbose: bool = False, quiet: bool = False, level: str | int | None = None) -> None:
    """INFO to stderr (DEBUG with ``verbose``, WARNING with ``quiet``, or an explicit ``level``)."""
    if level is None:
        level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    elif isinstance(level, str):
        level = getattr(logging, level.upper())
    logging.basicConfig(level=level, format=LOG_FORMAT, datefmt="%H:%M:%S", stream=sys.stderr)
    logging.getLogger("segswap").setLevel(level)


def format_duration(seconds: float) -> str:
    seconds = int(round(max(seconds, 0)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """Counts finished units (shards, chunks, queries) and an extra quantity (pairs) and reports them.

    ``progress.update(1, count=32)`` or ``progress(done, total)`` (the callback form);
    ``progress.close()`` ends the bar. ``tty`` defaults to whether the stream is a terminal.
    """

    def __init__(self, total: int, desc: str = "shards", unit: str | None = None, tty: bool | None = None,
                 log_every_s: float = DEFAULT_LOG_EVERY_S, stream=None, logger: logging.Logger | None = None):
        self.total, self.desc, self.unit = total, desc, unit
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.log_every_s = log_every_s
        self.log = logger or logging.getLogger("segswap")
        self.done = 0
        self.count = 0
        self.start = time.perf_counter()
        self._last_log = self.start
        self._bar = None
        if self.tty:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=desc.rstrip("s") or "it", file=self.stream,
                             dynamic_ncols=True, leave=True)

    def line(self) -> str:
        elapsed = time.perf_counter() - self.start
        eta = format_duration((self.total - self.done) * elapsed / self.done) if self.done else "?"
        if self.unit:
            rate = f"{self.count / elapsed if elapsed > 0 else 0.0:.2f} {self.unit}/s"
            what = f", {self.count} {self.unit}"
        else:
            rate = f"{self.done / elapsed if elapsed > 0 else 0.0:.2f} {self.desc}/s"
            what = ""
        return (f"{self.done}/{self.total} {self.desc}{what} "
                f"({rate}, elapsed {format_duration(elapsed)}, eta {eta})")

    def update(self, n: int = 1, count: int = 0) -> None:
        self.done += n
        self.count += count
        if self._bar is not None:
            if self.unit:
                self._bar.set_postfix_str(f"{self.count} {self.unit}", refresh=False)
            self._bar.update(n)
            return
        now = time.perf_counter()
        if now - self._last_log >= self.log_every_s or self.done == self.total:
            self._last_log = now
            self.log.info("progress: %s", self.line())

    def __call__(self, done: int, total: int | None = None) -> None:
        if total is not None and total != self.total:
            self.total = total
            if self._bar is not None:
                self._bar.total = total
        self.update(done - self.done)
        if self.done >= self.total:
            self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class SkipLog:
    """Names skipped items: the first ``examples`` per reason with their message, then counts only."""

    def __init__(self, logger: logging.Logger, what: str = "skipped", examples: int = SKIP_EXAMPLES):
        self.log, self.what, self.examples = logger, what, examples
        self.counts: Counter = Counter()
        self._named: Counter = Counter()

    def skip(self, reason: str, message: str) -> None:
        """One skipped item (counted; named while fewer than ``examples`` of its reason were)."""
        self.counts[reason] += 1
        self._name(reason, message)

    def _name(self, reason: str, message: str) -> None:
        if self._named[reason] < self.examples:
            self._named[reason] += 1
            more = " (further ones are only counted)" if self._named[reason] == self.examples else ""
            self.log.warning("%s (%s): %s%s", self.what, reason, message, more)

    def add(self, counts: dict, examples: dict | None = None) -> None:
        """Counts and first messages that a worker collected (see :func:`collect_example`)."""
        self.counts.update(counts)
        for reason, messages in (examples or {}).items():
            for message in messages:
                self._name(reason, message)

    def summary(self) -> dict:
        return dict(sorted(self.counts.items()))


def collect_example(examples: dict, reason: str, message: str, limit: int = SKIP_EXAMPLES) -> None:
    """In a worker: keep the first ``limit`` messages per reason for the driver's :class:`SkipLog`."""
    kept = examples.setdefault(reason, [])
    if len(kept) < limit:
        kept.append(message)
