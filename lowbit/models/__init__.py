"""The model families: one module each, found through this registry.

A family module defines a `Family` subclass (lowbit/models/base.py) and registers one instance
with `register`. Lookup is by `architectures` first, then `model_type` (of the text config).
Adding a family = one file, one line in FAMILY_MODULES, and the generic family test's entry.
"""
from __future__ import annotations

import importlib

from ..errors import ConfigError

FAMILY_MODULES = ("llama", "phi3", "gemma3", "qwen3_moe", "qwen3_5", "nemotron_h")
_BY_ARCH: dict = {}
_BY_TYPE: dict = {}
_loaded = False


def register(family):
    for a in family.architectures:
        _BY_ARCH[a] = family
    for t in family.model_types:
        _BY_TYPE[t] = family
    return family


def _load_all():
    global _loaded
    if not _loaded:
        for m in FAMILY_MODULES:
            importlib.import_module(f"{__name__}.{m}")
        _loaded = True


def family_for(config: dict, where: str = "config.json"):
    """(family, architecture name) of a config.json dict."""
    _load_all()
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    for a in config.get("architectures") or []:
        if a in _BY_ARCH:
            return _BY_ARCH[a], a
    for t in (text.get("model_type"), config.get("model_type")):
        if t in _BY_TYPE:
            fam = _BY_TYPE[t]
            return fam, fam.model_types[t]
    names = config.get("architectures") or [config.get("model_type")]
    raise ConfigError(f"{where}: unsupported architecture {', '.join(map(str, names))}; supported: "
                      f"{', '.join(sorted(_BY_ARCH))}")


def family(cfg):
    """The family of a parsed ModelConfig."""
    _load_all()
    return next(f for f in _BY_ARCH.values() if f.name == cfg.family)


def supported_architectures() -> list[str]:
    _load_all()
    return sorted(_BY_ARCH)
