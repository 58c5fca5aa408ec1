"""Static, slot-based caches: one row ("slot") per running sequence, allocated once, for every
cache kind the model's layers declare (lowbit/layers/context.py).

Sequences join and leave a running batch by taking and releasing slots; nothing is reallocated
between steps, which is what lets decode steps be captured in CUDA graphs. One extra slot,
`pad_slot`, takes the writes of the padding rows of a graph's fixed-size batch.
  kv     per layer {"k", "v"}: [slots + 1, max_len, Hkv, D] (FP8 for a ModelOpt FP8 KV cache: values
         divided by the checkpoint's per-layer k_scale / v_scale, multiplied back on read);
  state  per layer, each declared tensor: [slots + 1, *shape] (a recurrent layer's conv tail and state).
"""
from __future__ import annotations

import torch

from .layers.context import CacheSpec


class SlotCaches:
    def __init__(self, specs: dict[int, CacheSpec], num_slots: int, max_len: int, device):
        self.num_slots, self.max_len, self.specs = num_slots, max_len, specs
        self.pad_slot = num_slots
        self.layers: dict[int, dict[str, torch.Tensor]] = {}
        for idx, spec in specs.items():
            extra = (max_len,) if spec.kind == "kv" else ()
            # zeros, not poison: masked-out positions still enter the attention matmul (0 * NaN = NaN),
            # and a recurrent state starts from zero
            self.layers[idx] = {name: torch.zeros((num_slots + 1,) + extra + tuple(shape), dtype=dtype, device=device)
                                for name, (shape, dtype) in spec.tensors.items()}

    @property
    def fp8(self) -> bool:
        return any(t.dtype == torch.float8_e4m3fn for c in self.layers.values() for t in c.values())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for c in self.layers.values() for t in c.values())

    def read_bytes(self, context: float) -> float:
        """Bytes one decode step of one sequence reads from the caches at a context of `context`
        positions (a sliding-window layer reads at most its window; a recurrent layer its whole state)."""
        total = 0.0
        for idx, spec in self.specs.items():
            per_slot = sum(t[0].numel() * t.element_size() for t in self.layers[idx].values())
            if spec.kind == "kv":
                per_pos = per_slot / self.max_len
                total += per_pos * min(context, spec.window or context)
            else:
                total += per_slot
        return total
