"""Llama family: Llama, Mistral (sliding window), Qwen2 (q/k/v bias), Qwen3 (q/k RMSNorm).

q/k/v run as one `qkv_proj` and gate/up as one `gate_up_proj` whatever the on-disk layout; the
projections are modules built from the checkpoint's resolution (lowbit/quant/resolve.py), so this
file never looks at quantization.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config import ModelConfig, common_fields
from ..errors import ConfigError
from ..layers.attention import Attention
from ..layers.block import PreNormBlock
from ..layers.mlp import GatedMLP, check_activation
from ..layers.norm import RMSNorm
from ..layers.rotary import RotaryEmbedding
from . import register
from .base import DecoderModel, Family, norm_params
from .slots import attention_slots, gated_mlp_slots, lm_head_slot


@dataclass
class LlamaConfig(ModelConfig):
    qk_norm: bool = False  # Qwen3


def layer_types_of(text: dict, num_layers: int, window: int | None, where: str) -> list[str]:
    """Which layers use the sliding window: `layer_types` when the config has them, else every
    layer (Mistral) or Qwen's rule (layers from max_window_layers on)."""
    types = text.get("layer_types")
    if types is not None:
        if not isinstance(types, list) or len(types) != num_layers:
            raise ConfigError(f"{where}: layer_types must list one entry per layer ({num_layers}), got {types!r}")
        bad = sorted({t for t in types if t not in ("full_attention", "sliding_attention")})
        if bad:
            raise ConfigError(f"{where}: layer_types {bad} are not attention kinds this family runs")
        return list(types) if window is not None else ["full_attention"] * num_layers
    if window is None:
        return ["full_attention"] * num_layers
    first = int(text.get("max_window_layers", 0) or 0) if "use_sliding_window" in text else 0
    return ["sliding_attention" if i >= first else "full_attention" for i in range(num_layers)]


class LlamaFamily(Family):
    name = "llama"
    architectures = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
    model_types = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                   "qwen3": "Qwen3ForCausalLM"}
    config_class = LlamaConfig

    def parse_config(self, text, top, arch, where):
        f = common_fields(text, top, arch, self.name, where)
        if not f["intermediate_size"]:
            raise ConfigError(f"{where}: missing required key 'intermediate_size'")
        f["hidden_act"] = check_activation(text.get("hidden_act", "silu"), where)
        if arch == "Qwen2ForCausalLM":
            f["attention_bias"] = bool(text.get("attention_bias", True))
        window = self.sliding_window(text, arch)
        f["sliding_window"] = window
        f["layer_types"] = layer_types_of(text, f["num_layers"], window, where)
        return self.config_class(**f, qk_norm=arch == "Qwen3ForCausalLM")

    @staticmethod
    def sliding_window(text: dict, arch: str) -> int | None:
        """As transformers reads it: Llama has none; Mistral defaults to 4096 when the key is absent;
        Qwen2/Qwen3 apply it only with use_sliding_window."""
        if arch == "LlamaForCausalLM":
            return None
        if arch == "MistralForCausalLM":
            w = text.get("sliding_window", 4096)
        else:
            w = text.get("sliding_window") if text.get("use_sliding_window", False) else None
        return int(w) if w else None

    def linear_slots(self, cfg):
        slots = []
        for i in range(cfg.num_layers):
            slots += attention_slots(f"model.layers.{i}.self_attn", cfg.hidden_size, cfg.q_size, cfg.kv_size,
                                     cfg.q_size, cfg.num_kv_heads, cfg.attention_bias)
            slots += gated_mlp_slots(f"model.layers.{i}.mlp", cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)
        return slots + lm_head_slot(cfg)

    def expected_params(self, cfg):
        return norm_params(cfg, ("input_layernorm", "post_attention_layernorm"), cfg.qk_norm)

    def attention(self, cfg, i, linears, dtype, tp_size, **kw) -> Attention:
        a = f"model.layers.{i}.self_attn"
        qk = {}
        if getattr(cfg, "qk_norm", False):
            unit = kw.pop("unit_offset", False)
            qk = dict(q_norm=RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype, unit),
                      k_norm=RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype, unit))
        kw.pop("unit_offset", None)
        return Attention(i, linears[f"{a}.qkv_proj"], linears[f"{a}.o_proj"], cfg.num_heads, cfg.num_kv_heads,
                         cfg.head_dim, sliding_window=cfg.window(i), tp_size=tp_size, **qk, **kw)

    def mlp(self, cfg, i, linears, dtype, tp_size):
        m = f"model.layers.{i}.mlp"
        return GatedMLP(linears[f"{m}.gate_up_proj"], linears[f"{m}.down_proj"], cfg.hidden_act, tp_size)

    def build(self, cfg, linears, dtype, tp_size=1):
        def norm():
            return RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

        layers = [PreNormBlock(norm(), self.attention(cfg, i, linears, dtype, tp_size), norm(),
                               self.mlp(cfg, i, linears, dtype, tp_size)) for i in range(cfg.num_layers)]
        return DecoderModel(cfg, layers, linears, dtype, tp_size, {"default": RotaryEmbedding.from_config(cfg)})


FAMILY = register(LlamaFamily())
