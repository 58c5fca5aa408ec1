"""Sparse-MoE decoders with softmax routing: Qwen3-MoE and Mixtral.

Attention is the Llama family's (Qwen3: q/k norms; Mixtral: Mistral's sliding window). The MLP of a
sparse layer is the shared MoE block (lowbit/layers/moe.py): an unquantized router `mlp.gate`
[E, H], top-k of softmax (renormalised: Qwen3 `norm_topk_prob`, Mixtral always), and the experts
as two stacks (lowbit/quant/experts.py) loaded from per-expert tensors
`mlp.experts.{e}.{gate,up,down}_proj` (Mixtral on disk: `block_sparse_moe.experts.{e}.{w1,w3,w2}`)
or transformers 5's fused `mlp.experts.gate_up_proj` / `down_proj`. Qwen3-MoE layers listed in
`mlp_only_layers`, or off the `decoder_sparse_step` grid, run a dense gated MLP.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ConfigError
from ..layers.moe import MoEBlock
from ..kernels.moe_ref import Routing
from ..names import to_canonical
from . import register
from .base import norm_params
from .llama import LlamaConfig, LlamaFamily
from .slots import attention_slots, expert_slots, gated_mlp_slots, lm_head_slot

MIXTRAL_LEAVES = ("w1", "w3", "w2")


@dataclass
class MoEConfig(LlamaConfig):
    num_experts: int = 0
    top_k: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    sparse_layers: list[int] = field(default_factory=list)


class MoEFamily(LlamaFamily):
    name = "qwen3_moe"
    architectures = ("Qwen3MoeForCausalLM", "MixtralForCausalLM")
    model_types = {"qwen3_moe": "Qwen3MoeForCausalLM", "mixtral": "MixtralForCausalLM"}
    config_class = MoEConfig

    def parse_config(self, text, top, arch, where):
        mixtral = arch == "MixtralForCausalLM"
        base = dict(text)
        if mixtral:  # Mixtral's window defaults to none (Mistral's to 4096)
            base.setdefault("sliding_window", None)
        cfg = super().parse_config(base, top, "MistralForCausalLM" if mixtral else "Qwen3ForCausalLM", where)
        cfg.architecture, cfg.family, cfg.qk_norm = arch, self.name, not mixtral
        experts = text.get("num_experts", text.get("num_local_experts"))
        if not experts or int(experts) < 1:
            raise ConfigError(f"{where}: num_experts (num_local_experts) must be a positive integer, got {experts!r}")
        cfg.num_experts = int(experts)
        cfg.top_k = int(text.get("num_experts_per_tok", 2 if mixtral else 8))
        if not 1 <= cfg.top_k <= cfg.num_experts:
            raise ConfigError(f"{where}: num_experts_per_tok={cfg.top_k} must be between 1 and num_experts "
                              f"({cfg.num_experts})")
        cfg.moe_intermediate_size = int(cfg.intermediate_size if mixtral else text.get("moe_intermediate_size", 0))
        if cfg.moe_intermediate_size < 1:
            raise ConfigError(f"{where}: moe_intermediate_size must be a positive integer")
        cfg.norm_topk_prob = True if mixtral else bool(text.get("norm_topk_prob", False))
        if mixtral:
            cfg.sparse_layers = list(range(cfg.num_layers))
        else:
            step = int(text.get("decoder_sparse_step", 1) or 1)
            dense = set(text.get("mlp_only_layers") or [])
            cfg.sparse_layers = [i for i in range(cfg.num_layers) if i not in dense and (i + 1) % step == 0]
        if text.get("shared_expert_intermediate_size"):
            raise ConfigError(f"{where}: shared_expert_intermediate_size is set, but {arch} has no shared expert "
                              f"in transformers; this config describes another model")
        return cfg

    def sanitize(self, name):
        name = to_canonical(name)
        if ".block_sparse_moe." in name:  # Mixtral's on-disk spelling
            name = name.replace(".block_sparse_moe.", ".mlp.")
        return name

    def expert_leaves(self, cfg):
        return MIXTRAL_LEAVES if cfg.architecture == "MixtralForCausalLM" else ("gate_proj", "up_proj", "down_proj")

    def linear_slots(self, cfg):
        slots = []
        for i in range(cfg.num_layers):
            slots += attention_slots(f"model.layers.{i}.self_attn", cfg.hidden_size, cfg.q_size, cfg.kv_size,
                                     cfg.q_size, cfg.num_kv_heads, cfg.attention_bias)
            if i in cfg.sparse_layers:
                gate, up, down = self.expert_leaves(cfg)
                slots += expert_slots(f"model.layers.{i}.mlp.experts", cfg.num_experts, cfg.hidden_size,
                                      cfg.moe_intermediate_size, names=(gate, up, down))
            else:
                slots += gated_mlp_slots(f"model.layers.{i}.mlp", cfg.hidden_size, cfg.intermediate_size)
        return slots + lm_head_slot(cfg)

    def expected_params(self, cfg):
        shapes = norm_params(cfg, ("input_layernorm", "post_attention_layernorm"), cfg.qk_norm)
        for i in cfg.sparse_layers:
            shapes[f"model.layers.{i}.mlp.gate.weight"] = (cfg.num_experts, cfg.hidden_size)
        return shapes

    def check_tp(self, cfg, tp):
        super().check_tp(cfg, tp)
        if tp > 1 and cfg.moe_intermediate_size % tp:
            raise ConfigError(f"{cfg.architecture}: moe_intermediate_size {cfg.moe_intermediate_size} is not a "
                              f"multiple of tp={tp} (experts are split on their intermediate dimension)")

    def mlp(self, cfg, i, linears, dtype, tp_size):
        if i not in cfg.sparse_layers:
            return super().mlp(cfg, i, linears, dtype, tp_size)
        from ..quant.experts import Experts

        p = f"model.layers.{i}.mlp.experts"
        experts = Experts(linears[f"{p}.gate_up_proj"], linears[f"{p}.down_proj"], cfg.hidden_act)
        routing = Routing(top_k=cfg.top_k, renormalize=cfg.norm_topk_prob)
        return MoEBlock(cfg.hidden_size, routing, experts, dtype, tp_size=tp_size,
                        weights_in_logits_dtype=cfg.architecture != "MixtralForCausalLM")

    # build: the Llama family's, with this family's mlp()


FAMILY = register(MoEFamily())
