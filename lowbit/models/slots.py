"""Which Linear-like modules a model has: the contract between the families, resolve() and the loader.

A `LinearSlot` is one in-memory projection. Its `shards` are the canonical names a checkpoint may
store split (q_proj, k_proj, v_proj); `fused_name` is the name it has when stored fused on disk
(qkv_proj, Phi-3 style). Every family lists its slots through `Family.linear_slots(cfg)`; the
helpers below build the slots most families share.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LinearSlot:
    fused_name: str  # canonical in-memory name (also the fused-on-disk name)
    shards: tuple[str, ...]  # canonical split names, in fused order
    shard_sizes: tuple[int, ...]
    in_features: int
    bias: bool
    parallel: str  # 'column' | 'row'
    kv_heads: int = 0  # q/k/v slots: KV heads (k and v shards are replicated when tp > kv_heads)

    @property
    def out_features(self) -> int:
        return sum(self.shard_sizes)


def attention_slots(prefix: str, hidden: int, q_rows: int, kv_rows: int, o_in: int, kv_heads: int,
                    bias: bool = False, o_bias: bool = False) -> list[LinearSlot]:
    """q/k/v as one column-parallel qkv_proj, and the row-parallel o_proj."""
    return [LinearSlot(f"{prefix}.qkv_proj", (f"{prefix}.q_proj", f"{prefix}.k_proj", f"{prefix}.v_proj"),
                       (q_rows, kv_rows, kv_rows), hidden, bias, "column", kv_heads),
            LinearSlot(f"{prefix}.o_proj", (f"{prefix}.o_proj",), (hidden,), o_in, o_bias, "row")]


def gated_mlp_slots(prefix: str, hidden: int, inter: int, bias: bool = False,
                    names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")) -> list[LinearSlot]:
    """gate/up as one column-parallel gate_up_proj, and the row-parallel down_proj."""
    gate, up, down = names
    return [LinearSlot(f"{prefix}.gate_up_proj", (f"{prefix}.{gate}", f"{prefix}.{up}"), (inter, inter), hidden, bias,
                       "column"),
            LinearSlot(f"{prefix}.down_proj", (f"{prefix}.{down}",), (hidden,), inter, bias, "row")]


def lm_head_slot(cfg) -> list[LinearSlot]:
    return [] if cfg.tie_word_embeddings else [LinearSlot("lm_head", ("lm_head",), (cfg.vocab_size,), cfg.hidden_size,
                                                          False, "column")]
