"""``segswap.generate(out, **options)``: the generator as a Python call, the same code as ``segswap-gen``.

Options are spelled like the command's flags with ``_`` (``num_shards=2``, ``pairs_per_shard=4``,
``style="none"``, ``workers=0``), exactly the keys of a ``--config`` YAML file; they go through the
command's own defaults and validation (:func:`segswap.pipeline.config.resolve`) and its driver
(:func:`segswap.pipeline.run.generate`).
"""
from __future__ import annotations

import os


def generate(out: str | os.PathLike, **options) -> dict:
    """Generate (or resume) a dataset of shards in ``out``; returns the run summary.

    The summary holds ``pairs_written``, ``shards_written``, ``shards_resumed``, ``shards_failed``
    (ids), ``dataset_shards``, ``dataset_pairs``, skip counts and timings: what ``segswap-gen`` logs
    at the end. Raises :class:`segswap.pipeline.config.ConfigError` (a ValueError)
    for a bad option, naming it.
    """
    from segswap.pipeline.config import resolve
    from segswap.pipeline.run import generate as run_generate

    return run_generate(resolve({**options, "out": os.fspath(out)}))
