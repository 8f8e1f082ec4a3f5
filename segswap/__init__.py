"""segswap: learning co-segmentation by segment swapping (Shen, Efros, Joulin, Aubry, CVPR-W 2022).

The public Python API; everything here is re-exported from the layer that implements it and is
imported on first use, so ``import segswap`` stays cheap (the generator's workers never load torch
through it)::

    import segswap
    model = segswap.load_model("runs/demo/last.pth")       # ours, or an official SegSwap .pth
    out = model.predict(img0, img1)                         # mask0 [H0,W0], mask1, flow01 [H0,W0,2], flow10
    s = model.score(img0, img1)                             # Eq. 3 retrieval score
    segswap.generate("data/pairs", num_shards=2)            # what segswap-gen does
    for pair in segswap.open_shards("data/pairs"): ...      # shards.Pair objects
    segswap.viz.write_png("pair.png", segswap.viz.side_by_side(pair.img0, pair.img1))

========================  =====================================  ==========================
name                      what                                   defined in
========================  =====================================  ==========================
``load_model``            a :class:`Predictor` from a checkpoint  ``segswap.apps.predictor``
``Predictor``             ``predict`` / ``score`` on any images   ``segswap.apps.predictor``
``generate``              the generator (``segswap-gen``)         ``segswap.pipeline.api``
``open_shards``           iterate the pairs of shards             ``segswap.shards.reader``
``Pair``                  one decoded training pair               ``segswap.shards.format``
``viz``                   drawing pairs, masks, correspondences   ``segswap.core.viz``
``__version__``           the installed version                   ``segswap.core.cli``
========================  =====================================  ==========================
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "load_model": ("segswap.apps.predictor", "load_model"),
    "Predictor": ("segswap.apps.predictor", "Predictor"),
    "generate": ("segswap.pipeline.api", "generate"),
    "open_shards": ("segswap.shards.reader", "iter_pairs"),
    "Pair": ("segswap.shards.format", "Pair"),
    "viz": ("segswap.core.viz", None),
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name == "__version__":
        from segswap.core.cli import version

        return version()
    if name not in _EXPORTS:
        raise AttributeError(f"module 'segswap' has no attribute {name!r}")
    module, attr = _EXPORTS[name]
    value = importlib.import_module(module)
    return value if attr is None else getattr(value, attr)


def __dir__() -> list[str]:
    return sorted(__all__)
