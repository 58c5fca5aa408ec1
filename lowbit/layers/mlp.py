"""The gated MLP: down(act(gate) * up), gate and up run as one fused `gate_up_proj`; the ungated
MLP down(act(up)).

Activations by their config spellings (`hidden_act` / `hidden_activation`); anything else is
refused when the config is read (`check_activation`), never silently replaced by SiLU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import parallel
from ..errors import ConfigError
from ..kernels import decoder

ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh",
               "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu": "gelu", "relu2": "relu2"}


def check_activation(name, where: str, allowed=("silu", "gelu_tanh", "gelu")) -> str:
    act = ACTIVATIONS.get(str(name))
    if act is None or act not in allowed:
        ok = sorted(k for k, v in ACTIVATIONS.items() if v in allowed)
        raise ConfigError(f"{where}: hidden_act {name!r} is not supported by this family (supported: "
                          f"{', '.join(ok)}); running it as another activation would give wrong output")
    return act


def act_mul(x: torch.Tensor, act: str) -> torch.Tensor:
    """[..., 2I] (gate then up) -> act(gate) * up, rounded as transformers' eager spelling."""
    if act == "silu":
        return decoder.silu_mul(x)
    gate, up = x.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh" if act == "gelu_tanh" else "none") * up


def activation(x: torch.Tensor, act: str) -> torch.Tensor:
    """An ungated activation (Nemotron-H's relu^2 MLP)."""
    if act == "relu2":
        return torch.square(F.relu(x))
    if act == "silu":
        return F.silu(x)
    return F.gelu(x, approximate="tanh" if act == "gelu_tanh" else "none")


class GatedMLP(nn.Module):
    def __init__(self, gate_up_proj: nn.Module, down_proj: nn.Module, act: str = "silu", tp_size: int = 1):
        super().__init__()
        self.gate_up_proj, self.down_proj = gate_up_proj, down_proj
        self.act, self.tp_size = act, tp_size

    def forward(self, x):
        out = self.down_proj(act_mul(self.gate_up_proj(x), self.act))
        return parallel.all_reduce(out) if self.tp_size > 1 else out


class MLP(nn.Module):
    """The ungated MLP: down(act(up(x))) (Nemotron-H: relu^2, `up_proj`, `down_proj`)."""

    def __init__(self, up_proj: nn.Module, down_proj: nn.Module, act: str = "relu2", tp_size: int = 1):
        super().__init__()
        self.up_proj, self.down_proj = up_proj, down_proj
        self.act, self.tp_size = act, tp_size

    def forward(self, x):
        out = self.down_proj(activation(self.up_proj(x), self.act))
        return parallel.all_reduce(out) if self.tp_size > 1 else out
