"""Gemma-3 text (`Gemma3ForCausalLM`, model_type `gemma3_text`).

Differences from Llama, all applied from the config: sliding/full layers (`layer_types`, else the
`sliding_window_pattern` rule) with their own rope bases (`rope_parameters.sliding_attention` /
`.full_attention`, transformers 4: `rope_local_base_freq` / `rope_theta` + `rope_scaling`),
GELU-tanh gated MLP, (1 + w) RMSNorms including q/k norms and the pre/post feed-forward norms
around the MLP, embeddings scaled by sqrt(hidden), softmax scale `query_pre_attn_scalar ** -0.5`,
`final_logit_softcapping`. Attention-logit softcapping and bidirectional attention are refused.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..config import ModelConfig, common_fields, normalize_rope
from ..errors import ConfigError
from ..layers.attention import Attention
from ..layers.mlp import GatedMLP, check_activation
from ..layers.norm import RMSNorm
from ..layers.rotary import RotaryEmbedding
from . import register
from .base import DecoderModel, Family, norm_params, refuse
from .slots import attention_slots, gated_mlp_slots, lm_head_slot

NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")


@dataclass
class Gemma3Config(ModelConfig):
    query_pre_attn_scalar: float = 256.0
    local_rope_theta: float = 10000.0
    local_rope_scaling: dict | None = None
    final_logit_softcapping: float | None = None
    rope_kinds: dict = field(default_factory=dict)


class Gemma3Block(nn.Module):
    """x + post_attn_norm(attn(in_norm(x))), then + post_ff_norm(mlp(pre_ff_norm(x))); the adds are
    fused into the following norm (see layers/block.py)."""

    def __init__(self, norms: dict[str, RMSNorm], self_attn: Attention, mlp: nn.Module, rope: str):
        super().__init__()
        for n, m in norms.items():
            setattr(self, n, m)
        self.self_attn, self.mlp, self.rope = self_attn, mlp, rope

    def forward(self, x, residual, rope, ctx=None):
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.post_attention_layernorm(self.self_attn(h, *rope[self.rope], ctx))
        h, residual = self.pre_feedforward_layernorm(h, residual)
        return self.post_feedforward_layernorm(self.mlp(h)), residual


class Gemma3Model(DecoderModel):
    unit_offset_norm = True


class Gemma3Family(Family):
    name = "gemma3"
    architectures = ("Gemma3ForCausalLM",)
    model_types = {"gemma3_text": "Gemma3ForCausalLM"}

    def parse_config(self, text, top, arch, where):
        f = common_fields(text, top, arch, self.name, where)
        for key, why in (("attn_logit_softcapping", "attention-logit softcapping is not implemented"),
                         ("use_bidirectional_attention", "lowbit runs causal language models")):
            if text.get(key):
                raise refuse(where, key, text[key], why)
        f["hidden_act"] = check_activation(text.get("hidden_activation", text.get("hidden_act", "gelu_pytorch_tanh")),
                                           where)
        n = f["num_layers"]
        types = text.get("layer_types")
        if types is None:
            pattern = int(text.get("sliding_window_pattern", text.get("_sliding_window_pattern", 6)))
            types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
        if len(types) != n or set(types) - {"sliding_attention", "full_attention"}:
            raise ConfigError(f"{where}: layer_types must list sliding_attention/full_attention once per layer "
                              f"({n}), got {types!r}")
        f["layer_types"] = list(types)
        f["sliding_window"] = int(text.get("sliding_window") or 4096)
        params = text.get("rope_parameters") if isinstance(text.get("rope_parameters"), dict) else {}
        f["rope_theta"], f["rope_scaling"] = normalize_rope(params.get("full_attention"),
                                                            text.get("rope_theta", 1_000_000.0),
                                                            text.get("rope_scaling"), where)
        local_theta, local_scaling = normalize_rope(params.get("sliding_attention"),
                                                    text.get("rope_local_base_freq", 10_000.0), None, where)
        f["tie_word_embeddings"] = bool(text.get("tie_word_embeddings", top.get("tie_word_embeddings", True)))
        return Gemma3Config(**f, query_pre_attn_scalar=float(text.get("query_pre_attn_scalar", 256)),
                            local_rope_theta=local_theta, local_rope_scaling=local_scaling,
                            final_logit_softcapping=text.get("final_logit_softcapping"))

    def linear_slots(self, cfg):
        slots = []
        for i in range(cfg.num_layers):
            slots += attention_slots(f"model.layers.{i}.self_attn", cfg.hidden_size, cfg.q_size, cfg.kv_size,
                                     cfg.q_size, cfg.num_kv_heads, cfg.attention_bias)
            slots += gated_mlp_slots(f"model.layers.{i}.mlp", cfg.hidden_size, cfg.intermediate_size)
        return slots + lm_head_slot(cfg)

    def expected_params(self, cfg):
        return norm_params(cfg, NORMS, qk_norm=True)

    def build(self, cfg, linears, dtype, tp_size=1):
        def norm(dim=cfg.hidden_size):
            return RMSNorm(dim, cfg.rms_norm_eps, dtype, unit_offset=True)

        layers = []
        for i in range(cfg.num_layers):
            a, m = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
            attn = Attention(i, linears[f"{a}.qkv_proj"], linears[f"{a}.o_proj"], cfg.num_heads, cfg.num_kv_heads,
                             cfg.head_dim, scaling=cfg.query_pre_attn_scalar ** -0.5, q_norm=norm(cfg.head_dim),
                             k_norm=norm(cfg.head_dim), sliding_window=cfg.window(i), tp_size=tp_size)
            mlp = GatedMLP(linears[f"{m}.gate_up_proj"], linears[f"{m}.down_proj"], cfg.hidden_act, tp_size)
            layers.append(Gemma3Block({n: norm() for n in NORMS}, attn, mlp, cfg.layer_types[i]))
        rotary = {"full_attention": RotaryEmbedding.from_config(cfg),
                  "sliding_attention": RotaryEmbedding(cfg.head_dim, cfg.local_rope_theta, cfg.local_rope_scaling,
                                                       cfg.max_position_embeddings)}
        model = Gemma3Model(cfg, layers, linears, dtype, tp_size, rotary)
        model.embed_scale = cfg.hidden_size ** 0.5
        model.final_logit_softcap = cfg.final_logit_softcapping
        return model


FAMILY = register(Gemma3Family())
