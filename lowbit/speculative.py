"""Speculative decoding with a model's MTP head (`--speculative mtp`, Qwen3.5 / Qwen3.6): greedy only.

The MTP head (lowbit/models/qwen3_5.py) at position i takes the main model's output hidden state h_i
and the token t_{i+1} that follows i, and predicts t_{i+2}. Per sequence (`MTPSpeculator`):

  prefill   the main model runs the prompt t_0..t_{n-1} (its hidden states h_0..h_{n-1}), the first
            token t_n = argmax lm_head(h_{n-1}); the head runs positions 0..n-1 on (h_i, t_{i+1}),
            filling its own KV cache, and its output at n-1 gives the draft d_1 of t_{n+1}; with
            k > 1 drafts, the head continues on its own output: (h'_{n-1}, d_1) at position n gives
            d_2, and so on (its layer j % num_mtp_layers drafts token j).
  step      ONE forward of the main model verifies [t_n, d_1..d_k] at positions n..n+k (a `verify`
            ForwardContext: every token computed as a decode step computes it). Its greedy tokens
            g_0..g_k: the drafts agree for the longest prefix a (d_{j+1} == g_j for j < a); the
            sequence gains g_0..g_a (the accepted drafts plus the bonus token g_a), so greedy output
            is plain decoding's. The head then runs positions n..n+k on (h_{n+j}, g_j) (entries past
            n+a are dropped with the rollback), its output at n+a drafts the next k tokens.
  rollback  paged KV (main model and head): only the length, n + a + 1; the entries past it are
            overwritten by the next step. Recurrent layers (Gated DeltaNet's conv tail and state): the
            verify forward runs its k+1 tokens through the decode kernels one step at a time from the
            slot's state and keeps the state after EVERY token (ctx.steps, [k+1, B, ...]); the one
            after token a is written back into the slot. Chosen over snapshot-and-recompute because a
            rejection (most steps but the agreeing ones) would then cost a second main-model forward
            (every weight read again) to recompute the accepted tokens, while the per-token states cost
            k+1 copies of a layer's state; and each token's state is computed by the same kernel as in
            plain decoding, so the numerics match it step for step.

Sampling (temperature > 0) is refused: it needs rejection sampling against the draft distribution,
which is not implemented. A step is pure device work over a slot list (captured in a CUDA graph per
batch-size bucket on CUDA: see MTPSpeculator; eager, with a note, where capture fails); `stats`
counts drafted and accepted tokens (the acceptance rate).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .engine import capture_graph
from .errors import LowbitError


@dataclass(frozen=True)
class Speculation:
    """What `lowbit.load(..., speculative=, num_speculative_tokens=)` asked for."""

    method: str = "mtp"
    num_tokens: int = 1

    def __post_init__(self):
        if self.method != "mtp":
            raise LowbitError(f"unknown speculative method {self.method!r}; the one supported is 'mtp'")
        if not isinstance(self.num_tokens, int) or self.num_tokens < 1:
            raise LowbitError(f"--num-speculative-tokens must be a positive integer, got {self.num_tokens!r}")


def room(num_tokens: int) -> int:
    """Positions a step with `num_tokens` drafts may write past a sequence's length (verify k + 1,
    then the head's k drafts): what the engine's max_len must leave free."""
    return 2 * num_tokens + 1


def check_greedy(params) -> None:
    if params.temperature != 0:
        raise LowbitError(f"--speculative mtp decodes greedily only (temperature 0, got {params.temperature}): "
                          f"sampling would need rejection sampling against the drafts, which is not implemented; "
                          f"drop --temperature or --speculative")


class MTPSpeculator:
    """Drafts with the MTP head and verifies on an Engine (lowbit/engine.py) whose model has one.

    Per slot, on the device: `pending` [num_slots + 1, k + 1] (the token the next step feeds, then its
    k drafts) and `length` (positions in the caches), so a step needs only the slot list from the host:
    `_device_step` is pure device work, and on CUDA each batch-size bucket of it is captured once in a
    CUDA graph (as the engine's decode steps are; eager if capture fails, with a note). The host reads
    the greedy tokens and accept counts back once per step."""

    def __init__(self, engine, num_tokens: int, cuda_graphs: bool | None = None):
        self.engine, self.net, self.k = engine, engine.net, num_tokens
        if getattr(self.net, "mtp", None) is None:
            raise LowbitError("--speculative mtp: this model was loaded without its MTP head; load it with "
                              "speculative='mtp' (lowbit.load / --speculative mtp)")
        n, dev = engine.num_slots + 1, engine.device
        self.pending = torch.zeros(n, num_tokens + 1, dtype=torch.long, device=dev)
        self.length = torch.zeros(n, dtype=torch.long, device=dev)
        self.cuda_graphs = cuda_graphs is not False and engine.cuda_graphs and dev.type == "cuda"
        self._graphs: dict[int, tuple] = {}
        self._pool = None
        self.stats = {"steps": 0, "drafted": 0, "accepted": 0}

    @property
    def acceptance_rate(self) -> float:
        return self.stats["accepted"] / max(1, self.stats["drafted"])

    def room(self) -> int:
        return room(self.k)

    # ------------------------------------------------------------------ steps
    @torch.inference_mode()
    def prefill(self, slot: int, ids: list[int]) -> int:
        """Run the prompt into the empty `slot`, draft; returns the first token."""
        e = self.engine
        if e.begin(slot, ids):
            raise LowbitError("speculative decoding does not resume cached prefixes")  # (recurrent models have none)
        hidden = e._run_chunk(slot, ids, reserve=1)  # [1, n, H]
        e._prompt.pop(slot, None)
        first = self._greedy(hidden[:, -1])  # [1]
        n = len(ids)
        e._grow([slot], [n + self.room()])
        sid = e._to_device([slot])
        pos = torch.arange(n, device=e.device)[None]
        nxt = torch.cat([e._to_device(ids[1:]), first])[None]
        mh = self.net.mtp_forward(nxt, hidden, pos, e._context(sid, pos, decode=False, fresh=True))
        self.length[slot] = n
        self._draft(sid, first, mh[:, -1], self.length[sid])
        return int(first)

    @torch.inference_mode()
    def step(self, slots: list[int]) -> list[list[int]]:
        """One verify forward for every slot; returns each slot's new tokens (1 to k + 1)."""
        e, k, b = self.engine, self.k, len(slots)
        for s in slots:
            if e.lengths[s] + self.room() > e.max_len:
                raise LowbitError(f"slot {s} reached the KV-cache length {e.max_len} (speculation needs "
                                  f"{self.room()} positions of room)")
        e._grow(slots, [e.lengths[s] + self.room() for s in slots])  # verify and drafts, before any capture
        bucket = next((n for n in e.buckets if n >= b), b)
        ids = list(slots) + [e.cache.pad_slot] * (bucket - b)
        graph = self._graph(bucket) if self.cuda_graphs else None
        if graph is not None:
            g, sid, target, accepted = graph
            sid.copy_(e._host(ids), non_blocking=True)
            g.replay()
        else:
            target, accepted = self._device_step(e._to_device(ids))
        acc, tgt = accepted[:b].tolist(), target[:b].tolist()
        for s, a in zip(slots, acc):
            e.lengths[s] += a + 1
        self.stats["steps"] += 1
        self.stats["drafted"] += b * k
        self.stats["accepted"] += sum(acc)
        return [t[:a + 1] for t, a in zip(tgt, acc)]

    def _device_step(self, sid: torch.Tensor):
        """Verify, accept, roll back, catch the head up and draft, for the slots `sid` [B] (pad rows
        allowed) -> (greedy tokens [B, k + 1], accepted drafts [B]). No host syncs."""
        e, k = self.engine, self.k
        start = self.length[sid]
        ids = self.pending[sid]  # [B, k + 1]
        pos = start[:, None] + torch.arange(k + 1, device=sid.device)
        ctx = e._context(sid, pos, decode=False, fresh=False)
        ctx.verify = True
        hidden = self.net(ids, pos, ctx)
        target = self._greedy(hidden)  # [B, k + 1]
        accepted = (target[:, :-1] == ids[:, 1:]).long().cumprod(dim=1).sum(dim=1)  # [B]
        rows = torch.arange(sid.shape[0], device=sid.device)
        for idx, states in ctx.steps.items():  # rollback: the state after the last kept token
            for name, t in states.items():
                e.cache.layers[idx][name][sid] = t[accepted, rows]
        mctx = e._context(sid, pos, decode=False, fresh=False)
        mctx.verify = True
        mh = self.net.mtp_forward(target, hidden, pos, mctx)
        self.length[sid] = start + accepted + 1
        self.length[-1:].zero_()  # the pad slot stays at position 0 (a device op: `= 0` copies from the host)
        self._draft(sid, target[rows, accepted], mh[rows, accepted], start + accepted + 1)
        return target, accepted

    def _draft(self, sid, nxt: torch.Tensor, head: torch.Tensor, length: torch.Tensor) -> None:
        """pending[sid] = [nxt, d_1..d_k]: d_1 from the head's output `head` [B, H] at each slot's last
        position (length - 1), then d_j from the head run on (its previous output, d_{j-1}) at the next."""
        drafts = [self._greedy(head)]
        pos = length[:, None]
        for j in range(1, self.k):
            ctx = self.engine._context(sid, pos, decode=True)
            head = self.net.mtp_forward(drafts[-1][:, None], head[:, None], pos, ctx, step=j)[:, 0]
            drafts.append(self._greedy(head))
            pos = pos + 1
        self.pending[sid] = torch.stack([nxt] + drafts, dim=1)

    def _graph(self, bucket: int):
        """The CUDA graph of one bucket's `_device_step`, captured on first use (None if impossible)."""
        if bucket in self._graphs:
            return self._graphs[bucket]
        e = self.engine
        sid = torch.full((bucket,), e.cache.pad_slot, dtype=torch.long, device=e.device)
        try:
            self._pool = self._pool or torch.cuda.graph_pool_handle()
            g, (target, accepted) = capture_graph(lambda: self._device_step(sid), self._pool)
        except RuntimeError as err:  # (warm-up on the pad slot only)
            self.cuda_graphs = False
            e.notes.append(f"speculative steps without CUDA graphs: capturing a batch of {bucket} failed "
                           f"({str(err).splitlines()[0]})")
            return None
        self._graphs[bucket] = (g, sid, target, accepted)
        return self._graphs[bucket]

    def _greedy(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.net.compute_logits(hidden).float().argmax(dim=-1)


def run(model, seqs, params, max_new_tokens: int, stats: dict | None = None):
    """Generate for `seqs` (lowbit.generate.Sequence) with MTP drafting, yielding StreamEvents:
    every prompt is prefilled, then all running sequences verify together each step. `stats`, if
    given, receives the speculator's counters and acceptance rate."""
    check_greedy(params)
    spec = model.speculative
    longest = max(len(s.prompt) for s in seqs)
    engine = model.engine(len(seqs), longest + max(max_new_tokens, 1) + room(spec.num_tokens))
    sp = getattr(engine, "speculator", None)  # kept with the engine: its graphs are captured once
    if sp is None or sp.k != spec.num_tokens:
        sp = engine.speculator = MTPSpeculator(engine, spec.num_tokens)
    sp.stats = {"steps": 0, "drafted": 0, "accepted": 0}
    live = []
    try:
        for s in seqs:
            if max_new_tokens <= 0:
                s.finish = "length"
                continue
            s.slot = engine.acquire()
            live.append(s)
            yield s.emit(sp.prefill(s.slot, s.prompt))
            live = _drop_finished(live, engine)
        while live:
            for s, toks in zip(live, sp.step([s.slot for s in live])):
                for t in toks:
                    if s.finish is not None:
                        break
                    yield s.emit(t)
            live = _drop_finished(live, engine)
    finally:
        for s in live:
            engine.release(s.slot)
        if stats is not None:
            stats.update(sp.stats, acceptance_rate=sp.acceptance_rate)


def _drop_finished(live, engine):
    for s in [s for s in live if s.finish is not None]:
        engine.release(s.slot)
        s.slot = -1
    return [s for s in live if s.finish is None]
