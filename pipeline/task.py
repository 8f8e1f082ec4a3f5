"""One shard = one task: render pairs, stylise them in batches, write the shard, report statistics.

A task depends only on the job description and its shard id, never on which process runs it or what
ran before, so any number of workers in any order produce byte-identical shards:

- randomness: ``SeedSequence([root_seed, shard_id])`` spawns two children, one for rendering and one
  for styling. Each pair *attempt* draws from its own ``render_root.spawn(1)`` child (recorded in the
  sample's json as entropy + spawn key, so any pair can be regenerated alone); the styliser draws from
  one generator seeded by the style child, in pair order.
- the renderer and styliser are built once per worker process and cached here (module level), keyed by
  the job's fingerprint; they keep no state between pairs that affects output.
- the shard is written to a temporary name and renamed when complete (:class:`ShardWriter`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import resource
import sys
import time
import traceback
from collections import Counter

import numpy as np

from segswap.core.cputime import cpu_seconds
from segswap.core.logs import collect_example
from segswap.core.ray_driver import raise_if_interrupted
from segswap.shards.format import SHARD_PATTERN, sample_key
from segswap.shards.index import shard_entry
from segswap.shards.writer import ShardWriter

log = logging.getLogger(__name__)

# Worker-process cache: fingerprint -> (renderer, styliser). One job at a time per process.
_WORKER_STATE: dict[str, tuple] = {}


def job_fingerprint(job: dict) -> str:
    return hashlib.sha1(json.dumps(job, sort_keys=True, default=str).encode()).hexdigest()[:16]


def build_worker_state(job: dict) -> tuple:
    """(renderer, styliser) for a job, built once per worker process."""
    key = job["fingerprint"]
    state = _WORKER_STATE.get(key)
    if state is None:
        from segswap.pipeline.render import PairRenderer
        from segswap.pipeline.style import build_styliser
        from segswap.segments.coco import SegmentIndex

        # Skipped COCO items are named by the driver (once per job), not by every worker that loads the file.
        segments = SegmentIndex.from_coco(job["segments_json"], job["images_dir"], log_skips=False,
                                          **job["segment_filters"])
        if not len(segments):
            raise ValueError(f"{job['segments_json']}: no usable segments (skipped: {dict(segments.skipped)})")
        # Backgrounds: the index's own images, so the renderer knows which categories each holds
        # (sources are drawn from categories absent from the background).
        renderer = PairRenderer(segments, None, **job["renderer"])
        styliser = build_styliser(job["style"], **job["styliser"])
        _WORKER_STATE.clear()
        state = _WORKER_STATE[key] = (renderer, styliser)
    return state


def peak_rss_mb() -> float:
    """Peak resident memory of this (worker) process so far, in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1 << 20 if sys.platform == "darwin" else 1 << 10), 1)


def _seed_record(seq: np.random.SeedSequence) -> dict:
    return {"entropy": [int(e) for e in np.atleast_1d(seq.entropy)], "spawn_key": [int(k) for k in seq.spawn_key]}


def generate_shard(job: dict, shard_id: int) -> dict:
    """Generate one shard into ``job["out"]``; returns its statistics and index entry.

    Pairs are rendered with ``render_pair(rng, key, seed=...)`` (no style), then stylised
    ``style_batch`` pairs at a time: the styliser fills ``sty0``/``sty1`` and ``json["style"]``.

    Runs single-threaded (BLAS, OpenMP, OpenCV, torch), as a Ray task with one CPU would: the
    parallelism is across shards, and a multi-threaded reduction could round differently in this
    process than in a worker, breaking byte-identity between worker counts.

    Unusable draws (the renderer's ``SkipPair``, unreadable images, renderer errors) are counted by
    reason (``stats["skips"]``, the first few messages per reason in ``stats["skip_examples"]``, for the
    driver to log: workers do not) and retried with the next attempt, up to ``pairs_per_shard * max_attempts_per_pair``
    attempts; a shard that runs out of attempts is written short (and says so), one with no pair at
    all is not written.
    """
    import cv2
    import torch
    from threadpoolctl import threadpool_limits

    threads = (cv2.getNumThreads(), torch.get_num_threads())
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            return _generate_shard(job, shard_id)
    finally:
        cv2.setNumThreads(threads[0])
        torch.set_num_threads(threads[1])


def _generate_shard(job: dict, shard_id: int) -> dict:
    from segswap.core.images import BadImage
    from segswap.pipeline.render import SkipPair

    t0, cpu0 = time.perf_counter(), time.process_time()
    renderer, styliser = build_worker_state(job)
    setup_cpu = time.process_time() - cpu0  # 0 unless this process built the renderer just now
    stages = Counter()
    render_cpu0 = Counter(renderer.stage_cpu)
    path = os.path.join(job["out"], SHARD_PATTERN % shard_id)
    n_pairs = job["pairs_per_shard"]
    max_attempts = n_pairs * job["max_attempts_per_pair"]
    render_root, style_root = np.random.SeedSequence([job["seed"], shard_id]).spawn(2)
    style_rng = np.random.default_rng(style_root)
    skips, examples = Counter(), {}
    attempts = written = 0
    stats = {"url": os.path.basename(path), "shard_id": shard_id}

    def skip(reason: str, message: str) -> None:
        skips[reason] += 1
        collect_example(examples, reason, f"shard {shard_id} attempt {attempts}: {message}")

    with ShardWriter(path) as writer:
        while written < n_pairs and attempts < max_attempts:
            batch = []
            while len(batch) < min(job["style_batch"], n_pairs - written) and attempts < max_attempts:
                seq = render_root.spawn(1)[0]
                attempts += 1
                key = sample_key(shard_id, written + len(batch))
                try:
                    pair = renderer.render_pair(np.random.default_rng(seq), key, seed=_seed_record(seq))
                except SkipPair as e:
                    skip(e.reason, e.detail or e.reason)
                    continue
                except BadImage as e:
                    skip("bad_image", str(e))
                    continue
                except Exception as e:  # a renderer bug on odd input: count, show once, keep going
                    raise_if_interrupted()  # unless it is a signal that native code reported as an error
                    skip(f"error:{type(e).__name__}", f"{e}\n{traceback.format_exc()}")
                    continue
                batch.append(pair)
            if styliser is not None and batch:
                images = [im for p in batch for im in (p.img0, p.img1)]
                with cpu_seconds(stages, "style"):
                    styled, infos = styliser.stylise(images, style_rng)
                for i, p in enumerate(batch):
                    p.sty0, p.sty1 = styled[2 * i], styled[2 * i + 1]
                    p.meta["style"] = [infos[2 * i], infos[2 * i + 1]]
            with cpu_seconds(stages, "encode"):
                for p in batch:
                    writer.write(p)
                    written += 1
        if written == 0:
            raise ShardFailed(shard_id, attempts, dict(skips), examples)
    if written < n_pairs:
        log.warning("shard %d: only %d of %d pairs after %d attempts (skips: %s)", shard_id, written, n_pairs,
                    attempts, dict(skips))
    stats.update(pairs=written, short_by=n_pairs - written, attempts=attempts, skips=dict(sorted(skips.items())),
                 wall_time_s=round(time.perf_counter() - t0, 3), entry=shard_entry(path), pid=os.getpid(),
                 peak_rss_mb=peak_rss_mb(), skip_examples=examples,
                 segment_index={"skips": dict(sorted(renderer.segments.skipped.items())),
                                "examples": renderer.segments.skip_examples})
    # CPU seconds (user + sys) of this process: before the shard (the worker's start-up and imports, on
    # its first shard), the shard's total, the one-off build of the renderer and styliser in it, and
    # the split by stage (benchmarks/bench_gen.py reads these).
    stages.update({k: v - render_cpu0[k] for k, v in renderer.stage_cpu.items()})
    stats.update(process_cpu_at_start_s=round(cpu0, 4), cpu_s=round(time.process_time() - cpu0, 4),
                 setup_cpu_s=round(setup_cpu, 4),
                 stage_cpu_s={k: round(v, 4) for k, v in sorted(stages.items())})
    return stats


class ShardFailed(RuntimeError):
    """No pair at all could be rendered for a shard (every attempt was skipped)."""

    def __init__(self, shard_id: int, attempts: int, skips: dict, examples: dict | None = None):
        super().__init__(f"shard {shard_id}: no usable pair in {attempts} attempts (skips: {skips})")
        self.shard_id, self.attempts, self.skips, self.examples = shard_id, attempts, skips, examples or {}

    def __reduce__(self):  # picklable across Ray workers
        return (ShardFailed, (self.shard_id, self.attempts, self.skips, self.examples))
