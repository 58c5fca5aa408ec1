"""Token sampling on the device: greedy, temperature, top-k, top-p, min-p; and, per sequence,
repetition/presence/frequency penalties, min_tokens and logprobs. No host sync.

`SamplingParams` are settings. A sequence that needs state across steps (the counts of its tokens
for penalties, how many tokens it has for min_tokens, the logprobs it must report) gets a
`SequenceSampler`, which the engine takes in place of its SamplingParams: `sample` hands it its own
row. Every row is sampled from its own logits only, so a row's token never depends on the other
rows of the batch (the batch-invariance the server promises rests on this).
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import torch

GREEDY_BELOW = 1e-5  # a temperature below this samples greedily (logits / 1e-40 overflow float32)
MAX_LOGPROBS = 20  # top alternatives a request may ask for
SEED_RANGE = (-2**63, 2**64 - 1)  # what torch.Generator.manual_seed takes


@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0 (or below GREEDY_BELOW): greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    seed: int | None = None
    min_p: float = 0.0  # drop tokens with probability < min_p * the most likely one's
    repetition_penalty: float = 1.0  # over prompt and output tokens (divides positive logits, multiplies negative)
    presence_penalty: float = 0.0  # subtracted once from every token the output holds
    frequency_penalty: float = 0.0  # subtracted per occurrence in the output
    min_tokens: int = 0  # the stop tokens (EOS, stop_token_ids) cannot be sampled before this many
    logprobs: int | None = None  # report the sampled token's logprob and the top-k (raw model distribution)

    def __post_init__(self):
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if self.temperature < GREEDY_BELOW:
            self.temperature = 0.0
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if not 0 <= self.min_p <= 1:
            raise ValueError("min_p must be in [0, 1]")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0")
        if self.min_tokens < 0:
            raise ValueError("min_tokens must be >= 0")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}]")
        if self.seed is not None and not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise ValueError(f"seed must be in [{SEED_RANGE[0]}, {SEED_RANGE[1]}] (a signed or unsigned 64-bit integer)")

    @property
    def stateful(self) -> bool:
        """Whether sampling needs a SequenceSampler (state across steps)."""
        return (self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0
                or self.min_tokens > 0 or self.logprobs is not None)


@dataclass
class TokenLogprobs:
    """The sampled (or given) token's logprob and the most likely alternatives, best first."""
    token_id: int
    logprob: float
    top: list[tuple[int, float]]


def logprobs_of(logits: torch.Tensor, chosen: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """logits [T, V] float32, chosen [T] -> (chosen's logprob [T], top-k logprobs [T, k], their ids [T, k])."""
    lp = torch.log_softmax(logits, dim=-1)
    top = lp.topk(k, dim=-1) if k else (lp[:, :0], chosen[:, None][:, :0])
    return lp.gather(-1, chosen[:, None])[:, 0], top[0], top[1]


def to_token_logprobs(chosen: list[int], parts) -> list[TokenLogprobs]:
    """The host lists of `logprobs_of`'s tensors as TokenLogprobs."""
    lp, top_lp, top_ids = (t.tolist() for t in parts)
    return [TokenLogprobs(c, lp[i], list(zip(top_ids[i], top_lp[i]))) for i, c in enumerate(chosen)]


class SequenceSampler:
    """One sequence's sampling state, handed to the engine in place of its SamplingParams.

    The engine calls `sample` once per token of this sequence, in order (prefill, then each decode
    step), on a [1, V] row of logits; the counts of the sampled tokens stay on the device. Logprobs
    are copied to the host without a sync and collected by `take_logprobs`, one per sampled token in
    the order the tokens are read back."""

    def __init__(self, params: SamplingParams, prompt: list[int], stop_ids: set[int]):
        self.params = params
        self.prompt, self.stop_ids = prompt, sorted(stop_ids)
        self.sampled = 0  # tokens sampled so far (host count: no sync)
        self._counts = self._seen = None
        self._pending: deque = deque()

    # what sampling_key and the plain path read
    temperature = property(lambda self: self.params.temperature)
    top_k = property(lambda self: self.params.top_k)
    top_p = property(lambda self: self.params.top_p)

    def sample(self, logits: torch.Tensor, generator) -> torch.Tensor:
        p = self.params
        x = logits
        penalized = p.repetition_penalty != 1 or p.presence_penalty != 0 or p.frequency_penalty != 0
        if penalized:
            if self._counts is None:
                self._counts = torch.zeros(x.shape[-1], dtype=torch.int32, device=x.device)
                self._seen = torch.zeros(x.shape[-1], dtype=torch.bool, device=x.device)
                self._seen[torch.tensor(self.prompt, device=x.device).clamp(0, x.shape[-1] - 1)] = True
            if p.repetition_penalty != 1:
                seen = self._seen | (self._counts > 0)
                x = torch.where(seen, torch.where(x > 0, x / p.repetition_penalty, x * p.repetition_penalty), x)
            if p.presence_penalty != 0 or p.frequency_penalty != 0:
                c = self._counts.to(x.dtype)
                x = x - p.frequency_penalty * c - p.presence_penalty * (c > 0).to(x.dtype)
        if self.sampled < p.min_tokens and self.stop_ids:
            ban = torch.tensor([t for t in self.stop_ids if t < x.shape[-1]], device=x.device, dtype=torch.long)
            x = x.index_fill(-1, ban, float("-inf"))
        tok = _sample(x, p, generator)
        if penalized:
            self._counts.index_add_(0, tok, torch.ones_like(tok, dtype=torch.int32))
        self.sampled += 1
        if p.logprobs is not None:
            parts = logprobs_of(logits, tok, p.logprobs)
            self._pending.append((tok, *(_to_host(t) for t in parts)))
        return tok

    def take_logprobs(self) -> TokenLogprobs | None:
        """The logprobs of the oldest token read back (call once per token read, after its Tokens.get())."""
        if not self._pending:
            return None
        tok, *parts = self._pending.popleft()
        return to_token_logprobs([int(tok)], parts)[0]


def _to_host(t: torch.Tensor) -> torch.Tensor:
    if not t.is_cuda:
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return host.copy_(t, non_blocking=True)  # done when the step's Tokens event is


def sample(logits: torch.Tensor, params: SamplingParams | SequenceSampler | list,
           generator: torch.Generator | None | list[torch.Generator | None]) -> torch.Tensor:
    """logits [B, V] (float32) -> token ids [B]. `params` and `generator` apply to every row, or are
    lists with one per row (requests with their own settings sharing one decode step)."""
    if isinstance(params, list):
        return _sample_rows(logits, params, generator)
    if isinstance(params, SequenceSampler):
        return params.sample(logits, generator)
    return _sample(logits, params, generator)


def _sample(logits: torch.Tensor, params: SamplingParams, generator) -> torch.Tensor:
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.min_p > 0:
        probs = probs.masked_fill(probs < params.min_p * probs.amax(dim=-1, keepdim=True), 0.0)
    if params.top_p < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        cum = sorted_p.cumsum(dim=-1)
        mass = params.top_p * cum[..., -1:] if params.min_p > 0 else params.top_p  # of what min_p left
        drop = cum - sorted_p > mass  # keep the smallest prefix whose mass reaches top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p)
    # Exponential race (Gumbel-max equivalent): no host sync, unlike torch.multinomial.
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / noise).argmax(dim=-1)


def sampling_key(params: SamplingParams | SequenceSampler, generator) -> tuple:
    """Rows with equal keys sample alike: every greedy row; sampled rows with the same settings and
    generator. A SequenceSampler's row is always sampled alone."""
    if isinstance(params, SequenceSampler):
        return (1, id(params))
    if params.temperature == 0:
        return (0,)
    return (2, params.temperature, params.top_k, params.top_p, params.min_p, id(generator))


def _sample_rows(logits: torch.Tensor, params: list, generators: list) -> torch.Tensor:
    """Each run of consecutive rows that sample alike is sampled in one go (sort the rows by
    `sampling_key` for the fewest runs). A row with a generator of its own draws exactly what it
    would draw alone, whatever the other rows are."""
    keys = [sampling_key(p, g) for p, g in zip(params, generators)]
    parts, start = [], 0
    for i in range(1, len(keys) + 1):
        if i == len(keys) or keys[i] != keys[start]:
            parts.append(sample(logits[start:i], params[start], generators[start]))
            start = i
    return parts[0] if len(parts) == 1 else torch.cat(parts)
