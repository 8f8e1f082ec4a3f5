"""The one configuration mechanism: a table of defaults < a YAML file < command-line flags.

Each program keeps its own table of defaults (next to the code that uses them) and its own
validation; this module only merges. Every key of a YAML file must exist in the defaults, at every
level of nesting, except inside *open sections* (free-form mappings checked by the component that
receives them); an unknown key is a :class:`ConfigError` naming the key, the file and the keys known
at that level. Keys may be spelled like the flags (``pairs-per-shard``) or like Python
(``pairs_per_shard``).
"""
from __future__ import annotations

import copy
import os

import yaml


class ConfigError(ValueError):
    """A bad option or config file; the message names the key (and the file)."""


def _normalise(data: dict) -> dict:
    return {str(k).replace("-", "_"): (_normalise(v) if isinstance(v, dict) else v) for k, v in data.items()}


def load_yaml(path: str | os.PathLike) -> dict:
    """The mapping in a YAML file (empty file: ``{}``); errors name the file."""
    path = os.fspath(path)
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config ({e.strerror or e})") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of option: value")
    return _normalise(data)


def merge(base: dict, override: dict, where: str, open_sections=(), path: tuple = ()) -> dict:
    """Deep-merge ``override`` into a copy of ``base``; a key not in ``base`` is an error.

    ``open_sections``: key paths (tuples, e.g. ``("model", "ncnet")``) whose mappings are taken as
    given, without checking their keys.
    """
    out = copy.deepcopy(base)
    for k, v in (override or {}).items():
        here = path + (k,)
        if k not in base:
            raise ConfigError(f"{where}: unknown key {'.'.join(here)!r} "
                              f"(known at this level: {', '.join(sorted(base))})")
        if here in open_sections:
            if v is not None and not isinstance(v, dict):
                raise ConfigError(f"{where}: {'.'.join(here)!r} must be a mapping of option: value")
            out[k] = dict(v or {})
        elif isinstance(base[k], dict):
            if not isinstance(v, dict):
                raise ConfigError(f"{where}: {'.'.join(here)!r} must be a mapping of option: value")
            out[k] = merge(base[k], v, where, open_sections, here)
        else:
            out[k] = v
    return out


def set_path(cfg: dict, dotted: str, value, where: str = "options") -> None:
    """``set_path(cfg, "optim.lr", 0.1)``: one flag's value into the nested config (key must exist)."""
    node = cfg
    *parents, last = dotted.split(".")
    for p in parents:
        if not isinstance(node.get(p), dict):
            raise ConfigError(f"{where}: unknown option {dotted!r}")
        node = node[p]
    if last not in node:
        raise ConfigError(f"{where}: unknown option {dotted!r}")
    node[last] = value


def load_config(defaults: dict, config_file: str | os.PathLike | None = None, overrides: dict | None = None,
                *, open_sections=()) -> dict:
    """defaults < YAML ``config_file`` < ``overrides`` (dotted key -> value; None means not given)."""
    cfg = copy.deepcopy(defaults)
    if config_file:
        cfg = merge(cfg, load_yaml(config_file), os.fspath(config_file), open_sections)
    for dotted, value in (overrides or {}).items():
        if value is not None:
            set_path(cfg, dotted, value)
    return cfg
