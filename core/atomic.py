"""Atomic writes: a file appears under its final name complete or not at all.

Everything segswap writes goes to a temporary name in the same folder and is renamed with
``os.replace`` (atomic on POSIX filesystems) once it is complete. On any error the temporary file is
removed, so a full disk or a killed job leaves neither a half-written file under the final name nor
stray temporaries. The temporary name is hidden (a leading dot: folder listings, which skip hidden
files, never pick up a file being written) and carries host and pid: tasks of a SLURM array on a
shared filesystem may write the same file at once.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform

TMP_SUFFIX = ".tmp"


def temp_name(path: str | os.PathLike) -> str:
    """``<dir>/.<name>.<host>.<pid>.tmp``: unique per writer, hidden, recognisable (``.tmp``) to clean-up code."""
    head, name = os.path.split(os.fspath(path))
    return os.path.join(head, f".{name}.{platform.node()}.{os.getpid()}{TMP_SUFFIX}")


@contextlib.contextmanager
def _renamed_on_success(tmp: str, path: str | os.PathLike):
    """``tmp`` becomes ``path`` when the block succeeds, and is removed when it raises."""
    try:
        yield
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", *, fsync: bool = False, **open_kwargs):
    """``with atomic_open(path, "wb") as f: ...``: written to :func:`temp_name`, renamed on success.

    ``fsync``: flush to the device before the rename (for records that must survive a power cut).
    """
    if not any(c in mode for c in "wx"):
        raise ValueError(f"atomic_open writes; mode {mode!r} has no 'w'")
    tmp = temp_name(path)
    with _renamed_on_success(tmp, path), open(tmp, mode, **open_kwargs) as f:
        yield f
        f.flush()
        if fsync:
            os.fsync(f.fileno())


def atomic_write(path: str | os.PathLike, data: str | bytes, *, fsync: bool = False) -> None:
    """Write ``data`` (text or bytes) to ``path`` atomically."""
    with atomic_open(path, "wb" if isinstance(data, bytes) else "w", fsync=fsync) as f:
        f.write(data)


def atomic_write_json(path: str | os.PathLike, obj, *, indent: int | None = 1, sort_keys: bool = False,
                      fsync: bool = False, **dump_kwargs) -> None:
    """``json.dump(obj)`` to ``path`` atomically (a trailing newline when indented)."""
    with atomic_open(path, "w", fsync=fsync) as f:
        json.dump(obj, f, indent=indent, sort_keys=sort_keys, **dump_kwargs)
        if indent is not None:
            f.write("\n")


def atomic_save(path: str | os.PathLike, save, *, fsync: bool = False) -> None:
    """Atomic write through a saver that takes a file name (``torch.save``, ``cv2.imwrite``, PIL).

    ``save(tmp_path)`` writes the temporary file; its extension is kept (``x.png`` -> ``x.png.<...>.tmp.png``)
    for savers that pick the format from it.
    """
    tmp = temp_name(path) + os.path.splitext(os.fspath(path))[1]
    with _renamed_on_success(tmp, path):
        save(tmp)
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
