"""Every setting of the unsupervised segment extractor (paper §3.1), one ``segswap-segments`` flag each.

The thresholds and their meaning are documented with each field; :mod:`segswap.segments.extract`
uses them per image, :mod:`segswap.segments.unsupervised` runs the job.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from segswap.segments.grabcut import GrabCutParams
from segswap.segments.proposals import MODES, BoxFilter


def _param(default, help_text: str, **extra):
    return field(default=default, metadata={"help": help_text, **extra})


@dataclass(frozen=True)
class ExtractionParams:
    """Every setting of the extraction; each is a ``segswap-segments`` flag (``--box-quantile`` …).

    Defaults were chosen with ``benchmarks/bench_segments.py`` (best-segment IoU on images with known
    masks); the figures are in README.md ("Unsupervised segments").
    """

    work_side: int = _param(320, "longer side (px) of the working copy for features, saliency and GrabCut")
    ss_mode: str = _param("fast", "selective search strategy", choices=MODES)
    ss_side: int = _param(256, "longer side (px) of the image selective search runs on")
    min_box_frac: float = _param(0.02, "smallest proposal box, fraction of the image area")
    max_box_frac: float = _param(0.9, "largest proposal box, fraction of the image area")
    max_aspect: float = _param(4.0, "most elongated proposal box (long side / short side)")
    saliency_radius: int = _param(0, "saliency neighbourhood in feature cells (0 = all cells of the image)")
    box_quantile: float = _param(0.6, "keep boxes whose mean saliency reaches this quantile of the image's")
    box_rank: str = _param("excess", "order of boxes for GrabCut: salient mass above the cut-off or mean saliency",
                           choices=("excess", "mean"))
    box_nms_iou: float = _param(0.7, "box IoU above which a lower-scoring proposal is dropped")
    max_boxes: int = _param(10, "GrabCut runs per image (best boxes after NMS)")
    seed_quantile: float = _param(0.6, "pixels at or above this saliency quantile start as probable foreground")
    grabcut_iters: int = _param(5, "GrabCut iterations")
    grabcut_side: int = _param(240, "GrabCut runs on each box's crop shrunk to this longer side (px)")
    grabcut_margin: float = _param(0.2, "GrabCut crop margin around the box, fraction of its size")
    min_seed_frac: float = _param(0.05, "fraction of a box that must be salient for GrabCut to run")
    min_area_frac: float = _param(0.01, "smallest segment, fraction of the image area")
    max_area_frac: float = _param(0.8, "largest segment, fraction of the image area")
    min_fill: float = _param(0.2, "smallest segment area / its box's area")
    max_fill: float = _param(0.97, "largest segment area / its box's area (above: the box itself)")
    mask_nms_iou: float = _param(0.5, "mask IoU above which the lower-scoring segment is dropped")
    min_score: float = _param(0.0, "drop segments whose score (saliency rank of the mask, 0..1) is lower")
    max_segments: int = _param(10, "segments kept per image")
    min_side: int = _param(64, "images with a shorter side (px) are skipped as tiny")
    max_pixels: int = _param(100_000_000, "images with more pixels are skipped as huge")
    min_contrast: float = _param(8.0, "images whose 1st-99th percentile range (grey levels) is below are blank")

    def __post_init__(self):
        if self.work_side < 64:
            raise ValueError(f"work_side must be >= 64 px, got {self.work_side}")
        for name in ("box_quantile", "seed_quantile", "box_nms_iou", "min_score"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.max_boxes < 1 or self.max_segments < 1:
            raise ValueError("max_boxes and max_segments must be >= 1")
        # Validate the sub-parameter groups now, not in a worker.
        self.box_filter()
        self.grabcut()

    @classmethod
    def from_options(cls, **opts) -> ExtractionParams:
        """Build from keyword options; ``None`` values mean "default"; unknown names are errors."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(opts) - names)
        if unknown:
            raise ValueError(f"unknown segment extraction option(s) {unknown}; known: {sorted(names)}")
        return cls(**{k: v for k, v in opts.items() if v is not None})

    def box_filter(self) -> BoxFilter:
        return BoxFilter(min_area_frac=self.min_box_frac, max_area_frac=self.max_box_frac,
                         max_aspect=self.max_aspect)

    def grabcut(self) -> GrabCutParams:
        return GrabCutParams(iterations=self.grabcut_iters, margin=self.grabcut_margin, max_side=self.grabcut_side,
                             min_seed_frac=self.min_seed_frac, min_area_frac=self.min_area_frac,
                             max_area_frac=self.max_area_frac, min_fill=self.min_fill, max_fill=self.max_fill,
                             nms_iou=self.mask_nms_iou)
