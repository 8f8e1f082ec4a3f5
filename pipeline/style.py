"""Stylisers: the interface the generator uses to make the stylised versions of each pair.

The paper finds style transfer critical (Table 3), so every generated pair can carry plain and stylised
versions of both images (fields ``sty0``/``sty1``). A styliser is loaded once per worker process and
called on batches of images; it returns, for each image, the stylised image and a small dict that goes
into the sample's json (``{"styliser", "style_id", "strength"}``).

``build_styliser("none")`` returns ``None``: no stylised fields are written. The real stylisers live in
their own modules and are imported only when asked for, so a plain run never loads onnxruntime or VGG.
"""
from __future__ import annotations

import importlib
from typing import Protocol

import numpy as np

# name -> (module, class). Each class takes keyword options only (see its docstring).
STYLISERS = {
    "magenta": ("segswap.pipeline.style_magenta", "MagentaStyliser"),
    "adain": ("segswap.pipeline.style_adain", "AdainStyliser"),
}
STYLE_CHOICES = ("none", *STYLISERS)


class Styliser(Protocol):
    name: str

    def stylise(self, images: list[np.ndarray], rng: np.random.Generator) -> tuple[list[np.ndarray], list[dict]]:
        """uint8 HxWx3 RGB images -> (stylised images of the same sizes, one provenance dict per image).

        Every random choice (style image, strength) is drawn from ``rng`` in order, so the same rng
        state gives the same output whatever the batch size.
        """
        ...


def build_styliser(name: str, **opts) -> Styliser | None:
    """Make the styliser called ``name`` with its keyword options; ``"none"`` gives ``None``.

    Options left at ``None`` (flags the user did not give) are dropped, so callers can pass every
    style flag through unchanged.
    """
    opts = {k: v for k, v in opts.items() if v is not None}
    if name == "none":
        if opts:
            raise ValueError(f"style 'none' takes no options, got {sorted(opts)}")
        return None
    if name not in STYLISERS:
        raise ValueError(f"unknown style {name!r}; choose one of {', '.join(STYLE_CHOICES)}")
    module, cls = STYLISERS[name]
    return getattr(importlib.import_module(module), cls)(**opts)
