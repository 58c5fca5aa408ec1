"""Rotary position embeddings: default, linear, dynamic (NTK), llama3, yarn and longrope (Phi-3).

Frequencies follow transformers' definitions so logits match it; cos/sin are computed in float32
and cast to the activation dtype before use, as transformers does.
"""
from __future__ import annotations

import math

import torch

from ..errors import ConfigError
from ..kernels.decoder import apply_rotary  # noqa: F401  (the reference every rotary path matches)

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")


def _base_inv_freq(theta: float, dim: int, device=None) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))


class RotaryEmbedding:
    """cos/sin tables of one rotary variant. head_dim * partial_rotary_factor dimensions rotate;
    scaling: None (default) or the normalized rope parameters {"rope_type", "factor", ...}."""

    def __init__(self, head_dim: int, theta: float, scaling: dict | None, max_position_embeddings: int,
                 partial_rotary_factor: float = 1.0, device=None):
        self.dim = int(head_dim * partial_rotary_factor)
        self.theta = theta
        self.max_pos = max_position_embeddings
        p = dict(scaling or {})
        self.type = p.get("rope_type", "default")
        if self.type not in ROPE_TYPES:
            raise ConfigError(f"unsupported rope type {self.type!r}; supported: {', '.join(ROPE_TYPES)}")
        self.params = p
        self.orig_max = int(p.get("original_max_position_embeddings") or self.max_pos)
        self.attention_factor = 1.0
        self.inv_freq = self._inv_freq(None, device)

    def _inv_freq(self, seq_len: int | None, device) -> torch.Tensor:
        p, dim, theta = self.params, self.dim, self.theta
        inv = _base_inv_freq(theta, dim, device)
        if self.type == "default":
            return inv
        if self.type == "linear":
            return inv / float(p["factor"])
        if self.type == "dynamic":
            factor = float(p["factor"])
            seq_len = max(seq_len or self.max_pos, self.max_pos)
            base = theta * ((factor * seq_len / self.max_pos) - (factor - 1)) ** (dim / (dim - 2))
            return _base_inv_freq(base, dim, device)
        if self.type == "llama3":
            factor, lo, hi = float(p["factor"]), float(p["low_freq_factor"]), float(p["high_freq_factor"])
            old = float(p["original_max_position_embeddings"])
            wavelen = 2 * math.pi / inv
            scaled = torch.where(wavelen > old / lo, inv / factor, inv)
            smooth = (old / wavelen - lo) / (hi - lo)
            smoothed = (1 - smooth) * scaled / factor + smooth * scaled
            medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
            return torch.where(medium, smoothed, scaled)
        if self.type == "yarn":
            return self._yarn(device)
        if self.type == "longrope":
            factor = p.get("factor") or self.max_pos / self.orig_max
            af = p.get("attention_factor")
            if af is None:
                af = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(self.orig_max))
            self.attention_factor = float(af)
            long = seq_len is not None and seq_len > self.orig_max
            ext = torch.tensor(p["long_factor"] if long else p["short_factor"], dtype=torch.float32, device=device)
            return 1.0 / (ext * theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
        raise AssertionError(self.type)

    def _yarn(self, device) -> torch.Tensor:
        p, dim, theta = self.params, self.dim, self.theta
        factor = p.get("factor") or self.max_pos / self.orig_max

        def mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        af = p.get("attention_factor")
        if af is None:
            ms, msa = p.get("mscale"), p.get("mscale_all_dim")
            af = mscale(factor, ms) / mscale(factor, msa) if ms and msa else mscale(factor)
        self.attention_factor = float(af)
        beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

        def corr_dim(rot):
            return (dim * math.log(self.orig_max / (rot * 2 * math.pi))) / (2 * math.log(theta))

        low, high = corr_dim(beta_fast), corr_dim(beta_slow)
        if p.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
        extrap = 1 - ramp
        pos_freqs = theta ** (torch.arange(0, dim, 2, device=device).float() / dim)
        return (1.0 / (factor * pos_freqs)) * (1 - extrap) + (1.0 / pos_freqs) * extrap

    @classmethod
    def from_config(cls, cfg, device=None) -> "RotaryEmbedding":
        return cls(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings,
                   cfg.partial_rotary_factor, device)

    @property
    def length_dependent(self) -> bool:
        """Frequencies that depend on the sequence length (read on the host each step: no CUDA graphs)."""
        return self.type in ("dynamic", "longrope")

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] (int) -> cos, sin [B, T, dim] in `dtype`."""
        inv = self.inv_freq
        if self.type in ("dynamic", "longrope"):
            seq_len = int(positions.max()) + 1
            if self.type == "dynamic" and seq_len > self.max_pos or self.type == "longrope":
                inv = self._inv_freq(seq_len, positions.device)
        inv = inv.to(positions.device)
        freqs = positions.float()[..., None] * inv
        emb = torch.cat([freqs, freqs], dim=-1)
        return (emb.cos() * self.attention_factor).to(dtype), (emb.sin() * self.attention_factor).to(dtype)

