"""Generation: prefill each prompt into its own KV-cache slot, then decode all running sequences
together, one token per step. Sequences leave the batch when they finish (EOS, a stop string or
max_new_tokens), so a batch of unequal prompts gives the same tokens as running each alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .kv_cache import KVCache
from .sampling import SamplingParams, sample


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
    slot: int
    out: list[int] = field(default_factory=list)
    text: str = ""
    finish: str | None = None

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
        self.seqs = [_Seq(i, p, slot=i) for i, p in enumerate(ids)]
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

    def __iter__(self):
        model, dev, seqs = self.model, self.model.device, self.seqs
        gen = None
        if self.params.seed is not None:
            gen = torch.Generator(device=dev)
            gen.manual_seed(self.params.seed)
        cfg = model.config
        attn0 = model.net.model.layers[0].self_attn
        max_len = max(len(s.prompt) for s in seqs) + self.max_new_tokens
        cache = KVCache(cfg.num_layers, len(seqs), max_len, attn0.num_kv_heads, cfg.head_dim, model.dtype, dev,
                        fp8=attn0.k_scale is not None)
        with torch.inference_mode():
            if self.max_new_tokens <= 0:
                for s in seqs:
                    s.finish = "length"
            for s in seqs:  # prefill, one prompt at a time (no padding)
                if s.finish:
                    continue
                x = torch.tensor([s.prompt], device=dev)
                pos = torch.arange(len(s.prompt), device=dev)[None]
                hidden = model.net(x, pos, cache, torch.tensor([s.slot], device=dev))
                tok = sample(model.net.compute_logits(hidden[:, -1]).float(), self.params, gen)
                yield self._emit(s, int(tok))
            while True:
                live = [s for s in seqs if s.finish is None]
                if not live:
                    break
                x = torch.tensor([[s.out[-1]] for s in live], device=dev)
                pos = torch.tensor([[s.length - 1] for s in live], device=dev)
                slots = torch.tensor([s.slot for s in live], device=dev)
                hidden = model.net(x, pos, cache, slots, kv_len=max(s.length for s in live))
                toks = sample(model.net.compute_logits(hidden[:, -1]).float(), self.params, gen).tolist()
                for s, tok in zip(live, toks):
                    yield self._emit(s, tok)
        self.results = [GenerationResult(s.prompt, s.out, s.text if self.tracker else None, s.finish or "length")
                        for s in seqs]


def stream(model, prompts, **kwargs) -> GenerationRun:
    return GenerationRun(model, prompts, **kwargs)


def generate(model, prompts, **kwargs) -> list[GenerationResult]:
    run = GenerationRun(model, prompts, **kwargs)
    for _ in run:
        pass
    return run.results
