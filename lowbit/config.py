"""The text model's config: what every family shares, read from config.json in transformers 4 and 5
spellings. Which family reads a config (and its own fields) is decided by the registry in
lowbit/models/__init__.py; a family's module parses the rest (`Family.parse_config`)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config_checks import check_raw, check_rope
from .errors import ConfigError

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
          "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "half": torch.float16,
          "float": torch.float32}


def parse_dtype(name) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    key = str(name).replace("torch.", "")
    if key not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; use one of bfloat16, float16, float32")
    return DTYPES[key]


@dataclass
class ModelConfig:
    architecture: str
    family: str  # the registry name of the family module that builds it (lowbit/models)
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope_theta: float
    rope_scaling: dict | None  # normalized: {"rope_type": ..., factor, ...} or None for default
    partial_rotary_factor: float = 1.0
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: q/k/v bias
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3
    hidden_act: str = "silu"
    dtype: torch.dtype = torch.bfloat16
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    sliding_window: int | None = None
    # per layer: "full_attention" | "sliding_attention" | a family's own kinds ("linear_attention", "mamba", ...)
    layer_types: list[str] = field(default_factory=list)

    def window(self, layer: int) -> int | None:
        """The sliding window of an attention layer (None: full attention)."""
        kind = self.layer_types[layer] if self.layer_types else "full_attention"
        return self.sliding_window if kind == "sliding_attention" else None

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


def _req(cfg: dict, key: str, where: str):
    if key not in cfg:
        raise ConfigError(f"{where}: missing required key {key!r}; fix config.json (copy it from the original model)")
    return cfg[key]


def text_config(config: dict) -> dict:
    """The text model's part of config.json (a VLM's `text_config`, else the whole dict)."""
    return config.get("text_config") if isinstance(config.get("text_config"), dict) else config


def parse_model_config(config: dict, where: str = "config.json") -> ModelConfig:
    """config: the full config.json dict. The registry picks the family, which parses its fields."""
    from .models import family_for

    fam, arch = family_for(config, where)
    text = text_config(config)
    check_raw(text, where)
    try:
        cfg = fam.parse_config(text, config, arch, where)
    except (TypeError, ValueError, KeyError, ArithmeticError) as e:
        raise ConfigError(f"{where}: malformed value ({e})") from None
    check_rope(cfg.rope_scaling, cfg.head_dim, cfg.partial_rotary_factor, where)
    return cfg


def normalize_rope(params, theta, scaling, where: str) -> tuple[float, dict | None]:
    """transformers 5 `rope_parameters` {rope_theta, rope_type, ...} or 4's rope_theta + rope_scaling
    -> (theta, normalized scaling or None for the default rotary)."""
    if isinstance(params, dict):
        theta = params.get("rope_theta", theta)
        scaling = dict(params)
    if isinstance(scaling, dict):
        scaling = dict(scaling)
        rtype = scaling.get("rope_type", scaling.get("type", "default"))
        scaling["rope_type"] = rtype
        scaling.pop("type", None)
        scaling.pop("rope_theta", None)
        if rtype == "default":
            scaling = None
    elif scaling is not None:
        raise ConfigError(f"{where}: rope_scaling must be an object, got {scaling!r}")
    return float(theta if theta is not None else 10000.0), scaling


def common_fields(text: dict, top: dict, arch: str, family: str, where: str) -> dict:
    """The fields every attention family reads, as ModelConfig keyword arguments."""
    hidden = int(_req(text, "hidden_size", where))
    heads = int(_req(text, "num_attention_heads", where))
    kv_heads = int(text.get("num_key_value_heads") or heads)
    head_dim = int(text.get("head_dim") or hidden // heads)
    rope_params = text.get("rope_parameters")
    if isinstance(rope_params, dict) and "full_attention" in rope_params:
        rope_params = rope_params["full_attention"]
    theta, scaling = normalize_rope(rope_params, text.get("rope_theta"), text.get("rope_scaling"), where)
    eos = text.get("eos_token_id", top.get("eos_token_id"))
    eos_ids = [int(e) for e in (eos if isinstance(eos, list) else [eos] if eos is not None else [])]
    dtype = parse_dtype(text.get("dtype") or text.get("torch_dtype") or top.get("dtype")
                        or top.get("torch_dtype") or "bfloat16")
    return dict(
        architecture=arch,
        family=family,
        hidden_size=hidden,
        intermediate_size=int(text.get("intermediate_size") or 0),
        num_layers=int(_req(text, "num_hidden_layers", where)),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=int(_req(text, "vocab_size", where)),
        rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(text.get("max_position_embeddings", 4096)),
        rope_theta=theta,
        rope_scaling=scaling,
        partial_rotary_factor=float(text.get("partial_rotary_factor", 1.0) or 1.0),
        tie_word_embeddings=bool(text.get("tie_word_embeddings", top.get("tie_word_embeddings", False))),
        attention_bias=bool(text.get("attention_bias", False)),
        mlp_bias=bool(text.get("mlp_bias", False)),
        dtype=dtype,
        bos_token_id=text.get("bos_token_id", top.get("bos_token_id")),
        eos_token_ids=eos_ids,
    )
