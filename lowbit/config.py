"""The text model's architecture config, read from config.json in transformers 4 and 5 spellings."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config_checks import check_raw, check_rope
from .errors import ConfigError

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "llama",
    "Qwen3ForCausalLM": "llama",
    "Phi3ForCausalLM": "phi3",
}
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "qwen3": "Qwen3ForCausalLM", "phi3": "Phi3ForCausalLM"}
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
    family: str  # which file in lowbit/models builds it
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


def parse_model_config(config: dict, where: str = "config.json") -> ModelConfig:
    """config: the full config.json dict (a VLM's `text_config` is used for the text model)."""
    top = config
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    arch = None
    for a in top.get("architectures") or []:
        if a in SUPPORTED_ARCHITECTURES:
            arch = a
    if arch is None:
        arch = MODEL_TYPES.get(text.get("model_type", ""))
    if arch is None:
        names = top.get("architectures") or [top.get("model_type")]
        raise ConfigError(
            f"{where}: unsupported architecture {', '.join(map(str, names))}; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    check_raw(text, where)
    try:
        hidden = int(_req(text, "hidden_size", where))
        heads = int(_req(text, "num_attention_heads", where))
        kv_heads = int(text.get("num_key_value_heads") or heads)
        head_dim = int(text.get("head_dim") or hidden // heads)
        # transformers 5: rope_parameters {rope_theta, rope_type, ...}; 4: rope_theta + rope_scaling
        rope_params = text.get("rope_parameters")
        if isinstance(rope_params, dict) and "full_attention" in rope_params:
            rope_params = rope_params["full_attention"]
        theta = text.get("rope_theta")
        scaling = text.get("rope_scaling")
        if isinstance(rope_params, dict):
            theta = rope_params.get("rope_theta", theta)
            scaling = dict(rope_params)
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
        eos = text.get("eos_token_id", top.get("eos_token_id"))
        eos_ids = [int(e) for e in (eos if isinstance(eos, list) else [eos] if eos is not None else [])]
        dtype = parse_dtype(text.get("dtype") or text.get("torch_dtype") or top.get("dtype")
                            or top.get("torch_dtype") or "bfloat16")
        model_type = text.get("model_type", "")
        cfg = ModelConfig(
            architecture=arch,
            family=SUPPORTED_ARCHITECTURES[arch],
            hidden_size=hidden,
            intermediate_size=int(_req(text, "intermediate_size", where)),
            num_layers=int(_req(text, "num_hidden_layers", where)),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            vocab_size=int(_req(text, "vocab_size", where)),
            rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(text.get("max_position_embeddings", 4096)),
            rope_theta=float(theta if theta is not None else 10000.0),
            rope_scaling=scaling,
            partial_rotary_factor=float(text.get("partial_rotary_factor", 1.0) or 1.0),
            tie_word_embeddings=bool(text.get("tie_word_embeddings", top.get("tie_word_embeddings", False))),
            attention_bias=bool(text.get("attention_bias", arch == "Qwen2ForCausalLM" or model_type == "qwen2")),
            mlp_bias=bool(text.get("mlp_bias", False)),
            qk_norm=arch == "Qwen3ForCausalLM",
            hidden_act=str(text.get("hidden_act", "silu")),
            dtype=dtype,
            bos_token_id=text.get("bos_token_id", top.get("bos_token_id")),
            eos_token_ids=eos_ids,
            sliding_window=text.get("sliding_window") if text.get("use_sliding_window", True) else None,
        )
    except (TypeError, ValueError, ArithmeticError) as e:
        raise ConfigError(f"{where}: malformed value ({e})") from None
    check_rope(cfg.rope_scaling, cfg.head_dim, cfg.partial_rotary_factor, where)
    return cfg
