"""Generation on the engine (lowbit/engine.py): each prompt is prefilled into its own KV-cache
slot, then all running sequences decode together, one token per step. Sequences leave the batch
when they finish (EOS, a stop string or max_new_tokens), so a batch of unequal prompts gives the
same tokens as running each alone.

The host never waits for the step it just launched: step t+1 is launched before the tokens of
step t are read, so detokenizing, stop strings and streaming overlap the GPU. A sequence found
finished at step t has already been given step t+1, whose token is dropped.
"""
from dataclasses import dataclass, field

import torch

from . import parallel
from .sampling import SamplingParams


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


@dataclass
class _Seq:
    index: int
    prompt: list[int]
    slot: int = -1
    out: list[int] = field(default_factory=list)
    text: str = ""
    finish: str | None = None
    pending: int = 0  # tokens launched on the device, not yet read back

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.out)


class _TextTracker:
    """Incremental detokenization and stop-string detection for one sequence."""

    def __init__(self, model, stop: list[str]):
        self.model, self.stop = model, stop

    def update(self, seq: _Seq) -> tuple[str, bool]:
        full = self.model.decode(seq.out)
        hit = None
        for s in self.stop:
            i = full.find(s)
            if i >= 0 and (hit is None or i < hit):
                hit = i
        if hit is not None:
            full = full[:hit]
        if hit is None and full.endswith("\ufffd"):
            return "", False  # an incomplete multi-byte character: wait for the next token
        delta = full[len(seq.text):] if full.startswith(seq.text) else full
        seq.text = full
        return delta, hit is not None


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
        ids = [model.encode(p, chat=chat) for p in prompts]
        if not ids or any(len(p) == 0 for p in ids):
            raise ValueError("every prompt needs at least one token")
        has_text = any(isinstance(p, str) for p in prompts) or bool(stop)
        self.tracker = _TextTracker(model, list(stop or [])) if has_text else None
        self.eos = set() if ignore_eos else set(model.eos_token_ids)
        self.seqs = [_Seq(i, p) for i, p in enumerate(ids)]
        self.results: list[GenerationResult] | None = None

    def _emit(self, seq: _Seq, tok: int) -> StreamEvent:
        seq.out.append(tok)
        delta, stopped = self.tracker.update(seq) if self.tracker else ("", False)
        if stopped:
            seq.finish = "stop"
        elif tok in self.eos:
            seq.finish = "eos"
        elif len(seq.out) >= self.max_new_tokens:
            seq.finish = "length"
        return StreamEvent(seq.index, tok, delta, seq.finish)

    def _generator(self):
        if self.params.temperature == 0:
            return None
        seed = self.params.seed
        if seed is None:  # every tensor-parallel rank must draw the same tokens
            seed = int(torch.randint(0, 2**62, ()))
            if parallel.current()[1] > 1:
                t = torch.tensor([seed], device=self.model.device)
                torch.distributed.broadcast(t, 0)
                seed = int(t)
        gen = torch.Generator(device=self.model.device)
        gen.manual_seed(seed)
        return gen

    def __iter__(self):
        seqs, params = self.seqs, self.params
        if self.max_new_tokens <= 0:
            for s in seqs:
                s.finish = "length"
            live = []
        else:
            live = seqs
        gen = self._generator()
        engine = self.model.engine(len(seqs), max(len(s.prompt) for s in seqs) + max(self.max_new_tokens, 1))
        inflight = []  # (sequences, Tokens) in launch order
        for s in live:
            s.slot = engine.acquire()
            s.pending = 1
            inflight.append(([s], engine.prefill(s.slot, s.prompt, params, gen)))
        try:
            while inflight:
                # launch the next step first; sequences known to reach max_new_tokens are left out
                step = [s for s in seqs if s.slot >= 0 and s.finish is None
                        and len(s.out) + s.pending < self.max_new_tokens]
                if step:
                    for s in step:
                        s.pending += 1
                    launched = (step, engine.decode([s.slot for s in step], params, gen))
                for batch, toks in inflight:
                    for s, tok in zip(batch, toks.get()):
                        s.pending -= 1
                        if s.finish is None:
                            yield self._emit(s, tok)
                        if s.finish is not None and s.pending == 0 and s.slot >= 0:
                            engine.release(s.slot)
                            s.slot = -1
                inflight = [launched] if step else []
        finally:
            for s in seqs:  # also when the caller stops iterating early
                if s.slot >= 0:
                    engine.release(s.slot)
                    s.slot = -1
        self.results = [GenerationResult(s.prompt, s.out, s.text if self.tracker else None, s.finish or "length")
                        for s in seqs]


def stream(model, prompts, **kwargs) -> GenerationRun:
    return GenerationRun(model, prompts, **kwargs)


def generate(model, prompts, **kwargs) -> list[GenerationResult]:
    run = GenerationRun(model, prompts, **kwargs)
    for _ in run:
        pass
    return run.results
