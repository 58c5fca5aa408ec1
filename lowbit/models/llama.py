"""Llama-family decoder (Llama, Mistral, Qwen2 with qkv bias, Qwen3 with q/k RMSNorm).

q/k/v run as one `qkv_proj` and gate/up as one `gate_up_proj` whatever the on-disk layout; the
projections are `LinearGroup`s built from the checkpoint's resolution (lowbit/quant/resolve.py), so
this file never looks at quantization. Parameter names of everything that is not a projection equal
the canonical checkpoint names (model.embed_tokens.weight, model.layers.0.input_layernorm.weight, ...).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops, parallel
from ..config import ModelConfig
from ..kv_cache import CacheBatch, fake_quant_kv
from .rope import RotaryEmbedding


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.full((dim,), float("nan"), dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x), or with a residual: (norm(x + residual), x + residual) in one pass."""
        out, res = ops.rms_norm(x, self.weight, self.eps, residual)
        return out if residual is None else (out, res)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, qkv_proj: nn.Module, o_proj: nn.Module, dtype, tp_size: int = 1):
        super().__init__()
        self.layer_idx = layer_idx
        self.tp_size = tp_size
        self.head_dim = cfg.head_dim
        self.num_heads = cfg.num_heads // tp_size
        # KV heads are split across ranks, or replicated when there are fewer than ranks
        self.num_kv_heads = max(1, cfg.num_kv_heads // tp_size)
        self.scaling = cfg.head_dim ** -0.5
        self.qkv_proj, self.o_proj = qkv_proj, o_proj
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype)
        else:
            self.q_norm = self.k_norm = None
        # FP8 KV-cache scales (set by the loader when the checkpoint has them)
        self.k_scale: torch.Tensor | None = None
        self.v_scale: torch.Tensor | None = None

    def forward(self, x, cos, sin, positions, batch: CacheBatch | None = None):
        b, t, _ = x.shape
        qkv = self.qkv_proj(x)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(b, t, self.num_heads, self.head_dim)
        k = k.view(b, t, self.num_kv_heads, self.head_dim)
        v = v.view(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if batch is None:
            q, k = ops.apply_rotary(q, cos, sin), ops.apply_rotary(k, cos, sin)
        else:
            layer = self.layer_idx
            kc, vc = batch.cache.k[layer], batch.cache.v[layer]
            q, k = ops.rope_and_store(q, k, v, cos, sin, kc, vc, batch.slots, positions, self.k_scale, self.v_scale)
        if batch is not None and batch.decode:
            out = ops.decode_attention(q[:, 0], kc, vc, batch.slots, positions[:, 0], self.scaling,
                                       self.k_scale, self.v_scale)
        else:  # a whole sequence from position 0: causal attention over the new tokens
            if self.k_scale is not None:  # what the FP8 cache holds
                k, v = fake_quant_kv(k, self.k_scale), fake_quant_kv(v, self.v_scale)
            out = _causal_attention(q, k, v, self.scaling).transpose(1, 2)
        out = self.o_proj(out.reshape(b, t, q_size))
        return parallel.all_reduce(out) if self.tp_size > 1 else out


def _causal_attention(q, k, v, scale):
    """q [B, T, H, D], k/v [B, T, Hkv, D] -> [B, H, T, D]. On CUDA the KV heads are repeated so
    that the flash kernel serves grouped-query attention too."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = q.shape[1] != k.shape[1]
    if gqa and q.is_cuda:
        rep = q.shape[1] // k.shape[1]
        k, v, gqa = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1), False
    return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, scale=scale, enable_gqa=gqa)


class MLP(nn.Module):
    def __init__(self, gate_up_proj: nn.Module, down_proj: nn.Module, tp_size: int = 1):
        super().__init__()
        self.gate_up_proj, self.down_proj = gate_up_proj, down_proj
        self.tp_size = tp_size

    def forward(self, x):
        out = self.down_proj(ops.silu_mul(self.gate_up_proj(x)))
        return parallel.all_reduce(out) if self.tp_size > 1 else out


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, idx: int, linears: dict[str, nn.Module], dtype, tp_size: int = 1):
        super().__init__()
        p = f"model.layers.{idx}"
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = Attention(cfg, idx, linears[f"{p}.self_attn.qkv_proj"], linears[f"{p}.self_attn.o_proj"],
                                   dtype, tp_size)
        self.mlp = MLP(linears[f"{p}.mlp.gate_up_proj"], linears[f"{p}.mlp.down_proj"], tp_size)

    def forward(self, x, residual, cos, sin, positions, batch=None):
        """x: the previous block's output; residual: the residual stream before it (None in layer 0).
        Returns (this layer's MLP output, the residual stream before it): the adds are fused into
        the next norm."""
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm(x, residual)
        h, residual = self.post_attention_layernorm(self.self_attn(h, cos, sin, positions, batch), residual)
        return self.mlp(h), residual


class TextModel(nn.Module):
    def __init__(self, cfg: ModelConfig, linears: dict[str, nn.Module], dtype, tp_size: int = 1):
        super().__init__()
        self.embed_tokens = parallel.VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, dtype, tp_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, linears, dtype, tp_size) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)


class LlamaForCausalLM(nn.Module):
    """Also Mistral, Qwen2, Qwen3 and (through phi3.py) Phi-3."""

    def __init__(self, cfg: ModelConfig, linears: dict[str, nn.Module], dtype, tp_size: int = 1):
        super().__init__()
        self.config = cfg
        self.tp_size = tp_size
        self.model = TextModel(cfg, linears, dtype, tp_size)
        self.lm_head = None if cfg.tie_word_embeddings else linears["lm_head"]
        self.rotary = RotaryEmbedding(cfg)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: CacheBatch | None = None) -> torch.Tensor:
        """input_ids, positions [B, T] -> final hidden states [B, T, H] (after the norm).
        batch: how to use the KV cache (None: a cache-less causal forward from position 0)."""
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rotary.cos_sin(positions, x.dtype)
        residual = None
        for layer in self.model.layers:
            x, residual = layer(x, residual, cos, sin, positions, batch)
        return self.model.norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:
            logits = F.linear(hidden, self.model.embed_tokens.weight)
        else:
            logits = self.lm_head(hidden)
        return parallel.all_gather_last(logits) if self.tp_size > 1 else logits
