"""`lowbit quantize`: write ModelOpt and compressed-tensors checkpoints exactly as the producers do."""
from .pipeline import Summary, quantize

__all__ = ["quantize", "Summary"]
