"""Read shards back as :class:`~segswap.shards.format.Pair` objects.

``iter_pairs(url)`` accepts what WebDataset users expect: a local path, a directory of shards, a brace
list (``out/train-{000000..000015}.tar``), several of those joined by ``::``, ``pipe:`` commands
(``pipe:aws s3 cp s3://bucket/train-000000.tar -``), and a wids ``index.json``. Tar members are grouped into samples with
WebDataset's own tar iterator, and every sample goes through :func:`format.decode_sample`, which knows
only the whitelisted fields and never unpickles. WebDataset's default decoders are deliberately not
used: they would unpickle ``.pyd``/``.pickle`` members.
"""
from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator

from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls
from webdataset.tariterators import group_by_keys, tar_file_expander

from segswap.shards.format import FormatError, Pair, decode_sample

SHARD_GLOB = "*.tar"


def shard_urls(url: str | os.PathLike | list) -> list[str]:
    """Expand a path, directory, brace list or ``::``-joined list into a list of shard URLs."""
    if isinstance(url, (list, tuple)):
        return [u for part in url for u in shard_urls(part)]
    url = os.fspath(url)
    if url.endswith(".json") and os.path.isfile(url):
        # A wids index.json: its shard URLs are relative to the index's folder.
        with open(url) as f:
            shardlist = json.load(f).get("shardlist")
        if not isinstance(shardlist, list):
            raise ValueError(f"{url}: not a wids index (no shardlist)")
        base = os.path.dirname(os.path.abspath(url))
        return [e["url"] if "://" in e["url"] or e["url"].startswith("pipe:") or os.path.isabs(e["url"])
                else os.path.join(base, e["url"]) for e in shardlist]
    if not url.startswith("pipe:") and os.path.isdir(url):
        urls = sorted(glob.glob(os.path.join(url, SHARD_GLOB)))
        if not urls:
            raise FileNotFoundError(f"{url}: directory holds no *.tar shards")
        return urls
    return expand_urls(url)


def iter_raw_samples(url) -> Iterator[dict]:
    """Yield ``{"__key__", "__url__", field: bytes}`` samples without decoding anything."""
    for shard in shard_urls(url):
        stream = gopen(shard, "rb")
        try:
            yield from group_by_keys(tar_file_expander([{"url": shard, "stream": stream}]))
        finally:
            stream.close()


def iter_pairs(url) -> Iterator[Pair]:
    """Yield every pair of the shards named by ``url``, decoded and shape-checked.

    A sample that does not follow the format raises :class:`FormatError` naming the shard and key;
    use ``segswap-shards verify`` to find every bad sample of a dataset.
    """
    for raw in iter_raw_samples(url):
        try:
            yield decode_sample(raw)
        except FormatError as e:
            raise FormatError(f"{raw.get('__url__', '?')}: {e}") from e
