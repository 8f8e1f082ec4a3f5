"""CPU time (user + sys of this process) per named stage: what a cluster bills, and steadier than
wall time on a shared machine. The renderer, the shard task and ``benchmarks/bench_gen.py`` split their
cost this way."""
from __future__ import annotations

import time
from collections import Counter
from contextlib import contextmanager


@contextmanager
def cpu_seconds(into: Counter, key: str):
    """Add the process CPU seconds the ``with`` block takes to ``into[key]`` (also when it raises)."""
    t = time.process_time()
    try:
        yield
    finally:
        into[key] += time.process_time() - t
