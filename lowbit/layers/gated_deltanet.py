"""Gated DeltaNet: the linear-attention token mixer of Qwen3.5 / Qwen3.6 (transformers' Qwen3_5GatedDeltaNet).

    qkv = conv_silu(in_proj_qkv(x))   depthwise causal conv1d (K taps) over [q | k | v] channels
    z = in_proj_z(x), b = in_proj_b(x), a = in_proj_a(x)
    g = -exp(A_log) softplus(a + dt_bias), beta = sigmoid(b)
    o = gated_delta_rule(l2norm(q), l2norm(k), v, g, beta)            lowbit/kernels/gated_delta.py
    out = out_proj(rms_norm(o) * norm.weight * silu(z))               per value head (gated RMSNorm)

The gated RMSNorm multiplies by `norm.weight` itself (initialised to ones), not (1 + w) like the
full-attention q/k norms of the same family; norm before gate, the gate's SiLU in fp32.

Parameters other than the projections carry transformers' names inside `linear_attn`
(`conv1d.weight` with the on-disk shape [C, 1, K], `A_log`, `dt_bias`, `norm.weight`) and are created
NaN-poisoned; the loader fills them (`shard_param` says what slice a rank keeps).

Cache (`cache_spec`; `state_spec` from a config): per slot a conv tail "conv" [C, K-1] (the last K-1
conv inputs, compute dtype)
and the recurrent state "ssm" [H_v, d_k, d_v] in fp32. Prefill rows start from an empty history (or,
for a later chunk of a prompt, `ctx.fresh` False, from their slot's) and leave both in their slot;
a decode step (T == 1) reads and updates them in place (CUDA-graph safe). A verify forward
(`ctx.verify`, speculative decoding) runs its T tokens through the same decode kernels one step at a
time from the slot's state, leaves the slot alone and hands back the state after every token in
`ctx.steps[layer_idx]` (lowbit/speculative.py keeps the accepted one).

Tensor parallelism (tp_size ranks): heads are split, H_k / tp key heads and H_v / tp value heads per
rank (both must divide; value head h reads key head h // (H_v / H_k), so contiguous splits keep each
value head with its key head).
  in_proj_qkv  column-parallel, sliced per section: rank r keeps its q heads, its k heads and its v
               heads, concatenated [q_r | k_r | v_r] (`conv_channels(r)` gives those rows)
  in_proj_z    column-parallel (value heads); in_proj_b, in_proj_a column-parallel (one row per value head)
  conv1d       the same channels as in_proj_qkv; A_log, dt_bias split by value head; norm.weight
               ([d_v], per head) replicated
  out_proj     row-parallel over value channels; this layer all-reduces its output when tp_size > 1.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import parallel
from ..errors import ConfigError
from ..kernels.conv1d import causal_conv1d, causal_conv1d_update
from ..kernels.gated_delta import chunk_gated_delta_rule, gated_delta_rule_decode, gates
from .context import CacheSpec, ForwardContext

PROJECTIONS = ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj")


@dataclass(frozen=True)
class GatedDeltaNetDims:
    """The whole model's sizes of one Gated DeltaNet layer (before any tensor-parallel split)."""

    hidden_size: int
    num_k_heads: int
    num_v_heads: int
    head_k_dim: int
    head_v_dim: int
    conv_kernel: int
    eps: float
    activation: str

    @classmethod
    def from_config(cls, cfg) -> "GatedDeltaNetDims":
        """From an object with transformers' Qwen3_5TextConfig attribute names (hidden_size,
        linear_num_key_heads, linear_num_value_heads, linear_key_head_dim, linear_value_head_dim,
        linear_conv_kernel_dim, rms_norm_eps, hidden_act), or a GatedDeltaNetDims itself."""
        if isinstance(cfg, cls):
            return cfg
        names = ("hidden_size", "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
                 "linear_value_head_dim", "linear_conv_kernel_dim", "rms_norm_eps")
        missing = [n for n in names if getattr(cfg, n, None) is None]
        if missing:
            raise ConfigError(f"Gated DeltaNet layer: config lacks {', '.join(missing)}")
        return cls(cfg.hidden_size, cfg.linear_num_key_heads, cfg.linear_num_value_heads, cfg.linear_key_head_dim,
                   cfg.linear_value_head_dim, cfg.linear_conv_kernel_dim, cfg.rms_norm_eps,
                   getattr(cfg, "hidden_act", "silu"))

    def check(self, tp_size: int) -> None:
        if self.num_v_heads % self.num_k_heads:
            raise ConfigError(f"Gated DeltaNet: linear_num_value_heads={self.num_v_heads} is not a multiple of "
                              f"linear_num_key_heads={self.num_k_heads}")
        if self.num_k_heads % tp_size or self.num_v_heads % tp_size:
            raise ConfigError(f"Gated DeltaNet: tensor-parallel size {tp_size} does not divide the "
                              f"{self.num_k_heads} key / {self.num_v_heads} value heads; pick a divisor")
        if self.activation != "silu":
            raise ConfigError(f"Gated DeltaNet: hidden_act={self.activation!r}; the conv activation must be 'silu'")

    def sections(self, tp_size: int = 1) -> tuple[int, int, int]:
        """Channels of q, k, v in one rank's in_proj_qkv output / conv."""
        kd = self.num_k_heads // tp_size * self.head_k_dim
        return kd, kd, self.num_v_heads // tp_size * self.head_v_dim


def _nan(*shape, dtype) -> nn.Parameter:
    return nn.Parameter(torch.full(shape, float("nan"), dtype=dtype), requires_grad=False)


def gated_rms_norm(x, gate, weight, eps):
    """transformers' Qwen3_5RMSNormGated over the last dim: fp32 statistics, cast back, times the
    weight, times silu(gate) in fp32, cast back."""
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    h = weight * h.to(dtype)
    return (h * F.silu(gate.float())).to(dtype)


class GatedRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = _nan(dim, dtype=dtype)

    def forward(self, x, gate):
        return gated_rms_norm(x, gate, self.weight, self.eps)


class GatedDeltaNet(nn.Module):
    """The Qwen3.5 linear-attention mixer (module docstring). forward(x [B, T, hidden], ctx) -> [B, T, hidden]."""

    def __init__(self, cfg, layer_idx: int, projections: dict, dtype: torch.dtype, tp_size: int = 1):
        super().__init__()
        dims = GatedDeltaNetDims.from_config(cfg)
        dims.check(tp_size)
        missing = [p for p in PROJECTIONS if p not in projections]
        if missing:
            raise ConfigError(f"GatedDeltaNet layer {layer_idx}: projections {missing} not given")
        self.dims, self.layer_idx, self.tp_size = dims, layer_idx, tp_size
        self.num_k_heads = dims.num_k_heads // tp_size
        self.num_v_heads = dims.num_v_heads // tp_size
        self.head_k_dim, self.head_v_dim = dims.head_k_dim, dims.head_v_dim
        self.key_dim, _, self.value_dim = dims.sections(tp_size)
        self.conv_dim = 2 * self.key_dim + self.value_dim
        for name in PROJECTIONS:  # nn.Modules register as submodules; plain callables stay attributes
            setattr(self, name, projections[name])
        self.conv1d = nn.Module()
        self.conv1d.weight = _nan(self.conv_dim, 1, dims.conv_kernel, dtype=dtype)
        self.A_log = _nan(self.num_v_heads, dtype=dtype)
        self.dt_bias = _nan(self.num_v_heads, dtype=dtype)
        self.norm = GatedRMSNorm(self.head_v_dim, dims.eps, dtype)

    # ------------------------------------------------------------------ cache and sharding
    def cache_spec(self, dtype: torch.dtype) -> CacheSpec:
        """This layer's cache (what DecoderModel.cache_specs collects for the engine)."""
        return self.state_spec(self.dims, dtype, self.tp_size)

    @staticmethod
    def state_spec(cfg, dtype: torch.dtype, tp_size: int = 1) -> CacheSpec:
        """Per slot: the conv tail [C, K-1] in the compute dtype, the state [H_v, d_k, d_v] in fp32
        (C, H_v of one rank)."""
        d = GatedDeltaNetDims.from_config(cfg)
        d.check(tp_size)
        c = sum(d.sections(tp_size))
        return CacheSpec(kind="state", tensors={
            "conv": ((c, d.conv_kernel - 1), dtype),
            "ssm": ((d.num_v_heads // tp_size, d.head_k_dim, d.head_v_dim), torch.float32)})

    @staticmethod
    def conv_channels(cfg, rank: int, tp_size: int) -> torch.Tensor:
        """Indices of the whole model's in_proj_qkv rows / conv1d channels that rank keeps, in its order."""
        d = GatedDeltaNetDims.from_config(cfg)
        whole, local = d.sections(1), d.sections(tp_size)
        parts, start = [], 0
        for n, m in zip(whole, local):
            parts.append(torch.arange(start + rank * m, start + (rank + 1) * m))
            start += n
        return torch.cat(parts)

    @classmethod
    def shard_param(cls, cfg, name: str, t: torch.Tensor, rank: int, tp_size: int) -> torch.Tensor:
        """The slice of the on-disk plain parameter `name` (conv1d.weight, A_log, dt_bias, norm.weight)
        that rank keeps."""
        if tp_size == 1 or name == "norm.weight":
            return t
        if name == "conv1d.weight":
            return t.index_select(0, cls.conv_channels(cfg, rank, tp_size).to(t.device))
        if name in ("A_log", "dt_bias"):
            n = t.shape[0] // tp_size
            return t.narrow(0, rank * n, n)
        raise ConfigError(f"GatedDeltaNet.shard_param: unknown parameter {name!r}")

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, ctx: ForwardContext | None = None) -> torch.Tensor:
        bsz, t, _ = x.shape
        decode = ctx is not None and ctx.decode
        if decode and t != 1:
            raise ConfigError(f"GatedDeltaNet layer {self.layer_idx}: a decode step takes one token per row, got {t}")
        cache = ctx.cache(self.layer_idx) if ctx is not None else None
        qkv = self.in_proj_qkv(x)
        z = self.in_proj_z(x).view(bsz, t, self.num_v_heads, self.head_v_dim)
        b, a = self.in_proj_b(x), self.in_proj_a(x)
        weight = self.conv1d.weight.view(self.conv_dim, -1)
        if ctx is not None and ctx.verify:
            o = self._verify(qkv, a, b, weight, cache, ctx)
            o = self.norm(o, z).reshape(bsz, t, self.value_dim)
            out = self.out_proj(o)
            return parallel.all_reduce(out) if self.tp_size > 1 else out
        if decode:
            qkv = causal_conv1d_update(qkv[:, 0], cache["conv"], weight, None, "silu", ctx.slots)[:, None]
        else:
            cont = cache is not None and not ctx.fresh  # a later chunk: continue from the slot's state
            qkv, tail = causal_conv1d(qkv, weight, None, "silu", cache["conv"][ctx.slots] if cont else None)
            if cache is not None:
                cache["conv"][ctx.slots] = tail.to(cache["conv"].dtype)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        q = q.view(bsz, t, self.num_k_heads, self.head_k_dim)
        k = k.view(bsz, t, self.num_k_heads, self.head_k_dim)
        v = v.view(bsz, t, self.num_v_heads, self.head_v_dim)
        if decode:
            o = gated_delta_rule_decode(q[:, 0], k[:, 0], v[:, 0], a[:, 0], b[:, 0], self.A_log, self.dt_bias,
                                        cache["ssm"], ctx.slots)[:, None]
        else:
            g, beta = gates(a, b, self.A_log, self.dt_bias)
            o, state = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=cache["ssm"][ctx.slots] if cont else None)
            if cache is not None:
                cache["ssm"][ctx.slots] = state
        o = self.norm(o, z).reshape(bsz, t, self.value_dim)
        out = self.out_proj(o)
        return parallel.all_reduce(out) if self.tp_size > 1 else out

    def _verify(self, qkv, a, b, weight, cache, ctx: ForwardContext) -> torch.Tensor:
        """The T tokens of each row as T decode steps from its slot's state (the decode kernels, so each
        token is computed as plain decoding computes it); every step's conv tail and recurrent state go
        to ctx.steps[layer_idx] as [T, B, *shape]; the slot's own state is not written."""
        bsz, t, _ = qkv.shape
        # states[i] = after token i: each starts as a copy of the one before (the slot's, for i = 0) and
        # the kernels update its rows i * B + b of the flat view in place
        conv = cache["conv"].new_empty((t, bsz, *cache["conv"].shape[1:]))
        ssm = cache["ssm"].new_empty((t, bsz, *cache["ssm"].shape[1:]))
        flat_conv, flat_ssm = conv.view(-1, *conv.shape[2:]), ssm.view(-1, *ssm.shape[2:])
        rows = torch.arange(bsz, device=qkv.device)
        outs = []
        prev_conv, prev_ssm = cache["conv"][ctx.slots], cache["ssm"][ctx.slots]
        for i in range(t):
            conv[i], ssm[i] = prev_conv, prev_ssm
            prev_conv, prev_ssm = conv[i], ssm[i]
            here = rows + i * bsz
            y = causal_conv1d_update(qkv[:, i], flat_conv, weight, None, "silu", here)
            q, k, v = y.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
            outs.append(gated_delta_rule_decode(q.view(bsz, self.num_k_heads, self.head_k_dim),
                                                k.view(bsz, self.num_k_heads, self.head_k_dim),
                                                v.view(bsz, self.num_v_heads, self.head_v_dim), a[:, i], b[:, i],
                                                self.A_log, self.dt_bias, flat_ssm, here))
        ctx.steps[self.layer_idx] = {"conv": conv, "ssm": ssm}
        return torch.stack(outs, dim=1)
