"""Streaming training items from shards: read, decode, augment (``train/augment.py``).

``ShardStream`` is an ``IterableDataset``: the shard reader's raw samples (``shards/stream.py``:
every URL form ``shards.reader.shard_urls`` accepts, resampling, splitting, shuffle, damage checks,
the stall rule) followed by decoding and augmentation. Training streams are *resampled*: each DataLoader worker of each rank draws
shards with replacement from its own seeded generator and mixes samples through a shuffle buffer, so
the stream never ends and epochs are not a concept. Validation streams read every shard once, in
order, split across ranks and workers, without augmentation.

Corrupt samples (undecodable fields, bad shapes) and damaged shards are skipped and counted: each
yielded item carries ``skipped``, the number dropped since the previous item of that worker, which the
trainer sums. ``strict=True`` raises at the first one instead.
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import time

import cv2
import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from segswap.shards.format import FormatError
from segswap.shards.stream import SampleSource
from segswap.train.augment import PairAugmenter, decode_choice

log = logging.getLogger(__name__)

STREAM_DEFAULTS = {"shuffle_buffer": 500, "strict": False, "check_md5": True}
DECODE_ERRORS = (FormatError, cv2.error, ValueError, KeyError)


class ShardStream(IterableDataset):
    """Augmented training items from shards; see the module docstring."""

    def __init__(self, urls, augment: PairAugmenter, seed: int = 0, resampled: bool = True,
                 shuffle_buffer: int = STREAM_DEFAULTS["shuffle_buffer"], strict: bool = STREAM_DEFAULTS["strict"],
                 rank: int = 0, world_size: int = 1, stream_id: int = 0, max_items: int | None = None,
                 check_md5: bool = STREAM_DEFAULTS["check_md5"]):
        super().__init__()
        self.source = SampleSource(urls, resampled=resampled, shuffle_buffer=shuffle_buffer, strict=strict,
                                   rank=rank, world_size=world_size, check_md5=check_md5)
        self.urls = self.source.urls
        self.augment = augment
        self.seed = int(seed)
        self.resampled = resampled
        self.strict = strict
        self.rank = rank
        self.stream_id = int(stream_id)  # distinguishes restarts (resume step) and pool streams
        self.max_items = max_items

    # Every random choice of a worker comes from one SeedSequence keyed by (seed, rank, worker, stream):
    # one child for the shard order and shuffle buffer, one for the augmentations.
    def _seeds(self) -> tuple[int, np.random.Generator, int, int]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        order, aug = np.random.SeedSequence([self.seed, self.rank, wid, self.stream_id]).spawn(2)
        return int(order.generate_state(1)[0]), np.random.default_rng(aug), wid, nw

    def __iter__(self):
        order_seed, rng, wid, nw = self._seeds()
        source = self.source
        n = 0
        for raw in source.samples(order_seed, wid, nw):
            try:
                item = self.augment(decode_choice(raw, self.augment, rng), rng)
            except DECODE_ERRORS as e:
                source.sample_failed(raw, e)
                continue
            source.sample_used()
            item["skipped"] = source.take_skipped()
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


def _exit_now(_signum, _frame):
    os._exit(0)  # status 0: the trainer's DataLoader reads a signalled worker as a crash, an exited one as done


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when the process that started it dies (PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux/glibc: the DataLoader's own watchdog remains
        return
    if os.getppid() == 1:  # the parent died before the request was in place
        os._exit(0)


def worker_init(_worker_id: int) -> None:
    tune_loader_process()
    _die_with_parent()
    # Ctrl-C and a scheduler's SIGTERM reach the whole process group. A worker has nothing to save and
    # the trainer does not need it any more once signalled (it stops waiting for data at once, or
    # finishes the step it is in without fetching), so it leaves at once, also when the DataLoader asks
    # it to (SIGTERM) while it is stuck reading a shard.
    signal.signal(signal.SIGINT, _exit_now)
    signal.signal(signal.SIGTERM, _exit_now)


def stop_workers(batches, wait_s: float = 2.0) -> None:
    """End the worker processes of a DataLoader iterator now, whatever they are doing.

    The DataLoader's own shutdown asks each worker in turn and waits up to 5 s for each, which never
    ends a worker blocked inside a shard read; here every live worker gets SIGTERM (which makes it
    exit, see ``worker_init``), then SIGKILL if it has not gone within ``wait_s``. ``_workers`` is
    the DataLoader iterator's list of processes (absent with ``workers=0``).
    """
    workers = [w for w in getattr(batches, "_workers", ()) if w.is_alive()]
    # The DataLoader's SIGCHLD handler raises "DataLoader worker ... is killed by signal" in this process
    # when a worker it watches dies by a signal before join() reaps it: a worker killed here (stuck for
    # wait_s) or terminated before worker_init set its handler. Those ends are wanted, so stop watching
    # first, as the DataLoader's own shutdown does; otherwise the error could replace the one the
    # trainer is stopping for (seen in CI: a truncated shard with --strict-data exited 1, not 2).
    if getattr(batches, "_worker_pids_set", False):
        torch.utils.data._utils.signal_handling._remove_worker_pids(id(batches))
        batches._worker_pids_set = False
    for w in workers:
        w.terminate()
    deadline = time.monotonic() + wait_s
    for w in workers:
        w.join(max(0.0, deadline - time.monotonic()))
        if w.is_alive():
            w.kill()
            w.join(1.0)
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


def make_loader(stream: ShardStream, batch_size: int, workers: int, drop_last: bool = True):
    if workers:
        # OpenCV's thread pool does not survive fork: a forked worker that touches it (worker_init's
        # setNumThreads, any parallel cv2 call) can wait forever on a condition variable of the
        # parent's pool threads (gdb: pthread_cond_destroy inside cv2). With the parent's pool at one
        # thread no pool thread exists at fork time. Measured: 4 of 6 forked children hung after the
        # parent had run parallel cv2 calls, none with this. The parent's own cv2 work is light.
        cv2.setNumThreads(1)
    # DataLoader draws a base seed when iterated; give it its own generator so that creating a loader
    # (e.g. for validation) never moves torch's global RNG, which dropout uses.
    gen = torch.Generator().manual_seed(stream.seed)
    return torch.utils.data.DataLoader(stream, batch_size=batch_size, num_workers=workers, drop_last=drop_last,
                                       generator=gen,
                                       worker_init_fn=worker_init if workers else None,
                                       persistent_workers=workers > 0, pin_memory=torch.cuda.is_available())
