"""Listing a folder of images: the files, and the entries that look like images but cannot be read.

Users point segswap at their own folders, which hold folders named like photos, symlinks into other
disks (some dangling, some looping) and names in any encoding. :func:`list_images` names each entry it
cannot use instead of dropping it, so batch jobs can report it.
"""
from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

# File name endings read as images (lower case); every lister in segswap uses this one list.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm")


@dataclass
class ImageListing:
    """What :func:`list_images` found: ``files`` (sorted) and ``skipped`` = [(path, reason)]."""

    files: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def list_images(folder, *, extensions: tuple[str, ...] | None = IMAGE_EXTENSIONS, recursive: bool = True
                ) -> ImageListing:
    """The image files under ``folder``, sorted, and the entries that look like images but are not.

    Hidden entries (a leading dot, e.g. files being written) are ignored. ``extensions=None`` lists
    every regular file (the caller checks the contents). Symlinks are followed, to files and to
    folders; an entry that cannot be read as a file is *named* in ``skipped`` rather than dropped
    silently: a folder named like an image (``x.jpg/``; its contents are still listed when
    recursing), a broken symlink, a symlink loop, a socket or pipe. File names need not be UTF-8
    (they come back as ``Path`` objects holding the raw bytes, ``os.fsdecode`` style).
    Raises ``NotADirectoryError`` naming ``folder`` when it is not a folder.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder}: not a directory")
    listing = ImageListing()
    seen_dirs = {os.path.realpath(folder)}

    def wanted(name: str) -> bool:
        return extensions is None or name.lower().endswith(extensions)

    def visit(d: Path) -> None:
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as e:
            listing.skipped.append((d, f"cannot list folder ({e.strerror or e})"))
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            try:
                st = os.stat(entry.path)  # follows symlinks
            except OSError as e:
                if wanted(entry.name) or entry.is_symlink():
                    reason = "symlink loop" if e.errno == errno.ELOOP else "broken symlink" if entry.is_symlink() else "cannot read"
                    listing.skipped.append((path, f"{reason} ({e.strerror or e})"))
                continue
            if stat.S_ISDIR(st.st_mode):
                if entry.name.lower().endswith(extensions or IMAGE_EXTENSIONS):
                    listing.skipped.append((path, "a directory, not an image file"))
                if recursive:
                    real = os.path.realpath(entry.path)
                    if real in seen_dirs:
                        listing.skipped.append((path, f"symlink loop (folder {real} is listed already)"))
                        continue
                    seen_dirs.add(real)
                    visit(path)
            elif wanted(entry.name):
                if stat.S_ISREG(st.st_mode):
                    listing.files.append(path)
                else:
                    listing.skipped.append((path, "not a regular file (socket, pipe or device)"))

    visit(folder)
    listing.files.sort()
    return listing
