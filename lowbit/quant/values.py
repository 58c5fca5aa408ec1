"""Value checks of the small tensors that say how to read the big ones (issue 16).

A scale that is NaN, infinite, zero or negative, or a `weight_shape` that records another shape, passes
every dtype/shape cross-check and then gives NaN or quietly wrong logits. resolve() calls
`check_values` once, so `lowbit inspect` and the loader (which refuses every problem of the plan) see
the same verdict. Only scale-like tensors are read (per-tensor scales, block/group/channel scales,
`weight_shape`, KV-cache scales): weights never are.

Rules: a per-tensor scale (one value: weight_scale_2, global scales, input scales, per-tensor weight
scales, KV-cache scales) must be finite and > 0; a multi-value scale (per channel, group or block) must
be finite and >= 0 (a producer writes 0 for an all-zero block or row); `weight_shape` must equal the
module's [rows, in_features]; a KV-cache scale must be one value.
"""
from __future__ import annotations

import torch

from ..checkpoint import ST_DTYPES, Checkpoint, TensorInfo

SCALE_ROLES = ("weight_scale", "weight_scale_2", "weight_global_scale", "input_scale", "input_global_scale")
FIX = "the export is corrupt: re-export or re-download the checkpoint"


def _float_dtype(info: TensorInfo) -> bool:
    t = ST_DTYPES.get(info.dtype)
    return t is not None and t.is_floating_point


def scale_problem(ckpt: Checkpoint, info: TensorInfo, what: str) -> str | None:
    """What is wrong with the values of one scale tensor (read from disk), or None."""
    if not _float_dtype(info) or info.numel == 0:
        return None  # a dtype the cross-check already refuses
    t = ckpt.read(info.name).reshape(-1)
    where = f"{what} {info.name} ({info.file})"
    if t.numel() == 1:
        x = float(t.float()[0])
        if not (x > 0 and x != float("inf")):
            return f"{where} is {x}; a per-tensor scale must be finite and > 0: {FIX}"
        return None
    if not _any_bad(t):
        return None
    v = t.float()
    bad = ~v.isfinite() | (v < 0)
    i = int(bad.nonzero()[0])
    return (f"{where}: {int(bad.sum())} of {v.numel()} values are NaN, infinite or negative (the first, at flat "
            f"index {i}, is {float(v[i])}); scales must be finite and >= 0: {FIX}")


# E4M3 bytes that are NaN (0x7F, 0xFF) or negative and non-zero (0x81-0xFE): an FP8 block scale must not hold them
_FP8_BAD = torch.zeros(256, dtype=torch.bool)
_FP8_BAD[0x81:] = True
_FP8_BAD[0x7F] = True
CHUNK = 1 << 24  # elements per pass when converting to float (bounded memory on large block scales)


def _any_bad(t: torch.Tensor) -> bool:
    """Whether a multi-value scale holds NaN, inf or a negative value. FP8 block scales, the largest scale
    tensors (1/8 of an NVFP4 model's bytes), are checked on their bytes without converting them."""
    if t.dtype == torch.float8_e4m3fn:
        b = t.view(torch.uint8)
        top = int(b.max())  # one vectorized pass: finite positive E4M3 bytes are 0x00-0x7E
        if top <= 0x7E:
            return False
        return bool(torch.bincount(b, minlength=256)[_FP8_BAD].any())  # rare: -0.0 (0x80) present, or a bad byte
    for start in range(0, t.numel(), CHUNK):
        v = t[start:start + CHUNK].float()
        if not bool(v.isfinite().all()) or bool((v < 0).any()):
            return True
    return False


def check_values(ckpt: Checkpoint, plan) -> list[tuple[str, str]]:
    """(layer, message) for every scale of the plan whose values cannot be right."""
    out: list[tuple[str, str]] = []
    slots = {s.fused_name: s for s in plan.slots}
    for lp in plan.layers.values():
        for role, name in lp.tensors.items():
            info = ckpt.tensors[name]
            if role in SCALE_ROLES:
                bad = scale_problem(ckpt, info, role)
            elif role == "weight_shape":
                slot = slots[lp.slot]
                rows = slot.out_features if lp.shard is None else slot.shard_sizes[lp.shard]
                bad = _shape_problem(ckpt, info, [rows, slot.in_features])
            else:
                continue
            if bad:
                out.append((lp.name, bad))
    if plan.kv_cache == "fp8":
        for key, name in sorted(plan.kv_scales.items()):
            info = ckpt.tensors[name]
            if info.numel != 1 or not _float_dtype(info):
                heads = " (one per KV head: per-head KV-cache scales are not supported)" \
                    if info.numel == plan.model.num_kv_heads else ""
                out.append((key, f"KV-cache scale {name} ({info.file}) is {info.dtype} {list(info.shape)}{heads}; "
                                 f"lowbit needs one float value ([] or [1]) per layer for K and for V: re-export "
                                 f"with per-tensor KV-cache scales, or load with kv_cache='bf16' after removing "
                                 f"kv_cache_quant_algo / kv_cache_scheme from the config"))
                continue
            bad = scale_problem(ckpt, info, "KV-cache scale")
            if bad:
                out.append((key, bad))
    return out


def _shape_problem(ckpt: Checkpoint, info: TensorInfo, expected: list[int]) -> str | None:
    if info.dtype not in ("I64", "I32") or info.numel != 2:
        return None  # the cross-check reports the dtype/shape
    found = [int(x) for x in ckpt.read(info.name).reshape(-1).tolist()]
    if found != expected:
        return (f"weight_shape {info.name} ({info.file}) records the unpacked weight as {found}, but this module "
                f"is {expected}: the checkpoint was packed for another shape (fix config.json if it describes a "
                f"different model) or the export is corrupt (re-export it)")
    return None
