"""The public linear functions over the scheme units' in-memory layouts (see lowbit/kernels).

This module imports Triton only inside the functions, so `import lowbit.kernels` works without it.
Each function takes x [..., K] in bf16/fp16 and returns [..., N] in x's dtype.
"""
from __future__ import annotations

import torch

from . import invariance

NVFP4_BLOCK = 16
# torch._scaled_mm (cuBLASLt, row-wise scales) takes over FP8 W8A8 from the Triton kernel from
# this many tokens on; below it the swap-AB Triton kernel reads the weight faster (H200, summed
# over the Llama-3-8B shapes: Triton 1.44x vs cuBLASLt 1.30x over bf16 at M=64, 0.92x vs 1.48x at
# M=128; docs/benchmarks.md).
SCALED_MM_MIN_M = 128


def _check_x(x: torch.Tensor, k: int, what: str) -> None:
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"{what}: activations must be bf16 or fp16, got {x.dtype}")
    if x.shape[-1] != k:
        raise ValueError(f"{what}: x has {x.shape[-1]} input features, the weight has {k}")


def _check_planar(x: torch.Tensor, planar: torch.Tensor, what: str) -> None:
    k = x.shape[-1]
    if planar.shape[1] != -(-k // 128) * 16:
        raise ValueError(f"{what}: x has {k} input features, the planar weight holds "
                         f"{planar.shape[1] // 16 * 128} (ceil(K/128)*16 words a row)")


def _use_asm(x: torch.Tensor) -> bool:
    """The PTX decoders use sm_90 instructions (mul.bf16x2 / sub.bf16x2)."""
    return x.is_cuda and torch.cuda.get_device_capability(x.device) >= (9, 0)


def _row_vector(t: torch.Tensor, n: int) -> torch.Tensor:
    """A per-row fp32 scale [N] from [N], [N, 1], [1] or a 0-d per-tensor value."""
    t = t.reshape(-1).float()
    return t.expand(n).contiguous() if t.numel() == 1 else t.contiguous()


def nvfp4_supported(k: int) -> bool:
    """Checkpoint-layout NVFP4 is read as int32 words: K must be a multiple of 8 (the planar
    layout from prepare_nvfp4 takes any even K)."""
    return k % 8 == 0


def prepare_nvfp4(weight_packed: torch.Tensor) -> torch.Tensor:
    """NVFP4 codes uint8 [N, K/2] -> the planar layout int32 [N, ceil(K/128)*16] (same bytes).

    Do it once at load and keep only the result: nvfp4_linear then takes the fast path (see
    lowbit/kernels/w4.py). unprepare_nvfp4 restores the checkpoint layout bit for bit.
    """
    from .w4 import prepare_w4

    return prepare_w4(weight_packed, nvfp4=True)


def unprepare_nvfp4(planar: torch.Tensor, k: int) -> torch.Tensor:
    from .w4 import unprepare_w4

    return unprepare_w4(planar, nvfp4=True, k=k)


def nvfp4_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                 row_scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """NVFP4 weights x bf16/fp16 activations (W4A16).

    weight: the checkpoint's uint8 [N, K/2] (element 2j in the low nibble), or its planar form
    from prepare_nvfp4 (int32, the fast path); weight_scale float8_e4m3fn [N, ceil(K/16)];
    row_scale fp32 [N] (or one value), multiplied in the epilogue.
    """
    n, k = weight.shape[0], x.shape[-1]
    if weight.dtype == torch.int32:
        from .w4 import w4_linear

        _check_x(x, k, "nvfp4_linear")
        _check_planar(x, weight, "nvfp4_linear")
        return w4_linear(x, weight, True, k, weight_scale, row_scale=_row_vector(row_scale, n), bias=bias,
                         use_asm=_use_asm(x))
    from .gemm import FMT_NVFP4, gemm

    _check_x(x, weight.shape[1] * 2, "nvfp4_linear")
    if not nvfp4_supported(k):
        raise ValueError(f"nvfp4_linear: K={k} is not a multiple of 8; use the reference path")
    words = weight.contiguous().view(torch.int32)  # 8 codes a word, element i at bits 4i
    return gemm(x, words, FMT_NVFP4, k, scale=weight_scale, group=NVFP4_BLOCK, row_scale=_row_vector(row_scale, n),
                bias=bias, use_asm=_use_asm(x))


def int_supported(bits: int, group_size: int | None, planar: bool = False) -> bool:
    """Checkpoint layout: 4 or 8 bits, group sizes that are powers of two from 16 up, or per
    channel (None/0). Planar (int4 only): groups of 16, 32, 64, multiples of 128, or per channel."""
    if planar:
        from .w4 import planar_supported

        return bits == 4 and planar_supported(group_size or 0)
    if bits not in (4, 8):
        return False
    return not group_size or (group_size >= 16 and group_size & (group_size - 1) == 0)


def prepare_int4(weight_packed: torch.Tensor, k: int) -> torch.Tensor:
    """compressed-tensors int4 int32 [N, ceil(K/8)] -> planar int32 [N, ceil(K/128)*16], for
    int_linear(..., planar=True); unprepare_int4 restores the checkpoint layout exactly."""
    from .w4 import prepare_w4

    return prepare_w4(weight_packed, nvfp4=False, k=k)


def unprepare_int4(planar: torch.Tensor, k: int) -> torch.Tensor:
    from .w4 import unprepare_w4

    return unprepare_w4(planar, nvfp4=False, k=k)


def int_linear(x: torch.Tensor, weight_packed: torch.Tensor, weight_scale: torch.Tensor,
               zero_point: torch.Tensor | None, bits: int, group_size: int | None, k: int,
               bias: torch.Tensor | None = None, planar: bool = False) -> torch.Tensor:
    """compressed-tensors pack-quantized int4/int8 weights x bf16/fp16 activations (W4A16/W8A16).

    weight_packed int32 [N, ceil(K*bits/32)] (or, planar=True, int4 from prepare_int4: the fast
    path); weight_scale bf16/fp16 [N, ceil(K/group)] or [N, 1] (per channel: group_size None/0);
    zero_point int8 [N, ceil(K/group)] (unpacked) or None.
    """
    _check_x(x, k, "int_linear")
    if not int_supported(bits, group_size, planar):
        layout = "planar" if planar else "checkpoint"
        raise ValueError(f"int_linear: no kernel for {bits}-bit weights with group size {group_size} "
                         f"({layout} layout)")
    scale = weight_scale.reshape(weight_scale.shape[0], -1)
    zero = zero_point.reshape(zero_point.shape[0], -1) if zero_point is not None else None
    if planar:
        from .w4 import w4_linear

        _check_planar(x, weight_packed, "int_linear")
        return w4_linear(x, weight_packed, False, k, scale, zero, group_size or 0, bias=bias, use_asm=_use_asm(x))
    from .gemm import FMT_INT4, FMT_INT8, gemm

    fmt = FMT_INT4 if bits == 4 else FMT_INT8
    return gemm(x, weight_packed, fmt, k, scale=scale, zero=zero, group=group_size or k, bias=bias,
                use_asm=_use_asm(x))


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               input_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None,
               quantize_input: bool = True, amax: torch.Tensor | None = None) -> torch.Tensor:
    """FP8 E4M3 weights [N, K] with an fp32 per-row scale (per-tensor scales: expanded).

    quantize_input (W8A8): x is quantized to FP8 per token (or with the static `input_scale`) and
    multiplied on the FP8 tensor cores: the Triton kernel for small M, torch._scaled_mm from
    SCALED_MM_MIN_M tokens on. amax (fp32, one value per token): the tokens' amax over the whole
    K when x is a row-parallel rank's slice (see act_quant.quant_rows). quantize_input=False:
    weight-only (W8A16), the weight is upcast.
    """
    from .act_quant import quant_rows
    from .gemm import FMT_FP8, gemm

    n, k = weight.shape
    _check_x(x, k, "fp8_linear")
    ws = _row_vector(weight_scale, n)
    if not quantize_input:
        return gemm(x, weight, FMT_FP8, k, row_scale=ws, bias=bias)
    x2 = x.reshape(-1, k)
    xq, xs = quant_rows(x2, torch.float8_e4m3fn, input_scale, amax)
    m = x2.shape[0]
    if x.is_cuda and m >= SCALED_MM_MIN_M and k % 16 == 0 and n % 16 == 0 and invariance.m_dependent_paths():
        # row-wise scaled FP8 GEMM in cuBLASLt; it only writes bf16
        y = torch._scaled_mm(xq, weight.t(), scale_a=xs[:, None], scale_b=ws[None, :],
                             bias=bias.to(torch.bfloat16) if bias is not None else None, out_dtype=torch.bfloat16)
        return y.to(x.dtype).reshape(*x.shape[:-1], n)
    y = gemm(xq, weight, FMT_FP8, k, row_scale=ws, x_scale=xs, bias=bias, out_dtype=x.dtype)
    return y.reshape(*x.shape[:-1], n)


def int8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                input_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                quantize_input: bool = True, amax: torch.Tensor | None = None) -> torch.Tensor:
    """int8 weights [N, K] with an fp32 per-row scale. quantize_input (W8A8): x quantized to int8
    per token by compressed-tensors' rule (scale amax/127.5 and x/scale rounded to x's dtype, round
    half to even; numerics.quantize_int8_per_token; amax as in fp8_linear) or with the static
    symmetric `input_scale`; int8 tensor cores, int32 accumulation, both scales in the epilogue.
    Else weight-only (upcast)."""
    from .act_quant import quant_rows
    from .gemm import FMT_I8, gemm

    n, k = weight.shape
    _check_x(x, k, "int8_linear")
    if not quantize_input:
        return gemm(x, weight, FMT_I8, k, row_scale=_row_vector(weight_scale, n), bias=bias)
    x2 = x.reshape(-1, k)
    xq, xs = quant_rows(x2, torch.int8, input_scale, amax)
    y = gemm(xq, weight, FMT_I8, k, row_scale=_row_vector(weight_scale, n), x_scale=xs, bias=bias,
             out_dtype=x.dtype)
    return y.reshape(*x.shape[:-1], n)
