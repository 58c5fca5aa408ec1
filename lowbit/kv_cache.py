"""Static, slot-based KV cache: one row ("slot") per running sequence, allocated once.

Sequences join and leave a running batch by taking and releasing slots; nothing is reallocated
between steps, which is what lets decode steps be captured in CUDA graphs. One extra slot,
`pad_slot`, takes the writes of the padding rows of a graph's fixed-size batch. With an FP8 cache
(ModelOpt `kv_cache_quant_algo: FP8`) keys and values are stored as float8_e4m3fn divided by the
checkpoint's per-layer k_scale / v_scale and multiplied back on read.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .quant.numerics import fake_quant_fp8_activation


def fake_quant_kv(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """What an FP8 cache does to keys/values (used where attention reads fresh k/v, not the cache)."""
    return fake_quant_fp8_activation(x, scale)


class KVCache:
    def __init__(self, num_layers: int, num_slots: int, max_len: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device, fp8: bool = False):
        self.num_slots, self.max_len, self.dtype, self.fp8 = num_slots, max_len, dtype, fp8
        self.pad_slot = num_slots
        store = torch.float8_e4m3fn if fp8 else dtype
        shape = (num_slots + 1, max_len, kv_heads, head_dim)
        # zeros, not poison: masked-out positions still enter the attention matmul (0 * NaN = NaN)
        self.k = [torch.zeros(shape, dtype=store, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=store, device=device) for _ in range(num_layers)]


@dataclass
class CacheBatch:
    """How one forward pass uses the cache: rows b of the batch live in slots[b].

    decode=False: a prefill of fresh sequences (positions start at 0; attention over the new tokens).
    decode=True: one new token per row; row b attends to keys [0, positions[b]] of its slot.
    """

    cache: KVCache
    slots: torch.Tensor  # [B] int64
    decode: bool = False
