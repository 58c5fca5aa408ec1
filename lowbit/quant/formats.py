"""THE table of which tensors a Linear-like module of a given Scheme holds on disk (spec section 2).

`expected_tensors` is used by the cross-check in resolve(), by `lowbit inspect`, and by the scheme
units (`LinearMethod.disk_tensors`). `check_tensor` compares one on-disk tensor with its spec.
Roles are the on-disk leaf names (`weight`, `weight_scale`, `weight_packed`, ...).
"""
from __future__ import annotations

from math import ceil

from .base import TensorSpec
from .scheme import Scheme

FLOAT = "float"  # any of BF16 / F16 / F32 (unquantized weights, CT scales)
FLOAT_DTYPES = ("BF16", "F16", "F32")
FP8 = "F8_E4M3"
SCALAR = None  # per-tensor scale: 0-d (ModelOpt) or [1] (compressed-tensors), accepted both ways

NVFP4_BLOCK = 16
MXFP8_BLOCK = 32


def expected_tensors(scheme: Scheme, out_features: int, in_features: int, bias: bool) -> dict[str, TensorSpec]:
    """role -> TensorSpec for one on-disk module of shape [out_features, in_features]."""
    n, k = out_features, in_features
    if not scheme.quantized:
        tensors = {"weight": TensorSpec(FLOAT, (n, k))}
    elif scheme.fmt == "modelopt":
        tensors = _modelopt(scheme, n, k)
    elif scheme.fmt == "compressed-tensors":
        tensors = _compressed_tensors(scheme, n, k)
    else:
        raise ValueError(f"quantized scheme {scheme.label()} has no on-disk format (fmt={scheme.fmt!r})")
    if bias:
        tensors["bias"] = TensorSpec(FLOAT, (n,))
    return tensors


def _unsupported(scheme: Scheme) -> ValueError:
    return ValueError(f"no on-disk layout for {scheme.label()} in format {scheme.fmt}")


def _stray_input_scale(role: str) -> TensorSpec:
    # Some weight-only exports still carry the calibrated activation scale; it is unused.
    return TensorSpec("F32", SCALAR, optional=True, note=f"stray {role} on a weight-only scheme: ignored")


def _modelopt(s: Scheme, n: int, k: int) -> dict[str, TensorSpec]:
    if s.weight == "fp8":
        t = {"weight": TensorSpec(FP8, (n, k))}
        if s.granularity == "tensor":
            t["weight_scale"] = TensorSpec("F32", SCALAR)
        elif s.granularity == "channel":
            t["weight_scale"] = TensorSpec("F32", (n,))
        elif s.granularity == "block" and s.block:
            r, c = s.block
            t["weight_scale"] = TensorSpec("F32", (ceil(n / r), 1, ceil(k / c), 1))
        else:
            raise _unsupported(s)
        if s.activation == "fp8" and not s.act_dynamic:
            t["input_scale"] = TensorSpec("F32", SCALAR)
        return t
    if s.weight == "nvfp4":
        t = {
            "weight": TensorSpec("U8", (n, ceil(k / 2))),
            "weight_scale": TensorSpec(FP8, (n, ceil(k / NVFP4_BLOCK))),
            "weight_scale_2": TensorSpec("F32", SCALAR),
        }
        t["input_scale"] = TensorSpec("F32", SCALAR) if s.activation == "nvfp4" else _stray_input_scale("input_scale")
        return t
    if s.weight == "mxfp8":
        # E8M0 block exponents stored as bytes, one per 32 elements along K; activations are dynamic.
        return {"weight": TensorSpec(FP8, (n, k)), "weight_scale": TensorSpec("U8", (n, ceil(k / MXFP8_BLOCK)))}
    raise _unsupported(s)


def _ct_scale_shape(s: Scheme, n: int, k: int) -> tuple[int, ...] | None:
    """Shape of a compressed-tensors weight_scale / weight_zero_point (before zp packing)."""
    if s.granularity == "tensor":
        return SCALAR
    if s.granularity == "channel":
        return (n, 1)
    if s.granularity == "group" and s.group_size:
        return (n, ceil(k / s.group_size))
    if s.granularity == "block" and s.block:
        return (ceil(n / s.block[0]), ceil(k / s.block[1]))
    raise _unsupported(s)


def _ct_activation(s: Scheme) -> dict[str, TensorSpec]:
    """Static activation scales (dynamic ones are computed at run time and store nothing)."""
    if s.activation == "none" or s.act_dynamic:
        return {}
    t = {"input_scale": TensorSpec(FLOAT, SCALAR)}
    if not s.act_symmetric:
        t["input_zero_point"] = TensorSpec("I8", SCALAR)
    return t


def _compressed_tensors(s: Scheme, n: int, k: int) -> dict[str, TensorSpec]:
    if s.weight == "nvfp4":
        t = {
            "weight_packed": TensorSpec("U8", (n, ceil(k / 2))),
            "weight_scale": TensorSpec(FP8, (n, ceil(k / NVFP4_BLOCK))),
            "weight_global_scale": TensorSpec("F32", SCALAR),
        }
        t["input_global_scale"] = (TensorSpec("F32", SCALAR) if s.activation == "nvfp4"
                                   else _stray_input_scale("input_global_scale"))
        return t
    if s.weight in ("int4", "int8") and s.packed:
        bits = 4 if s.weight == "int4" else 8
        scale = _ct_scale_shape(s, n, k)
        t = {
            "weight_packed": TensorSpec("I32", (n, ceil(k * bits / 32))),
            "weight_scale": TensorSpec(FLOAT, scale),
            "weight_shape": TensorSpec("I64", (2,)),
        }
        if not s.symmetric:
            # zero points are packed into int32 words along N (the first dimension)
            zp = (ceil(n * bits / 32), scale[1]) if scale else SCALAR
            t["weight_zero_point"] = TensorSpec("I32", zp)
        return t | _ct_activation(s)
    if s.weight in ("int8", "fp8"):
        scale = _ct_scale_shape(s, n, k)
        t = {"weight": TensorSpec("I8" if s.weight == "int8" else FP8, (n, k)), "weight_scale": TensorSpec(FLOAT, scale)}
        if not s.symmetric:
            t["weight_zero_point"] = TensorSpec("I8", scale)
        return t | _ct_activation(s)
    raise _unsupported(s)


def fmt_shape(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def describe(spec: TensorSpec) -> str:
    dtype = "BF16/F16/F32" if spec.dtype == FLOAT else spec.dtype
    shape = "[] or [1]" if spec.shape is None else fmt_shape(spec.shape)
    return f"{dtype} {shape}"


def check_tensor(spec: TensorSpec, dtype: str, shape: tuple[int, ...]) -> str | None:
    """None when an on-disk tensor (safetensors dtype, shape) fits `spec`, else what is wrong."""
    dtype_ok = dtype in FLOAT_DTYPES if spec.dtype == FLOAT else dtype == spec.dtype
    shape_ok = tuple(shape) in ((), (1,)) if spec.shape is None else tuple(shape) == tuple(spec.shape)
    if dtype_ok and shape_ok:
        return None
    return f"expected {describe(spec)}, found {dtype} {fmt_shape(shape)}"


def mismatches(module: str, expected: dict[str, TensorSpec], infos: dict) -> list[str]:
    """Every way one module's on-disk tensors (role -> TensorInfo) differ from `expected`."""
    out = []
    for role, spec in expected.items():
        info = infos.get(role)
        if info is None:
            if not spec.optional:
                out.append(f"missing tensor {module}.{role} ({describe(spec)})")
            continue
        bad = check_tensor(spec, info.dtype, info.shape)
        if bad:
            out.append(f"tensor {info.name}: {bad}")
    for role, info in infos.items():
        if role not in expected:
            out.append(f"unexpected tensor {info.name} ({info.dtype} {fmt_shape(info.shape)}); this scheme stores "
                       f"only {', '.join(expected)}")
    return out
