"""Generation on the engine (lowbit/engine.py): each prompt is prefilled into its own slot (in
chunks, under a per-step token budget), then all running sequences decode together, one token per
step. Sequences join when a slot and the KV blocks of their prompt are free and leave the batch
when they finish (EOS, a stop string or max_new_tokens), so a batch of
unequal prompts gives the same tokens as running each alone. `Scheduler` is that loop; `generate`
and `stream` run it over a fixed list of prompts, the server (lowbit/serve/) over requests that
come and go.

The host never waits for the step it just launched: step t+1 is launched before the tokens of
step t are read, so detokenizing, stop strings and streaming overlap the GPU. A sequence found
finished at step t has already been given step t+1, whose token is dropped.

Prompt logprobs (the server's `echo` with `logprobs`) come out of the prefill itself: a sequence
with `prompt_logprobs` set has the logits of its prompt rows made from each chunk's hidden states
(`PromptRows`, a bounded block of rows at a time) and bypasses the prefix cache (a cached prefix has
no hidden states to make them from); they ride on its first event. max_new_tokens=0 with
prompt_logprobs: the prompt is prefilled and nothing is sampled.
"""
from collections import deque
from dataclasses import dataclass, field

import torch

from . import parallel
from .engine import Tokens
from .errors import LowbitError
from .sampling import (SamplingParams, SequenceSampler, TokenLogprobs, _to_host, logprobs_of, sampling_key,
                       to_token_logprobs)

PROMPT_LOGITS_ROWS = 512  # prompt logprobs: rows of logits made at once (a [rows, V] float32 block)
TOKEN_BUDGET = 2048  # the Scheduler's default tokens per step
CHUNK_SIZE = 512  # the Scheduler's default prompt-chunk cuts


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    output_ids: list[int]
    text: str | None  # None when the model has no tokenizer and prompts were token ids
    finish_reason: str  # "eos" | "stop" | "length"


@dataclass
class StreamEvent:
    index: int  # which prompt
    token_id: int
    text: str  # new text since the previous event of this prompt ("" if held back or no tokenizer)
    finish_reason: str | None  # set on the last event of a prompt
    logprobs: TokenLogprobs | None = None  # when the sequence's SamplingParams ask for them
    # on a sequence's first event when it asked for them: one entry per prompt token (None for the first)
    prompt_logprobs: list[TokenLogprobs | None] | None = None


class PromptRows:
    """The prompt logprobs one prefill chunk yields: row i of the chunk's hidden states predicts
    `chosen[i]`. Called with the hidden states (Engine.extend's on_hidden), it makes their logits
    PROMPT_LOGITS_ROWS rows at a time and copies the logprobs (with the top k) to the host without
    a sync; `entries` reads them once the step's tokens are read back."""

    def __init__(self, net, k: int, chosen: list[int]):
        self.net, self.k, self.chosen = net, k, chosen
        self.parts: list = []

    def __call__(self, hidden: torch.Tensor) -> None:
        for start in range(0, len(self.chosen), PROMPT_LOGITS_ROWS):
            ids = self.chosen[start:start + PROMPT_LOGITS_ROWS]
            logits = self.net.compute_logits(hidden[0, start:start + len(ids)]).float()
            parts = logprobs_of(logits, torch.tensor(ids, device=hidden.device), self.k)
            self.parts.append((ids, [_to_host(t) for t in parts]))

    def entries(self) -> list[TokenLogprobs]:
        return [e for ids, parts in self.parts for e in to_token_logprobs(ids, parts)]


class Detokenizer:
    """Incremental detokenization and stop strings for one sequence.

    Each token decodes only a short window (the text of the tokens since the last emitted piece,
    minus the text of the window's start), so the cost per token does not grow with the output.
    Text that may be the start of a stop string, or an incomplete multi-byte character, is held
    back until the next tokens settle it: the pieces always concatenate to the final text."""

    def __init__(self, model, stop: list[str], skip_special_tokens: bool = True, include_stop: bool = False):
        self.model, self.stop = model, [s for s in stop if s]
        self.skip_special_tokens, self.include_stop = skip_special_tokens, include_stop
        self.text = ""  # emitted so far
        self._held = ""
        self._start = self._read = 0  # window: ids[_start:] decoded, ids[_start:_read] already emitted

    def decode(self, ids: list[int]) -> str:
        if self.skip_special_tokens:
            return self.model.decode(ids)
        return self.model.tokenizer.decode(ids, skip_special_tokens=False)

    def update(self, ids: list[int], final: bool, check_stop: bool = True) -> tuple[str, bool]:
        """The new text after ids[-1] (all of it if `final`), and whether a stop string was hit
        (`check_stop` False: not looked for, e.g. before min_tokens)."""
        done = self.decode(ids[self._start:self._read])
        window = self.decode(ids[self._start:])
        new = ""
        if final or (len(window) > len(done) and not window.endswith("\ufffd")):
            new = window[len(done):]
            self._start, self._read = self._read, len(ids)
        text = self._held + new  # a stop string can only start in the held-back part or later
        hits = [(i, len(s)) for i, s in ((text.find(s), s) for s in self.stop) if i >= 0] if check_stop else []
        if hits:
            at, n = min(hits)
            text, self._held = text[:at + n if self.include_stop else at], ""
        elif final or not check_stop:
            self._held = ""
        else:
            keep = max((k for s in self.stop for k in range(1, min(len(s), len(text) + 1))
                        if text.endswith(s[:k])), default=0)
            text, self._held = text[:len(text) - keep], text[len(text) - keep:]
        self.text += text
        return text, bool(hits)


@dataclass
class Sequence:
    """One prompt's generation: its settings, its output, and its place in the engine."""
    index: int
    prompt: list[int]
    params: SamplingParams
    max_new_tokens: int
    eos: set[int]
    detokenizer: Detokenizer | None = None  # None: token ids only
    generator: torch.Generator | None = None
    slot: int = -1
    out: list[int] = field(default_factory=list)
    finish: str | None = None  # "eos" | "stop" | "length" | "cancelled"
    pending: int = 0  # tokens launched on the device, not yet read back
    feed: list[int] = field(default_factory=list)  # what its prefill computes: prompt (+ output, after a preemption)
    done: int = 0  # tokens of feed in the KV cache (a cached prefix, then prefilled chunks)
    stop_ids: set[int] = field(default_factory=set)  # tokens that end it like EOS, finish "stop"
    min_tokens: int = 0  # no stop string is looked for before this many tokens (EOS and stop_ids are
    # kept from being sampled by the sampler)
    sampler: SequenceSampler | None = None  # per-sequence sampling state (penalties, logprobs, min_tokens)
    prompt_logprobs: int | None = None  # report the prompt's logprobs with this many alternatives (echo)
    prompt_rows: list[PromptRows] | None = None  # what the prefill made of them so far; None once reported

    def __post_init__(self):
        if self.prompt_logprobs is not None:
            self.prompt_rows = []

    def rows_of_chunk(self, net, end: int) -> PromptRows | None:
        """The prompt logprobs the chunk feed[done:end] yields (rows predicting a prompt token)."""
        if self.prompt_rows is None:
            return None
        chosen = self.prompt[self.done + 1:min(end, len(self.prompt) - 1) + 1]
        if not chosen:
            return None
        rows = PromptRows(net, self.prompt_logprobs, chosen)
        self.prompt_rows.append(rows)
        return rows

    def take_prompt_logprobs(self) -> list[TokenLogprobs | None] | None:
        """The prompt's logprobs, once (with the sequence's first event)."""
        if self.prompt_rows is None:
            return None
        out = [None] + [e for rows in self.prompt_rows for e in rows.entries()]
        self.prompt_rows = None
        return out

    @property
    def sampling(self) -> SamplingParams | SequenceSampler:
        """What the engine samples this sequence's rows with."""
        return self.sampler or self.params

    def emit(self, tok: int, logprobs: TokenLogprobs | None = None) -> StreamEvent:
        self.out.append(tok)
        ended = tok in self.eos or tok in self.stop_ids
        if ended:
            self.finish = "eos" if tok in self.eos else "stop"
        elif len(self.out) >= self.max_new_tokens:
            self.finish = "length"
        delta, stopped = "", False
        if self.detokenizer:
            d = self.detokenizer
            ids = self.out[:-1] if ended and not d.include_stop else self.out  # the stop token's text is left out
            delta, stopped = d.update(ids, self.finish is not None, check_stop=len(self.out) >= self.min_tokens)
        if stopped:
            self.finish = "stop"
        return StreamEvent(self.index, tok, delta, self.finish, logprobs)


class Scheduler:
    """Continuous batching on one engine: `add` sequences at any time; each `step` launches the next
    decode step of every running sequence, then spends what is left of the step's token budget on
    prompt chunks (chunked prefill: waiting sequences are admitted into free slots when the KV cache
    has the blocks for their prompt, and a long prompt is prefilled over several steps, so running
    streams keep their inter-token latency while new prompts arrive), and returns the events of the
    tokens read back. Finished and cancelled sequences free their slot and blocks as soon as none of
    their tokens is still in flight.

    Preemption: when the running sequences need more KV blocks than are free, the most recently
    admitted ones are preempted (their blocks freed, their prompt and output so far recomputed when
    they are admitted again), so a request that fits the cache alone always completes.
    token_budget: tokens per step (decode rows + prompt chunks; at least one chunk runs per step);
    None = whole prompts at once. chunk_size: prompts are cut at its multiples (fixed cuts, so a prompt
    is computed the same way whatever else runs).
    """

    def __init__(self, engine, token_budget: int | None = TOKEN_BUDGET, chunk_size: int = CHUNK_SIZE):
        self.engine = engine
        self.token_budget, self.chunk_size = token_budget, chunk_size
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # holding a slot (prefilling or decoding), in admission order
        self._inflight = []  # (sequences, Tokens) in launch order
        self.preemptions = 0

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        engine = self.engine
        need = engine.blocks.blocks_for(min(len(seq.prompt) + seq.max_new_tokens, engine.max_len))
        if need > engine.blocks.num_blocks:
            raise LowbitError(f"a prompt of {len(seq.prompt)} tokens with max_new_tokens={seq.max_new_tokens} needs "
                              f"{need} KV-cache blocks; the cache has {engine.blocks.num_blocks}: build the engine "
                              "with more blocks or ask for fewer tokens")
        self.waiting.append(seq)

    def cancel(self, seq: Sequence) -> None:
        if seq.finish is None:
            seq.finish = "cancelled"

    def step(self) -> list[StreamEvent]:
        engine = self.engine
        events: list[StreamEvent] = []
        # 1. the decode step of every sequence past its prompt (those known to reach max_new_tokens
        #    are left out), with the KV blocks it needs: preempt the newest sequences if short
        while True:
            step = [s for s in self.running if s.finish is None and s.done == len(s.feed)
                    and len(s.out) + s.pending < s.max_new_tokens]
            need = sum(engine.blocks_needed(s.slot, engine.lengths[s.slot] + 1) for s in step)
            if need <= engine.free_blocks:
                break
            if self._inflight:  # read what is in flight first: a victim must have no pending token
                events += self._read()
                self._release_finished()
                continue
            victim = self.running[-1]
            self._preempt(victim)
        step.sort(key=lambda s: sampling_key(s.sampling, s.generator))  # rows that sample alike side by side
        launched = []
        if step:
            for s in step:
                s.pending += 1
            launched.append((step, engine.decode([s.slot for s in step], [s.sampling for s in step],
                                                 [s.generator for s in step])))
        # 2. prompt chunks under what is left of the budget (at least one chunk per step). Chunks are
        #    cut at multiples of chunk_size, whatever else runs: a prompt's numerics do not depend on the load
        budget = None if self.token_budget is None else self.token_budget - len(step)
        self._admit()
        ran = False
        for s in [s for s in self.running if s.done < len(s.feed) and s.finish is None]:
            whole = self.token_budget is None or not engine.chunkable
            end = len(s.feed) if whole else min(len(s.feed), (s.done // self.chunk_size + 1) * self.chunk_size)
            n = end - s.done
            if budget is not None and n > budget and ran:
                break
            last = end == len(s.feed)
            sample_next = last and s.max_new_tokens > 0  # 0: only the prompt's logprobs
            toks = engine.extend(s.slot, s.feed[s.done:end], s.sampling, s.generator, sample_next=sample_next,
                                 on_hidden=s.rows_of_chunk(engine.net, end))
            s.done, ran = end, True
            if budget is not None:
                budget -= n
            if last:
                s.pending += 1
                launched.append(([s], toks if sample_next else Tokens(torch.full((1,), -1, device=engine.device))))
        # 3. read back the previous step's tokens (the GPU is busy with this step meanwhile)
        events += self._read()
        self._inflight = launched
        self._release_finished()
        return events

    def _admit(self) -> None:
        """Admit waiting sequences (in order) while a slot and the blocks of their prompt are free."""
        engine = self.engine
        while self.waiting and engine.free_slots:
            s = self.waiting[0]
            if s.finish is not None:  # cancelled while waiting
                self.waiting.popleft()
                continue
            feed = s.prompt + s.out  # after a preemption: recompute the output so far too
            if engine.blocks.blocks_for(len(feed)) > engine.free_blocks:  # (a cached prefix may need fewer)
                return
            slot = engine.acquire()
            hit = engine.begin(slot, feed, cached=s.prompt_rows is None)
            if engine.blocks_needed(slot, len(feed)) > engine.free_blocks:
                engine.release(slot)
                return
            engine.reserve(slot, len(feed))
            self.waiting.popleft()
            s.slot, s.feed, s.done = slot, feed, hit
            self.running.append(s)

    def _read(self) -> list[StreamEvent]:
        events = []
        for batch, toks in self._inflight:
            for s, tok in zip(batch, toks.get()):
                s.pending -= 1
                if tok < 0:  # a prompt-only sequence: its prompt's logprobs, and it is done
                    if s.finish is None:
                        s.finish = "length"
                        events.append(StreamEvent(s.index, -1, "", "length", None, s.take_prompt_logprobs()))
                    continue
                lp = s.sampler.take_logprobs() if s.sampler else None  # one per token read, emitted or not
                if s.finish is None:
                    ev = s.emit(tok, lp)
                    ev.prompt_logprobs = s.take_prompt_logprobs()
                    events.append(ev)
        self._inflight = []
        return events

    def _release_finished(self) -> None:
        for s in [s for s in self.running if s.finish is not None and s.pending == 0]:
            self._release(s)

    def _preempt(self, s: Sequence) -> None:
        self._release(s)
        self.preemptions += 1
        if s.prompt_rows is not None:  # not reported yet: made again from the recomputed prefill
            s.prompt_rows = []
        if s.finish is None:
            self.waiting.appendleft(s)

    def close(self) -> None:
        """Free every slot (when the caller stops early); tokens still in flight are dropped."""
        self._inflight = []
        for s in list(self.running):
            self._release(s)
        self.waiting.clear()

    def _release(self, s: Sequence) -> None:
        self.engine.release(s.slot)
        s.slot = -1
        s.feed, s.done = [], 0
        self.running.remove(s)


def sampling_generator(device, seed: int | None) -> torch.Generator:
    """A generator seeded with `seed`, else randomly (the same seed on every tensor-parallel rank)."""
    if seed is None:  # every tensor-parallel rank must draw the same tokens
        seed = int(torch.randint(0, 2**62, ()))
        if parallel.current()[1] > 1:
            t = torch.tensor([seed], device=device)
            torch.distributed.broadcast(t, 0)
            seed = int(t)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


class GenerationRun:
    """An iterable over StreamEvents; `results` holds the GenerationResults once iteration ends."""

    def __init__(self, model, prompts, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None, stop: list[str] | None = None, chat: bool = False,
                 ignore_eos: bool = False):
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        self.model = model
        self.params = SamplingParams(temperature, top_k, top_p, seed)
        self.max_new_tokens = max_new_tokens
        if not prompts:
            raise LowbitError("no prompts given")
        ids = [model.encode(p, chat=chat) for p in prompts]
        vocab = model.config.vocab_size
        for i, p in enumerate(ids):
            which = f"prompt {i} ({str(prompts[i])[:40]!r})" if len(ids) > 1 else f"the prompt {str(prompts[i])[:40]!r}"
            if not p:
                raise LowbitError(f"{which} has no tokens; give some text (or token ids)")
            if any(not 0 <= t < vocab for t in p):
                raise LowbitError(f"{which}: token ids must be in [0, {vocab}) (the model's vocabulary)")
        has_text = any(isinstance(p, str) for p in prompts) or bool(stop)
        eos = set() if ignore_eos else set(model.eos_token_ids)
        self.seqs = [Sequence(i, p, self.params, max_new_tokens, eos,
                              Detokenizer(model, list(stop or [])) if has_text else None)
                     for i, p in enumerate(ids)]
        self.results: list[GenerationResult] | None = None
        self.spec_stats: dict = {}  # with a speculative model: drafted / accepted counts, acceptance_rate

    def __iter__(self):
        seqs = self.seqs
        if self.model.speculative is not None:  # MTP drafting (lowbit/speculative.py)
            from .speculative import run

            yield from run(self.model, seqs, self.params, self.max_new_tokens, self.spec_stats)
            self._finish()
            return
        gen = None if self.params.temperature == 0 else sampling_generator(self.model.device, self.params.seed)
        engine = self.model.engine(len(seqs), max(len(s.prompt) for s in seqs) + max(self.max_new_tokens, 1))
        scheduler = Scheduler(engine)
        for s in seqs:
            s.generator = gen
            if self.max_new_tokens > 0:
                scheduler.add(s)
            else:
                s.finish = "length"
        try:
            while scheduler.busy:
                yield from scheduler.step()
        finally:
            scheduler.close()  # also when the caller stops iterating early
        self._finish()

    def _finish(self) -> None:
        self.results = [GenerationResult(s.prompt, s.out, s.detokenizer.text if s.detokenizer else None,
                                         s.finish or "length") for s in self.seqs]


def stream(model, prompts, **kwargs) -> GenerationRun:
    return GenerationRun(model, prompts, **kwargs)


def generate(model, prompts, **kwargs) -> list[GenerationResult]:
    run = GenerationRun(model, prompts, **kwargs)
    for _ in run:
        pass
    return run.results
