"""Static, slot-based KV cache: one row ("slot") per running sequence, allocated once.

Sequences join and leave a running batch by taking and releasing slots; nothing is reallocated
between steps, which is what lets decode steps be captured in CUDA graphs. With an FP8 cache
(ModelOpt `kv_cache_quant_algo: FP8`) keys and values are stored as float8_e4m3fn divided by the
checkpoint's per-layer k_scale / v_scale and multiplied back on read.
"""
from __future__ import annotations

import torch

from .quant.numerics import FP8_MAX


def fake_quant_kv(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """What an FP8 cache does to keys/values, without storing them (used by the cache-less forward)."""
    return ((x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * scale).to(x.dtype)


class KVCache:
    def __init__(self, num_layers: int, num_slots: int, max_len: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device, fp8: bool = False):
        self.num_slots, self.max_len, self.dtype, self.fp8 = num_slots, max_len, dtype, fp8
        store = torch.float8_e4m3fn if fp8 else dtype
        shape = (num_slots, max_len, kv_heads, head_dim)
        # zeros, not poison: masked-out positions still enter the attention matmul (0 * NaN = NaN)
        self.k = [torch.zeros(shape, dtype=store, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=store, device=device) for _ in range(num_layers)]

    def write(self, layer: int, slots: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> None:
        """slots [B], positions [B, T], k/v [B, T, Hkv, D]."""
        if self.fp8:
            k = (k.float() / k_scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
            v = (v.float() / v_scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        rows = slots[:, None].expand_as(positions)
        self.k[layer][rows, positions] = k
        self.v[layer][rows, positions] = v

    def read(self, layer: int, slots: torch.Tensor, length: int,
             k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None):
        """Keys/values of `slots` for positions [0, length) -> [B, length, Hkv, D] in the compute dtype."""
        k = self.k[layer][slots, :length]
        v = self.v[layer][slots, :length]
        if self.fp8:
            k = (k.float() * k_scale).to(self.dtype)
            v = (v.float() * v_scale).to(self.dtype)
        return k, v

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
