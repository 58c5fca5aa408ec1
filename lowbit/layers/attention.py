"""Grouped-query attention that owns its KV cache through the forward context.

Options a family sets: q/k norms (modules given by the family), the softmax scale, a sliding
window, an output gate (Qwen3.5: q_proj holds [query | gate] per head, the output is multiplied by
sigmoid(gate) before o_proj), FP8 KV-cache scales (set by the loader through `kv_scales`).

q/k/v run as one `qkv_proj` (whatever the on-disk layout). With `ctx is None` it is a cache-less
causal forward from position 0; otherwise keys and values go into the layer's block pool
`ctx.cache(layer_idx)` at `ctx.rows`; a fresh prefill attends over the new tokens, a continued one
(a later chunk, or after a cached prefix) over the sequence's cached keys through its block table,
decode over the cached keys with the paged decode kernel.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import parallel
from ..kernels import decoder
from ..quant.numerics import fake_quant_fp8_activation
from .context import CacheSpec, ForwardContext


class Attention(nn.Module):
    def __init__(self, layer_idx: int, qkv_proj: nn.Module, o_proj: nn.Module, num_heads: int, num_kv_heads: int,
                 head_dim: int, scaling: float | None = None, q_norm: nn.Module | None = None,
                 k_norm: nn.Module | None = None, sliding_window: int | None = None, output_gate: bool = False,
                 tp_size: int = 1):
        super().__init__()
        self.layer_idx, self.tp_size = layer_idx, tp_size
        self.head_dim = head_dim
        self.num_heads = num_heads // tp_size
        # KV heads are split across ranks, or replicated when there are fewer than ranks
        self.num_kv_heads = max(1, num_kv_heads // tp_size)
        self.scaling = scaling if scaling is not None else head_dim ** -0.5
        self.qkv_proj, self.o_proj = qkv_proj, o_proj
        self.q_norm, self.k_norm = q_norm, k_norm
        self.sliding_window = sliding_window
        self.output_gate = output_gate
        # FP8 KV-cache scales (set by the loader when the checkpoint has them)
        self.k_scale: torch.Tensor | None = None
        self.v_scale: torch.Tensor | None = None

    def cache_spec(self, dtype: torch.dtype) -> CacheSpec:
        store = torch.float8_e4m3fn if self.k_scale is not None else dtype
        shape = ((self.num_kv_heads, self.head_dim), store)
        return CacheSpec("kv", {"k": shape, "v": shape}, window=self.sliding_window)

    def forward(self, x, cos, sin, ctx: ForwardContext | None = None):
        b, t, _ = x.shape
        h, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        q_rows = h * d * (2 if self.output_gate else 1)
        q, k, v = self.qkv_proj(x).split([q_rows, hkv * d, hkv * d], dim=-1)
        gate = None
        if self.output_gate:  # per head: [query | gate]
            q, gate = q.reshape(b, t, h, 2 * d).chunk(2, dim=-1)
            gate = gate.reshape(b, t, h * d)
        q = q.reshape(b, t, h, d)
        k = k.reshape(b, t, hkv, d)
        v = v.reshape(b, t, hkv, d)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if ctx is None:
            q, k = decoder.apply_rotary(q, cos, sin), decoder.apply_rotary(k, cos, sin)
        else:
            cache = ctx.cache(self.layer_idx)
            kc, vc = cache["k"], cache["v"]
            q, k = decoder.rope_and_store(q, k, v, cos, sin, kc.flatten(0, 1), vc.flatten(0, 1), ctx.rows,
                                          self.k_scale, self.v_scale)
        if ctx is not None and (ctx.decode or ctx.verify):  # verify: every token as its own decode query
            out = decoder.decode_attention(q.reshape(b * t, h, d), kc, vc, ctx.block_tables,
                                           ctx.slots[:, None].expand(b, t).reshape(-1), ctx.positions.reshape(-1),
                                           self.scaling, self.k_scale, self.v_scale, self.sliding_window)
        elif ctx is not None and not ctx.fresh:  # a chunk after cached positions: read them through the table
            out = cached_prefix_attention(q, kc, vc, ctx, self.scaling, self.k_scale, self.v_scale,
                                          self.sliding_window)
        else:  # a whole sequence from position 0: causal attention over the new tokens
            if self.k_scale is not None:  # what the FP8 cache holds
                k = fake_quant_fp8_activation(k, self.k_scale)
                v = fake_quant_fp8_activation(v, self.v_scale)
            out = causal_attention(q, k, v, self.scaling, self.sliding_window).transpose(1, 2)
        out = out.reshape(b, t, h * d)
        if gate is not None:
            out = out * torch.sigmoid(gate)
        out = self.o_proj(out)
        return parallel.all_reduce(out) if self.tp_size > 1 else out


def cached_prefix_attention(q, k_pool, v_pool, ctx: ForwardContext, scale, k_scale=None, v_scale=None,
                            window: int | None = None):
    """Queries q [B, T, H, D] at ctx.positions (already stored with their keys) against every cached
    key of their sequence up to their own position -> [B, T, H, D]. Keys are gathered through the
    block tables (a prefill step, not graph-captured: the gathered length may vary)."""
    bs = k_pool.shape[1]
    if ("prefix_rows", bs) not in ctx.shared:  # the same for every layer of the step
        length = ctx.key_len if ctx.key_len is not None else int(ctx.positions.max()) + 1
        keys = torch.arange(length, device=q.device)
        rows = decoder.cache_rows(ctx.block_tables, ctx.slots, keys[None].expand(q.shape[0], length), bs)
        ctx.shared["prefix_rows", bs] = keys, rows
    keys, rows = ctx.shared["prefix_rows", bs]
    k, v = k_pool.flatten(0, 1)[rows], v_pool.flatten(0, 1)[rows]
    if k_scale is not None:
        k, v = decoder.dequantize_kv(k, k_scale, q.dtype), decoder.dequantize_kv(v, v_scale, q.dtype)
    pos = ctx.positions[:, :, None]  # [B, T, 1]
    mask = keys[None, None, :] <= pos
    if window is not None:
        mask &= keys[None, None, :] > pos - window
    qt, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = qt.shape[1] != k.shape[1]
    if gqa and q.is_cuda:
        rep = qt.shape[1] // k.shape[1]
        k, v, gqa = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1), False
    out = F.scaled_dot_product_attention(qt, k, v, attn_mask=mask[:, None], scale=scale, enable_gqa=gqa)
    return out.transpose(1, 2)


def causal_attention(q, k, v, scale, window: int | None = None):
    """q [B, T, H, D], k/v [B, T, Hkv, D] -> [B, H, T, D]; a sliding window keeps keys
    (i - window, i] for query i. On CUDA the KV heads are repeated so that the flash kernel serves
    grouped-query attention too."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    t = q.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if gqa and q.is_cuda:
        rep = q.shape[1] // k.shape[1]
        k, v, gqa = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1), False
    if window is not None and t > window:
        i = torch.arange(t, device=q.device)
        mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, is_causal=t > 1, scale=scale, enable_gqa=gqa)
