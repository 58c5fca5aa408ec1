"""`lowbit serve --tp N`: one server over N tensor-parallel ranks (lowbit/parallel.py).

Rank 0 runs the HTTP server, the worker thread and its Scheduler, on a `Leader`: rank 0's engine,
whose every call that changes it is sent to the other ranks as well, as a pickled list of calls
broadcast over a gloo group of its own (the control group). Bookkeeping calls (acquire, begin,
reserve, release) are queued and go with the next step; a step (extend, decode, capture) goes at
once. The other ranks (`follow`) apply the calls to an engine of their own in the same order, so
their slots, block tables and caches are rank 0's, and run the same forward in lockstep: its
all-reduces and the all-gather of the logits pair up with rank 0's. Sampling happens on rank 0
alone (its SequenceSamplers, generators, logprobs): the sampled tokens are broadcast over the
model's group into the other ranks' engines, which feed them to the next step. Each bookkeeping
call carries rank 0's result; a rank whose own differs stops with an error instead of diverging.

Failures end the whole server, never hang it: a rank that dies or fails makes `launch` (the
parent process) terminate the others and report which one; a failed step under tensor
parallelism is fatal (the ranks could no longer agree on their caches). While idle, rank 0 sends a
ping every PING_S seconds, so a rank that hears nothing for CONTROL_TIMEOUT knows rank 0 is gone;
and a rank whose launcher is gone (killed) stops itself (SIGTERM: rank 0 shuts the server down).
"""
from __future__ import annotations

import inspect
import multiprocessing
import os
import signal
import threading
from datetime import timedelta

import torch
import torch.distributed as dist

from .. import parallel
from ..errors import LowbitError
from ..generate import PromptRows
from ..sampling import SamplingParams

PING_S = 20.0  # rank 0 tells the others it is alive this often while idle
CONTROL_TIMEOUT = timedelta(minutes=5)  # a rank waiting longer than this for rank 0's next call gives up
_group = None  # the control group, once `join` made it
_pids: list[int] = []


def join() -> None:
    """On every rank, in the tensor-parallel group: make the control group (and note the pids)."""
    global _group, _pids
    parent = multiprocessing.parent_process()
    if parent is not None:  # spawned by `launch`: end with it
        threading.Thread(target=_end_with, args=(parent,), name="lowbit-parent-watch", daemon=True).start()
    _group = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    _pids = [0] * dist.get_world_size()
    dist.all_gather_object(_pids, os.getpid(), group=_group)


def _end_with(parent) -> None:
    parent.join()
    os.kill(os.getpid(), signal.SIGTERM)


def describe() -> str:
    """For the banner: the ranks and their processes."""
    return f", tensor-parallel over {len(_pids)} ranks (pids {', '.join(map(str, _pids))})" if _pids else ""


def engine(model, slots: int, max_len: int):
    """The engine the worker runs on: the model's, or under `lowbit serve --tp` a Leader over it."""
    return model.engine(slots, max_len) if _group is None else Leader(model, slots, max_len)


def _send(calls: list) -> None:
    dist.broadcast_object_list([calls], src=0, group=_group)


def _receive() -> list:
    box = [None]
    try:
        dist.broadcast_object_list(box, src=0, group=_group)
    except RuntimeError as e:  # gloo: rank 0's process is gone, or silent past CONTROL_TIMEOUT
        raise LowbitError(f"tensor-parallel rank {parallel.current()[0]} lost rank 0 (the server): "
                          f"{str(e).splitlines()[0][:200]}") from None
    return box[0]


def _share_tokens(engine, slots: list[int]) -> None:
    """Rank 0's sampled tokens of `slots` into every rank's engine (what each feeds next)."""
    idx = torch.tensor(slots, device=engine.device)
    tok = engine.tokens[idx] if parallel.current()[0] == 0 else torch.empty(len(slots), dtype=torch.long,
                                                                             device=engine.device)
    dist.broadcast(tok, 0)
    engine.tokens[idx] = tok


class Leader:
    """Rank 0's engine under tensor parallelism: calls that change it are mirrored on every rank
    (see the module's docstring); what only reads it is rank 0's own."""

    lockstep = True
    READS = {"blocks_needed", "prefix_cache_stats"}  # methods that change nothing

    def __init__(self, model, slots: int, max_len: int):
        self._engine = model.engine(slots, max_len)
        self._queued: list = [(("engine", slots, max_len), None)]

    def __getattr__(self, name):
        value = getattr(self._engine, name)
        if inspect.ismethod(value) and name not in self.READS:
            raise LowbitError(f"Engine.{name} is not mirrored on the other tensor-parallel ranks; add it to "
                              f"lowbit/serve/tp.py (Leader and follow)")
        return value

    def _step(self, *call) -> None:
        calls, self._queued = self._queued + [(call, None)], []
        _send(calls)

    # bookkeeping: queued, sent with the next step
    def acquire(self) -> int:
        slot = self._engine.acquire()
        self._queued.append((("acquire",), slot))
        return slot

    def begin(self, slot: int, ids: list[int], cached: bool = True) -> int:
        hit = self._engine.begin(slot, ids, cached)
        self._queued.append((("begin", slot, ids, cached), hit))
        return hit

    def reserve(self, slot: int, tokens: int) -> None:
        self._engine.reserve(slot, tokens)
        self._queued.append((("reserve", slot, tokens), None))

    def release(self, slot: int) -> None:
        self._engine.release(slot)
        self._queued.append((("release", slot), None))

    # steps: sent at once, run together
    def extend(self, slot, ids, params=None, generator=None, sample_next=True, on_hidden=None):
        rows = None if on_hidden is None else (on_hidden.k, on_hidden.chosen)
        self._step("extend", slot, ids, sample_next, rows)
        toks = self._engine.extend(slot, ids, params, generator, sample_next, on_hidden)
        if sample_next:
            _share_tokens(self._engine, [slot])
        return toks

    def decode(self, slots, params, generator=None):
        self._step("decode", slots)
        toks = self._engine.decode(slots, params, generator)
        _share_tokens(self._engine, slots)
        return toks

    def capture(self, sizes: list[int]) -> None:
        self._step("capture", sizes)
        self._engine.capture(sizes)

    def ping(self) -> None:
        self._step("ping")

    def stop(self) -> None:
        """The other ranks return from `follow` (after the bookkeeping still queued)."""
        self._step("stop")


def follow(model) -> None:
    """A rank other than 0: apply rank 0's calls to this rank's engine until rank 0 stops."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches rank 0, which stops the others
    rank, greedy = parallel.current()[0], SamplingParams()
    engine = None
    while True:
        for (name, *args), expect in _receive():
            got = None
            if name == "stop":
                return
            if name == "engine":
                engine = model.engine(*args)
            elif name == "extend":
                slot, ids, sample_next, rows = args
                engine.extend(slot, ids, greedy, None, sample_next, rows and PromptRows(engine.net, *rows))
                if sample_next:
                    _share_tokens(engine, [slot])
            elif name == "decode":
                engine.decode(args[0], greedy)
                _share_tokens(engine, args[0])
            elif name != "ping":
                got = getattr(engine, name)(*args)  # acquire, begin, reserve, release, capture
            if got != expect:
                raise LowbitError(f"tensor-parallel rank {rank} diverged from rank 0: {name}{tuple(args)} gave "
                                  f"{got} here and {expect} on rank 0")


def launch(tp: int, fn, *args) -> int:
    """Run fn(*args) on tp spawned ranks (parallel.launch) and return rank 0's result. SIGINT and
    SIGTERM sent to this process go on to the ranks as SIGINT (rank 0 shuts the server down
    gracefully and stops the others); then the exit status is 130."""
    interrupted = []

    def forward(sig, frame):
        interrupted.append(sig)
        for p in multiprocessing.active_children():
            try:
                os.kill(p.pid, signal.SIGINT)
            except ProcessLookupError:
                pass

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        results = parallel.launch(tp, fn, *args)
    except LowbitError as e:
        raise LowbitError(f"the server stopped: {e}") from None
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    return 130 if interrupted else results[0]
