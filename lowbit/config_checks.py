"""Checks of config.json values that parsing alone lets through (issue 16): sizes that must be positive
integers, head counts that must divide, rope scaling parameters each rope type needs, fields that must
be objects. Each failure is a ConfigError naming the field and what it must be.

`check_raw` runs on the text model's raw dict before parsing (so a zero head count is reported, not
divided by); `check_rope` on the parsed config. lowbit/config.py calls both.
"""
from __future__ import annotations

from .errors import ConfigError

POSITIVE = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
POSITIVE_IF_SET = ("num_key_value_heads", "head_dim", "max_position_embeddings")
OBJECTS = ("rope_scaling", "rope_parameters", "quantization_config")
# rope_type -> parameters lowbit.models.rope reads without a default
ROPE_REQUIRED = {
    "default": (), "linear": ("factor",), "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": (), "longrope": ("long_factor", "short_factor"),
}


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_raw(text: dict, where: str) -> None:
    """The text model's config dict (a VLM's text_config, else config.json itself)."""
    for key in POSITIVE + POSITIVE_IF_SET:
        v = text.get(key)
        if v is None and key in POSITIVE_IF_SET:
            continue
        if v is None:
            continue  # a missing required key is reported by the parser
        if type(v) is not int or v <= 0:
            raise ConfigError(f"{where}: {key} must be a positive integer, found {v!r}; fix config.json")
    heads, kv = text.get("num_attention_heads"), text.get("num_key_value_heads")
    if heads and kv and heads % kv:
        raise ConfigError(f"{where}: num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv}); "
                          f"fix config.json")
    hidden = text.get("hidden_size")
    if heads and hidden and text.get("head_dim") is None and hidden % heads:
        raise ConfigError(f"{where}: hidden_size ({hidden}) is not a multiple of num_attention_heads ({heads}) and "
                          f"no head_dim is given; fix config.json")
    for key in ("rms_norm_eps", "rope_theta"):
        v = text.get(key)
        if v is not None and (not _number(v) or not v > 0 or v == float("inf")):
            raise ConfigError(f"{where}: {key} must be a positive number, found {v!r}; fix config.json")
    for key in OBJECTS:
        v = text.get(key)
        if v is not None and not isinstance(v, dict):
            raise ConfigError(f"{where}: {key} must be a JSON object or null, found {type(v).__name__} {v!r:.60}; "
                              f"fix config.json")
    eos = text.get("eos_token_id")
    if eos is not None and not (type(eos) is int or isinstance(eos, list) and all(type(e) is int for e in eos)):
        raise ConfigError(f"{where}: eos_token_id must be a token id or a list of ids, found {eos!r}; fix config.json")


def check_rope(scaling: dict | None, head_dim: int, partial_rotary_factor: float, where: str) -> None:
    """The normalized rope scaling dict ({"rope_type": ..., params}) of a parsed config."""
    if not scaling:
        return
    field = f"{where}: rope_scaling / rope_parameters"
    rtype = scaling.get("rope_type")
    if rtype not in ROPE_REQUIRED:
        raise ConfigError(f"{field}: unsupported rope_type {rtype!r}; supported: {', '.join(ROPE_REQUIRED)}")
    absent = [k for k in ROPE_REQUIRED[rtype] if scaling.get(k) is None]
    if absent:
        raise ConfigError(f"{field}: rope_type {rtype!r} needs {', '.join(absent)}, which "
                          f"{'is' if len(absent) == 1 else 'are'} missing; fix config.json")
    for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings",
              "attention_factor", "beta_fast", "beta_slow"):
        v = scaling.get(k)
        if v is not None and (not _number(v) or not v > 0):
            raise ConfigError(f"{field}: {k} must be a positive number, found {v!r}; fix config.json")
    if rtype == "llama3" and scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise ConfigError(f"{field}: high_freq_factor ({scaling['high_freq_factor']}) must be larger than "
                          f"low_freq_factor ({scaling['low_freq_factor']}); fix config.json")
    if rtype == "longrope":
        half = int(head_dim * partial_rotary_factor) // 2
        for k in ("long_factor", "short_factor"):
            v = scaling[k]
            if not (isinstance(v, list) and len(v) == half and all(_number(x) and x > 0 for x in v)):
                raise ConfigError(f"{field}: {k} must be a list of {half} positive numbers (one per rotary "
                                  f"frequency), found {v!r:.60}; fix config.json")
