"""Token sampling on the device: greedy, temperature, top-k, top-p. No host sync."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")


def sample(logits: torch.Tensor, params: SamplingParams | list[SamplingParams],
           generator: torch.Generator | None | list[torch.Generator | None]) -> torch.Tensor:
    """logits [B, V] (float32) -> token ids [B]. `params` and `generator` apply to every row, or are
    lists with one per row (requests with their own settings sharing one decode step)."""
    if isinstance(params, list):
        return _sample_rows(logits, params, generator)
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        cum = sorted_p.cumsum(dim=-1)
        drop = cum - sorted_p > params.top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p)
    # Exponential race (Gumbel-max equivalent): no host sync, unlike torch.multinomial.
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / noise).argmax(dim=-1)


def sampling_key(params: SamplingParams, generator) -> tuple:
    """Rows with equal keys sample alike: every greedy row; sampled rows with the same settings and generator."""
    if params.temperature == 0:
        return (0.0, 0, 1.0, 0)
    return (params.temperature, params.top_k, params.top_p, id(generator))


def _sample_rows(logits: torch.Tensor, params: list[SamplingParams], generators: list) -> torch.Tensor:
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
