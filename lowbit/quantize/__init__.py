"""`lowbit quantize`: write ModelOpt and compressed-tensors checkpoints exactly as the producers do.

`quantize` and `Summary` are imported on first use, so that `lowbit --help` (which reads the scheme
list in .recipes) does not import torch."""

__all__ = ["quantize", "Summary"]


def __getattr__(name):
    if name in __all__:
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
