"""The stream of raw samples a training or validation loader reads, and what it does about bad shards.

``SampleSource(urls, ...)`` takes every URL form :func:`~segswap.shards.reader.shard_urls` accepts and
yields raw samples (``{"__key__", "__url__", field: bytes}``) for one DataLoader worker, built from
WebDataset's own stages:

- resampled (training): ``webdataset.ResampledShards`` draws shards with replacement, seeded
  (``deterministic=True``) from the caller's seed, then ``webdataset.filters.shuffle`` mixes samples
  through a buffer; the stream never ends;
- in order (validation): every shard once, split across ranks and workers as ``split_by_node`` and
  ``split_by_worker`` do (with the rank given explicitly: rank 0 validates alone and must read all).

Each shard is read by :func:`~segswap.shards.reader.read_shard`, which raises on a damaged tar; a
local shard with an ``index.json`` beside it is first compared with its entry (size, md5:
:mod:`segswap.shards.integrity`).

Bad data, by default, is counted and skipped: ``take_skipped()`` returns the samples lost since the
last call (``skipped_total``: all of them in this process). The count is exact when an ``index.json`` says how many samples a shard holds; otherwise
a shard read that fails counts as one. Warnings are rate-limited per reason (the first few in full,
then one line with the running count per minute). ``strict=True`` raises at the first damaged shard.

The stall rule (resampled streams only: an in-order stream ends by itself): the stream stops with
:class:`StreamStalled`, naming the shards and why, when

- no sample came from the last ``stall_reads(n)`` shard reads, ``min(max(2 n, 32), 256)`` for n shards
  (at least 32 so that a set where few shards are readable does not stop by bad luck: with one good
  shard of two, 32 bad draws in a row happen once in 4 billion reads), or
- none of the last ``max(1000, 2 * shuffle_buffer)`` samples read could be used (the decoding layer
  reports each with ``sample_failed`` / ``sample_used``).
"""
from __future__ import annotations

import itertools
import logging
import os
import random
import time
from collections import Counter

import numpy as np
from webdataset.filters import shuffle
from webdataset.shardlists import ResampledShards

from segswap.shards.integrity import IndexCheck
from segswap.shards.reader import DamagedShard, is_local, read_shard, shard_urls

log = logging.getLogger(__name__)

STALL_SAMPLES = 1000


def stall_reads(n_shards: int) -> int:
    """Shard reads in a row without a sample after which a resampled stream stops (see the module docstring)."""
    return min(max(2 * n_shards, 32), 256)


class StreamStalled(RuntimeError):
    """A resampled stream that can no longer produce samples; the message names the shards and why."""


class RateLimitedLog:
    """Warnings counted per reason: the first ``first`` logged in full, then one line per ``every_s``."""

    def __init__(self, logger: logging.Logger, first: int = 3, every_s: float = 60.0):
        self.logger, self.first, self.every_s = logger, first, every_s
        self.counts: Counter = Counter()
        self._last: dict[str, float] = {}

    def warn(self, reason: str, msg: str) -> None:
        n = self.counts[reason] = self.counts[reason] + 1
        now = time.monotonic()
        if n <= self.first:
            more = " (further ones are counted, one line a minute)" if n == self.first else ""
            self.logger.warning("%s%s", msg, more)
            self._last[reason] = now
        elif now - self._last.get(reason, 0.0) >= self.every_s:
            self.logger.warning("%d %s so far; latest: %s", n, reason, msg)
            self._last[reason] = now


class SampleSource:
    """Raw samples of shards for one loader worker; see the module docstring."""

    def __init__(self, urls, *, resampled: bool = True, shuffle_buffer: int = 0, strict: bool = False,
                 rank: int = 0, world_size: int = 1, check_md5: bool = True):
        expanded = shard_urls(urls)
        self.urls = self._existing(expanded, strict)
        self._missing = len(expanded) - len(self.urls)  # counted once, by the first worker of rank 0
        self.resampled = resampled
        self.shuffle_buffer = int(shuffle_buffer)
        self.strict = strict
        self.rank, self.world_size = rank, world_size
        self.check = IndexCheck(md5=check_md5)
        self.warnings = RateLimitedLog(log)
        self.stall_reads = stall_reads(len(self.urls))
        self.stall_samples = max(STALL_SAMPLES, 2 * self.shuffle_buffer)
        self._skipped = 0
        self.skipped_total = 0  # in this process, whether or not a later sample carried the count out
        self._failed_samples = 0

    @staticmethod
    def _existing(urls: list[str], strict: bool) -> list[str]:
        """Check local shard paths once, here, rather than in every worker on every pass: a mistyped
        path must stop the run with its name, not loop over skips."""
        missing = [u for u in urls if is_local(u) and not os.path.isfile(u)]
        if missing and (strict or len(missing) == len(urls)):
            raise FileNotFoundError(f"{len(missing)} of {len(urls)} shards do not exist, e.g. {', '.join(missing[:3])}")
        if missing:
            log.warning("%d of %d shards do not exist and are left out, e.g. %s", len(missing), len(urls),
                        ", ".join(missing[:3]))
            gone = set(missing)
            urls = [u for u in urls if u not in gone]
        return urls

    # ------------------------------------------------------------------ counting, for the decoding layer

    def _count(self, n: int) -> None:
        self._skipped += n
        self.skipped_total += n

    def take_skipped(self) -> int:
        """Samples lost since the previous call (see the module docstring for how they are counted)."""
        n, self._skipped = self._skipped, 0
        return n

    def sample_failed(self, raw: dict, why: Exception) -> None:
        """A sample read but unusable (undecodable, bad shape): counted, warned, and part of the stall rule."""
        msg = f"{raw.get('__url__', '?')}: sample {raw.get('__key__', '?')}: {why}"
        if self.strict:
            raise DamagedShard(msg) from why
        self._count(1)
        self._failed_samples += 1
        self.warnings.warn("unusable samples", f"skipping unusable sample: {msg}")
        if self.resampled and self._failed_samples >= self.stall_samples:
            raise StreamStalled(f"none of the last {self._failed_samples} samples read from {self._describe()} "
                                f"could be used (latest: {msg}); stopping")

    def sample_used(self) -> None:
        self._failed_samples = 0

    # --------------------------------------------------------------------------------------- stream

    def _describe(self) -> str:
        return self.urls[0] if len(self.urls) == 1 else f"{len(self.urls)} shards ({self.urls[0]} ...)"

    def _shard_failed(self, url: str, why: str, got: int) -> None:
        if self.strict:
            raise DamagedShard(why if why.startswith(url) else f"{url}: {why}")
        entry = self.check.entry(url)
        n = entry.get("nsamples") if entry else None
        self._count(max(int(n) - got, 0) if isinstance(n, int) else 1)
        why = why[len(url) + 2:] if why.startswith(f"{url}: ") else why
        self.warnings.warn("unreadable shard reads", f"skipping the rest of shard {url} after {got} samples: {why}"
                           if got else f"skipping shard {url}: {why}")

    def _read(self, urls):
        fruitless, recent = 0, {}
        for url in urls:
            got, why = 0, "holds no samples"
            problem = self.check.problem(url)
            if problem is not None:
                why = f"{url}: disagrees with the index.json beside it: {problem}"
                self._shard_failed(url, why, 0)
            else:
                try:
                    for sample in read_shard(url):
                        if not got:
                            fruitless, recent = 0, {}
                        got += 1
                        yield sample
                except DamagedShard as e:
                    why = str(e)
                    self._shard_failed(url, why, got)
            if got:
                continue
            fruitless += 1
            recent[url] = why
            if self.resampled and fruitless >= self.stall_reads:
                named = "; ".join(w if w.startswith(u) else f"{u}: {w}" for u, w in itertools.islice(recent.items(), 3))
                more = f" and {len(recent) - 3} more" if len(recent) > 3 else ""
                raise StreamStalled(f"no sample from the last {fruitless} shard reads ({len(recent)} distinct "
                                    f"shard(s) of {len(self.urls)}): {named}{more}; stopping")

    def samples(self, seed: int, worker: int = 0, num_workers: int = 1):
        """Raw samples for ``worker`` of ``num_workers`` (this rank's), every random choice from ``seed``."""
        if worker == 0 and self.rank == 0:
            self._count(self._missing)
        shard_seed, buffer_seed = (int(x) for x in np.random.SeedSequence(seed).generate_state(2))
        if self.resampled:
            order = (d["url"] for d in ResampledShards(self.urls, seed=shard_seed, worker_seed=lambda: 0,
                                                       deterministic=True))
        else:
            order = itertools.islice(self.urls, self.rank * num_workers + worker, None, self.world_size * num_workers)
        raw = self._read(order)
        if self.resampled and self.shuffle_buffer > 1:
            raw = shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=random.Random(buffer_seed))(raw)
        return raw
