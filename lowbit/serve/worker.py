"""The thread that owns the model. Every choice of a request becomes a `Sequence` of one
`Scheduler` (lowbit/generate.py, the loop `Model.generate` runs too), so requests share the
engine's running batch: they join it when a KV-cache slot is free and leave it at EOS, a stop
string or token, max_tokens, or when their client goes away. Events go back to the event loop, one
hand-over per step; token strings for logprobs are made here too, off the event loop. A choice
that asks for its prompt's logprobs (echo) gets them from its own prefill (the Scheduler makes them
while it runs the prompt), as a PromptLogprobs event before its first token.

The worker is alive from `start` (which returns once the thread runs on the model's device) until
`stop` or until something outside a decode step fails: then `error` says why, every waiting
request gets a `WorkerDied`, new ones are refused, and `on_fatal` (the server's shutdown) is called.
A failed decode step only fails the requests in that batch (under tensor parallelism, where the
ranks must agree on every step, it is fatal; lowbit/serve/tp.py).
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from ..errors import LowbitError
from ..generate import Detokenizer, Scheduler, Sequence, StreamEvent, sampling_generator
from ..sampling import SamplingParams, SequenceSampler, TokenLogprobs
from . import tp

log = logging.getLogger("lowbit.serve")
SEED_MOD = 2**64


class WorkerDied(RuntimeError):
    """The worker thread is gone: requests cannot be served."""


@dataclass
class Choice:
    """What one sequence of a request asks for."""
    prompt: list[int]
    params: SamplingParams
    max_new_tokens: int  # 0: only the prompt's logprobs (echo)
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop: bool = False
    skip_special_tokens: bool = True
    prompt_logprobs: int | None = None  # echo with logprobs: the prompt's logprobs, with this many alternatives


@dataclass
class PromptLogprobs:
    """The first event of a choice that asked for its prompt's logprobs: one entry per prompt token
    (None for the first, which has no context)."""
    entries: list[TokenLogprobs | None]


class Request:
    """One choice's sequence; its events (StreamEvent, PromptLogprobs, or an exception) go to
    `sink` as (choice, event)."""

    def __init__(self, seq: Sequence, choice: Choice, sink: asyncio.Queue, index: int, arrival: float):
        self.seq, self.choice, self.sink, self.index, self.arrival = seq, choice, sink, index, arrival
        self.done = False  # set on the event loop when its last event is delivered or it is cancelled
        self.last_token: float | None = None  # worker thread: when its previous token was handed over


class Worker:
    def __init__(self, model, max_batch: int, max_len: int, metrics=None):
        self.model, self.max_len, self.metrics = model, max_len, metrics
        self.engine = tp.engine(model, max_batch, max_len)  # under `serve --tp`, mirrored on every rank
        self.lockstep = getattr(self.engine, "lockstep", False)
        self.engine.capture(self.engine.buckets)  # CUDA graphs now, not when the batch first grows
        # the thread must run on the model's GPU; "cuda" without an index means the one current now
        dev = model.device
        self.cuda_index = (dev.index if dev.index is not None else torch.cuda.current_device()) \
            if dev.type == "cuda" else None
        self.eos = set(model.eos_token_ids)
        try:
            model.tokenizer
            self.has_tokenizer = True
        except LowbitError:
            self.has_tokenizer = False
        self.error: str | None = None  # why the thread died
        self.on_fatal = None  # called on the event loop with the error when the thread dies
        self.outstanding = 0  # sequences submitted and not done (event loop only)
        self.waiting = self.running = 0  # the scheduler's, as of its last step
        self._shared_generator = None  # requests sampled without a seed share one: sampled in one go
        self._token_strings: dict[int, str] = {}
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()  # submit vs death: nothing is queued after the inbox is drained
        self._ids = itertools.count()
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    def start(self) -> None:
        """Start the thread and wait until it runs; call from the event loop requests are served on."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="lowbit-worker", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self.error is not None:
            raise LowbitError(f"the model worker failed to start: {self.error}")

    def stop(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._inbox.put(None)
            self._thread.join()

    def submit(self, choice: Choice, sink: asyncio.Queue, index: int, arrival: float) -> Request:
        params = choice.params
        gen = None
        if params.temperature > 0:
            if params.seed is not None:  # its own generator: the same draws whatever else runs
                gen = sampling_generator(self.model.device, params.seed % SEED_MOD)
            else:
                if self._shared_generator is None:  # (seeded here: no rank but this one samples)
                    self._shared_generator = sampling_generator(self.model.device, int(torch.randint(0, 2**62, ())))
                gen = self._shared_generator
        detok = Detokenizer(self.model, choice.stop, choice.skip_special_tokens, choice.include_stop) \
            if self.has_tokenizer else None
        eos = set() if choice.ignore_eos else self.eos
        stop_ids = set(choice.stop_token_ids)
        sampler = SequenceSampler(params, choice.prompt, eos | stop_ids) if params.stateful else None
        seq = Sequence(next(self._ids), choice.prompt, params, choice.max_new_tokens, eos, detok, gen,
                       stop_ids=stop_ids, min_tokens=params.min_tokens, sampler=sampler,
                       prompt_logprobs=choice.prompt_logprobs)
        req = Request(seq, choice, sink, index, arrival)
        with self._lock:
            if not self.alive:
                raise WorkerDied(self.error or "the model worker is not running")
            self.outstanding += 1
            self._inbox.put(("add", req))
        return req

    def cancel(self, req: Request) -> None:
        if not req.done:
            req.done = True
            self.outstanding -= 1
            self._inbox.put(("cancel", req))

    # ------------------------------------------------------------------ the thread
    def _run(self) -> None:
        live: dict[int, Request] = {}
        try:
            if self.cuda_index is not None:
                torch.cuda.set_device(self.cuda_index)  # kernels launch on the current device
            self._ready.set()
            self._serve(live)
            if self.lockstep:
                try:
                    self.engine.stop()  # the other ranks return
                except RuntimeError as e:  # one is gone already: the launcher names it
                    log.warning("could not stop the other tensor-parallel ranks: %s", str(e).splitlines()[0][:200])
        except BaseException as e:  # noqa: BLE001 - the thread must report any death
            self._die(e, live)

    def _serve(self, live: dict[int, Request]) -> None:
        scheduler = Scheduler(self.engine)
        while True:
            for msg in self._messages(wait=not scheduler.busy):
                if msg is None:
                    scheduler.close()
                    return
                kind, req = msg
                if kind == "add":
                    self._admit(req, scheduler, live)
                elif live.pop(req.seq.index, None) is not None:
                    scheduler.cancel(req.seq)
            try:
                events = scheduler.step()
            except Exception as e:  # fail the requests in the batch, keep serving
                if self.lockstep:
                    raise  # the other ranks ran (or wait in) this step: they can no longer follow
                log.exception("decode step failed")
                self._hand_over([(req, e) for req in live.values()])
                live.clear()
                scheduler.close()
                scheduler = Scheduler(self.engine)
                continue
            self.waiting, self.running = len(scheduler.waiting), len(scheduler.running)
            if self.metrics is not None:
                self.metrics.scheduler(self.waiting, self.running, self.engine)
            items = []
            for ev in events:
                req = live.pop(ev.index) if ev.finish_reason else live[ev.index]
                if ev.prompt_logprobs is not None:
                    items.append((req, PromptLogprobs(ev.prompt_logprobs)))
                items.append((req, ev))
            self._hand_over(items)

    def _admit(self, req: Request, scheduler: Scheduler, live: dict[int, Request]) -> None:
        choice, seq = req.choice, req.seq
        live[seq.index] = req  # from here on, a death of the thread fails it
        if choice.max_new_tokens == 0 and choice.prompt_logprobs is None:  # echo only: nothing to compute
            seq.finish = "length"
            self._hand_over([(live.pop(seq.index), StreamEvent(seq.index, -1, "", "length"))])
            return
        scheduler.add(seq)

    def _with_strings(self, entries):
        for e in entries:
            if e is not None:
                self.token_string(e.token_id)
                for t, _ in e.top:
                    self.token_string(t)
        return entries

    def token_string(self, token_id: int) -> str:
        """A token's text for logprobs ("token_id:N" without a tokenizer); cached."""
        s = self._token_strings.get(token_id)
        if s is None:
            s = self.model.tokenizer.decode([token_id], skip_special_tokens=False) if self.has_tokenizer \
                else f"token_id:{token_id}"
            self._token_strings[token_id] = s
        return s

    def _die(self, e: BaseException, live: dict[int, Request]) -> None:
        with self._lock:
            self.error = f"{type(e).__name__}: {e}"
            pending = list(live.values())
            while True:
                try:
                    msg = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if msg is not None and msg[0] == "add":
                    pending.append(msg[1])
        log.error("the model worker died: %s", self.error, exc_info=e)
        self._ready.set()
        err = WorkerDied(self.error)
        self._hand_over([(req, err) for req in pending])
        if self.on_fatal is not None and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.on_fatal, self.error)

    def _messages(self, wait: bool) -> list:
        msgs = []
        while wait and not msgs:
            try:
                msgs.append(self._inbox.get(timeout=tp.PING_S if self.lockstep else None))
            except queue.Empty:
                self.engine.ping()  # idle: the other ranks hear that rank 0 is alive
        while True:
            try:
                msgs.append(self._inbox.get_nowait())
            except queue.Empty:
                return msgs

    def _hand_over(self, items: list) -> None:
        if not items:
            return
        now = time.monotonic()
        tokens = 0
        for req, ev in items:
            if isinstance(ev, PromptLogprobs):
                self._with_strings(ev.entries)
            if isinstance(ev, StreamEvent) and ev.token_id >= 0:
                if ev.logprobs is not None:
                    self._with_strings([ev.logprobs])
                if self.metrics is not None:
                    self.metrics.token(now - (req.last_token or req.arrival), first=req.last_token is None)
                req.last_token = now
                tokens += 1
        if self.metrics is not None:
            self.metrics.generated(tokens)
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(_deliver, self, items)


def _deliver(worker: Worker, items) -> None:
    for req, ev in items:
        if req.done:
            continue  # cancelled: nobody reads it
        if isinstance(ev, Exception) or (isinstance(ev, StreamEvent) and ev.finish_reason):
            req.done = True
            worker.outstanding -= 1
        req.sink.put_nowait((req.index, ev))
