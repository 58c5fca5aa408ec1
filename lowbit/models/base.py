"""What a model family declares, and the decoder-model skeleton the families share.

`Family` (one instance per family module, registered in lowbit/models/__init__.py) answers every
question the rest of lowbit asks about an architecture:
  parse_config     config.json -> its ModelConfig (every field that changes the numbers is applied
                   or refused with a ConfigError naming it)
  linear_slots     the projections (fused/split shards, expert stacks) resolve() and the loader fill
  expected_params  the plain parameters (embeddings, norms, ...) with their shapes
  sanitize         on-disk tensor name -> canonical name (VLM wrappers, `backbone.*`, ...)
  skip             on-disk tensors the family knowingly leaves unused, with the reason (Qwen3.5's MTP head
                   unless speculation is on)
  enable_mtp       turn the config's MTP head on (speculative decoding), or refuse naming why
  check_tp         which tensor-parallel sizes the model splits into
  param_shard      the slice of a plain parameter one tensor-parallel rank keeps
  build            the nn.Module (a `DecoderModel`)
The model it builds exposes `forward(ids, positions, ctx)`, `compute_logits`, `cache_specs` (what the
engine allocates per layer) and `attention_layers` (where FP8 KV-cache scales go), so the engine and
the loader never reach into its modules.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import parallel
from ..config import ModelConfig
from ..errors import ConfigError
from ..kernels import invariance
from ..layers.attention import Attention
from ..layers.context import CacheSpec, ForwardContext
from ..layers.norm import RMSNorm
from ..layers.rotary import RotaryEmbedding
from ..names import to_canonical
from .slots import LinearSlot

VOCAB_SHARDED = "model.embed_tokens.weight"  # split by vocabulary rows under tensor parallelism


class Family:
    name: str = ""
    architectures: tuple[str, ...] = ()
    model_types: dict[str, str] = {}  # model_type -> architecture

    def parse_config(self, text: dict, top: dict, arch: str, where: str) -> ModelConfig:
        raise NotImplementedError

    def linear_slots(self, cfg) -> list[LinearSlot]:
        raise NotImplementedError

    def expected_params(self, cfg) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    def sanitize(self, name: str) -> str:
        """An on-disk tensor name -> its canonical name."""
        return to_canonical(name)

    def skip(self, name: str, cfg=None) -> str | None:
        """Why the on-disk tensor `name` is present but unused by this engine, or None (it is used)."""
        return None

    def enable_mtp(self, cfg, where: str) -> None:
        """Build and load the checkpoint's MTP head (`--speculative mtp`); a LowbitError if it has none."""
        from ..errors import LowbitError

        raise LowbitError(f"{where}: --speculative mtp needs a multi-token-prediction head; the {self.name} family "
                          f"({cfg.architecture}) has none in lowbit (MTP drafting: Qwen3.5 / Qwen3.6)")

    def attention_layers(self, cfg) -> list[int]:
        """Indices of the layers with softmax attention (the ones that may carry KV-cache scales)."""
        return list(range(cfg.num_layers))

    def check_tp(self, cfg, tp: int) -> None:
        parallel.check(cfg, tp)

    def param_shard(self, cfg, name: str, tensor: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
        """This rank's part of the plain parameter `name` (canonical), given whole (its shape in
        `expected_params`): the loader and lowbit/synthetic.py write what this returns. The embedding
        is split by vocabulary rows (parallel.VocabParallelEmbedding); everything else is replicated
        unless a family splits it (heads of a linear-attention or Mamba2 layer)."""
        if tp > 1 and name == VOCAB_SHARDED:
            n = tensor.shape[0] // tp
            return tensor.narrow(0, rank * n, n)
        return tensor

    def build(self, cfg, linears: dict[str, nn.Module], dtype, tp_size: int = 1) -> nn.Module:
        raise NotImplementedError


def norm_params(cfg, names: tuple[str, ...], qk_norm: bool = False, layers=None) -> dict[str, tuple[int, ...]]:
    """Embedding, final norm, the per-layer norms `names` and optional q/k norms: name -> shape."""
    h = (cfg.hidden_size,)
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, cfg.hidden_size), "model.norm.weight": h}
    for i in range(cfg.num_layers) if layers is None else layers:
        for n in names:
            shapes[f"model.layers.{i}.{n}.weight"] = h
        if qk_norm:
            shapes[f"model.layers.{i}.self_attn.q_norm.weight"] = (cfg.head_dim,)
            shapes[f"model.layers.{i}.self_attn.k_norm.weight"] = (cfg.head_dim,)
    return shapes


class TextModel(nn.Module):
    """`model.embed_tokens`, `model.layers`, `model.norm`: parameter names equal the canonical names."""

    def __init__(self, cfg, layers: list[nn.Module], dtype, tp_size: int, unit_offset: bool = False):
        super().__init__()
        self.embed_tokens = parallel.VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, dtype, tp_size)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, unit_offset)


class DecoderModel(nn.Module):
    """embed -> layers -> norm -> head. Each layer is called as layer(x, residual, rope, ctx) and
    returns (its output, the residual stream before it): the residual adds are fused into the next
    norm. `rope` maps a rotary name to its (cos, sin), computed once per forward."""

    embed_scale: float | None = None  # Gemma: embeddings times sqrt(hidden), in the compute dtype
    final_logit_softcap: float | None = None
    unit_offset_norm = False

    def __init__(self, cfg, layers: list[nn.Module], linears: dict[str, nn.Module], dtype, tp_size: int,
                 rotary: dict[str, RotaryEmbedding]):
        super().__init__()
        self.config, self.tp_size = cfg, tp_size
        self.model = TextModel(cfg, layers, dtype, tp_size, self.unit_offset_norm)
        self.lm_head = None if cfg.tie_word_embeddings else linears["lm_head"]
        self.rotary = rotary

    @property
    def graph_safe(self) -> bool:
        """False when a decode step needs the host (rotary frequencies that depend on the length)."""
        return not any(r.length_dependent for r in self.rotary.values())

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext | None = None):
        """input_ids, positions [B, T] -> final hidden states [B, T, H] (after the norm)."""
        x = self.model.embed_tokens(input_ids)
        if self.embed_scale is not None:
            x = x * torch.tensor(self.embed_scale, dtype=x.dtype)
        rope = {name: r.cos_sin(positions, x.dtype) for name, r in self.rotary.items()}
        residual = None
        for layer in self.model.layers:
            x, residual = layer(x, residual, rope, ctx)
        return self.model.norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:
            logits = invariance.linear(hidden, self.model.embed_tokens.weight)
        else:
            logits = self.lm_head(hidden)
        if self.tp_size > 1:
            logits = parallel.all_gather_last(logits)
        if self.final_logit_softcap:
            logits = torch.tanh(logits / self.final_logit_softcap) * self.final_logit_softcap
        return logits

    def attention_layers(self) -> dict[int, Attention]:
        return {m.layer_idx: m for m in self.modules() if isinstance(m, Attention)}

    def cache_specs(self, dtype: torch.dtype) -> dict[int, CacheSpec]:
        """What every stateful layer keeps per sequence slot (the engine allocates it)."""
        specs = {}
        for m in self.modules():
            if m is not self and hasattr(m, "cache_spec") and hasattr(m, "layer_idx"):
                specs[m.layer_idx] = m.cache_spec(dtype)
        return specs


def refuse(where: str, field: str, value, why: str) -> ConfigError:
    return ConfigError(f"{where}: {field}={value!r} is not supported ({why})")
