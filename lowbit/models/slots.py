"""Which Linear-like modules a model has: the contract between the families, resolve() and the loader.

A `LinearSlot` is one in-memory projection. Its `shards` are the canonical names a checkpoint may
store split (q_proj, k_proj, v_proj); `fused_name` is the name it has when stored fused on disk
(qkv_proj, Phi-3 style). Every family lists its slots through `Family.linear_slots(cfg)`; the
helpers below build the slots most families share.

`shard_sizes` are also the slot's tensor-parallel sections: a column-parallel slot gives rank r the
r-th part of each shard. A slot of ONE on-disk module may list several sizes (Gated DeltaNet's
in_proj_qkv [q | k | v], Mamba2's in_proj [z | x | B | C | dt]): the module is then sliced like a
fused-on-disk one, so each rank keeps its heads of every section.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LinearSlot:
    fused_name: str  # canonical in-memory name (also the fused-on-disk name)
    shards: tuple[str, ...]  # canonical split names, in fused order
    shard_sizes: tuple[int, ...]  # one per shard, or the sections of a one-shard slot (module docstring)
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


@dataclass(frozen=True)
class ExpertSlot:
    """E stacked experts of one projection kind of a MoE layer (lowbit/quant/experts.py runs them).

    On disk each expert is its own module `{prefix}.{e}.{shard}` (both producers), or, unquantized,
    one tensor for every expert `{prefix}.{fused}` (transformers 5's fused form)."""

    name: str  # canonical in-memory name of the stack, e.g. model.layers.0.mlp.experts.gate_up_proj
    kind: str  # gate_up | up | down
    prefix: str  # e.g. model.layers.0.mlp.experts
    shards: tuple[str, ...]  # per-expert on-disk leaves in fused order: (gate_proj, up_proj) | (w1, w3) | (down_proj,)
    fused: str  # leaf of the fused form: gate_up_proj | up_proj | down_proj
    num_experts: int
    hidden: int
    intermediate: int

    @property
    def rows(self) -> int:
        """Output rows of one on-disk shard of one expert."""
        return self.hidden if self.kind == "down" else self.intermediate

    @property
    def cols(self) -> int:
        return self.intermediate if self.kind == "down" else self.hidden

    # LinearSlot-compatible views (inspect, bench and the quantize tools count elements through them)
    bias = False
    parallel = "column"
    kv_heads = 0

    @property
    def fused_name(self) -> str:
        return self.name

    @property
    def shard_sizes(self) -> tuple[int, ...]:
        return (self.rows,) * len(self.shards)

    @property
    def in_features(self) -> int:
        return self.cols

    @property
    def out_features(self) -> int:
        return self.rows * len(self.shards)


def expert_slots(prefix: str, num_experts: int, hidden: int, inter: int, gated: bool = True,
                 names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")) -> list[ExpertSlot]:
    gate, up, down = names
    first = (ExpertSlot(f"{prefix}.gate_up_proj", "gate_up", prefix, (gate, up), "gate_up_proj", num_experts, hidden,
                        inter) if gated else
             ExpertSlot(f"{prefix}.up_proj", "up", prefix, (up,), "up_proj", num_experts, hidden, inter))
    return [first, ExpertSlot(f"{prefix}.down_proj", "down", prefix, (down,), "down_proj", num_experts, hidden, inter)]
