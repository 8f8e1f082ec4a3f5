"""Is a local shard the one its ``index.json`` describes? Size on every read, md5 once per process.

The generator records each shard's size and md5 in the ``index.json`` of its folder right after
writing it (``shards/index.py``). A reader that finds such an index beside a local shard compares the
file with its entry before reading it: a size that differs (a truncated copy, a shard rewritten since)
or an md5 that differs (flipped bytes, which a JPEG decoder often does not notice) is reported with
both values. The md5 reads the whole file once more; it is computed the first time a process opens the
shard and remembered for as long as the file's size and modification time stay the same, so a
resampling training stream pays it once per shard per worker (the cost is printed by
``benchmarks/bench_loader.py``). Shards without an index beside them, and remote or ``pipe:`` shards,
are not checked.
"""
from __future__ import annotations

import json
import os

from segswap.shards.index import INDEX_NAME, file_md5
from segswap.shards.reader import is_local


class IndexCheck:
    """``problem(url)`` -> None when the shard agrees with its index entry (or has none), else why not."""

    def __init__(self, md5: bool = True):
        self.md5 = md5
        self._indexes: dict[str, dict] = {}  # folder -> {file name: entry}
        self._verdicts: dict[tuple, str | None] = {}

    def entry(self, url: str) -> dict | None:
        if not is_local(url):
            return None
        folder, name = os.path.split(os.path.abspath(url))
        if folder not in self._indexes:
            self._indexes[folder] = self._read_index(os.path.join(folder, INDEX_NAME))
        return self._indexes[folder].get(name)

    @staticmethod
    def _read_index(path: str) -> dict:
        try:
            with open(path) as f:
                shardlist = json.load(f).get("shardlist") or []
        except (OSError, ValueError, AttributeError):
            return {}  # no index (or not one we can read): nothing to compare with
        return {os.path.basename(e["url"]): e for e in shardlist
                if isinstance(e, dict) and isinstance(e.get("url"), str) and is_local(e["url"])}

    def problem(self, url: str) -> str | None:
        entry = self.entry(url)
        if entry is None:
            return None
        try:
            st = os.stat(url)
        except OSError as e:
            return f"cannot stat ({e.strerror})"
        size = entry.get("filesize")
        if size is not None and st.st_size != size:
            return f"size {st.st_size} bytes, index.json says {size}"
        want = entry.get("md5sum")
        if not self.md5 or not want:
            return None
        key = (os.path.abspath(url), st.st_size, st.st_mtime_ns)
        if key not in self._verdicts:
            try:
                got = file_md5(url)
            except OSError as e:
                return f"cannot read ({e.strerror})"
            self._verdicts[key] = None if got == want else f"md5 {got}, index.json says {want}"
        return self._verdicts[key]
