"""lowbit: run quantized LLM checkpoints (NVIDIA ModelOpt, compressed-tensors) exactly and fast."""
from .errors import CheckpointError, ConfigError, LowbitError

__version__ = "0.1.0"


def load(path, device=None, dtype=None, **options):
    """Load a checkpoint directory into a ready-to-run `Model` (see lowbit.model.Model)."""
    from .model import load as _load

    return _load(path, device=device, dtype=dtype, **options)


__all__ = ["load", "LowbitError", "ConfigError", "CheckpointError", "__version__"]
