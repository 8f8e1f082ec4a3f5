"""Streaming training items from shards: read, decode, augment (``train/augment.py``).

``ShardStream`` is an ``IterableDataset`` over WebDataset shards (local paths, brace lists, ``pipe:``
URLs, ``::``-joined lists). Training streams are *resampled*: each DataLoader worker of each rank draws
shards with replacement from its own seeded generator and mixes samples through a shuffle buffer, so
the stream never ends and epochs are not a concept. Validation streams read every shard once, in
order, split across ranks and workers, without augmentation.

Corrupt samples (undecodable fields, bad shapes, broken tar members) are skipped and counted: each
yielded item carries ``skipped``, the number dropped since the previous item of that worker, which the
trainer sums. ``strict=True`` raises instead.
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal

import cv2
import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls
from webdataset.tariterators import group_by_keys, tar_file_expander

from segswap.shards.format import FormatError
from segswap.train.augment import PairAugmenter, decode_choice

log = logging.getLogger(__name__)

STREAM_DEFAULTS = {"shuffle_buffer": 500, "strict": False}


def expand_shards(urls: str | list) -> list[str]:
    """Brace lists, ``::``-joined lists, directories and ``pipe:`` URLs -> list of shard URLs."""
    if isinstance(urls, (list, tuple)):
        return [u for part in urls for u in expand_shards(part)]
    urls = os.fspath(urls)
    if not urls.startswith("pipe:") and os.path.isdir(urls):
        found = sorted(os.path.join(urls, f) for f in os.listdir(urls) if f.endswith(".tar"))
        if not found:
            raise FileNotFoundError(f"{urls}: directory holds no .tar shards")
        return found
    out = expand_urls(urls)
    if not out:
        raise ValueError(f"{urls!r} names no shards")
    return out


class ShardStream(IterableDataset):
    """Augmented training items from shards; see the module docstring."""

    def __init__(self, urls, augment: PairAugmenter, seed: int = 0, resampled: bool = True,
                 shuffle_buffer: int = STREAM_DEFAULTS["shuffle_buffer"], strict: bool = STREAM_DEFAULTS["strict"],
                 rank: int = 0, world_size: int = 1, stream_id: int = 0, max_items: int | None = None):
        super().__init__()
        expanded = expand_shards(urls)
        self.urls = self._existing(expanded, strict)
        self._missing = len(expanded) - len(self.urls)  # counted once, as skips of the first worker
        self.augment = augment
        self.seed = int(seed)
        self.resampled = resampled
        self.shuffle_buffer = int(shuffle_buffer)
        self.strict = strict
        self.rank, self.world_size = rank, world_size
        self.stream_id = int(stream_id)  # distinguishes restarts (resume step) and pool streams
        self.max_items = max_items
        self._skipped = 0

    @staticmethod
    def _existing(urls: list[str], strict: bool) -> list[str]:
        """Check local shard paths once, here, rather than in every worker on every pass: a mistyped
        path must stop the run with its name, not loop over skips."""
        missing = [u for u in urls if not u.startswith("pipe:") and "://" not in u and not os.path.isfile(u)]
        if missing and (strict or len(missing) == len(urls)):
            raise FileNotFoundError(f"{len(missing)} of {len(urls)} shards do not exist, e.g. {', '.join(missing[:3])}")
        if missing:
            log.warning("%d of %d shards do not exist and are left out, e.g. %s", len(missing), len(urls),
                        ", ".join(missing[:3]))
            gone = set(missing)
            urls = [u for u in urls if u not in gone]
        return urls

    # Every random choice of a worker comes from one SeedSequence keyed by (seed, rank, worker, stream).
    def _rng(self) -> tuple[np.random.Generator, int, int]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        ss = np.random.SeedSequence([self.seed, self.rank, wid, self.stream_id])
        return np.random.default_rng(ss), wid, nw

    def _handler(self, exn: Exception) -> bool:
        if self.strict:
            return False
        self._skipped += 1
        log.warning("skipping unreadable shard data: %s", str(exn)[:300])
        return True

    def _shard_order(self, rng, wid, nw):
        if self.resampled:
            while True:
                yield self.urls[int(rng.integers(len(self.urls)))]
        else:
            k = self.rank * nw + wid
            yield from self.urls[k::self.world_size * nw]

    def _raw_samples(self, rng, wid, nw):
        for url in self._shard_order(rng, wid, nw):
            try:
                stream = gopen(url, "rb")
            except Exception as e:  # noqa: BLE001 - missing file, failing pipe: count and go on
                if self.strict:
                    raise FormatError(f"{url}: cannot open ({e})") from e
                self._handler(e)
                if self.resampled and self._skipped > 100 * len(self.urls):
                    raise RuntimeError(f"no shard of {self.urls[:3]}... can be opened") from e
                continue
            try:
                for raw in group_by_keys(tar_file_expander([{"url": url, "stream": stream}], handler=self._handler),
                                         handler=self._handler):
                    yield raw
            finally:
                stream.close()

    def _shuffled(self, samples, rng):
        if not self.resampled or self.shuffle_buffer <= 1:
            yield from samples
            return
        buf = []
        for s in samples:
            if len(buf) < self.shuffle_buffer:
                buf.append(s)
                continue
            k = int(rng.integers(len(buf)))
            buf[k], s = s, buf[k]
            yield s
        while buf:
            yield buf.pop(int(rng.integers(len(buf))))

    def __iter__(self):
        rng, wid, nw = self._rng()
        if wid == 0 and self.rank == 0:
            self._skipped += self._missing
        n = 0
        for raw in self._shuffled(self._raw_samples(rng, wid, nw), rng):
            try:
                item = self.augment(decode_choice(raw, self.augment, rng), rng)
            except (FormatError, cv2.error, ValueError, KeyError) as e:
                if self.strict:
                    raise FormatError(f"{raw.get('__url__', '?')}: {e}") from e
                self._skipped += 1
                log.warning("skipping corrupt sample %s in %s: %s", raw.get("__key__"), raw.get("__url__"), e)
                continue
            item["skipped"] = self._skipped
            self._skipped = 0
            yield item
            n += 1
            if self.max_items is not None and n >= self.max_items:
                return


def tune_loader_process() -> None:
    """One thread per loader process, and freed image-sized buffers recycled instead of unmapped.

    Workers decode and warp with numpy/cv2; one thread each keeps 2-core machines responsive. Every
    item allocates a few dozen arrays of 0.2-2 MB; glibc hands blocks that large back to the kernel on
    free, so the next item takes a fresh page fault on every 4 KB page of them (measured: ~480 faults
    and 1.6 ms of system time per 480-px pair). Raising glibc's mmap and trim thresholds keeps them
    in the heap for reuse. Other C libraries are left as they are.
    """
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
        libc.mallopt(m_mmap_threshold, 64 << 20)
        libc.mallopt(m_trim_threshold, 256 << 20)
    except (OSError, AttributeError):  # not glibc
        pass


def worker_init(_worker_id: int) -> None:
    tune_loader_process()
    # Ctrl-C and a scheduler's SIGTERM reach the whole process group: the trainer handles them (saves,
    # then shuts the workers down); a worker dying first would make the last batch fetch fail.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def make_loader(stream: ShardStream, batch_size: int, workers: int, drop_last: bool = True):
    # DataLoader draws a base seed when iterated; give it its own generator so that creating a loader
    # (e.g. for validation) never moves torch's global RNG, which dropout uses.
    gen = torch.Generator().manual_seed(stream.seed)
    return torch.utils.data.DataLoader(stream, batch_size=batch_size, num_workers=workers, drop_last=drop_last,
                                       generator=gen,
                                       worker_init_fn=worker_init if workers else None,
                                       persistent_workers=workers > 0, pin_memory=torch.cuda.is_available())
