"""Which scheme do a module's tensors hold? (formats.py read backwards)

Used when the config and the tensors disagree: to name what the file holds in the error, and to
resolve from the tensors under --trust-tensors. A scheme fits when every tensor it needs is present
with the right dtype and shape and no tensor is left over; ambiguous cases (activation settings leave
no trace for dynamic schemes) prefer the schemes the config uses elsewhere, then common presets.
"""
from __future__ import annotations

from dataclasses import replace
from functools import lru_cache
from math import ceil

from .config import modelopt_scheme
from .formats import expected_tensors, mismatches
from .scheme import ST_FLOAT_NAMES, Scheme, unquantized

CT = "compressed-tensors"


@lru_cache(maxsize=1)
def _fixed_catalog() -> tuple[Scheme, ...]:
    """Schemes whose tensor shapes do not depend on a free parameter, most common first."""
    out = [modelopt_scheme(a) for a in ("NVFP4", "W4A16_NVFP4", "FP8", "FP8_PER_CHANNEL_PER_TOKEN", "FP8_PB_WO",
                                        "MXFP8")]
    nvfp4 = Scheme(weight="nvfp4", granularity="group", group_size=16, fmt=CT)
    out += [Scheme(weight="nvfp4", granularity="group", group_size=16, activation="nvfp4", act_granularity="group",
                   fmt=CT), nvfp4]
    for weight, act in (("fp8", "fp8"), ("int8", "int8")):
        grans = [("channel", None), ("tensor", None)] + ([("block", (128, 128))] if weight == "fp8" else [])
        for gran, block in grans:
            base = Scheme(weight=weight, granularity=gran, block=block, fmt=CT)
            out += [Scheme(weight=weight, granularity=gran, block=block, activation=act, act_dynamic=True,
                           act_granularity="token", fmt=CT),
                    Scheme(weight=weight, granularity=gran, block=block, activation=act, act_granularity="tensor",
                           fmt=CT),
                    base]
    return tuple(out)


def _packed_candidates(infos: dict, k: int) -> list[Scheme]:
    """compressed-tensors pack-quantized ints: bits and group size read off the shapes."""
    packed, scale = infos.get("weight_packed"), infos.get("weight_scale")
    if packed is None or scale is None or packed.dtype != "I32" or len(packed.shape) != 2 or len(scale.shape) != 2:
        return []
    bits = next((b for b in (4, 8) if packed.shape[1] == ceil(k * b / 32)), None)
    if bits is None:
        return []
    groups = scale.shape[1]
    if groups == 1:
        gran = dict(granularity="channel")
    else:
        size = ceil(k / groups)
        if ceil(k / size) != groups:
            return []
        gran = dict(granularity="group", group_size=size)
    return [Scheme(weight=f"int{bits}", packed=True, symmetric="weight_zero_point" not in infos, fmt=CT, **gran)]


def _with_zero_points(s: Scheme, infos: dict) -> Scheme:
    """compressed-tensors int schemes: zero points on disk mean asymmetric."""
    if s.fmt != CT or s.weight != "int8":
        return s
    return replace(s, symmetric="weight_zero_point" not in infos,
                   act_symmetric=s.activation == "none" or s.act_dynamic or "input_zero_point" not in infos)


def infer_scheme(infos: dict, n: int, k: int, bias: bool, preferred: list[Scheme]) -> Scheme | None:
    """The scheme the tensors (role -> TensorInfo) of one [n, k] module hold, or None if none fits."""
    w = infos.get("weight")
    if w is not None and w.dtype in ST_FLOAT_NAMES and set(infos) <= {"weight", "bias"}:
        plain = unquantized(ST_FLOAT_NAMES[w.dtype])
        return plain if not mismatches("", expected_tensors(plain, n, k, bias), infos) else None
    tried = list(preferred) + _packed_candidates(infos, k) + [_with_zero_points(s, infos) for s in _fixed_catalog()]
    best, best_key = None, None
    for i, s in enumerate(dict.fromkeys(tried)):
        if not s.quantized:
            continue
        try:
            expected = expected_tensors(s, n, k, bias)
        except ValueError:
            continue
        if mismatches("", expected, infos):
            continue
        strays = sum(1 for role in infos if expected[role].optional)
        key = (strays, i)  # a scheme that uses every tensor beats one that tolerates strays
        if best_key is None or key < best_key:
            best, best_key = s, key
    return best
