"""The pre-norm decoder block most families use: x + mixer(norm(x)), then x + mlp(norm(x)).

The residual adds are fused into the following norm: a block takes (x, residual) where the
stream is x + residual (residual None before the first block) and returns (its MLP output, the
stream before it). The mixer is attention (called with the block's rotary tables) or any layer
called as mixer(h, ctx). `mixer_name` is the mixer's attribute (and parameter-name) spelling:
`self_attn`, or e.g. Qwen3.5's `linear_attn`."""
from __future__ import annotations

from torch import nn

from .attention import Attention


class PreNormBlock(nn.Module):
    def __init__(self, input_layernorm: nn.Module, self_attn: nn.Module, post_attention_layernorm: nn.Module,
                 mlp: nn.Module, rope: str = "default", mixer_name: str = "self_attn"):
        super().__init__()
        self.input_layernorm, self.mixer_name = input_layernorm, mixer_name
        setattr(self, mixer_name, self_attn)
        self.post_attention_layernorm, self.mlp = post_attention_layernorm, mlp
        self.rope = rope

    def forward(self, x, residual, rope, ctx=None):
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm(x, residual)
        mixer = getattr(self, self.mixer_name)
        if isinstance(mixer, Attention):
            h = mixer(h, *rope[self.rope], ctx)
        else:
            h = mixer(h, ctx)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual
