"""Quantized GEMM in Triton: y = x @ dequant(W).T (+ bias), one kernel for every weight format.

Weight formats (the scheme units' in-memory layouts; `FMT_*`):

  NVFP4   E2M1 codes, uint8 [N, K/2] read as int32 words (8 codes a word, element i at bits 4i),
          E4M3 block scales [N, K/16], fp32 row scale [N] in the epilogue.
  INT4    compressed-tensors pack-quantized int32 [N, ceil(K/8)], stored value q+8.
  INT8    compressed-tensors pack-quantized int32 [N, ceil(K/4)], stored value q+128.
  FP8     float8_e4m3fn [N, K], fp32 per-row scale: weight-only with bf16/fp16 x, or W8A8 with
          x already quantized to fp8 (per-token scale in the epilogue).
  I8      int8 [N, K] with int8-quantized x (W8A8): int8 tensor-core dot, int32 accumulator.
  FLOAT   bf16/fp16/fp32 [N, K] in x's dtype, used as stored (fp32: full-precision dots, no TF32):
          the batch-invariant mode's unquantized linears (lowbit/kernels/invariance.py).

Tiles are computed transposed ("swap AB"): acc[BN, BM] = W[BN, BK] @ x[BM, BK].T, so the weight is
the MMA's wide side (64+ rows) and the token count M only has to fill the MMA's narrow side (>= 16):
tensor cores stay usable at decode (M=1) without padding the weight. Grids too small for the GPU
are split along K; partial sums go to an fp32 buffer that `_splitk_reduce_kernel` adds up.

Group scales are applied where they cost least: per element for NVFP4 (block 16 is narrower than
any MMA tile) and for int groups narrower than BLOCK_K; on the tile's partial product when one int
group spans whole K-tiles; in the epilogue when they are per output row.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import dequant as dq
from . import invariance

FMT_NVFP4 = 0
FMT_INT4 = 1
FMT_INT8 = 2
FMT_FP8 = 3
FMT_I8 = 4
FMT_FLOAT = 5

SCALE_ELEMENT = 0  # multiply each dequantized weight by its group scale
SCALE_TILE = 1  # one group spans the K-tile: scale the tile's partial product instead
SCALE_NONE = 2  # no group scale (per-row scales go to the epilogue)


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr):
    """tl.dot; UPCAST runs it in fp32 (TRITON_INTERPRET's numpy dot mis-reads bf16 and fp8)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    if a.dtype == tl.float32:  # fp32 operands (FMT_FLOAT): IEEE products, not TF32
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc, out_dtype=acc.dtype)  # int8 dots accumulate in int32


@triton.jit
def _group_tile(ptr, offs_n, n_ok, stride, g0, G, GT: tl.constexpr):
    """Columns g0..g0+GT of a per-group tensor [N, G] (one contiguous, vectorizable load per row)."""
    offs_g = g0 + tl.arange(0, GT)
    return tl.load(ptr + offs_n[:, None] * stride + offs_g[None, :], mask=n_ok[:, None] & (offs_g < G)[None, :],
                   other=0)


@triton.jit
def _per_unit(t, REP: tl.constexpr):
    """[R, GT] -> [R, GT*REP]: each group column repeated for the REP stored units it covers."""
    return tl.reshape(tl.broadcast_to(t[:, :, None], (t.shape[0], t.shape[1], REP)), (t.shape[0], t.shape[1] * REP))


@triton.jit
def _weight_tile(units, scale, offset, DT: tl.constexpr, FMT: tl.constexpr, HAS_SCALE: tl.constexpr,
                 USE_ASM: tl.constexpr):
    """Dequantize one [BN, BK/EPU] tile of stored units to [BN, BK] in DT. scale / offset: per
    unit or per row; the int offset is the storage offset 2^(b-1) plus the zero point."""
    if FMT == 5:  # unquantized, in x's dtype
        w = units
    elif FMT == 3:  # fp8 bytes: used as stored (fp8 x) or cast (weight-only)
        w = units.to(tl.float8e4nv, bitcast=True).to(DT)
    elif FMT == 4:  # int8: used as stored (int8 x) or cast (weight-only)
        w = units if DT == tl.int8 else units.to(tl.float32).to(DT)
    elif FMT == 0:
        w = dq.nvfp4_tile(units, scale, DT, USE_ASM)
    elif FMT == 1:
        w = dq.int4_tile(units, offset, scale, DT, HAS_SCALE, USE_ASM)
    else:
        w = dq.int8_tile(units, offset, scale, DT, HAS_SCALE)
    return w


@triton.jit
def scaled_weight_tile(units, s_ptr, z_ptr, offs_n, n_ok, stride_sn, stride_zn, k0, G, DT: tl.constexpr,
                       FMT: tl.constexpr, GROUP: tl.constexpr, SCALE_MODE: tl.constexpr, HAS_ZP: tl.constexpr,
                       USE_ASM: tl.constexpr, BK: tl.constexpr):
    """The weight tile [BN, BK] in DT for K-columns k0..k0+BK, with its group scales and zero points
    applied per stored unit (SCALE_ELEMENT) and zero points per tile or row otherwise; a TILE scale
    multiplies the tile's product and a row scale the epilogue (the caller's). s_ptr / z_ptr: the
    per-group scales / zero points [N, G] (row stride stride_sn / stride_zn)."""
    EPU: tl.constexpr = 8 if FMT <= 1 else 4 if FMT == 2 else 1  # K elements per stored unit
    offset = tl.full((1, 1), 8.0 if FMT == 1 else 128.0, tl.float32)  # ints store q + 2^(b-1)
    scale = offset  # placeholder operand when no per-unit scale is applied
    if SCALE_MODE == 0:
        g0 = tl.multiple_of(k0 // GROUP, BK // GROUP)
        st = _group_tile(s_ptr, offs_n, n_ok, stride_sn, g0, G, BK // GROUP)
        if FMT == 0:  # E4M3 scales arrive as raw bytes (uint8) so that masked loads can fill zeros
            st = dq.nvfp4_scale(st.to(tl.float8e4nv, bitcast=True), DT)
        scale = _per_unit(st.to(DT), GROUP // EPU)  # converted once per group, then repeated
        if HAS_ZP:
            zt = _group_tile(z_ptr, offs_n, n_ok, stride_zn, g0, G, BK // GROUP)
            offset += _per_unit(zt.to(tl.float32), GROUP // EPU)
    elif HAS_ZP:
        g = k0 // GROUP if SCALE_MODE == 1 else 0
        offset += tl.load(z_ptr + offs_n[:, None] * stride_zn + g, mask=n_ok[:, None], other=0).to(tl.float32)
    return _weight_tile(units, scale, offset, DT, FMT, SCALE_MODE == 0, USE_ASM)


@triton.jit
def tile_coords(M, N, BM: tl.constexpr, BN: tl.constexpr):
    """Output rows (offs_n) and tokens (offs_m) of this program's [BN, BM] tile, with their masks.

    M tiles vary fastest: the programs sharing one weight tile run together, so each weight byte
    comes from HBM once and the (small) activations are re-read from L2.
    """
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    offs_n = (pid // num_m) * BN + tl.arange(0, BN)
    offs_m = (pid % num_m) * BM + tl.arange(0, BM)
    return offs_n, offs_m, offs_n < N, offs_m < M


@triton.jit
def _gemm_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, rs_ptr, xs_ptr, b_ptr, out_ptr,
    M, N, K, KU, G,  # KU: stored units per weight row; G: scale columns
    stride_xm, stride_wn, stride_sn, stride_zn, stride_xs, stride_om, stride_os,
    k_per_split,  # K elements each split covers (a multiple of BK)
    FMT: tl.constexpr, GROUP: tl.constexpr, SCALE_MODE: tl.constexpr, HAS_ZP: tl.constexpr,
    HAS_ROW_SCALE: tl.constexpr, HAS_X_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, EPI_EXP: tl.constexpr,
    ACT_Q: tl.constexpr, USE_ASM: tl.constexpr, UPCAST: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    EPU: tl.constexpr = 8 if FMT <= 1 else 4 if FMT == 2 else 1  # K elements per stored unit
    BKU: tl.constexpr = BK // EPU
    # the dot's operand dtype; fp8 arrives as raw bytes (uint8) so that masked loads can fill zeros
    DT: tl.constexpr = tl.float8e4nv if (ACT_Q and FMT == 3) else x_ptr.dtype.element_ty
    ACC: tl.constexpr = tl.int32 if DT == tl.int8 else tl.float32

    offs_n, offs_m, n_ok, m_ok = tile_coords(M, N, BM, BN)
    pid_k = tl.program_id(1)
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn
    x_rows = x_ptr + offs_m[None, :].to(tl.int64) * stride_xm

    acc = tl.zeros((BN, BM), dtype=ACC)
    k_begin = pid_k * k_per_split
    k_end = tl.minimum(K, k_begin + k_per_split)
    for k0 in range(k_begin, k_end, BK):
        offs_u = tl.multiple_of(k0 // EPU, BKU) + tl.arange(0, BKU)
        u_ok = offs_u < KU
        units = tl.load(w_rows + offs_u[None, :], mask=n_ok[:, None] & u_ok[None, :], other=0)
        offs_k = k0 + tl.arange(0, BK)
        xt = tl.load(x_rows + offs_k[:, None], mask=m_ok[None, :] & (offs_k[:, None] < K), other=0).to(DT, bitcast=True)
        w = scaled_weight_tile(units, s_ptr, z_ptr, offs_n, n_ok, stride_sn, stride_zn, k0, G, DT, FMT, GROUP,
                               SCALE_MODE, HAS_ZP, USE_ASM, BK)
        if SCALE_MODE == 1:
            s = tl.load(s_ptr + offs_n * stride_sn + k0 // GROUP, mask=n_ok, other=0.0).to(tl.float32)
            acc += _dot(w, xt, tl.zeros((BN, BM), dtype=tl.float32), UPCAST) * s[:, None]
        else:
            acc = _dot(w, xt, acc, UPCAST)

    acc = acc.to(tl.float32)
    if HAS_ROW_SCALE:
        acc *= tl.load(rs_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    if HAS_X_SCALE:  # per-token scale of a quantized x
        acc *= tl.load(xs_ptr + offs_m * stride_xs, mask=m_ok, other=0.0)[None, :]
    if EPI_EXP != 0:
        acc *= 2.0 ** EPI_EXP  # NVFP4 tiles come out scaled by 2^-EPI_EXP (see dequant.py)
    if HAS_BIAS:  # split-K adds the bias in the reduction instead
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    out = out_ptr + pid_k * stride_os + offs_m[None, :] * stride_om + offs_n[:, None]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=n_ok[:, None] & m_ok[None, :])


@triton.jit
def _splitk_reduce_kernel(p_ptr, b_ptr, y_ptr, MN, N, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr,
                          BLOCK: tl.constexpr):
    """y[m, n] = sum_s partial[s, m, n] (+ bias[n]), in y's dtype."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT):
        acc += tl.load(p_ptr + s * MN + offs, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs % N, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------- launcher
@dataclass(frozen=True)
class Tiles:
    """One launch configuration; `split` = K slices (1: no split-K)."""

    bm: int
    bn: int
    bk: int
    split: int = 1
    warps: int = 4
    stages: int = 3
    maxnreg: int | None = None  # register cap per thread (more CTAs per SM), compiled kernels only


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU (TRITON_INTERPRET=1, the CPU test mode)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # interpreter runs: pretend to be an H100 so split-K is exercised as on GPU
    return torch.cuda.get_device_properties(device).multi_processor_count


def pick_tiles(m: int, n: int, k: int, fmt: int, group: int, device: torch.device) -> Tiles:
    """Tile shape by M bucket, then split K until the grid covers the GPU about twice (in the
    batch-invariant mode the tiles of M = 1 for every M: lowbit/kernels/invariance.py)."""
    m = invariance.tiles_m(m)
    if m <= 16:
        t = Tiles(16, 64, 256, warps=4, stages=4)
    elif m <= 32:
        t = Tiles(32, 64, 128, warps=4, stages=4)
    elif m <= 64:
        t = Tiles(64, 128, 128, warps=4, stages=3)
    else:
        t = Tiles(128, 128, 64, warps=8, stages=3)
    bk = t.bk
    if fmt in (FMT_INT4, FMT_INT8) and 0 < group < k and group % 64 == 0 and bk > group:
        bk = group  # one group per K-tile: its scale multiplies the tile's product, not each weight
    return Tiles(t.bm, t.bn, bk, split_k(m, n, k, t.bm, t.bn, bk, device), t.warps, t.stages)


def split_k(m: int, n: int, k: int, bm: int, bn: int, bk: int, device: torch.device) -> int:
    """K slices so that the grid covers the GPU about twice, each slice at least 4 K-tiles long."""
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    return max(1, min(triton.cdiv(2 * _sm_count(device), tiles), k // (4 * bk), 16))


def gemm(x: torch.Tensor, units: torch.Tensor, fmt: int, k: int, *, scale: torch.Tensor | None = None,
         zero: torch.Tensor | None = None, group: int = 0, row_scale: torch.Tensor | None = None,
         x_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None,
         out_dtype: torch.dtype | None = None, tiles: Tiles | None = None, use_asm: bool = True) -> torch.Tensor:
    """y[..., N] = x[..., K] @ W.T for a stored weight of format `fmt` (see the module docstring).

    units: the stored weight [N, KU]; scale: group scales [N, G] (G == 1 with an int format: one
    scale per row); zero: int zero points [N, G]; group: K elements per scale column; row_scale:
    fp32 [N], multiplied in the epilogue; x_scale: fp32 per-token scales [M] of a quantized x (fp8
    or int8), whose output dtype `out_dtype` must then be given.
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, n = x2.shape[0], units.shape[0]
    act_q = x_scale is not None
    out = torch.empty((m, n), dtype=out_dtype or x.dtype, device=x.device)
    if m == 0:
        return out.reshape(*lead, n)
    t = tiles or pick_tiles(m, n, k, fmt, group, x.device)

    if scale is None:
        mode = SCALE_NONE
    elif scale.shape[1] == 1 and fmt != FMT_NVFP4:  # per-channel ints: the scale is a row scale
        mode, row_scale, scale = SCALE_NONE, scale[:, 0], None
    elif group % t.bk == 0:
        mode = SCALE_TILE
    else:
        mode = SCALE_ELEMENT
    nvfp4_exp = 0
    if fmt == FMT_NVFP4:
        nvfp4_exp = dq.NVFP4_EXP_BF16 if x.dtype == torch.bfloat16 else dq.NVFP4_EXP_FP16
    # fp8 goes in as raw bytes: the kernel bit-casts, so masked loads can zero-fill
    as_bytes = {torch.float8_e4m3fn: torch.uint8}
    x2 = x2.view(as_bytes.get(x2.dtype, x2.dtype))
    units = units.view(as_bytes.get(units.dtype, units.dtype))
    if scale is not None:
        scale = scale.view(as_bytes.get(scale.dtype, scale.dtype))

    k_per_split = triton.cdiv(triton.cdiv(k, t.split), t.bk) * t.bk
    split = triton.cdiv(k, k_per_split)
    dst = out if split == 1 else torch.empty((split, m, n), dtype=torch.float32, device=x.device)
    unused = units  # stands in for absent tensors: their constexpr flag keeps the kernel off them
    grid = (triton.cdiv(m, t.bm) * triton.cdiv(n, t.bn), split)
    _gemm_kernel[grid](
        x2, units, _or(scale, unused), _or(zero, unused), _or(row_scale, unused), _or(x_scale, unused),
        _or(bias, unused), dst,
        m, n, k, units.shape[1], scale.shape[1] if scale is not None else 1,
        x2.stride(0), units.stride(0), _stride0(scale), _stride0(zero), _stride0(x_scale), n, m * n, k_per_split,
        FMT=fmt, GROUP=max(group, 1), SCALE_MODE=mode, HAS_ZP=zero is not None,
        HAS_ROW_SCALE=row_scale is not None, HAS_X_SCALE=act_q, HAS_BIAS=bias is not None and split == 1,
        EPI_EXP=nvfp4_exp, ACT_Q=act_q, USE_ASM=use_asm and not interpreting(),
        UPCAST=interpreting() and x.dtype in (torch.bfloat16, torch.float8_e4m3fn),
        BM=t.bm, BN=t.bn, BK=t.bk, num_warps=t.warps, num_stages=t.stages,
    )
    if split > 1:
        block = 1024
        _splitk_reduce_kernel[(triton.cdiv(m * n, block),)](
            dst, _or(bias, dst), out, m * n, n, SPLIT=split, HAS_BIAS=bias is not None, BLOCK=block)
    return out.reshape(*lead, n)


def _or(t: torch.Tensor | None, default: torch.Tensor) -> torch.Tensor:
    return t if t is not None else default


def _stride0(t: torch.Tensor | None) -> int:
    return t.stride(0) if t is not None else 0
