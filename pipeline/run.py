"""Drive a generation job: prepare segments, pick the shards to do, run one task per shard, record.

``generate(cfg)`` is what ``segswap-gen`` calls with a resolved config (:mod:`pipeline.config`):

1. segments: ``--segments coco`` reads ``--coco-annotations``; ``--segments unsupervised`` extracts
   them from ``--images`` (default: the embedded sample photos, written to ``OUT/embedded-images``)
   into ``OUT/segments.json`` once, and reuses that file on every rerun and by every part of a job;
2. shards: the selected ids (all, ``--shard-range A:B``, or ``--task-index/--num-tasks``) minus those
   already finished: a shard file under its final name whose md5 matches the one recorded when it
   was written, or that passes a full verification when there is no record (resume is the default;
   ``--overwrite`` deletes the selected shards first);
3. tasks: in this process (``--workers 0`` / ``--no-ray``) or one Ray task per shard with at most
   ``2 x workers`` in flight (``ray.wait``), on a local loopback-only instance or the cluster at
   ``--ray-address`` / ``$RAY_ADDRESS``;
4. records: this part's manifest in ``OUT/manifests/``, then ``index.json`` and ``manifest.json``
   rebuilt from everything the folder holds, so the parts of a split job compose into one dataset.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import json
import logging
import os
import shutil
import time
from collections import Counter

from segswap.core.atomic import atomic_open, atomic_write
from segswap.core.logs import Progress, SkipLog
from segswap.core.provenance import environment
from segswap.core.ray_driver import Interrupted, interruptible, ray_session, run_tasks
from segswap.pipeline.config import ConfigError, dataset_config, selected_shards
from segswap.pipeline.task import ShardFailed, generate_shard, job_fingerprint
from segswap.shards import index as shard_index
from segswap.shards.format import SHARD_PATTERN
from segswap.shards.verify import verify_shard
from segswap.shards.writer import TMP_SUFFIX

log = logging.getLogger("segswap.gen")

SEGMENTS_CACHE = "segments.json"
EMBEDDED_IMAGES = "embedded-images"
CONFIG_NAME = "config.yaml"
# While running, this part's manifest is rewritten at most this often (finished shards and their md5).
PART_SAVE_EVERY_S = 10.0


# ------------------------------------------------------------------------------------ segments

def resolve_segments(cfg: dict) -> tuple[str, str]:
    """(segments json, images folder) for the job, extracting unsupervised segments if needed."""
    images = cfg["images"]
    if cfg["segments"] == "coco":
        if not cfg["coco_annotations"]:
            if images:
                raise ConfigError("--segments coco with --images needs --coco-annotations FILE; without "
                                  "annotations use --segments unsupervised")
            # Demo segments (Felzenszwalb regions) of the embedded photos: a quick smoke test.
            from segswap.segments.embedded import embedded_coco

            images = os.path.join(cfg["out"], EMBEDDED_IMAGES)
            return str(embedded_coco(images)), images
        if not os.path.isfile(cfg["coco_annotations"]):
            raise ConfigError(f"--coco-annotations {cfg['coco_annotations']}: file not found")
        return cfg["coco_annotations"], images or os.path.dirname(os.path.abspath(cfg["coco_annotations"]))
    if images is None:
        # The embedded corpus: scikit-image's sample photos, written once as files into the dataset
        # folder so segments.json and every sample's provenance can name them.
        from segswap.segments.embedded import embedded_images

        images = os.path.join(cfg["out"], EMBEDDED_IMAGES)
        embedded_images(images)
    if not os.path.isdir(images):
        raise ConfigError(f"--images {images}: not a directory")
    from segswap.segments.unsupervised import run_extraction

    out_json = os.path.join(cfg["out"], SEGMENTS_CACHE)
    log.info("segments: unsupervised extraction from %s into %s (reused when complete)", images, out_json)
    path = run_extraction(images, out_json, workers=cfg["workers"], ray_address=cfg["ray_address"],
                          seed=cfg["seed"], images_dir=images, **cfg["unsupervised"])
    return str(path), images


def make_job(cfg: dict, segments_json: str, images_dir: str) -> dict:
    """The picklable description every task receives (everything that decides a shard's bytes)."""
    job = {
        "out": os.path.abspath(cfg["out"]),
        "seed": cfg["seed"],
        "pairs_per_shard": cfg["pairs_per_shard"],
        "max_attempts_per_pair": cfg["max_attempts_per_pair"],
        "style_batch": cfg["style_batch"],
        "segments_json": os.path.abspath(segments_json),
        "images_dir": os.path.abspath(images_dir),
        "segment_filters": {"min_area": cfg["min_area"], "min_side": cfg["min_segment_side"],
                            "categories": cfg["categories"]},
        "renderer": {"size": cfg["size"], "blend": cfg["blend"], "flow_stride": cfg["flow_stride"],
                     "min_cells": cfg["min_cells"], "p_two_object": cfg["p_two_object"], **cfg["render"]},
        "style": cfg["style"],
        "styliser": {"style_images": cfg["style_images"], "adain_weights": cfg["adain_weights"],
                     "strength": tuple(cfg["style_strength"]) if cfg["style_strength"] else None,
                     "device": cfg["style_device"], "work_scale": cfg["style_scale"],
                     "engine": cfg["style_engine"]},
    }
    from segswap.pipeline.render import RENDER_DEFAULTS

    own = {"size", "blend", "flow_stride", "min_cells", "p_two_object"}  # set by their own flags
    unknown = sorted(set(cfg["render"]) - (set(RENDER_DEFAULTS) - own))
    if unknown:
        raise ConfigError(f"render: unknown or flag-only key(s) {unknown}; the renderer takes "
                          f"{sorted(set(RENDER_DEFAULTS) - own)} here (and {sorted(own)} as flags)")
    job["fingerprint"] = job_fingerprint(job)
    return job


# ------------------------------------------------------------------------------------- resume

def check_same_dataset(cfg: dict) -> None:
    """Refuse to mix shards made with different settings in one folder."""
    ours = json.loads(json.dumps(dataset_config(cfg)))
    for part in shard_index.read_parts(cfg["out"]):
        theirs = part.get("config")
        if theirs is not None and theirs != ours:
            diff = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
            raise ConfigError(f"{cfg['out']} holds shards generated with other settings (part {part['name']} "
                              f"differs in {diff}); use --overwrite to start over or another --out")


def remove_selected(out: str, shard_ids: list[int], everything: bool) -> None:
    """Delete the selected shards, or (``everything``) every shard and record of the folder."""
    paths = [os.path.join(out, SHARD_PATTERN % sid) for sid in shard_ids]
    if everything:
        paths += shard_index.list_shards(out)
    for path in paths:
        for p in (path, path + TMP_SUFFIX):
            if os.path.exists(p):
                os.remove(p)
    if everything:
        for tmp in glob.glob(os.path.join(out, "*.tar" + TMP_SUFFIX)):
            os.remove(tmp)
        shutil.rmtree(os.path.join(out, shard_index.PARTS_DIR), ignore_errors=True)
        shutil.rmtree(os.path.join(out, SEGMENTS_CACHE + ".parts"), ignore_errors=True)
        for name in (shard_index.INDEX_NAME, shard_index.MANIFEST_NAME, SEGMENTS_CACHE, CONFIG_NAME):
            if os.path.exists(os.path.join(out, name)):
                os.remove(os.path.join(out, name))


def finished_shards(cfg: dict, shard_ids: list[int]) -> dict[int, dict]:
    """Shards of the selection already complete: present under their final name and either matching
    the size and md5 recorded when they were written, or (no record) passing a full verification."""
    out = cfg["out"]
    known = shard_index.known_entries(out)
    stats = {}
    for part in shard_index.read_parts(out):
        stats.update(part.get("shards", {}))
    done = {}
    for sid in shard_ids:
        url = SHARD_PATTERN % sid
        path = os.path.join(out, url)
        if not os.path.isfile(path):
            continue
        expected = known.get(url)
        if expected is not None:
            # md5 recorded right after the shard was written from checked pairs: equal bytes are a
            # finished, valid shard, and hashing is much cheaper than decoding every sample.
            if cfg["verify_existing"]:
                ok = os.path.getsize(path) == expected["filesize"] and shard_index.file_md5(path) == expected["md5sum"]
            else:
                ok = os.path.getsize(path) == expected["filesize"]
            if not ok:
                log.warning("%s differs from what was written (size/md5): regenerating it", url)
                continue
        elif cfg["verify_existing"]:
            report = verify_shard(path, None, min_cells=cfg["min_cells"])
            if not report.ok:
                log.warning("%s fails verification (%s): regenerating it", url, report.first_problem())
                continue
        previous = dict(stats.get(url, {}))
        previous.setdefault("entry", expected or shard_index.shard_entry(path))
        previous["resumed"] = True
        done[sid] = previous
    return done


# ------------------------------------------------------------------------------------ execution

# An OSError with one of these while writing under --out means every later shard would fail too.
OUTPUT_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT}


class OutputUnwritable(RuntimeError):
    """``--out`` takes no more data (full, read-only, no permission); the message says what is kept."""


def check_writable(out: str) -> None:
    """Fail before any work when ``--out`` cannot be created or written."""
    try:
        os.makedirs(out, exist_ok=True)
        atomic_write(os.path.join(out, ".segswap-write-test"), b"")
        os.remove(os.path.join(out, ".segswap-write-test"))
    except OSError as e:
        raise OutputUnwritable(f"--out {out}: cannot write there ({e.strerror or e})") from e


def part_name(shard_ids: list[int]) -> str:
    if not shard_ids:
        return "shards-empty"
    return "shards-%06d-%06d" % (min(shard_ids), max(shard_ids) + 1)


def generate(cfg: dict) -> dict:
    """Run a generation job; returns the summary (also logged and stored in the part manifest).

    Raises :class:`OutputUnwritable` when ``--out`` is full or read-only and
    :class:`~segswap.core.ray_driver.Interrupted` on SIGTERM/SIGINT (with ``finished``/``selected``
    set), after recording the shards finished so far so that a rerun resumes from them.
    """
    t0 = time.perf_counter()
    out = cfg["out"]
    check_writable(out)
    shard_ids = selected_shards(cfg)
    env = environment()
    if cfg["overwrite"]:
        everything = cfg["shard_range"] is None and cfg["num_tasks"] is None
        log.info("--overwrite: removing %s", "the whole dataset" if everything else f"{len(shard_ids)} shards")
        remove_selected(out, shard_ids, everything)
    else:
        check_same_dataset(cfg)

    results: dict[str, dict] = {}
    failed: dict[str, dict] = {}
    done: dict[int, dict] = {}
    todo: list[int] = []
    segment_index: dict = {}
    pair_skips = SkipLog(log, "pair attempt skipped")
    segment_skips = SkipLog(log, "segments file: skipped")
    segments_json = None
    gen_start = time.perf_counter()

    def record(final: bool) -> dict:
        """Write this part's manifest: at the end, and every PART_SAVE_EVERY_S while running, so
        a killed run still leaves the md5 of each finished shard for a fast resume."""
        summary = summarise(shard_ids, todo, done, results, failed, time.perf_counter() - gen_start)
        summary["segment_skips"] = segment_index.get("skips", {})
        part = {
            "name": part_name(shard_ids), "config": json.loads(json.dumps(dataset_config(cfg))),
            "run": {k: v for k, v in cfg.items() if k not in dataset_config(cfg)}, "root_seed": cfg["seed"],
            "segments_json": os.path.abspath(segments_json) if segments_json else None, **env, "finished": final,
            "shard_range": [min(shard_ids), max(shard_ids) + 1] if shard_ids else None,
            "workers": cfg["workers"], "shards_written": [SHARD_PATTERN % s for s in todo if SHARD_PATTERN % s in results],
            "shards_resumed": sorted(SHARD_PATTERN % s for s in done), "shards": dict(sorted(results.items())),
            "segment_skips": summary["segment_skips"],
            "summary": summary, "wall_time_s": round(time.perf_counter() - t0, 3), "finished_unix": time.time(),
        }
        if shard_ids:  # an empty range only prepares (segments): nothing to record
            shard_index.write_part(out, part["name"], part)
        return summary

    def finished_count() -> int:
        # A worker renames a shard to its final name only once it is whole, so a final-named file counts
        # even when the interruption came before its result reached this driver (a rerun verifies it).
        return len(done) + sum(1 for s in todo if SHARD_PATTERN % s in results
                               or os.path.isfile(os.path.join(out, SHARD_PATTERN % s)))

    try:
        with interruptible(), ray_session(cfg["workers"], cfg["ray_address"]) as ray:
            segments_json, images_dir = resolve_segments(cfg)
            job = make_job(cfg, segments_json, images_dir)
            done.update(finished_shards(cfg, shard_ids) if not cfg["overwrite"] else {})
            todo[:] = [s for s in shard_ids if s not in done]
            results.update({SHARD_PATTERN % s: st for s, st in done.items()})
            log.info("%d shards selected: %d already finished, %d to generate (%s)", len(shard_ids), len(done),
                     len(todo), "in-process" if ray is None else f"Ray, {cfg['workers']} workers")
            progress = Progress(len(todo), desc="shards", unit="pairs", logger=log)
            gen_start = time.perf_counter()
            last_save = [gen_start]

            def on_result(sid, stats, error):
                url = SHARD_PATTERN % sid
                if error is not None:
                    if isinstance(error, OSError) and error.errno in OUTPUT_ERRNOS:
                        raise OutputUnwritable(f"--out {out}: cannot write {url} ({error.strerror or error})") from error
                    # A ShardFailed raised in a Ray worker prints the remote traceback: keep the message.
                    message = (f"no usable pair in {error.attempts} attempts (skips: {error.skips})"
                               if isinstance(error, ShardFailed) else str(error))
                    pair_skips.add({}, getattr(error, "examples", {}))
                    log.error("%s failed: %s", url, message)
                    failed[url] = {"error": f"{type(error).__name__}: {message}",
                                   "attempts": getattr(error, "attempts", 0), "skips": getattr(error, "skips", {})}
                    progress.update(1, 0)
                else:
                    pair_skips.add({}, stats.pop("skip_examples", {}))
                    index_report = stats.pop("segment_index", None)
                    if index_report is not None and not segment_index:
                        segment_index.update(index_report)
                        segment_skips.add({}, index_report["examples"])
                    results[url] = stats
                    progress.update(1, stats["pairs"])
                if time.perf_counter() - last_save[0] > PART_SAVE_EVERY_S:
                    record(final=False)
                    last_save[0] = time.perf_counter()

            try:
                job_ref = ray.put(job) if ray is not None else job  # the job travels to each worker once
                run_tasks(generate_shard, [(sid, (job_ref, sid)) for sid in todo], on_result, ray=ray,
                          workers=cfg["workers"], expected=(ShardFailed, OSError))
            finally:
                progress.close()
    except (Interrupted, OutputUnwritable) as e:
        # The workers are gone (the Ray session ended before this): remove what they left half-written.
        for sid in todo:
            if SHARD_PATTERN % sid not in results:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(out, SHARD_PATTERN % sid + TMP_SUFFIX))
        if isinstance(e, Interrupted):
            e.finished, e.selected = finished_count(), len(shard_ids)
        try:  # keep the md5 of every finished shard, for a fast resume
            record(final=False)
        except OSError as again:
            log.debug("part manifest not written: %s", again)
        if isinstance(e, OutputUnwritable):
            raise OutputUnwritable(f"{e}; {finished_count()} of {len(shard_ids)} selected shards are finished "
                                   "and kept: make room (or choose another --out) and rerun to resume") from e
        raise
    try:
        summary = record(final=True)
        index, manifest = shard_index.rebuild(out)
        write_config_yaml(out, cfg, index)
    except OSError as e:
        if e.errno in OUTPUT_ERRNOS:
            raise OutputUnwritable(f"--out {out}: cannot write the dataset records ({e.strerror or e}); the "
                                   "finished shards are kept: make room and rerun to resume") from e
        raise
    summary["dataset_shards"] = manifest["counts"]["shards"]
    summary["dataset_pairs"] = manifest["counts"]["pairs"]
    log_summary(summary)
    return summary


def write_config_yaml(out: str, cfg: dict, index: dict) -> None:
    """``OUT/config.yaml``: the settings that made the dataset, so that
    ``segswap-gen --config OUT/config.yaml --out NEW`` regenerates it byte for byte."""
    import yaml

    ids = [int(e["url"].split("-")[-1].split(".")[0]) for e in index["shardlist"]
           if e["url"].startswith("train-")]
    data = {**json.loads(json.dumps(dataset_config(cfg))), "num_shards": max(ids) + 1 if ids else cfg["num_shards"]}
    with atomic_open(os.path.join(out, CONFIG_NAME), "w") as f:
        f.write("# segswap-gen settings of this dataset (written by segswap-gen; flags override)\n")
        yaml.safe_dump(data, f, sort_keys=True)


def summarise(shard_ids, todo, done, results, failed, gen_time: float) -> dict:
    written = [results[SHARD_PATTERN % s] for s in todo if SHARD_PATTERN % s in results]
    new_pairs = sum(r["pairs"] for r in written)
    skips = Counter()
    for r in [*written, *failed.values()]:
        skips.update(r["skips"])
    return {
        "shards_selected": len(shard_ids), "shards_written": len(written), "shards_resumed": len(done),
        "shards_failed": sorted(failed), "failures": failed, "pairs_written": new_pairs,
        "attempts": sum(r["attempts"] for r in written), "skips": dict(sorted(skips.items())),
        "pairs_missing": sum(r.get("short_by", 0) for r in written),
        "generation_time_s": round(gen_time, 3),
        "pairs_per_s": round(new_pairs / gen_time, 3) if gen_time > 0 and new_pairs else 0.0,
    }


def log_summary(summary: dict) -> None:
    skips = ", ".join(f"{k}: {v}" for k, v in summary["skips"].items()) or "none"
    segment_skips = ", ".join(f"{k}: {v}" for k, v in summary.get("segment_skips", {}).items()) or "none"
    log.info("done: %d pairs in %d new shards (%d resumed, %d failed) in %.1f s = %.2f pairs/s; skipped "
             "attempts: %s; skipped in the segments file: %s; dataset now %d shards, %d pairs",
             summary["pairs_written"], summary["shards_written"], summary["shards_resumed"],
             len(summary["shards_failed"]), summary["generation_time_s"], summary["pairs_per_s"], skips,
             segment_skips, summary["dataset_shards"], summary["dataset_pairs"])

