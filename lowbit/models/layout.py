"""Which Linear-like modules a model has: the contract between the model files, resolve() and the loader.

A `LinearSlot` is one in-memory projection. Its `shards` are the canonical names a checkpoint may
store split (q_proj, k_proj, v_proj); `fused_name` is the name it has when stored fused on disk
(qkv_proj, Phi-3 style). Every family lists its slots through `linear_slots(cfg)`.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config import ModelConfig


@dataclass(frozen=True)
class LinearSlot:
    fused_name: str  # canonical in-memory name (also the fused-on-disk name)
    shards: tuple[str, ...]  # canonical split names, in fused order
    shard_sizes: tuple[int, ...]
    in_features: int
    bias: bool
    parallel: str  # 'column' | 'row'

    @property
    def out_features(self) -> int:
        return sum(self.shard_sizes)


def llama_slots(cfg: ModelConfig) -> list[LinearSlot]:
    """Llama, Mistral, Qwen2, Qwen3 and Phi-3 share this projection layout."""
    slots = []
    h, q, kv, inter = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size
    for i in range(cfg.num_layers):
        a, m = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        slots += [
            LinearSlot(f"{a}.qkv_proj", (f"{a}.q_proj", f"{a}.k_proj", f"{a}.v_proj"), (q, kv, kv), h,
                       cfg.attention_bias, "column"),
            LinearSlot(f"{a}.o_proj", (f"{a}.o_proj",), (h,), q, False, "row"),
            LinearSlot(f"{m}.gate_up_proj", (f"{m}.gate_proj", f"{m}.up_proj"), (inter, inter), h, cfg.mlp_bias, "column"),
            LinearSlot(f"{m}.down_proj", (f"{m}.down_proj",), (h,), inter, cfg.mlp_bias, "row"),
        ]
    if not cfg.tie_word_embeddings:
        slots.append(LinearSlot("lm_head", ("lm_head",), (cfg.vocab_size,), h, False, "column"))
    return slots


def linear_slots(cfg: ModelConfig) -> list[LinearSlot]:
    if cfg.family in ("llama", "phi3"):
        return llama_slots(cfg)
    raise ValueError(cfg.family)
