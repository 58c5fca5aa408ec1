"""The decode engine: cache slots, prefill, and decode steps captured in CUDA graphs.

Sequences join and leave between steps: `acquire` a slot, `prefill` the prompt into it (the first
token is sampled on the device), then every `decode` call advances any set of slots by one token,
and `release` frees a slot. The token each slot feeds next and its position live on the device
(`tokens`, `positions`), so a step needs nothing from the host but the list of slots, and results
come back through `Tokens`, which copies them to the host without blocking the GPU.

A decode step runs the batch padded to a size bucket (1, 2, 4, 8, ...); padding rows use the
cache's `pad_slot`. Each bucket's step is captured once in a CUDA graph: the graph reads the slot
list from a static buffer, gathers tokens and positions by slot, and leaves float32 logits in a
static buffer; sampling and the per-slot updates run after it, still without a host sync. With
or without graphs the step runs the same kernels, so greedy tokens are identical.
"""
from __future__ import annotations

import heapq

import torch

from .caches import SlotCaches
from .errors import LowbitError
from .layers.context import ForwardContext
from .sampling import SamplingParams, sample


def buckets_for(num_slots: int) -> list[int]:
    sizes, b = [], 1
    while b < num_slots:
        sizes.append(b)
        b *= 2
    return sizes + [num_slots]


class Tokens:
    """Sampled token ids on their way to the host; `get` waits for them (and only for them)."""

    def __init__(self, tok: torch.Tensor):
        self.event = None
        if tok.is_cuda:
            self.host = torch.empty(tok.shape, dtype=tok.dtype, pin_memory=True)
            self.host.copy_(tok, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = tok

    def get(self) -> list[int]:
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()


class Engine:
    def __init__(self, model, num_slots: int, max_len: int, cuda_graphs: bool | None = None):
        self.model, self.net = model, model.net
        self.num_slots, self.max_len, self.device = num_slots, max_len, model.device
        cfg = model.config
        if max_len > cfg.max_position_embeddings:
            raise LowbitError(f"a cache of {max_len} positions exceeds the model's max_position_embeddings "
                              f"({cfg.max_position_embeddings}); use shorter prompts or fewer new tokens")
        # every stateful layer's cache (KV, sliding-window KV, recurrent state), as the model declares it
        self.cache = SlotCaches(self.net.cache_specs(model.dtype), num_slots, max_len, self.device)
        self._free = list(range(num_slots))
        self.lengths = [0] * (num_slots + 1)  # host copy of each slot's length, for bounds checks
        # per slot: the token the next decode step feeds, and its position (the pad slot stays at 0)
        self.tokens = torch.zeros(num_slots + 1, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(num_slots + 1, dtype=torch.long, device=self.device)
        self.notes: list[str] = []
        graphs_ok = self.device.type == "cuda" and cuda_graphs is not False
        if graphs_ok and not self.net.graph_safe:
            graphs_ok = False
            self.notes.append("CUDA graphs off: the rotary frequencies depend on the length")
        self.cuda_graphs = graphs_ok
        self.buckets = buckets_for(num_slots)
        self._graphs: dict[int, tuple] = {}
        self._graph_slots: dict[int, list[int]] = {}  # what each graph's slot buffer holds
        self._pool = torch.cuda.graph_pool_handle() if graphs_ok else None

    # ------------------------------------------------------------------ slots
    def acquire(self) -> int:
        if not self._free:
            raise LowbitError(f"all {self.num_slots} KV-cache slots are in use; release one or build a larger engine")
        return heapq.heappop(self._free)

    def release(self, slot: int) -> None:
        heapq.heappush(self._free, slot)
        self.lengths[slot] = 0

    @property
    def free_slots(self) -> int:
        return len(self._free)

    # ------------------------------------------------------------------ steps
    @torch.inference_mode()
    def prefill(self, slot: int, ids: list[int], params: SamplingParams, generator=None) -> Tokens:
        """Run a whole prompt into `slot` (from position 0) and sample its first new token."""
        t = len(ids)
        if t + 1 > self.max_len:
            raise LowbitError(f"a prompt of {t} tokens does not fit a KV cache of {self.max_len} positions")
        x = self._to_device([ids])
        pos = torch.arange(t, device=self.device)[None]
        hidden = self.net(x, pos, self._context(self._to_device([slot]), pos, decode=False))
        tok = sample(self.net.compute_logits(hidden[:, -1]).float(), params, generator)
        self.tokens[slot:slot + 1].copy_(tok)
        self.positions[slot:slot + 1].fill_(t)
        self.lengths[slot] = t
        return Tokens(tok)

    @torch.inference_mode()
    def decode(self, slots: list[int], params: SamplingParams | list[SamplingParams], generator=None) -> Tokens:
        """Advance each slot by one token (the one it was last given) and sample the next (per-slot
        params and generators as lists: see sampling.sample)."""
        n = len(slots)
        for s in slots:
            if self.lengths[s] + 1 > self.max_len:
                raise LowbitError(f"slot {s} reached the KV-cache length {self.max_len}")
            self.lengths[s] += 1
        bucket = next((b for b in self.buckets if b >= n), n)
        ids = list(slots) + [self.cache.pad_slot] * (bucket - n)
        graph = self._graph(bucket) if self.cuda_graphs else None
        if graph is not None:
            g, slot_ids, logits = graph
            if self._graph_slots.get(bucket) != ids:  # the batch changed: refill the static slot list
                slot_ids.copy_(self._host(ids), non_blocking=True)
                self._graph_slots[bucket] = ids
            g.replay()
        else:
            slot_ids = self._to_device(ids)
            logits = self._decode_logits(slot_ids)
        tok = sample(logits[:n], params, generator)
        live = slot_ids[:n]
        self.tokens[live] = tok
        self.positions[live] += 1
        return Tokens(tok)

    def _decode_logits(self, slot_ids: torch.Tensor) -> torch.Tensor:
        """The captured part of a decode step: slot list -> float32 logits [B, V]."""
        x = self.tokens[slot_ids][:, None]
        pos = self.positions[slot_ids][:, None]
        hidden = self.net(x, pos, self._context(slot_ids, pos, decode=True))
        return self.net.compute_logits(hidden[:, 0]).float()

    def _context(self, slots: torch.Tensor, positions: torch.Tensor, decode: bool) -> ForwardContext:
        return ForwardContext(slots, positions, decode, self.cache.layers)

    def _graph(self, bucket: int):
        """The CUDA graph of one bucket, captured on first use (None if capture is impossible)."""
        if bucket in self._graphs:
            return self._graphs[bucket]
        slot_ids = torch.full((bucket,), self.cache.pad_slot, dtype=torch.long, device=self.device)
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up outside the capture: compiles kernels, creates handles
                for _ in range(2):
                    self._decode_logits(slot_ids)
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self._pool):
                logits = self._decode_logits(slot_ids)
        except RuntimeError as e:
            self.cuda_graphs = False
            self.notes.append(f"CUDA graphs off: capturing a batch of {bucket} failed ({str(e).splitlines()[0]})")
            torch.cuda.synchronize()
            return None
        self._graphs[bucket] = (g, slot_ids, logits)
        return self._graphs[bucket]

    def capture(self, sizes: list[int]) -> None:
        """Capture the graphs of the buckets these batch sizes fall in (else done on first use)."""
        if self.cuda_graphs:
            with torch.inference_mode():
                for n in sorted(sizes, reverse=True):
                    self._graph(next((b for b in self.buckets if b >= n), n))

    # ------------------------------------------------------------------ helpers
    def _host(self, values: list[int]) -> torch.Tensor:
        t = torch.tensor(values, dtype=torch.long)
        return t.pin_memory() if self.device.type == "cuda" else t

    def _to_device(self, values) -> torch.Tensor:
        return self._host(values).to(self.device, non_blocking=True)
