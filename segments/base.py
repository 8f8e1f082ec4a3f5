"""What a segment is, and what a segment source promises.

Every segment source (COCO instance annotations, the unsupervised extractor of issue 3, a user's own
tool) ends in the same place: a COCO-format instances json with RLE or polygon masks and an optional
``score`` per annotation. The renderer reads all of them through one class,
:class:`segswap.segments.coco.SegmentIndex`, so a new source only has to write that file.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class ImageRecord:
    """One image of a segment index: COCO ``images`` entry plus the resolved file path."""

    id: int
    file_name: str
    path: Path
    width: int
    height: int


@dataclass(frozen=True)
class Segment:
    """One usable instance mask.

    ``bbox`` is COCO's [x, y, w, h] in pixels of the original image; ``rle`` the compressed RLE
    (``{"size": [h, w], "counts": bytes}``) as pycocotools encodes it; ``area`` in pixels (of the
    decoded mask); ``score`` the source's confidence (1.0 for human annotations).
    """

    id: int
    image_id: int
    category: int
    bbox: tuple[float, float, float, float]
    rle: dict = field(repr=False, compare=False)
    area: float
    score: float = 1.0
