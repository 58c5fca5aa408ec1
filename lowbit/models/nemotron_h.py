"""Nemotron-H: a hybrid of Mamba2, attention, MLP and MoE layers (NemotronHForCausalLM, nemotron_h).

On disk (NVIDIA's names): `backbone.embeddings`, `backbone.layers.N.{norm,mixer}`, `backbone.norm_f`,
`lm_head`; canonical here (as every family): `model.embed_tokens`, `model.layers.N.{norm,mixer}`,
`model.norm` (names.to_canonical maps `backbone.` to `model.`, `sanitize` the two renames).
Each layer is one pre-norm block x + mixer(norm(x)), the mixer by `layers_block_type`
(older configs: `hybrid_override_pattern`, M Mamba2, * attention, - MLP, E MoE):
  linear_attention  the Mamba2 mixer (lowbit/layers/mamba2.py; in_proj/out_proj are projections)
  full_attention    q/k/v/o attention without rotary embeddings
  mlp               down(relu^2(up(x))), not gated
  moe               sigmoid router with score-correction bias and group-limited choice, routed
                    ungated experts (optionally in a latent space: fc1_latent_proj / fc2_latent_proj),
                    times routed_scaling_factor, plus one shared MLP (`shared_experts`)
All norms are RMSNorm with `layer_norm_epsilon`.

Tensor parallelism: Mamba2 heads split in whole B/C groups (in_proj column-parallel in its five
sections, out_proj row-parallel, conv1d/A_log/D/dt_bias/norm through `param_shard`), attention and
the MLP as every family's, the MoE experts and shared MLP on their intermediate dimension with the
router replicated and one all-reduce per block (the latent MoE, `moe_latent_size`: one more, see
LatentExperts).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .. import parallel
from ..config import ModelConfig, common_fields
from ..errors import ConfigError
from ..kernels.moe_ref import Routing
from ..layers.attention import Attention
from ..layers.mamba2 import Mamba2Config, Mamba2Mixer, in_proj_shard_sizes
from ..layers.mlp import MLP, check_activation
from ..layers.moe import MoEBlock
from ..layers.norm import RMSNorm
from ..names import to_canonical
from . import register
from .base import DecoderModel, Family, refuse
from .slots import LinearSlot, attention_slots, expert_slots, lm_head_slot

KINDS = ("linear_attention", "full_attention", "mlp", "moe")
PATTERN = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}
LEGACY = {"mamba": "linear_attention", "attention": "full_attention"}  # transformers' older kind names


@dataclass
class NemotronHConfig(ModelConfig):
    mamba: Mamba2Config | None = None
    num_experts: int = 0
    top_k: int = 0
    moe_intermediate_size: int = 0
    shared_intermediate_size: int = 0
    moe_latent_size: int | None = None
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    layers_of: dict = field(default_factory=dict)  # kind -> layer indices

    def kind(self, i: int) -> str:
        return self.layer_types[i]


def block_types(text: dict, where: str) -> list[str]:
    """Layer kinds from `layers_block_type` (or `layer_types`), else `hybrid_override_pattern`."""
    types = text.get("layers_block_type") or text.get("layer_types")
    if types is None:
        pattern = text.get("hybrid_override_pattern")
        if not isinstance(pattern, str) or not pattern:
            raise ConfigError(f"{where}: Nemotron-H needs layers_block_type (or hybrid_override_pattern)")
        bad = sorted(set(pattern) - set(PATTERN))
        if bad:
            raise ConfigError(f"{where}: hybrid_override_pattern has unknown layer symbols {bad} "
                              f"(M Mamba2, * attention, - MLP, E MoE)")
        return [PATTERN[c] for c in pattern]
    if not isinstance(types, list) or not types:
        raise ConfigError(f"{where}: layers_block_type must be a non-empty list, got {types!r}")
    types = [LEGACY.get(t, t) for t in types]
    bad = sorted({str(t) for t in types if t not in KINDS})
    if bad:
        raise ConfigError(f"{where}: layers_block_type has kinds {bad} that Nemotron-H does not have "
                          f"(supported: {', '.join(KINDS)})")
    return types


class NemotronHFamily(Family):
    name = "nemotron_h"
    architectures = ("NemotronHForCausalLM",)
    model_types = {"nemotron_h": "NemotronHForCausalLM"}

    def parse_config(self, text, top, arch, where):
        types = block_types(text, where)
        f = common_fields({**text, "num_hidden_layers": len(types)}, top, arch, self.name, where)
        f["rms_norm_eps"] = float(text.get("layer_norm_epsilon", 1e-5))
        f["layer_types"] = types
        f["rope_theta"], f["rope_scaling"] = 0.0, None  # no rotary embeddings
        for key, why in (("attention_bias", "transformers' Nemotron-H attention has no biases"),
                         ("residual_in_fp32", "lowbit keeps the residual stream in the compute dtype, as "
                                              "transformers does"),
                         ("sliding_window", "Nemotron-H attention is full attention in transformers"),
                         ("mamba_proj_bias", "transformers' mixer reads use_bias for in_proj/out_proj; a "
                                             "separate mamba_proj_bias would be ignored")):
            if text.get(key):
                raise refuse(where, key, text[key], why)
        f["mlp_bias"] = bool(text.get("mlp_bias", False))
        cfg = NemotronHConfig(**f)
        cfg.layers_of = {k: [i for i, t in enumerate(types) if t == k] for k in KINDS}
        if text.get("use_bias"):
            raise refuse(where, "use_bias", text["use_bias"], "Mamba2 in_proj/out_proj biases are not implemented")
        if cfg.layers_of["linear_attention"]:
            cfg.mamba = Mamba2Config.from_hf(text, where)
        if cfg.layers_of["mlp"] or cfg.layers_of["moe"]:
            cfg.hidden_act = check_activation(text.get("mlp_hidden_act", "relu2"), f"{where} mlp_hidden_act",
                                              allowed=("relu2", "silu", "gelu_tanh", "gelu"))
            if not cfg.intermediate_size and cfg.layers_of["mlp"]:
                raise ConfigError(f"{where}: missing required key 'intermediate_size' (MLP layers need it)")
        if cfg.layers_of["moe"]:
            self._parse_moe(cfg, text, where)
        return cfg

    @staticmethod
    def _parse_moe(cfg, text, where):
        cfg.num_experts = int(text.get("n_routed_experts", 8))
        cfg.top_k = int(text.get("num_experts_per_tok", 2))
        if not 1 <= cfg.top_k <= cfg.num_experts:
            raise ConfigError(f"{where}: num_experts_per_tok={cfg.top_k} must be between 1 and n_routed_experts "
                              f"({cfg.num_experts})")
        cfg.moe_intermediate_size = int(text.get("moe_intermediate_size", 7688))
        cfg.shared_intermediate_size = int(text.get("moe_shared_expert_intermediate_size", 7688))
        latent = text.get("moe_latent_size")
        cfg.moe_latent_size = int(latent) if latent is not None else None
        cfg.norm_topk_prob = bool(text.get("norm_topk_prob", True))
        cfg.routed_scaling_factor = float(text.get("routed_scaling_factor", 1.0))
        cfg.n_group, cfg.topk_group = int(text.get("n_group", 1) or 1), int(text.get("topk_group", 1) or 1)
        if cfg.num_experts % cfg.n_group or not 1 <= cfg.topk_group <= cfg.n_group:
            raise ConfigError(f"{where}: n_group={cfg.n_group} must divide n_routed_experts ({cfg.num_experts}) "
                              f"and topk_group={cfg.topk_group} must be between 1 and n_group")
        if cfg.num_experts // cfg.n_group < 2:
            raise ConfigError(f"{where}: each of the n_group={cfg.n_group} expert groups needs at least 2 experts "
                              f"(groups are scored by their top-2)")

    def sanitize(self, name):
        name = to_canonical(name)
        for old, new in (("model.embeddings", "model.embed_tokens"), ("model.norm_f", "model.norm")):
            if name == old or name.startswith(old + "."):
                return new + name[len(old):]
        return name

    # -- projections and parameters ------------------------------------------------------------
    def linear_slots(self, cfg):
        slots, h = [], cfg.hidden_size
        for i, kind in enumerate(cfg.layer_types):
            p = f"model.layers.{i}.mixer"
            if kind == "linear_attention":
                m = cfg.mamba
                # column-parallel in five sections [z | x | B | C | dt], each split by heads / groups
                slots += [LinearSlot(f"{p}.in_proj", (f"{p}.in_proj",), in_proj_shard_sizes(m), h, False, "column"),
                          LinearSlot(f"{p}.out_proj", (f"{p}.out_proj",), (h,), m.intermediate_size, False, "row")]
            elif kind == "full_attention":
                slots += attention_slots(p, h, cfg.q_size, cfg.kv_size, cfg.q_size, cfg.num_kv_heads)
            elif kind == "mlp":
                slots += mlp_slots(p, h, cfg.intermediate_size, cfg.mlp_bias)
            else:
                width = cfg.moe_latent_size or h
                slots += expert_slots(f"{p}.experts", cfg.num_experts, width, cfg.moe_intermediate_size,
                                      gated=False)
                slots += mlp_slots(f"{p}.shared_experts", h, cfg.shared_intermediate_size, cfg.mlp_bias)
                if cfg.moe_latent_size:  # replicated under TP: every rank projects the whole latent
                    slots += [LinearSlot(f"{p}.fc1_latent_proj", (f"{p}.fc1_latent_proj",), (width,), h,
                                         cfg.mlp_bias, None),
                              LinearSlot(f"{p}.fc2_latent_proj", (f"{p}.fc2_latent_proj",), (h,), width,
                                         cfg.mlp_bias, None)]
        return slots + lm_head_slot(cfg)

    def expected_params(self, cfg):
        h = cfg.hidden_size
        shapes = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
        for i, kind in enumerate(cfg.layer_types):
            p = f"model.layers.{i}"
            shapes[f"{p}.norm.weight"] = (h,)
            if kind == "linear_attention":
                m = cfg.mamba
                shapes[f"{p}.mixer.conv1d.weight"] = (m.conv_dim, 1, m.conv_kernel)
                if m.use_conv_bias:
                    shapes[f"{p}.mixer.conv1d.bias"] = (m.conv_dim,)
                for n in ("dt_bias", "A_log", "D"):
                    shapes[f"{p}.mixer.{n}"] = (m.num_heads,)
                shapes[f"{p}.mixer.norm.weight"] = (m.intermediate_size,)
            elif kind == "moe":
                shapes[f"{p}.mixer.gate.weight"] = (cfg.num_experts, h)
                shapes[f"{p}.mixer.gate.e_score_correction_bias"] = (cfg.num_experts,)
        return shapes

    def attention_layers(self, cfg):
        return list(cfg.layers_of["full_attention"])

    def check_tp(self, cfg, tp):
        also, refused = {}, {}
        if cfg.mamba is not None:
            also |= {"mamba_num_heads": cfg.mamba.num_heads, "n_groups": cfg.mamba.n_groups}
        if cfg.layers_of["moe"]:
            also |= {"moe_intermediate_size": cfg.moe_intermediate_size,
                     "moe_shared_expert_intermediate_size": cfg.shared_intermediate_size}
        parallel.check(cfg, tp, also, refused)

    def param_shard(self, cfg, name, tensor, rank, tp):
        head, sep, leaf = name.partition(".mixer.")
        if sep and tp > 1 and cfg.kind(int(head.rsplit(".", 1)[1])) == "linear_attention":
            return Mamba2Mixer.shard_param(cfg.mamba, leaf, tensor, rank, tp)
        return super().param_shard(cfg, name, tensor, rank, tp)

    # -- the model -----------------------------------------------------------------------------
    def mixer(self, cfg, i, linears, dtype, tp_size=1):
        p, kind = f"model.layers.{i}.mixer", cfg.layer_types[i]
        if kind == "linear_attention":
            return Mamba2Mixer(cfg.mamba, i, {"in_proj": linears[f"{p}.in_proj"],
                                              "out_proj": linears[f"{p}.out_proj"]}, dtype, tp_size)
        if kind == "full_attention":
            return Attention(i, linears[f"{p}.qkv_proj"], linears[f"{p}.o_proj"], cfg.num_heads, cfg.num_kv_heads,
                             cfg.head_dim, tp_size=tp_size)
        if kind == "mlp":
            return MLP(linears[f"{p}.up_proj"], linears[f"{p}.down_proj"], cfg.hidden_act, tp_size)
        from ..quant.experts import Experts

        experts = Experts(linears[f"{p}.experts.up_proj"], linears[f"{p}.experts.down_proj"], cfg.hidden_act)
        if cfg.moe_latent_size:
            experts = LatentExperts(linears[f"{p}.fc1_latent_proj"], experts, linears[f"{p}.fc2_latent_proj"],
                                    tp_size)
        routing = Routing(top_k=cfg.top_k, scoring="sigmoid", renormalize=cfg.norm_topk_prob,
                          scaling=cfg.routed_scaling_factor, n_group=cfg.n_group, topk_group=cfg.topk_group)
        shared = MLP(linears[f"{p}.shared_experts.up_proj"], linears[f"{p}.shared_experts.down_proj"], cfg.hidden_act)
        return MoEBlock(cfg.hidden_size, routing, experts, dtype, shared_expert=shared, router_dtype=torch.float32,
                        correction_bias=True, tp_size=tp_size)  # one all-reduce for experts + shared

    def build(self, cfg, linears, dtype, tp_size=1):
        layers = [NemotronHBlock(RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype),
                                 self.mixer(cfg, i, linears, dtype, tp_size)) for i in range(cfg.num_layers)]
        return DecoderModel(cfg, layers, linears, dtype, tp_size, {"none": NoRotary()})


def mlp_slots(prefix: str, hidden: int, inter: int, bias: bool) -> list[LinearSlot]:
    """The ungated MLP's column-parallel up_proj and row-parallel down_proj."""
    return [LinearSlot(f"{prefix}.up_proj", (f"{prefix}.up_proj",), (inter,), hidden, bias, "column"),
            LinearSlot(f"{prefix}.down_proj", (f"{prefix}.down_proj",), (hidden,), inter, bias, "row")]


class LatentExperts(nn.Module):
    """Routed experts that work in a latent space: fc2(experts(fc1(x))) (moe_latent_size).

    Under tensor parallelism the latent projections are replicated and the experts split on their
    intermediate dimension like any experts: each rank's experts give a partial latent sum, summed
    across ranks before fc2 (fc2 may quantize its input: it must see the whole sum), and the
    block's one all-reduce after the shared expert then takes fc2's output from rank 0 only (the
    others contribute zeros), so the routed part is counted once."""

    def __init__(self, fc1: nn.Module, experts: nn.Module, fc2: nn.Module, tp_size: int = 1):
        super().__init__()
        self.fc1_latent_proj, self.experts, self.fc2_latent_proj = fc1, experts, fc2
        self.num_experts = experts.num_experts
        self.tp_size = tp_size

    def finalize(self):
        return self.experts.finalize()

    def forward(self, x, topk_ids, topk_weights):
        latent = self.experts(self.fc1_latent_proj(x), topk_ids, topk_weights)
        if self.tp_size == 1:
            return self.fc2_latent_proj(latent)
        y = self.fc2_latent_proj(parallel.all_reduce(latent))
        return y if parallel.current()[0] == 0 else torch.zeros_like(y)


class NoRotary:
    """cos = 1, sin = 0: attention's rotary step leaves q and k exactly as they are."""

    length_dependent = False

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype):
        shape = (*positions.shape, 2)  # the smallest rotary width; broadcast over head_dim below
        return torch.ones(shape, dtype=dtype, device=positions.device), torch.zeros(shape, dtype=dtype,
                                                                                   device=positions.device)


class NemotronHBlock(nn.Module):
    """x + mixer(norm(x)); the residual add is fused into the next norm (DecoderModel's contract)."""

    def __init__(self, norm: nn.Module, mixer: nn.Module):
        super().__init__()
        self.norm, self.mixer = norm, mixer

    def forward(self, x, residual, rope, ctx=None):
        if residual is None:
            h, residual = self.norm(x), x
        else:
            h, residual = self.norm(x, residual)
        if isinstance(self.mixer, Attention):
            h = self.mixer(h, *rope["none"], ctx)
        elif isinstance(self.mixer, Mamba2Mixer):
            h = self.mixer(h, ctx)
        else:
            h = self.mixer(h)
        return h, residual


FAMILY = register(NemotronHFamily())
