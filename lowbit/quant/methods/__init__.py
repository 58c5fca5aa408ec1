"""Scheme units: one module per scheme family. `method_class(scheme)` picks the unit for a Scheme."""
from __future__ import annotations

from ..scheme import Scheme
from .unquantized import UnquantizedMethod

_REGISTRY: list[tuple[object, type]] = []


def register(predicate):
    """Decorator: register a LinearMethod subclass for the schemes `predicate(scheme)` accepts."""

    def deco(cls):
        _REGISTRY.append((predicate, cls))
        return cls

    return deco


def method_class(scheme: Scheme):
    if not scheme.quantized:
        return UnquantizedMethod
    _import_units()
    for pred, cls in _REGISTRY:
        if pred(scheme):
            return cls
    from ...errors import ConfigError

    raise ConfigError(f"no scheme unit runs {scheme.label()} (format {scheme.fmt}); this is not supported yet")


_imported = False


def _import_units():
    """Import every scheme-unit module so their @register decorators run."""
    global _imported
    if _imported:
        return
    import importlib
    import pkgutil

    for mod in pkgutil.iter_modules(__path__):
        if mod.name != "unquantized":
            importlib.import_module(f"{__name__}.{mod.name}")
    _imported = True
