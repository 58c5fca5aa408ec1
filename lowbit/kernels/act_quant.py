"""Per-token activation quantization for W8A8 (FP8 E4M3 or int8), one fused Triton kernel.

One program per row: pass 1 takes the row's amax (dynamic scales), pass 2 divides, rounds,
saturates and stores, so x is read from HBM once (the second pass hits L2) and written once as
8-bit codes. Numerics match lowbit.quant.numerics:

  fp8:  s = max(amax / 448, 1e-12); q = e4m3_rne(clamp(x / s, +-448))
  int8 (dynamic, compressed-tensors' rule, numerics.quantize_int8_per_token): s = dt(amax / 127.5),
        0 -> eps(dt); q = clamp(round_half_even(dt(x / s)), -128, 127), dt = x's dtype
  int8 (static input_scale s): q = clamp(round_half_even(x / s), -128, 127) in fp32

A static scale (a checkpoint's input_scale) replaces the amax pass, and so does a given per-row
amax: a row-parallel layer under tensor parallelism holds a slice of K, so its amax over the whole
row comes from an all-reduce (lowbit.parallel.whole_k_amax) and the scale is formed here, by the
same formula as the unsplit row. The division is IEEE
(div_rn), and the rounding is done in fp32 arithmetic so that the result is bit-exact on GPU and
in the CPU interpreter alike (the interpreter truncates fp32 -> bf16 casts, hence `_round_bf16`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _round_e4m3(v):
    """Round fp32 v (|v| <= 448) to the nearest E4M3 value, ties to even, staying in fp32.

    Adding c = 1.5 * 2^(e+20), e = max(exponent(|v|), -6), leaves exactly E4M3's 3 mantissa bits
    (or its fixed 2^-9 step below 2^-6) in the sum; subtracting c back is exact. The rounding is
    done on |v| and the sign put back, so that tiny negatives become -0 as in a cast.
    """
    bits = v.to(tl.int32, bitcast=True)
    a = tl.abs(v)
    c = tl.maximum((bits & 0x7F800000).to(tl.float32, bitcast=True), 2.0 ** -6) * 1572864.0
    r = (a + c) - c
    return (r.to(tl.int32, bitcast=True) | (bits & -2147483648)).to(tl.float32, bitcast=True)


@triton.jit
def _round_bf16(v):
    """fp32 v rounded to bf16 precision, ties to even, staying in fp32 (the integer spelling of
    cvt.rn.bf16.f32, for finite v)."""
    bits = v.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _round_to(v, DT: tl.constexpr):
    """fp32 v rounded to DT's precision (bf16, fp16 or fp32 itself), kept in fp32."""
    if DT == tl.bfloat16:
        return _round_bf16(v)
    elif DT == tl.float16:
        return v.to(tl.float16).to(tl.float32)
    return v


@triton.jit
def _quant_rows_kernel(x_ptr, q_ptr, s_ptr, in_scale_ptr, amax_ptr, K, stride_xm, stride_qm,
                       IS_INT: tl.constexpr, STATIC: tl.constexpr, GIVEN_AMAX: tl.constexpr, BLOCK: tl.constexpr):
    DT: tl.constexpr = x_ptr.dtype.element_ty
    CT_INT: tl.constexpr = IS_INT and not STATIC  # compressed-tensors' dynamic int8 rule: steps in DT
    QMAX: tl.constexpr = 127.5 if IS_INT else 448.0
    EPS: tl.constexpr = 2.0 ** -7 if DT == tl.bfloat16 else 2.0 ** -10 if DT == tl.float16 else 2.0 ** -23
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    q_row = q_ptr + row * stride_qm
    offs = tl.arange(0, BLOCK)
    if STATIC:
        s = tl.load(in_scale_ptr).to(tl.float32)
    else:
        if GIVEN_AMAX:
            amax = tl.load(amax_ptr + row)
        else:
            acc = tl.zeros((BLOCK,), dtype=tl.float32)
            for k0 in range(0, K, BLOCK):
                x = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
                acc = tl.maximum(acc, tl.abs(x))
            amax = tl.max(acc, axis=0)
        if CT_INT:
            s = _round_to(tl.math.div_rn(amax, QMAX), DT)
            s = tl.where(s == 0.0, EPS, s)
        else:
            s = tl.maximum(tl.math.div_rn(amax, QMAX), 1e-12)
    for k0 in range(0, K, BLOCK):
        ok = k0 + offs < K
        v = tl.math.div_rn(tl.load(x_row + k0 + offs, mask=ok, other=0.0).to(tl.float32), s)
        if CT_INT:
            v = _round_to(v, DT)
        if IS_INT:  # + - 1.5*2^23 rounds |v| < 2^22 to an integer, ties to even
            q = tl.clamp((v + 12582912.0) - 12582912.0, -128.0, 127.0).to(tl.int8)
        else:
            q = _round_e4m3(tl.clamp(v, -448.0, 448.0)).to(tl.float8e4nv).to(tl.uint8, bitcast=True)
        tl.store(q_row + k0 + offs, q, mask=ok)
    tl.store(s_ptr + row, s)


def quant_rows(x: torch.Tensor, dtype: torch.dtype, input_scale: torch.Tensor | None = None,
               amax: torch.Tensor | None = None):
    """x [M, K] bf16/fp16 -> (codes [M, K] of `dtype` (float8_e4m3fn or int8), scales fp32 [M]).

    input_scale: a static per-tensor scale (0-d or [1]); None computes one scale per row, from the
    row's own amax or from `amax` (fp32, M values: each row's amax over the whole K, when x holds
    only this rank's slice of it).
    """
    m, k = x.shape
    static, given = input_scale is not None, amax is not None
    if given and (static or amax.numel() != m):
        raise ValueError(f"quant_rows: a given amax replaces the dynamic scale's own, one value per row ({m}); "
                         f"got {amax.numel()} values{' and a static input_scale' if static else ''}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    is_int = dtype == torch.int8
    q = torch.empty((m, k), dtype=torch.int8 if is_int else torch.uint8, device=x.device)
    s = torch.empty(m, dtype=torch.float32, device=x.device)
    if m:
        block = min(triton.next_power_of_2(k), 4096)
        _quant_rows_kernel[(m,)](
            x, q, s, input_scale.reshape(1).float() if static else s,
            amax.reshape(m).float().contiguous() if given else s, k, x.stride(0), q.stride(0),
            IS_INT=is_int, STATIC=static, GIVEN_AMAX=given, BLOCK=block, num_warps=4 if block <= 1024 else 8)
    return (q if is_int else q.view(torch.float8_e4m3fn)), s
