"""The thread that owns the model. Every request becomes a `Sequence` of one `Scheduler`
(lowbit/generate.py, the loop `Model.generate` runs too), so requests share the engine's running
batch: they join it when a KV-cache slot is free and leave it at EOS, a stop string, max_tokens,
or when their client goes away. Events go back to the event loop, one hand-over per step.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading

import torch

from ..errors import LowbitError
from ..generate import Detokenizer, Scheduler, Sequence, StreamEvent, sampling_generator
from ..sampling import SamplingParams

log = logging.getLogger("lowbit.serve")


class Request:
    """A submitted sequence and the queue its StreamEvents (or an exception) arrive on."""

    def __init__(self, seq: Sequence):
        self.seq = seq
        self.events: asyncio.Queue = asyncio.Queue()


class Worker:
    def __init__(self, model, max_batch: int, max_len: int):
        self.model, self.max_len = model, max_len
        self.engine = model.engine(max_batch, max_len)
        self.engine.capture(self.engine.buckets)  # CUDA graphs now, not when the batch first grows
        self.eos = set(model.eos_token_ids)
        try:
            model.tokenizer
            self.has_tokenizer = True
        except LowbitError:
            self.has_tokenizer = False
        self._shared_generator = None  # requests sampled without a seed share one: sampled in one go
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._ids = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the thread; call from the event loop the requests are served on."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="lowbit-worker", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._inbox.put(None)
        self._thread.join()

    def submit(self, prompt: list[int], params: SamplingParams, max_new_tokens: int, stop: list[str],
               ignore_eos: bool) -> Request:
        gen = None
        if params.temperature > 0:
            if params.seed is not None:  # its own generator: the same draws whatever else runs
                gen = sampling_generator(self.model.device, params.seed)
            else:
                if self._shared_generator is None:
                    self._shared_generator = sampling_generator(self.model.device, None)
                gen = self._shared_generator
        detok = Detokenizer(self.model, stop) if self.has_tokenizer else None
        seq = Sequence(next(self._ids), prompt, params, max_new_tokens, set() if ignore_eos else self.eos, detok, gen)
        req = Request(seq)
        self._inbox.put(("add", req))
        return req

    def cancel(self, req: Request) -> None:
        self._inbox.put(("cancel", req))

    # ------------------------------------------------------------------ the thread
    def _run(self) -> None:
        if self.model.device.type == "cuda":
            torch.cuda.set_device(self.model.device)  # kernels launch on the current device
        scheduler = Scheduler(self.engine)
        live: dict[int, Request] = {}
        while True:
            for msg in self._messages(wait=not scheduler.busy):
                if msg is None:
                    scheduler.close()
                    return
                kind, req = msg
                if kind == "add":
                    live[req.seq.index] = req
                    scheduler.add(req.seq)
                elif live.pop(req.seq.index, None) is not None:
                    scheduler.cancel(req.seq)
            try:
                events = scheduler.step()
            except Exception as e:  # fail the requests in the batch, keep serving
                log.exception("decode step failed")
                self._hand_over([(req, e) for req in live.values()])
                live.clear()
                scheduler.close()
                scheduler = Scheduler(self.engine)
                continue
            self._hand_over([(live.pop(ev.index) if ev.finish_reason else live[ev.index], ev) for ev in events])

    def _messages(self, wait: bool) -> list:
        msgs = [self._inbox.get()] if wait else []
        while True:
            try:
                msgs.append(self._inbox.get_nowait())
            except queue.Empty:
                return msgs

    def _hand_over(self, items: list[tuple[Request, StreamEvent | Exception]]) -> None:
        if items:
            self._loop.call_soon_threadsafe(_deliver, items)


def _deliver(items) -> None:
    for req, ev in items:
        req.events.put_nowait(ev)
