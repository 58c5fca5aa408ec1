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

from ..config import ModelConfig
from ..kv_cache import KVCache, fake_quant_kv
from .rope import RotaryEmbedding, apply_rotary


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.full((dim,), float("nan"), dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, qkv_proj: nn.Module, o_proj: nn.Module, dtype, tp_size: int = 1):
        super().__init__()
        self.layer_idx = layer_idx
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

    def forward(self, x, cos, sin, positions, cache: KVCache | None = None, slots: torch.Tensor | None = None,
                kv_len: int | None = None):
        b, t, _ = x.shape
        qkv = self.qkv_proj(x)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(b, t, self.num_heads, self.head_dim)
        k = k.view(b, t, self.num_kv_heads, self.head_dim)
        v = v.view(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is None:
            if self.k_scale is not None:  # what an FP8 cache would do to k/v
                k, v = fake_quant_kv(k, self.k_scale), fake_quant_kv(v, self.v_scale)
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=t > 1, scale=self.scaling,
                enable_gqa=self.num_heads != self.num_kv_heads)
        else:
            cache.write(self.layer_idx, slots, positions, k, v, self.k_scale, self.v_scale)
            length = kv_len if kv_len is not None else int(positions.max()) + 1
            kc, vc = cache.read(self.layer_idx, slots, length, self.k_scale, self.v_scale)
            key_pos = torch.arange(length, device=x.device)
            mask = key_pos[None, None, :] <= positions[:, :, None]  # [B, T, L]: causal within the slot
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2), attn_mask=mask[:, None],
                scale=self.scaling, enable_gqa=self.num_heads != self.num_kv_heads)
        out = out.transpose(1, 2).reshape(b, t, q_size)
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, gate_up_proj: nn.Module, down_proj: nn.Module):
        super().__init__()
        self.gate_up_proj, self.down_proj = gate_up_proj, down_proj

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, idx: int, linears: dict[str, nn.Module], dtype, tp_size: int = 1):
        super().__init__()
        p = f"model.layers.{idx}"
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = Attention(cfg, idx, linears[f"{p}.self_attn.qkv_proj"], linears[f"{p}.self_attn.o_proj"],
                                   dtype, tp_size)
        self.mlp = MLP(linears[f"{p}.mlp.gate_up_proj"], linears[f"{p}.mlp.down_proj"])

    def forward(self, x, cos, sin, positions, cache=None, slots=None, kv_len=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, positions, cache, slots, kv_len)
        return x + self.mlp(self.post_attention_layernorm(x))


class TextModel(nn.Module):
    def __init__(self, cfg: ModelConfig, linears: dict[str, nn.Module], dtype, tp_size: int = 1):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype)
        self.embed_tokens.weight.requires_grad_(False).fill_(float("nan"))
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, linears, dtype, tp_size) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)


class LlamaForCausalLM(nn.Module):
    """Also Mistral, Qwen2, Qwen3 and (through phi3.py) Phi-3."""

    def __init__(self, cfg: ModelConfig, linears: dict[str, nn.Module], dtype, tp_size: int = 1):
        super().__init__()
        self.config = cfg
        self.model = TextModel(cfg, linears, dtype, tp_size)
        self.lm_head = None if cfg.tie_word_embeddings else linears["lm_head"]
        self.rotary = RotaryEmbedding(cfg)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache | None = None,
                slots: torch.Tensor | None = None, kv_len: int | None = None) -> torch.Tensor:
        """input_ids, positions [B, T] -> final hidden states [B, T, H] (after the norm)."""
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rotary.cos_sin(positions, x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin, positions, cache, slots, kv_len)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:
            return F.linear(hidden, self.model.embed_tokens.weight)
        return self.lm_head(hidden)
