"""The pre-norm decoder block most families use: x + mixer(norm(x)), then x + mlp(norm(x)).

The residual adds are fused into the following norm: a block takes (x, residual) where the
stream is x + residual (residual None before the first block) and returns (its MLP output, the
stream before it). The mixer is attention (called with the block's rotary tables) or any layer
called as mixer(h, ctx)."""
from __future__ import annotations

from torch import nn

from .attention import Attention


class PreNormBlock(nn.Module):
    def __init__(self, input_layernorm: nn.Module, self_attn: nn.Module, post_attention_layernorm: nn.Module,
                 mlp: nn.Module, rope: str = "default"):
        super().__init__()
        self.input_layernorm, self.self_attn = input_layernorm, self_attn
        self.post_attention_layernorm, self.mlp = post_attention_layernorm, mlp
        self.rope = rope

    def forward(self, x, residual, rope, ctx=None):
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm(x, residual)
        if isinstance(self.self_attn, Attention):
            h = self.self_attn(h, *rope[self.rope], ctx)
        else:
            h = self.self_attn(h, ctx)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual
