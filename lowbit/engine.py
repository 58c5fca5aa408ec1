"""The decode engine: sequence slots over a paged KV cache, prefill (whole or in chunks), and decode
steps captured in CUDA graphs.

Sequences join and leave between steps: `acquire` a slot, `prefill` the prompt into it (the first
token is sampled on the device), then every `decode` call advances any set of slots by one token,
and `release` frees a slot and its KV blocks. A slot indexes the sequence's recurrent states and its
row of the block table; its keys and values live in fixed-size blocks the BlockManager hands out as
the sequence grows (lowbit/blocks.py, lowbit/caches.py), so memory follows the actual lengths.
`extend` runs any chunk of a prompt after the positions already cached (chunked prefill; the
Scheduler in lowbit/generate.py mixes such chunks with decode steps). With prefix caching (models
without recurrent layers), `prefill` first takes the cached blocks of the prompt's longest cached
prefix and computes only the rest; `prefix_cache_stats` counts the hits. A step that needs a block
when none is free raises OutOfBlocks (the Scheduler preempts a sequence before that happens).
The token each slot feeds next and its position live on the device
(`tokens`, `positions`), so a step needs nothing from the host but the list of slots, and results
come back through `Tokens`, which copies them to the host without blocking the GPU.

A decode step runs the batch padded to a size bucket (1, 2, 4, 8, ...); padding rows use the
cache's `pad_slot`. Each bucket's step is captured once in a CUDA graph: the graph reads the slot
list from a static buffer, gathers tokens and positions by slot, and leaves float32 logits in a
static buffer; sampling and the per-slot updates run after it, still without a host sync. The
block table is a static device buffer too: new blocks are written into it before the replay, and
the graph maps each row's position to its pool row. With or without graphs the step runs the same
kernels, so greedy tokens are identical.
"""
from __future__ import annotations

import heapq

import torch

from .blocks import BlockManager, OutOfBlocks
from .caches import PagedCaches
from .errors import LowbitError
from .kernels.decoder import cache_rows
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


def capture_graph(fn, pool, warmup: int = 2):
    """(graph, fn's outputs) of `fn` captured in a CUDA graph, after `warmup` runs on a side stream
    (which compile kernels and create handles outside the capture). A capture that fails raises
    RuntimeError after putting the device's RNG back in order: torch leaves the default CUDA
    generator marked as capturing, and every later random draw on that device would fail ("Offset
    increment outside graph capture encountered unexpectedly")."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(g, pool=pool):
            out = fn()
    except Exception as e:
        _reset_cuda_rng()
        raise RuntimeError(str(e)) from e
    return g, out


def _reset_cuda_rng() -> None:
    """Give the current device's default generator a fresh state (same seed and offset) that is not
    marked as capturing; a no-op where torch lacks graphsafe_set_state."""
    try:
        torch.cuda.synchronize()
    except Exception:  # noqa: BLE001 - the capture's error may resurface here; the state is what matters
        pass
    gen = torch.cuda.default_generators[torch.cuda.current_device()]
    if not hasattr(gen, "graphsafe_set_state"):
        return
    fresh = torch.Generator(device=gen.device)
    fresh.set_state(gen.get_state())
    gen.graphsafe_set_state(fresh)


class Engine:
    """num_slots sequences at most, each up to max_len positions; the KV pool holds num_blocks blocks
    of block_size positions (default: enough for every slot at max_len). prefix_caching: None = on
    for models without recurrent layers (a recurrent state cannot be shared at a block boundary)."""

    def __init__(self, model, num_slots: int, max_len: int, cuda_graphs: bool | None = None,
                 block_size: int = 16, num_blocks: int | None = None, prefix_caching: bool | None = None):
        self.model, self.net = model, model.net
        self.num_slots, self.max_len, self.device = num_slots, max_len, model.device
        cfg = model.config
        if max_len > cfg.max_position_embeddings:
            raise LowbitError(f"a cache of {max_len} positions exceeds the model's max_position_embeddings "
                              f"({cfg.max_position_embeddings}); use shorter prompts or fewer new tokens")
        if num_blocks is None:
            num_blocks = num_slots * -(-max_len // block_size)
        # every stateful layer's cache (KV blocks, recurrent state slots), as the model declares it
        self.cache = PagedCaches(self.net.cache_specs(model.dtype), num_slots, max_len, num_blocks, block_size,
                                 self.device)
        self.block_size = block_size
        # a prompt may be computed in pieces (chunks, or after a cached prefix) unless its rotary
        # frequencies depend on the whole length (dynamic scaling): then each prompt runs whole
        self.chunkable = self.net.graph_safe
        if prefix_caching is None:
            prefix_caching = not self.cache.has_state and self.chunkable
        elif prefix_caching and (self.cache.has_state or not self.chunkable):
            raise LowbitError("prefix caching needs a model without recurrent layers (a recurrent state is "
                              "not kept at block boundaries, so a cached prefix could not be resumed) and "
                              "with length-independent rotary frequencies")
        self.blocks = BlockManager(num_blocks, block_size, prefix_caching)
        self.cache_options: dict = {}  # what Model.engine built it with
        self._prompt: dict[int, list[int]] = {}  # slot -> prompt tokens fed so far (for prefix hashes)
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
        self.blocks.free(slot)
        self._prompt.pop(slot, None)

    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def free_blocks(self) -> int:
        return self.blocks.free_blocks

    def blocks_needed(self, slot: int, tokens: int) -> int:
        """More KV blocks `slot` needs to hold `tokens` positions."""
        return self.blocks.needed(slot, tokens)

    def prefix_cache_stats(self) -> dict:
        """Prefix-cache counters: queries (prompts looked up), query_blocks / hit_blocks (full blocks
        looked up / found), hit_tokens, evictions; plus enabled, block_size, blocks in use and free."""
        return dict(self.blocks.stats, enabled=self.blocks.prefix_caching, block_size=self.block_size,
                    num_blocks=self.blocks.num_blocks, free_blocks=self.blocks.free_blocks)

    def _grow(self, slots: list[int], lengths: list[int]) -> None:
        """Give each slot the blocks for its length and write them into the device block table."""
        if any(self.blocks.needed(s, n) for s, n in zip(slots, lengths)):
            need = sum(self.blocks.needed(s, n) for s, n in zip(slots, lengths))
            if need > self.blocks.free_blocks:
                raise OutOfBlocks(f"this step needs {need} more KV-cache blocks and {self.blocks.free_blocks} "
                                  f"are free; release a sequence first (the Scheduler preempts one)")
            rows, cols, vals = [], [], []
            for s, n in zip(slots, lengths):
                for i, b in self.blocks.grow(s, n):
                    rows.append(s)
                    cols.append(i)
                    vals.append(b)
            self._set_table(rows, cols, vals)

    def _set_table(self, rows, cols, vals) -> None:
        if rows:
            r, c = self._to_device(rows), self._to_device(cols)
            self.cache.block_tables[r, c] = self._host(vals).to(self.device, torch.int32, non_blocking=True)

    # ------------------------------------------------------------------ steps
    def begin(self, slot: int, ids: list[int], cached: bool = True) -> int:
        """Start the prompt `ids` in the empty `slot`: take the cached blocks of its longest cached
        prefix (prefix caching) and return how many leading tokens need no computing. cached=False:
        compute every token (a prompt whose logprobs are wanted needs the hidden state of each)."""
        if self.lengths[slot] or self._prompt.get(slot):
            raise LowbitError(f"slot {slot} already holds a sequence; release it first")
        if len(ids) + 1 > self.max_len:
            raise LowbitError(f"a prompt of {len(ids)} tokens does not fit a KV cache of {self.max_len} positions")
        hit = self.blocks.match(slot, ids) if cached else 0
        if hit:
            table = self.blocks.tables[slot]
            self._set_table([slot] * len(table), list(range(len(table))), table)
        self._prompt[slot] = list(ids[:hit])
        self.lengths[slot] = hit
        return hit

    def reserve(self, slot: int, tokens: int) -> None:
        """Give `slot` the KV blocks for `tokens` positions now (OutOfBlocks if there are not enough)."""
        self._grow([slot], [tokens])

    @torch.inference_mode()
    def prefill(self, slot: int, ids: list[int], params: SamplingParams, generator=None) -> Tokens:
        """Run a whole prompt into the empty `slot` (after its cached prefix, if any) and sample its
        first new token."""
        start = self.begin(slot, ids)
        return self.extend(slot, ids[start:], params, generator)

    @torch.inference_mode()
    def extend(self, slot: int, ids: list[int], params: SamplingParams | None = None, generator=None,
               sample_next: bool = True, on_hidden=None) -> Tokens | None:
        """Run the tokens `ids` into `slot` after the positions it already holds (a prompt chunk) and,
        if sample_next (the prompt's last chunk), sample the next token from the last one's logits.
        on_hidden: called with the chunk's hidden states [1, T, hidden] (prompt logprobs are made so)."""
        hidden = self._run_chunk(slot, ids, reserve=1 if sample_next else 0)
        if on_hidden is not None:
            on_hidden(hidden)
        if not sample_next:
            return None
        tok = sample(self.net.compute_logits(hidden[:, -1]).float(), params or SamplingParams(), generator)
        self.tokens[slot:slot + 1].copy_(tok)
        self.positions[slot:slot + 1].fill_(self.lengths[slot])
        self._prompt.pop(slot, None)  # decode tokens stay on the device: no more hashing
        return Tokens(tok)

    def _run_chunk(self, slot: int, ids: list[int], reserve: int = 0) -> torch.Tensor:
        """The forward of one chunk after the slot's cached positions -> hidden states [1, T, hidden]."""
        start, t = self.lengths[slot], len(ids)
        if not t:
            raise LowbitError("extend: no tokens given")
        if start + t + reserve > self.max_len:
            raise LowbitError(f"a prompt of {start + t} tokens does not fit a KV cache of {self.max_len} positions")
        self._grow([slot], [start + t])
        x = self._to_device([ids])
        pos = torch.arange(start, start + t, device=self.device)[None]
        ctx = self._context(self._to_device([slot]), pos, decode=False, fresh=start == 0)
        ctx.key_len = start + t  # (known here: attention need not read it back from the device)
        hidden = self.net(x, pos, ctx)
        self.lengths[slot] = start + t
        if slot in self._prompt:
            self._prompt[slot] += list(ids)
            self.blocks.register(slot, self._prompt[slot])
        return hidden

    @torch.inference_mode()
    def decode(self, slots: list[int], params: SamplingParams | list[SamplingParams], generator=None) -> Tokens:
        """Advance each slot by one token (the one it was last given) and sample the next (per-slot
        params and generators as lists: see sampling.sample)."""
        n = len(slots)
        for s in slots:
            if self.lengths[s] + 1 > self.max_len:
                raise LowbitError(f"slot {s} reached the KV-cache length {self.max_len}")
        self._grow(slots, [self.lengths[s] + 1 for s in slots])
        for s in slots:
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

    def _context(self, slots: torch.Tensor, positions: torch.Tensor, decode: bool,
                 fresh: bool = True) -> ForwardContext:
        tables = self.cache.block_tables
        return ForwardContext(slots, positions, decode, self.cache.layers, fresh=fresh, block_tables=tables,
                              rows=cache_rows(tables, slots, positions, self.block_size))

    def _graph(self, bucket: int):
        """The CUDA graph of one bucket, captured on first use (None if capture is impossible)."""
        if bucket in self._graphs:
            return self._graphs[bucket]
        slot_ids = torch.full((bucket,), self.cache.pad_slot, dtype=torch.long, device=self.device)
        try:
            g, logits = capture_graph(lambda: self._decode_logits(slot_ids), self._pool)
        except RuntimeError as e:
            self.cuda_graphs = False
            self.notes.append(f"CUDA graphs off: capturing a batch of {bucket} failed ({str(e).splitlines()[0]})")
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
