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

MTP head (`mtp.*`, `mtp_num_hidden_layers` in the config, Qwen3-Next style; vLLM's qwen3_5_mtp.py):
    x = mtp.fc(cat[mtp.pre_fc_norm_embedding(embed(t_{i+1})), mtp.pre_fc_norm_hidden(h_i)])  2H -> H
    x = mtp.layers.j(x)   one gated full-attention decoder layer with the family's MLP (dense or MoE)
    h'_i = mtp.norm(x);  logits = lm_head(h'_i) predict t_{i+2}
where h_i is the main model's OUTPUT hidden state at position i (after model.norm: the one lm_head
reads; vLLM and SGLang hand the MTP head the hidden states the target model returns, which are
post-norm) and the embedding comes first in fc's input. embed_tokens and lm_head are the main
model's. The head is built and its tensors loaded only when speculation is asked for
(`lowbit.load(..., speculative="mtp")`: `Family.enable_mtp` sets `use_mtp`); otherwise they are
reported skipped (MTP_REASON). Its attention is layer `num_layers + j` for the caches: the engine
gives it a KV cache of its own like any attention layer (the family's `attention_layers`, where FP8
KV scales go, leaves it out: its cache stays in the compute dtype). How speculation runs:
lowbit/speculative.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import parallel
from ..config import ModelConfig, common_fields
from ..errors import ConfigError, LowbitError
from ..kernels.moe_ref import Routing
from ..layers.attention import Attention
from ..layers.block import PreNormBlock
from ..layers.gated_deltanet import PROJECTIONS, GatedDeltaNet, GatedDeltaNetDims
from ..layers.context import ForwardContext
from ..layers.mlp import GatedMLP, check_activation
from ..layers.moe import MoEBlock
from ..layers.norm import RMSNorm
from ..layers.rotary import RotaryEmbedding
from . import register
from .base import DecoderModel, Family, norm_params
from .slots import LinearSlot, attention_slots, expert_slots, gated_mlp_slots, lm_head_slot

LINEAR, FULL = "linear_attention", "full_attention"
MTP_REASON = "MTP head: used only with speculative decoding (--speculative mtp)"
MTP_KV_REASON = "KV-cache scale of the MTP head: its cache stays in the compute dtype"


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
    mtp_num_layers: int = 0  # MTP layers the checkpoint declares (mtp_num_hidden_layers)
    mtp_dedicated_embeddings: bool = False  # mtp_use_dedicated_embeddings: not supported
    use_mtp: bool = False  # build and load the MTP head (speculative decoding asked for)

    @property
    def linear(self) -> GatedDeltaNetDims:
        return GatedDeltaNetDims(self.hidden_size, self.linear_num_key_heads, self.linear_num_value_heads,
                                 self.linear_key_head_dim, self.linear_value_head_dim, self.linear_conv_kernel_dim,
                                 self.rms_norm_eps, self.hidden_act)

    def is_linear(self, i: int) -> bool:
        return self.layer_types[i] == LINEAR


class MTPHead(nn.Module):
    """The `mtp.*` modules (module docstring): forward(embeds, hidden, rope, ctx, step) -> the head's
    hidden states after mtp.norm [B, T, H] (what lm_head reads, and what a further draft step takes
    as its `hidden`)."""

    def __init__(self, fc, layers: list[nn.Module], norm):
        super().__init__()
        self.fc = fc
        self.pre_fc_norm_embedding, self.pre_fc_norm_hidden = norm(), norm()
        self.layers = nn.ModuleList(layers)
        self.norm = norm()

    def forward(self, embeds, hidden, rope, ctx: ForwardContext | None = None, step: int = 0):
        x = self.fc(torch.cat([self.pre_fc_norm_embedding(embeds), self.pre_fc_norm_hidden(hidden)], dim=-1))
        x, residual = self.layers[step % len(self.layers)](x, None, rope, ctx)
        return self.norm(x, residual)[0]


class Qwen3_5Model(DecoderModel):
    unit_offset_norm = True  # the family's build sets `mtp`: its MTPHead, or None

    def attention_layers(self):
        """The main model's attention layers (where FP8 KV scales go); not the MTP head's."""
        return {i: m for i, m in super().attention_layers().items() if i < self.config.num_layers}

    def mtp_forward(self, next_ids: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor,
                    ctx: ForwardContext | None = None, step: int = 0) -> torch.Tensor:
        """The MTP head at `positions` [B, T]: next_ids [B, T] are the tokens that follow them, hidden
        [B, T, H] the main model's output (or the head's own, for a further draft) -> [B, T, H]."""
        embeds = self.model.embed_tokens(next_ids)
        rope = {name: r.cos_sin(positions, embeds.dtype) for name, r in self.rotary.items()}
        return self.mtp(embeds, hidden, rope, ctx, step)


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
        mtp = text.get("mtp_num_hidden_layers", text.get("num_nextn_predict_layers", 0))
        if not isinstance(mtp, int) or isinstance(mtp, bool) or mtp < 0:
            raise ConfigError(f"{where}: mtp_num_hidden_layers must be a non-negative integer, got {mtp!r}")
        cfg.mtp_num_layers = mtp
        cfg.mtp_dedicated_embeddings = bool(text.get("mtp_use_dedicated_embeddings", False))
        try:
            cfg.linear.check(1)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        return cfg

    # ------------------------------------------------------------------ what is on disk
    def skip(self, name, cfg=None):
        if not name.startswith("mtp."):
            return None
        if cfg is None or not cfg.use_mtp:
            return MTP_REASON
        from ..quant.resolve import KV_SCALE_LEAVES

        return MTP_KV_REASON if name.rsplit(".", 1)[-1] in KV_SCALE_LEAVES else None

    def enable_mtp(self, cfg, where):
        if cfg.mtp_num_layers < 1:
            raise LowbitError(f"{where}: --speculative mtp needs an MTP head, and the config declares none "
                              f"(mtp_num_hidden_layers is 0 or absent): this checkpoint cannot draft with MTP")
        if cfg.mtp_dedicated_embeddings:
            raise LowbitError(f"{where}: mtp_use_dedicated_embeddings=true (an MTP head with its own embedding) "
                              f"is not supported; run without --speculative")
        cfg.use_mtp = True

    def attention_layers(self, cfg):
        return [i for i in range(cfg.num_layers) if not cfg.is_linear(i)]

    def _mtp_prefixes(self, cfg) -> list[str]:
        return [f"mtp.layers.{j}" for j in range(cfg.mtp_num_layers)] if cfg.use_mtp else []

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
                slots += self._mlp_slots(cfg, p)
            else:
                slots += self._full_layer_slots(cfg, p)
        if cfg.use_mtp:  # fc: [embedding | hidden] -> hidden (column: the head runs at tp=1 only)
            slots.append(LinearSlot("mtp.fc", ("mtp.fc",), (cfg.hidden_size,), 2 * cfg.hidden_size, False, "column"))
            for p in self._mtp_prefixes(cfg):
                slots += self._full_layer_slots(cfg, p)
        return slots + lm_head_slot(cfg)

    def _full_layer_slots(self, cfg, p):
        """A full-attention decoder layer's projections (q_proj: [query | gate] per head) and its MLP."""
        return attention_slots(f"{p}.self_attn", cfg.hidden_size, 2 * cfg.q_size, cfg.kv_size, cfg.q_size,
                               cfg.num_kv_heads, cfg.attention_bias, cfg.attention_bias) + self._mlp_slots(cfg, p)

    def _mlp_slots(self, cfg, p):
        if cfg.moe:
            return (expert_slots(f"{p}.mlp.experts", cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size)
                    + gated_mlp_slots(f"{p}.mlp.shared_expert", cfg.hidden_size, cfg.shared_expert_intermediate_size))
        return gated_mlp_slots(f"{p}.mlp", cfg.hidden_size, cfg.intermediate_size)

    def expected_params(self, cfg):
        d = cfg.linear
        full = self.attention_layers(cfg)
        shapes = norm_params(cfg, ("input_layernorm", "post_attention_layernorm"))
        shapes |= norm_params(cfg, (), qk_norm=True, layers=full)
        h = (cfg.hidden_size,)
        mtp = self._mtp_prefixes(cfg)
        if mtp:
            shapes |= {f"mtp.{n}.weight": h for n in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm")}
        for p in mtp:
            shapes |= {f"{p}.{n}.weight": h for n in ("input_layernorm", "post_attention_layernorm")}
            shapes |= {f"{p}.self_attn.{n}.weight": (cfg.head_dim,) for n in ("q_norm", "k_norm")}
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}"
            if cfg.is_linear(i):
                shapes |= {f"{p}.linear_attn.conv1d.weight": (sum(d.sections()), 1, d.conv_kernel),
                           f"{p}.linear_attn.A_log": (d.num_v_heads,), f"{p}.linear_attn.dt_bias": (d.num_v_heads,),
                           f"{p}.linear_attn.norm.weight": (d.head_v_dim,)}
        for p in [f"model.layers.{i}" for i in range(cfg.num_layers)] + mtp:
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
                layers.append(PreNormBlock(norm(), mixer, norm(), self.mlp(cfg, p, linears, dtype, tp_size),
                                           mixer_name="linear_attn"))
            else:
                layers.append(self._full_layer(cfg, p, i, linears, dtype, tp_size, norm))
        model = Qwen3_5Model(cfg, layers, linears, dtype, tp_size, {"default": RotaryEmbedding.from_config(cfg)})
        model.mtp = None
        if cfg.use_mtp:
            if tp_size > 1:
                raise LowbitError("--speculative mtp runs without tensor parallelism (tp=1); drop --tp or "
                                  "--speculative")
            heads = [self._full_layer(cfg, p, cfg.num_layers + j, linears, dtype, tp_size, norm)
                     for j, p in enumerate(self._mtp_prefixes(cfg))]
            model.mtp = MTPHead(linears["mtp.fc"], heads, norm)
        return model

    def _full_layer(self, cfg, p, idx, linears, dtype, tp_size, norm):
        """A gated full-attention decoder layer (cache layer index `idx`) with the family's MLP."""
        a = f"{p}.self_attn"
        mixer = Attention(idx, linears[f"{a}.qkv_proj"], linears[f"{a}.o_proj"], cfg.num_heads, cfg.num_kv_heads,
                          cfg.head_dim, q_norm=norm(cfg.head_dim), k_norm=norm(cfg.head_dim), output_gate=True,
                          tp_size=tp_size)
        return PreNormBlock(norm(), mixer, norm(), self.mlp(cfg, p, linears, dtype, tp_size))

    def mlp(self, cfg, p, linears, dtype, tp_size):
        m = f"{p}.mlp"
        if not cfg.moe:
            return GatedMLP(linears[f"{m}.gate_up_proj"], linears[f"{m}.down_proj"], cfg.hidden_act, tp_size)
        from ..quant.experts import Experts

        experts = Experts(linears[f"{m}.experts.gate_up_proj"], linears[f"{m}.experts.down_proj"], cfg.hidden_act)
        shared = GatedMLP(linears[f"{m}.shared_expert.gate_up_proj"], linears[f"{m}.shared_expert.down_proj"],
                          cfg.hidden_act)
        return MoEBlock(cfg.hidden_size, Routing(top_k=cfg.top_k, renormalize=True), experts, dtype,
                        shared_expert=shared, shared_expert_gate=True, weights_in_logits_dtype=True, tp_size=tp_size)


FAMILY = register(Qwen3_5Family())
