"""Read shards back: URL expansion, tar reading that notices damage, and :class:`~segswap.shards.format.Pair` objects.

``shard_urls(url)`` accepts what WebDataset users expect: a local path, a directory of shards, a brace
list (``out/train-{000000..000015}.tar``), several of those joined by ``::``, ``pipe:`` commands
(``pipe:aws s3 cp s3://bucket/train-000000.tar -``), and a wids ``index.json``. A ``pipe:`` URL is a
shell command: it is honoured only where the user typed it. URLs read from a file (an ``index.json``)
are data; a ``pipe:`` entry there is an error naming the index, never run.

``read_shard`` groups a shard's tar members into samples and, unlike a plain tar iterator, tells a
damaged tar from a finished one: an empty file, a file that is not a tar, a header with a bad checksum,
a tar that stops before its end-of-archive block or in the middle of a member all raise
:class:`DamagedShard` naming the shard, after every complete sample before the damage was yielded.
(Python's ``tarfile`` and WebDataset's iterator end such a shard silently.)

Every sample goes through :func:`format.decode_sample`, which knows only the whitelisted fields and
never unpickles. WebDataset's default decoders are deliberately not used: they would unpickle
``.pyd``/``.pickle`` members.
"""
from __future__ import annotations

import glob
import json
import os
import tarfile
from collections.abc import Iterator

from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls

from segswap.shards.format import FormatError, Pair, decode_sample

SHARD_GLOB = "*.tar"


class DamagedShard(FormatError):
    """A shard that cannot be read to its end (or at all); the message names it and says why."""


def is_command(url: str) -> bool:
    return url.startswith("pipe:")


def is_local(url: str) -> bool:
    return not is_command(url) and "://" not in url


def _index_urls(path: str) -> list[str]:
    """Shard URLs of a wids ``index.json``, relative to its folder. Entries are data: no commands."""
    try:
        with open(path) as f:
            shardlist = json.load(f).get("shardlist")
    except (OSError, json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"{path}: not a readable wids index ({e})") from e
    if not isinstance(shardlist, list) or not shardlist:
        raise ValueError(f"{path}: not a wids index (no shardlist, or an empty one)")
    base = os.path.dirname(os.path.abspath(path))
    out = []
    for i, entry in enumerate(shardlist):
        url = entry.get("url") if isinstance(entry, dict) else None
        if not isinstance(url, str) or not url:
            raise ValueError(f"{path}: shardlist[{i}] has no url")
        if is_command(url):
            raise ValueError(f"{path}: shardlist[{i}] is a command ({url[:60]!r}); URLs read from a file are "
                             f"data and never run (type a pipe: URL on the command line if you mean it)")
        out.append(url if "://" in url or os.path.isabs(url) else os.path.join(base, url))
    return out


def shard_urls(url: str | os.PathLike | list) -> list[str]:
    """Expand a path, directory, ``index.json``, brace list, ``pipe:`` URL or ``::``-joined list into shard URLs."""
    if isinstance(url, (list, tuple)):
        return [u for part in url for u in shard_urls(part)]
    url = os.fspath(url)
    if "::" in url:
        return [u for part in url.split("::") if part for u in shard_urls(part)]
    if is_command(url):
        return expand_urls(url)  # typed by the user; braces expand as WebDataset does
    if url.endswith(".json") and os.path.isfile(url):
        return _index_urls(url)
    if os.path.isdir(url):
        urls = sorted(glob.glob(os.path.join(url, SHARD_GLOB)))
        if not urls:
            raise FileNotFoundError(f"{url}: directory holds no *.tar shards")
        return urls
    out = expand_urls(url)
    if not out:
        raise ValueError(f"{url!r} names no shards")
    return out


class _CheckedTarInfo(tarfile.TarInfo):
    """A header reader that calls damage damage, not the end: ``tarfile`` treats a bad or missing header after the
    first one as the end of the archive. Only an all-zero block (the end-of-archive marker) ends it here."""

    @classmethod
    def frombuf(cls, buf, encoding, errors):
        try:
            return super().frombuf(buf, encoding, errors)
        except tarfile.EOFHeaderError:
            raise
        except tarfile.EmptyHeaderError:
            raise DamagedShard("empty file" if not getattr(cls, "_seen", False) else
                               "truncated (ends before the end-of-archive block)") from None
        except tarfile.TruncatedHeaderError:
            raise DamagedShard("truncated (ends inside a tar header)") from None
        except tarfile.InvalidHeaderError as e:
            raise DamagedShard(f"not a tar or corrupt tar header ({e})") from None


def _close(stream) -> None:
    # A pipe: command may never end (a stalled download): kill it rather than wait for it (WebDataset's
    # Pipe.close waits up to two hours).
    proc = getattr(stream, "proc", None)
    if proc is not None and proc.poll() is None:
        proc.kill()
    try:
        stream.close()
    except Exception:  # noqa: BLE001 - a killed pipe reports its status; the shard is done either way
        pass


def read_shard(url: str, stream=None) -> Iterator[dict]:
    """Yield ``{"__key__", "__url__", field: bytes}`` for every complete sample of one shard.

    Members are grouped by key (the file name up to its first dot), as WebDataset does. Raises
    :class:`DamagedShard` where the tar is damaged (see the module docstring), after yielding the
    sample in progress there (it may be incomplete; ``decode_sample`` rejects what lacks a field).
    """
    own = stream is None
    try:
        stream = gopen(url, "rb") if own else stream
    except Exception as e:  # noqa: BLE001 - missing file, failing command: one error naming the shard
        raise DamagedShard(f"{url}: cannot open ({type(e).__name__}: {e})") from e
    tarinfo = type("_Checked", (_CheckedTarInfo,), {"_seen": False})
    sample: dict = {}
    try:
        try:
            with tarfile.open(fileobj=stream, mode="r|*", tarinfo=tarinfo) as tar:
                for member in tar:
                    tarinfo._seen = True
                    if not member.isreg() or os.path.basename(member.name).startswith("__"):
                        continue
                    prefix, base = os.path.split(member.name)
                    key, dot, field = base.partition(".")
                    if not dot:
                        continue
                    key = os.path.join(prefix, key) if prefix else key
                    data = tar.extractfile(member).read()
                    if sample and sample["__key__"] != key:
                        yield sample
                        sample = {}
                    if not sample:
                        sample = {"__key__": key, "__url__": url}
                    field = field.lower()
                    if field in sample:
                        raise DamagedShard(f"sample {key}: field {field} appears twice")
                    sample[field] = data
        except DamagedShard as e:
            if sample:
                yield sample
                sample = {}
            msg = str(e)
            raise DamagedShard(msg if msg.startswith(url) else f"{url}: {msg}") from None
        except (tarfile.TarError, EOFError, OSError, ValueError) as e:
            if sample:
                yield sample
                sample = {}
            raise DamagedShard(f"{url}: unreadable tar ({type(e).__name__}: {e})") from e
        if sample:
            yield sample
    finally:
        if own:
            _close(stream)


def iter_raw_samples(url) -> Iterator[dict]:
    """Yield ``{"__key__", "__url__", field: bytes}`` samples without decoding anything."""
    for shard in shard_urls(url):
        yield from read_shard(shard)


def iter_pairs(url) -> Iterator[Pair]:
    """Yield every pair of the shards named by ``url``, decoded and shape-checked.

    A sample that does not follow the format, or a damaged shard, raises :class:`FormatError` naming
    the shard and key; use ``segswap-shards verify`` to find every bad sample of a dataset.
    """
    for raw in iter_raw_samples(url):
        try:
            yield decode_sample(raw)
        except FormatError as e:
            raise FormatError(f"{raw.get('__url__', '?')}: {e}") from e
