"""How one forward pass uses the caches: the only thing the engine hands the layers.

The engine builds one `ForwardContext` per step; each layer that keeps state between steps asks it
for its own cache by layer index. `ctx is None` means a cache-less causal forward from position 0
(`Model.logits`, the reference path).

Cache kinds (what a layer declares through `cache_spec`, what the engine allocates per slot):
  kv      : {"k": [Hkv, D], "v": [Hkv, D]} per position, in the compute dtype (float8_e4m3fn for an
            FP8 cache); the engine keeps them in a pool of blocks [num_blocks + 1, block_size, Hkv, D]
            that sequences reach through their block tables (lowbit/caches.py)
  state   : named per-slot tensors of a recurrent layer, e.g. {"conv": [C, K-1], "ssm": [H, dk, dv]}

Every per-slot tensor is allocated as [num_slots + 1, *shape]: row `num_slots` is the pad slot that
takes the writes of a CUDA graph's padding rows.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class CacheSpec:
    """What one layer keeps per sequence slot: name -> (shape per slot, dtype)."""

    kind: str  # "kv" | "state"
    tensors: dict[str, tuple[tuple[int, ...], torch.dtype]]
    window: int | None = None  # kv only: sliding-window attention (keys older than this are not read)


@dataclass
class ForwardContext:
    """One step of the engine.

    slots     [B] int64: row b of the batch lives in cache slot slots[b].
    positions [B, T] int64: absolute position of every token.
    decode    False: a prefill (T tokens per row, leaving the row's cache/final state in its slot);
              True: one new token per row (T == 1), reading and updating the slot's cache/state.
    fresh     prefill only. True: every row starts at position 0 from an empty cache/zero state;
              False: rows continue their sequence (a later chunk of a prompt, or after a cached
              prefix): attention reads the cached keys before the chunk, recurrent layers start
              from the slot's state.
    caches    layer index -> {name: tensor} as declared by the layer's CacheSpec: KV block pools
              [num_blocks + 1, block_size, *shape], states [num_slots + 1, *shape].
    block_tables [num_slots + 1, max_blocks] int32: the KV blocks of each slot's sequence.
    rows      [B, T] int64: the flat pool row of every token's key/value (`decoder.cache_rows`).
    verify    speculative verification (lowbit/speculative.py; `decode` False): T tokens per row continue
              the sequence, each computed as a decode step would compute it (attention through the paged
              decode kernel, one query per token; recurrent layers one step at a time). Recurrent layers
              leave their slot's state untouched and put the state after every token in
              steps[layer_idx] = {name: [T, B, *shape]}; the caller keeps the accepted one.
    key_len   a prefill with fresh False: how many key positions its rows read (max position + 1), as the
              engine knows it on the host; None: attention reads it from `positions` (a host sync per layer).
    """

    slots: torch.Tensor
    positions: torch.Tensor
    decode: bool
    caches: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    fresh: bool = True
    block_tables: torch.Tensor | None = None
    rows: torch.Tensor | None = None
    verify: bool = False
    steps: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    key_len: int | None = None
    shared: dict = field(default_factory=dict)  # what every layer of the step computes alike, made once

    def cache(self, layer_idx: int) -> dict[str, torch.Tensor]:
        return self.caches[layer_idx]
