"""The MoE block the families compose: router -> routing -> routed experts (+ shared expert).

    y = experts(x, top-k of route(gate(x))) [+ sigmoid(shared_expert_gate(x)) * shared_expert(x)]

The caller builds the parts: `experts` is a stacked-experts unit (lowbit.quant.experts.Experts, of
whatever scheme), `shared_expert` any MLP module mapping [T, H] -> [T, H] (a family's gated MLP), so
this layer never imports a scheme. The router `gate` ([E, H], plus Nemotron-H's
`e_score_correction_bias` [E]) and `shared_expert_gate` ([1, H], Qwen2/Qwen3.5-MoE) stay unquantized
and exact: they are plain parameters, poisoned until the loader writes them, under the transformers
names (`gate.weight`, `gate.e_score_correction_bias`, `shared_expert_gate.weight`).

Tensor parallelism: the router and the shared-expert gate are replicated; the experts (and the
shared expert, when the caller splits it) return this rank's partial sums over the intermediate
dimension, added up by one all-reduce at the end.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import parallel
from ..kernels import invariance
from ..kernels.moe_ref import Routing, route_ref


def _poisoned(*shape, dtype) -> nn.Parameter:
    return nn.Parameter(torch.full(shape, float("nan"), dtype=dtype), requires_grad=False)


def route(logits: torch.Tensor, routing: Routing, bias: torch.Tensor | None):
    """The routing kernel where Triton is installed (it falls back to route_ref itself)."""
    try:
        from ..kernels import moe
    except ImportError:  # pragma: no cover - no Triton
        return route_ref(logits, routing, bias)
    return moe.route(logits, routing, bias)


class Router(nn.Module):
    """The router's [E, H] weight (and optional score-correction bias); logits in its dtype."""

    def __init__(self, hidden: int, num_experts: int, dtype: torch.dtype, correction_bias: bool = False):
        super().__init__()
        self.weight = _poisoned(num_experts, hidden, dtype=dtype)
        self.e_score_correction_bias = _poisoned(num_experts, dtype=torch.float32) if correction_bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return invariance.linear(x.to(self.weight.dtype), self.weight)


class MoEBlock(nn.Module):
    """A sparse MoE MLP. routing: how logits pick experts (lowbit.kernels.moe.Routing);
    router_dtype: the router's parameter and logits dtype (Nemotron-H keeps it float32);
    weights_in_logits_dtype: round the routing weights to the logits dtype before they scale the
    experts (transformers' Qwen2/Qwen3-MoE do; Mixtral keeps them float32)."""

    def __init__(self, hidden: int, routing: Routing, experts: nn.Module, dtype: torch.dtype,
                 shared_expert: nn.Module | None = None, shared_expert_gate: bool = False,
                 router_dtype: torch.dtype | None = None, correction_bias: bool = False,
                 weights_in_logits_dtype: bool = False, tp_size: int = 1):
        super().__init__()
        if shared_expert_gate and shared_expert is None:
            raise ValueError("MoEBlock: a shared_expert_gate needs a shared_expert")
        if correction_bias and routing.scoring != "sigmoid":
            raise ValueError("MoEBlock: the score-correction bias belongs to sigmoid routing")
        self.routing = routing
        self.gate = Router(hidden, experts.num_experts, router_dtype or dtype, correction_bias)
        self.experts = experts
        self.shared_expert = shared_expert
        self.shared_expert_gate = None
        if shared_expert_gate:
            self.shared_expert_gate = nn.Module()
            self.shared_expert_gate.weight = _poisoned(1, hidden, dtype=dtype)
        self.weights_in_logits_dtype = weights_in_logits_dtype
        self.tp_size = tp_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        logits = self.gate(x2)
        weights, ids = route(logits, self.routing, self.gate.e_score_correction_bias)
        if self.weights_in_logits_dtype:
            weights = weights.to(logits.dtype)
        y = self.experts(x2, ids, weights)
        if self.shared_expert is not None:
            s = self.shared_expert(x2)
            if self.shared_expert_gate is not None:
                s = torch.sigmoid(invariance.linear(x2, self.shared_expert_gate.weight)) * s
            y = y + s
        if self.tp_size > 1:
            parallel.all_reduce(y)
        return y.reshape(shape)
