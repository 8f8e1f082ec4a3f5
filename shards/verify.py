"""Check shards against their index and the format, naming the first bad shard and sample.

For each shard: size and md5 against ``index.json``; tar integrity (every header and member readable,
nothing truncated); member names ``<key>.<field>`` with format keys and a sample's members contiguous;
per sample the fields present, decoded shapes, dtypes and value ranges (:func:`format.decode_sample`),
the minimum mask size in grid cells, the mask/flow consistency (:func:`format.check_consistency`) and
the json's ``key`` and ``format_version``; finally the sample count against the index.
"""
from __future__ import annotations

import logging
import os
import re
import tarfile
from dataclasses import dataclass, field

from segswap.shards.format import (
    FORMAT_VERSION,
    KEY_RE,
    FormatError,
    check_consistency,
    check_pair,
    decode_sample,
)
from segswap.shards.index import file_md5, list_shards, read_index, read_json
from segswap.shards.writer import TMP_SUFFIX

log = logging.getLogger(__name__)
SHARD_ID_RE = re.compile(r"-(\d{6})\.tar$")  # train-000012.tar holds keys 000012-...


@dataclass
class ShardReport:
    """Outcome of verifying one shard. ``problems`` are ``(sample key or None, message)``."""

    path: str
    nsamples: int = 0
    problems: list[tuple[str | None, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def first_problem(self) -> str:
        key, msg = self.problems[0]
        where = f"sample {key}" if key else "shard"
        return f"{os.path.basename(self.path)}: {where}: {msg}"


def _iter_tar_samples(path: str):
    """Yield (key, {field: bytes}) from a local tar, raising FormatError on layout problems."""
    seen_keys = set()
    key, fields = None, {}
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                name = member.name
                if not member.isreg():
                    raise FormatError(f"member {name!r} is not a regular file")
                base, dot, fld = os.path.basename(name).partition(".")
                if not dot or not KEY_RE.match(base):
                    raise FormatError(f"member {name!r} is not named <key>.<field> with a 000000-000000 key")
                if base != key:
                    if key is not None:
                        yield key, fields
                    if base in seen_keys:
                        raise FormatError(f"members of sample {base} are not contiguous")
                    seen_keys.add(base)
                    key, fields = base, {}
                if fld in fields:
                    raise FormatError(f"sample {base}: field {fld} appears twice")
                data = tar.extractfile(member).read()
                if len(data) != member.size:
                    raise FormatError(f"sample {base}: member {name} truncated")
                fields[fld] = data
    except (tarfile.TarError, EOFError, OSError) as e:
        raise FormatError(f"tar unreadable after sample {key}: {e}") from e
    if key is not None:
        yield key, fields


def verify_shard(path: str, expected: dict | None = None, *, min_cells: int = 0, consistency: bool = True,
                 keep_going: bool = False) -> ShardReport:
    """Verify one shard; stops at the first problem unless ``keep_going``.

    ``expected`` is the shard's index entry (``nsamples``, ``filesize``, ``md5sum``) when known.
    """
    report = ShardReport(path)

    def problem(key, msg) -> bool:
        report.problems.append((key, msg))
        return not keep_going  # True: stop now

    if not os.path.isfile(path):
        problem(None, "file missing")
        return report
    if expected:
        size = os.path.getsize(path)
        if size != expected["filesize"] and problem(None, f"size {size} != {expected['filesize']} in index"):
            return report
        md5 = file_md5(path)
        if md5 != expected["md5sum"] and problem(None, f"md5 {md5} != {expected['md5sum']} in index"):
            return report
    id_match = SHARD_ID_RE.search(os.path.basename(path))
    shard_prefix = "%06d-" % int(id_match.group(1)) if id_match else None
    try:
        for key, fields in _iter_tar_samples(path):
            report.nsamples += 1
            try:
                if shard_prefix and not key.startswith(shard_prefix):
                    raise FormatError(f"key does not start with the shard's id ({shard_prefix}...)")
                pair = decode_sample({"__key__": key, **fields})
                if min_cells:
                    check_pair(pair, min_cells=min_cells)
                if consistency:
                    check_consistency(pair)
                if pair.meta.get("key") != key:
                    raise FormatError(f"json key {pair.meta.get('key')!r} != member key")
                if pair.meta.get("format_version") != FORMAT_VERSION:
                    raise FormatError(f"json format_version {pair.meta.get('format_version')!r} != {FORMAT_VERSION}")
            except FormatError as e:
                msg = str(e)
                prefix = f"sample {key} "
                msg = msg[len(prefix):] if msg.startswith(prefix) else msg.removeprefix(f"sample {key}: ")
                if problem(key, msg):
                    return report
    except FormatError as e:
        problem(None, str(e))
        return report
    if report.nsamples == 0:
        problem(None, "no samples")
    elif expected and report.nsamples != expected["nsamples"]:
        problem(None, f"{report.nsamples} samples != {expected['nsamples']} in index")
    return report


def dataset_min_cells(out_dir: str, default: int) -> int:
    """The generator's min_cells from the manifest, so verify checks what the run promised."""
    path = os.path.join(out_dir, "manifest.json")
    try:
        cfg = read_json(path).get("config") or {}
    except (OSError, ValueError):
        return default
    value = cfg.get("min_cells", default)
    return int(value) if isinstance(value, int) else default


def verify_dir(out_dir: str, *, min_cells: int = 0, consistency: bool = True, keep_going: bool = False,
               use_index: bool = True) -> list[ShardReport]:
    """Verify every shard of a dataset directory against its index; stops at the first bad shard
    unless ``keep_going``. Shards missing from the index (or listed but missing) are problems."""
    if not os.path.isdir(out_dir):
        raise FileNotFoundError(f"{out_dir}: not a directory")
    index = read_index(out_dir) if use_index else None
    reports = []
    if use_index and index is None:
        report = ShardReport(os.path.join(out_dir, "index.json"), problems=[
            (None, "index.json missing (rebuild it with `segswap-shards index DIR`)")])
        reports.append(report)
        if not keep_going:
            return reports
    entries = {e["url"]: e for e in (index or {}).get("shardlist", [])}
    paths = list_shards(out_dir)
    names = {os.path.basename(p) for p in paths}
    for url in sorted(set(entries) - names):
        reports.append(ShardReport(os.path.join(out_dir, url), problems=[(None, "listed in index.json but missing")]))
        if not keep_going:
            return reports
    for tmp in sorted(n for n in os.listdir(out_dir) if n.endswith(".tar" + TMP_SUFFIX)):
        log.warning("%s: unfinished shard left by an interrupted run (a rerun replaces it)", tmp)
    for i, path in enumerate(paths):
        url = os.path.basename(path)
        expected = entries.get(url)
        if index is not None and expected is None:
            report = ShardReport(path, problems=[(None, "not listed in index.json")])
        else:
            report = verify_shard(path, expected, min_cells=min_cells, consistency=consistency,
                                  keep_going=keep_going)
        reports.append(report)
        log.info("[%d/%d] %s: %s", i + 1, len(paths), url, "ok" if report.ok else report.first_problem())
        if not report.ok and not keep_going:
            break
    if not paths:
        reports.append(ShardReport(out_dir, problems=[(None, "no shards (*.tar) in directory")]))
    return reports
