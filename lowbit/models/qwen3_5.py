"""Qwen3.5 / Qwen3.6, dense and MoE, text and VLM checkpoints (the text path).

Architectures `Qwen3_5ForCausalLM`, `Qwen3_5ForConditionalGeneration`, `Qwen3_5MoeForCausalLM`,
`Qwen3_5MoeForConditionalGeneration` (model_type qwen3_5, qwen3_5_text, qwen3_5_moe, qwen3_5_moe_text;
a VLM's text model under `text_config`, its tensors under `model.language_model.*`).

A hybrid stack (transformers' modeling_qwen3_5 / qwen3_5_moe): per `layer_types` (else every
`full_attention_interval`-th layer, default 4, is full attention) each layer's mixer is
  linear_attention  Gated DeltaNet (lowbit/layers/gated_deltanet.py): in_proj_qkv, in_proj_z,
                    in_proj_b, in_proj_a, out_proj are separate projections (producers quantize them
                    per module; in_proj_b/in_proj_a usually stay bf16); conv1d.weight, A_log, dt_bias,
                    norm.weight are plain parameters; its cache is the conv tail + recurrent state
  full_attention    attention with an output gate (q_proj holds [query | gate] per head, 2x rows),
                    (1 + w) q/k norms, partial rotary (`partial_rotary_factor`, default 0.25)
then a dense gated MLP, or (MoE) softmax top-k routing renormalised over the chosen experts, the
experts as stacks, plus a shared expert scaled by sigmoid(shared_expert_gate(x)). Every RMSNorm is
(1 + w) except the linear-attention's gated norm (plain w).

Rotary: M-RoPE (`mrope_section`, `mrope_interleaved`) mixes temporal/height/width frequencies; for
text the three position ids are equal, so every layout gives the plain 1-D rotary of the rotated
dims, which is what runs here.

Tensor parallelism: attention as every family's; the Gated DeltaNet heads split like attention heads
(its projections column-parallel by head, out_proj row-parallel, conv1d/A_log/dt_bias through
`param_shard`); the MoE experts and the shared expert on their intermediate dimension, the routers
replicated, one all-reduce per MoE block.

Not run: the MTP head (`mtp.*` tensors are reported skipped: speculative decoding is not
implemented).
"""
from __future__ import annotations

from dataclasses import dataclass

from .. import parallel
from ..config import ModelConfig, common_fields
from ..errors import ConfigError
from ..kernels.moe_ref import Routing
from ..layers.attention import Attention
from ..layers.block import PreNormBlock
from ..layers.gated_deltanet import PROJECTIONS, GatedDeltaNet, GatedDeltaNetDims
from ..layers.mlp import GatedMLP, check_activation
from ..layers.moe import MoEBlock
from ..layers.norm import RMSNorm
from ..layers.rotary import RotaryEmbedding
from . import register
from .base import DecoderModel, Family, norm_params
from .slots import LinearSlot, attention_slots, expert_slots, gated_mlp_slots, lm_head_slot

LINEAR, FULL = "linear_attention", "full_attention"
MTP_REASON = "MTP head: speculative decoding not implemented"


@dataclass
class Qwen3_5Config(ModelConfig):
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_conv_kernel_dim: int = 4
    moe: bool = False
    num_experts: int = 0
    top_k: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    qk_norm: bool = True

    @property
    def linear(self) -> GatedDeltaNetDims:
        return GatedDeltaNetDims(self.hidden_size, self.linear_num_key_heads, self.linear_num_value_heads,
                                 self.linear_key_head_dim, self.linear_value_head_dim, self.linear_conv_kernel_dim,
                                 self.rms_norm_eps, self.hidden_act)

    def is_linear(self, i: int) -> bool:
        return self.layer_types[i] == LINEAR


class Qwen3_5Model(DecoderModel):
    unit_offset_norm = True


def _positive(text: dict, key: str, where: str, default=None) -> int:
    v = text.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ConfigError(f"{where}: {key} must be a positive integer, got {v!r}")
    return v


class Qwen3_5Family(Family):
    name = "qwen3_5"
    architectures = ("Qwen3_5ForCausalLM", "Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForCausalLM",
                     "Qwen3_5MoeForConditionalGeneration")
    model_types = {"qwen3_5": "Qwen3_5ForConditionalGeneration", "qwen3_5_text": "Qwen3_5ForCausalLM",
                   "qwen3_5_moe": "Qwen3_5MoeForConditionalGeneration", "qwen3_5_moe_text": "Qwen3_5MoeForCausalLM"}

    # ------------------------------------------------------------------ config
    def parse_config(self, text, top, arch, where):
        f = common_fields(text, top, arch, self.name, where)
        f["hidden_act"] = check_activation(text.get("hidden_act", "silu"), where, allowed=("silu",))
        rope = text.get("rope_parameters") if isinstance(text.get("rope_parameters"), dict) else {}
        f["partial_rotary_factor"] = float(rope.get("partial_rotary_factor", text.get("partial_rotary_factor", 0.25)))
        if f["rope_scaling"] is not None:  # the M-RoPE keys are not a scaling of their own
            f["rope_scaling"] = {k: v for k, v in f["rope_scaling"].items()
                                 if k not in ("mrope_section", "mrope_interleaved", "partial_rotary_factor")}
        n = f["num_layers"]
        types = text.get("layer_types")
        if types is None:
            every = _positive(text, "full_attention_interval", where, 4)
            types = [LINEAR if (i + 1) % every else FULL for i in range(n)]
        if not isinstance(types, list) or len(types) != n or set(types) - {LINEAR, FULL}:
            raise ConfigError(f"{where}: layer_types must list linear_attention/full_attention once per layer "
                              f"({n}), got {types!r}")
        f["layer_types"] = list(types)
        moe = "Moe" in arch
        lin = {k: _positive(text, k, where, d) for k, d in (
            ("linear_num_key_heads", 16), ("linear_num_value_heads", 32), ("linear_key_head_dim", 128),
            ("linear_value_head_dim", 128), ("linear_conv_kernel_dim", 4))}
        if not moe:
            f["intermediate_size"] = _positive(text, "intermediate_size", where)
        cfg = Qwen3_5Config(**f, **lin, moe=moe)
        if moe:
            cfg.num_experts = _positive(text, "num_experts", where)
            cfg.top_k = _positive(text, "num_experts_per_tok", where)
            if cfg.top_k > cfg.num_experts:
                raise ConfigError(f"{where}: num_experts_per_tok={cfg.top_k} exceeds num_experts={cfg.num_experts}")
            cfg.moe_intermediate_size = _positive(text, "moe_intermediate_size", where)
            cfg.shared_expert_intermediate_size = _positive(text, "shared_expert_intermediate_size", where)
        try:
            cfg.linear.check(1)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        return cfg

    # ------------------------------------------------------------------ what is on disk
    def skip(self, name):
        return MTP_REASON if name.startswith("mtp.") else None

    def attention_layers(self, cfg):
        return [i for i in range(cfg.num_layers) if not cfg.is_linear(i)]

    def linear_slots(self, cfg):
        d, slots = cfg.linear, []
        kd, _, vd = d.sections()
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}"
            if cfg.is_linear(i):
                a = f"{p}.linear_attn"
                # column-parallel by heads: in_proj_qkv's sections [q | k | v] split each (conv_channels)
                rows = {"in_proj_qkv": (kd, kd, vd), "in_proj_z": (vd,), "in_proj_b": (d.num_v_heads,),
                        "in_proj_a": (d.num_v_heads,)}
                slots += [LinearSlot(f"{a}.{n}", (f"{a}.{n}",), r, cfg.hidden_size, False, "column")
                          for n, r in rows.items()]
                slots.append(LinearSlot(f"{a}.out_proj", (f"{a}.out_proj",), (cfg.hidden_size,), vd, False, "row"))
            else:  # q_proj: [query | gate] per head
                slots += attention_slots(f"{p}.self_attn", cfg.hidden_size, 2 * cfg.q_size, cfg.kv_size, cfg.q_size,
                                         cfg.num_kv_heads, cfg.attention_bias, cfg.attention_bias)
            if cfg.moe:
                slots += expert_slots(f"{p}.mlp.experts", cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size)
                slots += gated_mlp_slots(f"{p}.mlp.shared_expert", cfg.hidden_size,
                                         cfg.shared_expert_intermediate_size)
            else:
                slots += gated_mlp_slots(f"{p}.mlp", cfg.hidden_size, cfg.intermediate_size)
        return slots + lm_head_slot(cfg)

    def expected_params(self, cfg):
        d = cfg.linear
        full = self.attention_layers(cfg)
        shapes = norm_params(cfg, ("input_layernorm", "post_attention_layernorm"))
        shapes |= norm_params(cfg, (), qk_norm=True, layers=full)
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}"
            if cfg.is_linear(i):
                shapes |= {f"{p}.linear_attn.conv1d.weight": (sum(d.sections()), 1, d.conv_kernel),
                           f"{p}.linear_attn.A_log": (d.num_v_heads,), f"{p}.linear_attn.dt_bias": (d.num_v_heads,),
                           f"{p}.linear_attn.norm.weight": (d.head_v_dim,)}
            if cfg.moe:
                shapes[f"{p}.mlp.gate.weight"] = (cfg.num_experts, cfg.hidden_size)
                shapes[f"{p}.mlp.shared_expert_gate.weight"] = (1, cfg.hidden_size)
        return shapes

    def check_tp(self, cfg, tp):
        d = cfg.linear
        also = {"linear_num_key_heads": d.num_k_heads, "linear_num_value_heads": d.num_v_heads}
        if cfg.moe:
            also |= {"moe_intermediate_size": cfg.moe_intermediate_size,
                     "shared_expert_intermediate_size": cfg.shared_expert_intermediate_size}
        parallel.check(cfg, tp, also)

    def param_shard(self, cfg, name, tensor, rank, tp):
        head, sep, leaf = name.partition(".linear_attn.")
        if sep and tp > 1:  # conv1d.weight, A_log, dt_bias by head; norm.weight replicated
            return GatedDeltaNet.shard_param(cfg.linear, leaf, tensor, rank, tp)
        return super().param_shard(cfg, name, tensor, rank, tp)

    # ------------------------------------------------------------------ the model
    def build(self, cfg, linears, dtype, tp_size=1):
        def norm(dim=cfg.hidden_size):
            return RMSNorm(dim, cfg.rms_norm_eps, dtype, unit_offset=True)

        layers = []
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}"
            if cfg.is_linear(i):
                mixer = GatedDeltaNet(cfg.linear, i, {n: linears[f"{p}.linear_attn.{n}"] for n in PROJECTIONS},
                                      dtype, tp_size)
                name = "linear_attn"
            else:
                a = f"{p}.self_attn"
                mixer = Attention(i, linears[f"{a}.qkv_proj"], linears[f"{a}.o_proj"], cfg.num_heads,
                                  cfg.num_kv_heads, cfg.head_dim, q_norm=norm(cfg.head_dim), k_norm=norm(cfg.head_dim),
                                  output_gate=True, tp_size=tp_size)
                name = "self_attn"
            layers.append(PreNormBlock(norm(), mixer, norm(), self.mlp(cfg, i, linears, dtype, tp_size),
                                       mixer_name=name))
        return Qwen3_5Model(cfg, layers, linears, dtype, tp_size, {"default": RotaryEmbedding.from_config(cfg)})

    def mlp(self, cfg, i, linears, dtype, tp_size):
        m = f"model.layers.{i}.mlp"
        if not cfg.moe:
            return GatedMLP(linears[f"{m}.gate_up_proj"], linears[f"{m}.down_proj"], cfg.hidden_act, tp_size)
        from ..quant.experts import Experts

        experts = Experts(linears[f"{m}.experts.gate_up_proj"], linears[f"{m}.experts.down_proj"], cfg.hidden_act)
        shared = GatedMLP(linears[f"{m}.shared_expert.gate_up_proj"], linears[f"{m}.shared_expert.down_proj"],
                          cfg.hidden_act)
        return MoEBlock(cfg.hidden_size, Routing(top_k=cfg.top_k, renormalize=True), experts, dtype,
                        shared_expert=shared, shared_expert_gate=True, weights_in_logits_dtype=True, tp_size=tp_size)


FAMILY = register(Qwen3_5Family())
