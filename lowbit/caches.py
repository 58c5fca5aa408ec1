"""The engine's caches, allocated once for every cache kind the model's layers declare
(lowbit/layers/context.py), so that nothing is reallocated between steps (CUDA-graph safe).

  kv     per attention layer {"k", "v"}: a pool of blocks [num_blocks + 1, block_size, Hkv, D] (FP8
         for a ModelOpt FP8 KV cache: values divided by the checkpoint's per-layer k_scale / v_scale,
         multiplied back on read). A sequence's positions live in the blocks its row of
         `block_tables` [num_slots + 1, max_blocks] (int32, on the device) names; which blocks those
         are is the BlockManager's business (lowbit/blocks.py). Sliding-window layers keep every block
         too (the block table is shared by all layers) and read only their window.
  state  per recurrent layer, each declared tensor: [num_slots + 1, *shape] (conv tail and state).

Row `num_slots` of the states and of the block tables is the pad slot that takes the writes of the
padding rows of a CUDA graph's fixed-size batch; block `num_blocks` is its block.
"""
from __future__ import annotations

import torch

from .layers.context import CacheSpec


class PagedCaches:
    def __init__(self, specs: dict[int, CacheSpec], num_slots: int, max_len: int, num_blocks: int,
                 block_size: int, device):
        self.specs, self.num_slots, self.max_len = specs, num_slots, max_len
        self.num_blocks, self.block_size = num_blocks, block_size
        self.pad_slot, self.pad_block = num_slots, num_blocks
        self.max_blocks = -(-max_len // block_size)
        # every entry points at the pad block until a sequence is given real ones
        self.block_tables = torch.full((num_slots + 1, self.max_blocks), num_blocks, dtype=torch.int32,
                                       device=device)
        self.layers: dict[int, dict[str, torch.Tensor]] = {}
        for idx, spec in specs.items():
            lead = (num_blocks + 1, block_size) if spec.kind == "kv" else (num_slots + 1,)
            # zeros, not poison: masked-out positions still enter the attention matmul (0 * NaN = NaN),
            # and a recurrent state starts from zero
            self.layers[idx] = {name: torch.zeros(lead + tuple(shape), dtype=dtype, device=device)
                                for name, (shape, dtype) in spec.tensors.items()}

    @property
    def has_state(self) -> bool:
        return any(s.kind == "state" for s in self.specs.values())

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
            if spec.kind == "kv":
                per_pos = sum(t[0, 0].numel() * t.element_size() for t in self.layers[idx].values())
                total += per_pos * min(context, spec.window or context)
            else:
                total += sum(t[0].numel() * t.element_size() for t in self.layers[idx].values())
        return total
