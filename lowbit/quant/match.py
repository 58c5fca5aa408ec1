"""Which config entry decides a module's scheme (spec section 3, steps 1-4, with the lowbit rules).

Patterns: exact names, shell globs (ModelOpt; `*` crosses dots), `re:` regexes (compressed-tensors,
`re.match`, anchored at the start) and class names (`Linear`, never the LM head). An exact name or glob
also matches at a dot boundary (`lm_head` matches `language_model.lm_head`, `v_proj` matches
`...self_attn.v_proj`), never as a plain substring (`v_proj` does not match `qkv_proj`).
Every module is matched through all spellings of its name (names.candidates).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from functools import lru_cache

from ..names import candidates, to_canonical
from .config import QuantConfig
from .scheme import Scheme

GLOB_CHARS = "*?["


@dataclass(frozen=True)
class Decision:
    scheme: Scheme | None  # None: unquantized
    reason: str  # which config entry decided it, for messages
    rule: str = "default"  # exclude | quantized_layers | config_groups | default: which part of the config
    # The other accepted reading, if the config is ambiguous for this module: llm-compressor's
    # "Linear" target quantizes lm_head (an nn.Linear) where vLLM's and lowbit's reading leaves it
    # unquantized. The tensors pick between the two.
    alternative: Scheme | None = None
    alternative_reason: str = ""


@lru_cache(maxsize=4096)
def _regex(pattern: str) -> re.Pattern:
    return re.compile(pattern)


def is_class_target(pattern: str) -> bool:
    """compressed-tensors targets a module class by its name (`Linear`), never dotted or lower-case."""
    return not pattern.startswith("re:") and "." not in pattern and pattern[:1].isupper()


def is_exact(pattern: str) -> bool:
    return not pattern.startswith("re:") and not any(c in pattern for c in GLOB_CHARS) and not is_class_target(pattern)


def pattern_matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return _regex(pattern[3:]).match(name) is not None
    if any(c in pattern for c in GLOB_CHARS):
        return fnmatchcase(name, pattern) or fnmatchcase(name, "*." + pattern)
    return name == pattern or name.endswith("." + pattern)


def module_names(canonical: str, owner: str | None = None) -> list[str]:
    """Every spelling of a module, then of the fused module that owns it (a config entry for
    `...qkv_proj` applies to each of its shards)."""
    names = candidates(canonical)
    if owner and owner != canonical:
        names += candidates(owner)
    return names


def decide(qc: QuantConfig | None, canonical: str, owner: str | None = None) -> Decision:
    """The configured scheme of one on-disk module (canonical name; owner: its fused slot name)."""
    if qc is None:
        return Decision(None, "the checkpoint has no quantization config")
    names = module_names(canonical, owner)
    for pattern in qc.ignore:
        if any(pattern_matches(pattern, n) for n in names):
            return Decision(None, f"excluded by {qc.ignore_key} entry {pattern!r}", "exclude")
    if qc.quantized_layers is not None:
        for key in (canonical, owner):
            if key in qc.quantized_layers:
                return Decision(qc.quantized_layers[key], f"quantized_layers[{qc.quantized_layer_keys[key]!r}]",
                                "quantized_layers")
        return Decision(None, "not listed in quantized_layers (MIXED_PRECISION)", "quantized_layers")
    is_head = canonical == "lm_head"
    for group in qc.groups:
        for target in group.targets:
            hit = (not is_head) if is_class_target(target) and target == "Linear" else \
                not is_class_target(target) and any(pattern_matches(target, n) for n in names)
            if hit:
                return Decision(group.scheme, f"config_groups.{group.name} target {target!r}", "config_groups")
    if qc.groups:
        linear = next((g for g in qc.groups if "Linear" in g.targets), None)
        if is_head and linear is not None:
            return Decision(None, "no config_groups target names it ('Linear' does not cover lm_head)",
                            "config_groups", linear.scheme, f"config_groups.{linear.name} target 'Linear' as llm-compressor reads "
                                           f"it (lm_head is an nn.Linear there)")
        return Decision(None, "no config_groups target matches it", "config_groups")
    if qc.default is not None:
        return Decision(qc.default, f"global quant_algo {qc.algo}")
    return Decision(None, "the config quantizes no weights")


def config_entries(qc: QuantConfig) -> list[tuple[str, str]]:
    """(where, pattern) for every module name or pattern the config writes."""
    out = [(qc.ignore_key, p) for p in qc.ignore]
    out += [("quantized_layers", k) for k in qc.quantized_layer_keys.values()]
    out += [(f"config_groups.{g.name}.targets", t) for g in qc.groups for t in g.targets if not is_class_target(t)]
    return out


def unmatched_entries(qc: QuantConfig, known_modules: set[str], canonical=to_canonical) -> list[tuple[str, str]]:
    """Config entries that match no module of the checkpoint (known_modules: canonical names;
    canonical: the family's name mapping, Family.sanitize)."""
    spellings = [n for m in known_modules for n in candidates(m)]
    out = []
    for where, pattern in config_entries(qc):
        if is_exact(pattern) and canonical(pattern) in known_modules:
            continue
        if not any(pattern_matches(pattern, n) for n in spellings):
            out.append((where, pattern))
    return out
