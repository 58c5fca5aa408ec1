"""RMSNorm, with the residual add fused in, in the two weightings families use:
`w * norm(x)` (Llama, Qwen, Mistral) and `(1 + w) * norm(x)` (Gemma, Qwen3.5: `unit_offset`)."""
from __future__ import annotations

import torch
from torch import nn

from ..kernels import decoder


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype, unit_offset: bool = False):
        super().__init__()
        self.eps, self.unit_offset = eps, unit_offset
        self.weight = nn.Parameter(torch.full((dim,), float("nan"), dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x), or with a residual: (norm(x + residual), x + residual) in one pass."""
        out, res = decoder.rms_norm(x, self.weight, self.eps, residual, self.unit_offset)
        return out if residual is None else (out, res)
