"""Write one shard: a WebDataset tar of encoded pairs, byte-identical for identical pairs.

The tar headers carry nothing that changes between runs (fixed mtime, owner, group and mode; USTAR
format; members in sorted field order), so a rerun with the same seed reproduces every byte and md5
sums can be compared across machines. The shard is written to ``path + ".tmp"`` and renamed into place
only when it is complete, so a reader, an index rebuild or a resuming generator never sees half a shard:
a file with the final name is finished.
"""
from __future__ import annotations

import os

import webdataset as wds

from segswap.shards.format import Pair, encode_sample

# Fixed header fields: any constant works; these are what the format documents.
TAR_MTIME = 0
TAR_OWNER = "segswap"
TAR_MODE = 0o444
TMP_SUFFIX = ".tmp"


class ShardWriter:
    """Context manager writing :class:`Pair` objects (or already encoded samples) to one tar.

    ``with ShardWriter("out/train-000003.tar") as w: w.write(pair)``. On a clean exit the file is
    flushed, fsynced and renamed to ``path``; on an exception the temporary file is removed and
    ``path`` is left untouched.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.tmp_path = self.path + TMP_SUFFIX
        self.nsamples = 0
        self._file = None
        self._tar = None

    def __enter__(self) -> ShardWriter:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self._file = open(self.tmp_path, "wb")
        self._tar = wds.TarWriter(self._file, encoder=False, mtime=TAR_MTIME, user=TAR_OWNER,
                                  group=TAR_OWNER, mode=TAR_MODE)
        return self

    def write(self, sample: Pair | dict) -> None:
        """Append one pair; a ``dict`` must already be ``format.encode_sample`` output."""
        if self._tar is None:
            raise RuntimeError("ShardWriter.write called outside its `with` block")
        if isinstance(sample, Pair):
            sample = encode_sample(sample)
        self._tar.write(sample)
        self.nsamples += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        renamed = False
        try:
            try:
                self._tar.close()  # does not close the file object we passed in
                self._file.flush()
                os.fsync(self._file.fileno())
            finally:
                self._file.close()
                self._tar = self._file = None
            if exc_type is None:
                os.replace(self.tmp_path, self.path)
                renamed = True
        finally:
            # Also when closing fails (a full disk fails the last flush): no temporary file stays behind.
            if not renamed:
                try:
                    os.remove(self.tmp_path)
                except FileNotFoundError:
                    pass


def write_shard(path: str | os.PathLike, samples) -> int:
    """Write an iterable of pairs / encoded samples to ``path``; returns the number written."""
    with ShardWriter(path) as writer:
        for sample in samples:
            writer.write(sample)
    return writer.nsamples
