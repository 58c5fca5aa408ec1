"""Plain-PyTorch references of the MoE kernels (lowbit/kernels/moe.py) and the routing description.

No Triton here: the MoE layer and the stacked-experts unit run on these where the kernels do not.
Each function computes what its kernel computes, on device and without host syncs where the kernel
is CUDA-graph friendly (align).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Routing:
    """How a router's logits pick experts.

    softmax: p = softmax(logits) (Qwen3-MoE, Mixtral, Qwen2/3.5-MoE); sigmoid: p = sigmoid(logits),
    experts chosen by p + correction bias (Nemotron-H, DeepSeek-V3 style), with the group-limited
    choice when n_group > 1 (reference only). The weights are the chosen p, divided by their sum
    when `renormalize` (Qwen3 norm_topk_prob, Mixtral always), times `scaling`
    (routed_scaling_factor)."""

    top_k: int
    scoring: str = "softmax"
    renormalize: bool = False
    scaling: float = 1.0
    n_group: int = 1
    topk_group: int = 1

    def __post_init__(self):
        if self.scoring not in ("softmax", "sigmoid"):
            raise ValueError(f"unknown router scoring {self.scoring!r} (softmax, sigmoid)")
        if self.top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {self.top_k}")


def route_ref(logits: torch.Tensor, routing: Routing, bias: torch.Tensor | None = None):
    """Plain PyTorch: logits [T, E] -> (weights fp32 [T, k], ids int32 [T, k]), as transformers."""
    lf = logits.float()
    if routing.scoring == "softmax":
        p = torch.softmax(lf, dim=-1)
        choice = p
    else:
        p = torch.sigmoid(lf)
        choice = p + bias.float() if bias is not None else p
        if routing.n_group > 1:
            t, e = choice.shape
            groups = choice.view(t, routing.n_group, e // routing.n_group).topk(2, dim=-1)[0].sum(-1)
            keep = torch.zeros_like(groups).scatter_(1, groups.topk(routing.topk_group, dim=-1)[1], 1)
            keep = keep[:, :, None].expand(-1, -1, e // routing.n_group).reshape(t, e)
            choice = choice.masked_fill(keep == 0, float("-inf"))
    ids = torch.topk(choice, routing.top_k, dim=-1)[1]
    w = p.gather(1, ids)
    if routing.renormalize:
        w = w / (w.sum(dim=-1, keepdim=True) + (1e-20 if routing.scoring == "sigmoid" else 0.0))
    if routing.scaling != 1.0:
        w = w * routing.scaling
    return w, ids.to(torch.int32)


def max_blocks(pairs: int, num_experts: int, block_m: int) -> int:
    """Blocks of block_m rows the padded segments can need: each active expert (at most
    min(pairs, E)) wastes fewer than block_m rows. Depends only on shapes (CUDA graphs)."""
    return -(-(pairs + min(pairs, num_experts) * (block_m - 1)) // block_m)


def align_ref(topk_ids: torch.Tensor, num_experts: int, block_m: int):
    """Plain PyTorch, on device and without host syncs: see `align`."""
    dev = topk_ids.device
    flat = topk_ids.reshape(-1).long()
    p = flat.numel()
    nb = max_blocks(p, num_experts, block_m)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    ends = torch.cumsum(padded, 0)
    order = torch.argsort(flat, stable=True)
    e_sorted = flat[order]
    rank = torch.arange(p, device=dev) - (torch.cumsum(counts, 0) - counts)[e_sorted]
    sorted_ids = torch.full((nb * block_m,), p, dtype=torch.int32, device=dev)
    sorted_ids[(ends - padded)[e_sorted] + rank] = order.to(torch.int32)
    starts = torch.arange(nb, device=dev) * block_m
    block_expert = torch.searchsorted(ends, starts, right=True).to(torch.int32)
    block_expert = torch.where(starts < ends[-1], block_expert, -1).to(torch.int32)
    return sorted_ids, block_expert, ends[-1:].to(torch.int32)


def grouped_gemm_ref(x: torch.Tensor, weights: torch.Tensor, topk_ids: torch.Tensor, top_k: int,
                     routed_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Plain PyTorch: out[p] = x[p // top_k] @ weights[ids[p]].T (x routed_weights[p]), with
    weights the dequantized stack float32 [E, N, K]; float32 out [P, N]."""
    ids = topk_ids.reshape(-1).long()
    xr = x.float()[torch.arange(ids.numel(), device=x.device) // top_k]
    out = torch.einsum("pk,pnk->pn", xr, weights.float()[ids])
    if routed_weights is not None:
        out = out * routed_weights.reshape(-1, 1).float()
    return out
