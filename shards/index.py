"""A dataset directory's ``index.json`` (wids style) and ``manifest.json`` (what made it).

``index.json`` lists every finished shard, relative to the directory, in the layout ``wids`` reads::

    {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": "...",
     "shardlist": [{"url": "train-000000.tar", "nsamples": 32, "filesize": 5242880, "md5sum": "..."}]}

The index is always *rebuilt from the shards present*, so the parts of a job split over a SLURM array
compose by construction: each part rebuilds it when it finishes, and ``segswap-shards index DIR`` does it
once more after the whole array. The md5 recorded for a shard is the one computed right after it was
written (kept in the per-part manifests), not recomputed from a possibly damaged file, so
``segswap-shards verify`` can tell a damaged shard from a good one.

``manifest.json`` is the merge of the per-part manifests in ``manifests/``: one per generator
invocation (``manifests/shards-000000-000016.json``), each with the resolved config, root seed,
package versions, git revision, host, wall time and per-shard statistics (pairs written, attempts,
skips by reason). The merge sums the statistics of the shards present, taking each shard from the
last part that wrote it, so reruns and resumed runs do not double count.
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import tarfile
from collections import Counter

from segswap.core.atomic import atomic_write_json
from segswap.shards.format import FORMAT_VERSION

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"
MANIFEST_NAME = "manifest.json"
PARTS_DIR = "manifests"
INDEX_KIND = "wids-shard-index-v1"
SHARD_GLOB = "*.tar"


def read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def file_md5(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def count_samples(path: str) -> int:
    """Number of distinct sample keys in a tar (reads headers only)."""
    keys = set()
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if member.isreg():
                    keys.add(os.path.basename(member.name).split(".", 1)[0])
    except (tarfile.TarError, EOFError) as e:
        # Index what is readable; `segswap-shards verify` reports the damage with the shard's name.
        log.warning("%s: tar unreadable after %d samples (%s)", path, len(keys), e)
    return len(keys)


def shard_entry(path: str) -> dict:
    """The index entry of one finished shard, computed from the file."""
    return {"url": os.path.basename(path), "nsamples": count_samples(path),
            "filesize": os.path.getsize(path), "md5sum": file_md5(path)}


def list_shards(out_dir: str) -> list[str]:
    """Finished shards of a directory, sorted (temporary ``.tmp`` files are never listed)."""
    return sorted(p for p in glob.glob(os.path.join(out_dir, SHARD_GLOB)) if os.path.isfile(p))


# ------------------------------------------------------------------------------------------ index

def read_index(out_dir: str) -> dict | None:
    """The directory's index, or None when it has none; a malformed index is an error naming it."""
    path = os.path.join(out_dir, INDEX_NAME)
    if not os.path.exists(path):
        return None
    index = read_json(path)
    if index.get("__kind__") != INDEX_KIND or not isinstance(index.get("shardlist"), list):
        raise ValueError(f"{path}: not a {INDEX_KIND} index (missing __kind__ or shardlist)")
    for i, entry in enumerate(index["shardlist"]):
        missing = {"url", "nsamples", "filesize", "md5sum"} - set(entry)
        if missing:
            raise ValueError(f"{path}: shardlist[{i}] lacks {sorted(missing)}")
    return index


def known_entries(out_dir: str) -> dict[str, dict]:
    """Index entries recorded at write time: the per-part manifests, then the current index."""
    known = {}
    index = None
    try:
        index = read_index(out_dir)
    except ValueError:
        pass  # a damaged index is rebuilt from the files
    for entry in (index or {}).get("shardlist", []):
        known[entry["url"]] = entry
    for part in read_parts(out_dir):
        for url, stats in part.get("shards", {}).items():
            if "entry" in stats:
                known[url] = stats["entry"]
    return known


def build_index(out_dir: str, name: str | None = None, rehash: bool = False) -> dict:
    """Index of the shards present; md5s recorded at write time are reused when the size matches
    (``rehash`` recomputes every entry from the files instead, accepting their current content)."""
    known = {} if rehash else known_entries(out_dir)
    shardlist = []
    for path in list_shards(out_dir):
        url = os.path.basename(path)
        entry = known.get(url)
        if entry is None or entry.get("filesize") != os.path.getsize(path):
            entry = shard_entry(path)
        shardlist.append({k: entry[k] for k in ("url", "nsamples", "filesize", "md5sum")})
    return {"__kind__": INDEX_KIND, "wids_version": 1,
            "name": name or os.path.basename(os.path.abspath(out_dir)), "shardlist": shardlist}


def write_index(out_dir: str, name: str | None = None, rehash: bool = False) -> dict:
    index = build_index(out_dir, name, rehash)
    atomic_write_json(os.path.join(out_dir, INDEX_NAME), index, sort_keys=True, fsync=True)
    return index


# --------------------------------------------------------------------------------------- manifest

def part_path(out_dir: str, part_name: str) -> str:
    return os.path.join(out_dir, PARTS_DIR, part_name + ".json")


def write_part(out_dir: str, part_name: str, part: dict) -> str:
    os.makedirs(os.path.join(out_dir, PARTS_DIR), exist_ok=True)
    path = part_path(out_dir, part_name)
    atomic_write_json(path, part, sort_keys=True, fsync=True)
    return path


def read_parts(out_dir: str) -> list[dict]:
    """Per-part manifests, oldest first (by their recorded finish time, then name)."""
    parts = []
    for path in sorted(glob.glob(os.path.join(out_dir, PARTS_DIR, "*.json"))):
        part = read_json(path)
        part.setdefault("name", os.path.splitext(os.path.basename(path))[0])
        parts.append(part)
    return sorted(parts, key=lambda p: (p.get("finished_unix", 0), p["name"]))


def merge_manifest(out_dir: str, index: dict | None = None) -> dict:
    """Merge the per-part manifests over the shards present into one dataset manifest."""
    parts = read_parts(out_dir)
    index = index if index is not None else build_index(out_dir)
    present = {e["url"]: e for e in index["shardlist"]}
    shard_stats = {}
    for part in parts:  # later parts win
        for url, stats in part.get("shards", {}).items():
            shard_stats[url] = stats
    pairs = sum(e["nsamples"] for e in present.values())
    skips, attempts = Counter(), 0
    for url in present:
        stats = shard_stats.get(url, {})
        skips.update(stats.get("skips", {}))
        attempts += stats.get("attempts", 0)
    configs = {json.dumps(p.get("config"), sort_keys=True) for p in parts if p.get("config") is not None}
    last = parts[-1] if parts else {}
    return {
        "format_version": FORMAT_VERSION,
        "config": last.get("config"),
        "root_seed": last.get("root_seed"),
        "configs_agree": len(configs) <= 1,
        "packages": last.get("packages"),
        "git_revision": last.get("git_revision"),
        "counts": {"shards": len(present), "pairs": pairs, "attempts": attempts,
                   "shards_without_stats": sorted(u for u in present if u not in shard_stats)},
        "skips": dict(sorted(skips.items())),
        # What the segments file's loader skipped (COCO items, by reason): the same for every part.
        "segment_skips": last.get("segment_skips", {}),
        "wall_time_s": round(sum(p.get("wall_time_s", 0.0) for p in parts), 3),
        "parts": [{k: p.get(k) for k in ("name", "host", "started_utc", "wall_time_s", "shard_range",
                                          "shards_written", "shards_resumed", "workers", "git_revision")}
                  for p in parts],
    }


def rebuild(out_dir: str, rehash: bool = False) -> tuple[dict, dict]:
    """Rewrite ``index.json`` then ``manifest.json`` from what the directory holds."""
    index = write_index(out_dir, rehash=rehash)
    manifest = merge_manifest(out_dir, index)
    atomic_write_json(os.path.join(out_dir, MANIFEST_NAME), manifest, sort_keys=True, fsync=True)
    return index, manifest
