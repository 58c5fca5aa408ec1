"""4-bit weights (NVFP4, compressed-tensors int4) in the planar layout: the fast W4A16 path.

Planar layout (made once at load by `prepare_w4`, same bytes as the checkpoint's): each row is cut
into chunks of 128 K-elements, 16 int32 words per chunk, and nibble j of word w holds element
16*j + w of the chunk. One decode of a word tile [BN, 16] thus yields eight [BN, 16] operands, one
per contiguous K-block of 16, each fed to its own MMA with the matching 16 columns of x. Because
the decode needs no other operand (block and group scales multiply the MMA results, per K-block
for NVFP4 and per group for int4), Triton loads the words from shared memory directly into the MMA
operand registers and decodes them there: no shared-memory round trip, no join of the eight
outputs, and mma.sync tiles small enough for many CTAs per SM. On an H200 this took int4 decode from
1.33x to 1.73x over bf16 (docs/benchmarks.md); docs/kernel-notes.md has the instruction counts.

Large M (prefill) is bound by tensor-core throughput, where Triton cannot overlap the decode with
wgmma well: there `dense_weight` decodes the planar words once into a bf16/fp16 weight and
cuBLAS multiplies.

Scales: NVFP4 block scale (E4M3 [N, K/16]) and row scale (fp32 [N]); int4 group scale [N, G]
(G == 1: per channel) and optional zero points [N, G] (int8), q = code - 8. Padding past K inside
the last chunk holds code 0 and meets x = 0.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import dequant as dq
from . import invariance
from .gemm import Tiles, _dot, _sm_count, _splitk_reduce_kernel, interpreting, tile_coords

CHUNK = 128  # K elements per 16 planar words
_ROWS = 8192  # rows repacked at a time (bounds the temporaries)


# ---------------------------------------------------------------- layout
def _codes_nvfp4(weight_packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([weight_packed & 0xF, weight_packed >> 4], -1).flatten(-2)


def _codes_int4(weight_packed: torch.Tensor, k: int) -> torch.Tensor:
    shifts = torch.arange(0, 32, 4, device=weight_packed.device, dtype=torch.int32)
    return ((weight_packed.unsqueeze(-1) >> shifts) & 0xF).flatten(-2)[:, :k].to(torch.uint8)


def prepare_w4(weight_packed: torch.Tensor, nvfp4: bool, k: int | None = None) -> torch.Tensor:
    """Checkpoint 4-bit weight -> planar int32 [N, ceil(K/128)*16].

    NVFP4: uint8 [N, K/2] (element 2j in the low nibble). int4: compressed-tensors int32
    [N, ceil(K/8)] and `k`. Same bytes (up to the last chunk's padding); the result replaces the
    original, and `unprepare_w4` gives it back exactly.
    """
    n = weight_packed.shape[0]
    k = weight_packed.shape[1] * 2 if nvfp4 else k
    chunks = triton.cdiv(k, CHUNK)
    out = torch.empty((n, chunks * 16), dtype=torch.int32, device=weight_packed.device)
    shifts = torch.arange(0, 32, 4, device=weight_packed.device, dtype=torch.int64)
    for r in range(0, n, _ROWS):
        part = weight_packed[r:r + _ROWS]
        codes = _codes_nvfp4(part) if nvfp4 else _codes_int4(part, k)
        codes = torch.nn.functional.pad(codes, (0, chunks * CHUNK - k)).to(torch.int64)
        # [rows, chunk, j, w] -> [rows, chunk, w, j]: nibble j of word w <- element 16j + w
        words = (codes.view(-1, chunks, 8, 16).transpose(2, 3) << shifts).sum(-1)
        if not nvfp4:
            words = _pair_lanes(words)
        out[r:r + _ROWS] = (words - ((words >> 31) << 32)).view(-1, chunks * 16).to(torch.int32)
    return out


def _pair_lanes(words: torch.Tensor) -> torch.Tensor:
    """int4 only: words 2p, 2p+1 (elements 2p, 2p+1 of every K-block) -> one word holding both
    elements of blocks 0-3 (low 16 bits from word 2p, high from 2p+1), the next those of blocks 4-7.
    An MMA operand register holds exactly such an element pair, so the decoder masks each pair
    out of one word (Marlin's trick) instead of gathering it from two words. The exchange of 16-bit
    halves is its own inverse: unprepare_w4 applies it again. words: non-negative int64 < 2^32."""
    a, b = words[..., 0::2], words[..., 1::2]
    lo = (a & 0xFFFF) | ((b & 0xFFFF) << 16)
    hi = (a >> 16) | (b & 0xFFFF0000)
    return torch.stack([lo, hi], -1).flatten(-2)


def unprepare_w4(planar: torch.Tensor, nvfp4: bool, k: int) -> torch.Tensor:
    """Inverse of prepare_w4: the checkpoint layout (uint8 [N, K/2] or int32 [N, ceil(K/8)])."""
    from ..quant.numerics import pack_e2m1, pack_int32

    shifts = torch.arange(0, 32, 4, device=planar.device, dtype=torch.int64)
    n = planar.shape[0]
    words = planar.to(torch.int64).view(n, -1, 16) & 0xFFFFFFFF
    if not nvfp4:
        words = _pair_lanes(words)
    codes = ((words.unsqueeze(-1) >> shifts) & 0xF).transpose(2, 3).reshape(n, -1)[:, :k]
    if nvfp4:
        return pack_e2m1(codes.to(torch.uint8))
    return pack_int32(codes - 8, 4)


# ---------------------------------------------------------------- kernels
@triton.jit
def _chain(v, x_rows, k0, K, m_ok, part, xs, HAS_ZP: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr):
    """part + v [BN, 16] @ x[:, k0:k0+16].T (fp32 [BN, BM]). With zero points, xs accumulates the
    block sums of x the same way, as an MMA with a ones operand: it lands in the accumulator's
    layout, where a reduction across lanes would cost shuffles."""
    offs_k = k0 + tl.arange(0, 16)
    k_ok = offs_k[:, None] < K
    if EVEN_K:  # K % 128 == 0: no K mask to compute in the inner loop
        k_ok = offs_k[:, None] >= 0
    xt = tl.load(x_rows + offs_k[:, None], mask=m_ok[None, :] & k_ok, other=0.0)
    if HAS_ZP:
        xs = _dot(tl.full(v.shape, 1.0, v.dtype), xt, xs, UPCAST)
    return _dot(v, xt, part, UPCAST), xs


@triton.jit
def _scale_tile(ptr, offs_n, n_ok, stride, g0, G, NG: tl.constexpr, E4M3: tl.constexpr, DT: tl.constexpr):
    """Columns g0..g0+NG of a per-group tensor as an MMA operand [BN, 16] in DT (exact: E4M3,
    bf16/fp16 scales, int8 zero points)."""
    cols = tl.arange(0, 16)
    g = g0 + cols
    t = tl.load(ptr + offs_n[:, None] * stride + g[None, :], mask=n_ok[:, None] & ((cols < NG) & (g < G))[None, :],
                other=0)
    if E4M3:  # arrives as raw bytes
        t = t.to(tl.float8e4nv, bitcast=True)
    return t.to(tl.float32).to(DT)


@triton.jit
def _grouped(acc, v, x_rows, k0, K, m_ok, s_ptr, z_ptr, offs_n, n_ok, G, stride_sn, stride_zn, GROUP: tl.constexpr,
             NVFP4: tl.constexpr, HAS_ZP: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr):
    """One chunk's eight K-block products, BPG consecutive blocks per scale column, into acc.

    The blocks of a group chain on the MMA accumulator; each group's sum is then scaled (and
    zero-point corrected) in the accumulator's layout. Loaded as [BN] vectors the scales would each
    need a layout conversion through shared memory, a barrier apiece; instead the chunk's scale
    columns are one [BN, 16] MMA operand, and an MMA with a one-hot [16, BM] selector puts column h
    into the accumulator layout: scale[n, g0+h] for every m, exactly.
    """
    BM: tl.constexpr = acc.shape[1]
    DT: tl.constexpr = v[0].dtype
    BPG: tl.constexpr = 8 if GROUP >= 128 else GROUP // 16
    g0 = k0 // GROUP
    st = _scale_tile(s_ptr, offs_n, n_ok, stride_sn, g0, G, 8 // BPG, NVFP4, DT)
    zt = st
    if HAS_ZP:
        zt = _scale_tile(z_ptr, offs_n, n_ok, stride_zn, g0, G, 8 // BPG, False, DT)
    rows = tl.arange(0, 16)[:, None]
    zero = tl.zeros(acc.shape, dtype=tl.float32)
    for h in tl.static_range(8 // BPG):
        part, xs = zero, zero
        for i in tl.static_range(BPG):
            part, xs = _chain(v[h * BPG + i], x_rows, k0 + 16 * (h * BPG + i), K, m_ok, part, xs, HAS_ZP, EVEN_K,
                              UPCAST)
        sel = tl.broadcast_to((rows == h).to(tl.float32).to(DT), (16, BM))
        if HAS_ZP:
            part -= _dot(zt, sel, zero, UPCAST) * xs
        acc += part * _dot(st, sel, zero, UPCAST)
    return acc


@triton.jit
def _w4_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, rs_ptr, b_ptr, out_ptr,
    M, N, K, G, stride_xm, stride_wn, stride_sn, stride_zn, stride_om, stride_os, chunks_per_split,
    NVFP4: tl.constexpr, GROUP: tl.constexpr, HAS_ZP: tl.constexpr, HAS_ROW_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, USE_ASM: tl.constexpr, UPCAST: tl.constexpr, BM: tl.constexpr,
    BN: tl.constexpr,
):
    """GROUP: K elements per scale column (NVFP4 16; int4 16/32/64/k*128), 0 for per-channel int4
    (its scale is the epilogue's row scale, its zero point one value per row)."""
    DT: tl.constexpr = x_ptr.dtype.element_ty
    offs_n, offs_m, n_ok, m_ok = tile_coords(M, N, BM, BN)
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn
    x_rows = x_ptr + offs_m[None, :].to(tl.int64) * stride_xm

    acc = tl.zeros((BN, BM), dtype=tl.float32)
    xs = tl.zeros((BN, BM), dtype=tl.float32)  # per channel with zero points: x's running sums
    c_begin = tl.program_id(1) * chunks_per_split
    c_end = tl.minimum(tl.cdiv(K, 128), c_begin + chunks_per_split)
    for c in range(c_begin, c_end):
        units = tl.load(w_rows + c * 16 + tl.arange(0, 16)[None, :], mask=n_ok[:, None], other=0)
        v = dq.planar_tile(units, NVFP4, DT, USE_ASM)
        if GROUP == 0:
            for j in tl.static_range(8):
                acc, xs = _chain(v[j], x_rows, c * 128 + 16 * j, K, m_ok, acc, xs, HAS_ZP, EVEN_K, UPCAST)
        else:
            acc = _grouped(acc, v, x_rows, c * 128, K, m_ok, s_ptr, z_ptr, offs_n, n_ok, G, stride_sn, stride_zn,
                           GROUP, NVFP4, HAS_ZP, EVEN_K, UPCAST)
    if GROUP == 0 and HAS_ZP:
        acc -= tl.load(z_ptr + offs_n * stride_zn, mask=n_ok, other=0).to(tl.float32)[:, None] * xs

    if HAS_ROW_SCALE:
        acc *= tl.load(rs_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    if HAS_BIAS:  # split-K adds the bias in the reduction instead
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    out = out_ptr + tl.program_id(1) * stride_os + offs_m[None, :] * stride_om + offs_n[:, None]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=n_ok[:, None] & m_ok[None, :])


@triton.jit
def _dense_kernel(w_ptr, s_ptr, z_ptr, rs_ptr, out_ptr, N, K, stride_wn, stride_sn, stride_zn, stride_on,
                  NVFP4: tl.constexpr, GROUP: tl.constexpr, HAS_ZP: tl.constexpr, HAS_ROW_SCALE: tl.constexpr,
                  BN: tl.constexpr):
    """Planar words -> the dequantized weight [N, K] in out's dtype, one 128-element chunk a program."""
    offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
    c = tl.program_id(1)
    n_ok = offs_n < N
    units = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + c * 16 + tl.arange(0, 16)[None, :],
                    mask=n_ok[:, None], other=0)
    rs = tl.load(rs_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32) if HAS_ROW_SCALE else 1.0
    for j in tl.static_range(8):
        k0 = c * 128 + 16 * j
        v = dq._planar_code(units, j, NVFP4, tl.float32)
        g = k0 // GROUP if GROUP != 0 else 0
        if HAS_ZP:
            v -= tl.load(z_ptr + offs_n * stride_zn + g, mask=n_ok, other=0).to(tl.float32)[:, None]
        if GROUP != 0:
            s = tl.load(s_ptr + offs_n * stride_sn + g, mask=n_ok, other=0)
            if NVFP4:
                s = s.to(tl.float8e4nv, bitcast=True)
            v *= s.to(tl.float32)[:, None]
        offs_k = k0 + tl.arange(0, 16)
        tl.store(out_ptr + offs_n[:, None].to(tl.int64) * stride_on + offs_k[None, :],
                 (v * rs[:, None] if HAS_ROW_SCALE else v).to(out_ptr.dtype.element_ty),
                 mask=n_ok[:, None] & (offs_k[None, :] < K))


# ---------------------------------------------------------------- launchers
# From this many tokens on, dequantize once and multiply with cuBLAS (tensor-core bound). NVFP4's
# per-block scaling costs BM/16 FMAs per weight in the planar kernel, so it switches earlier.
# (Measured on an H200: docs/kernel-notes.md.)
DENSE_MIN_M = {True: 128, False: 512}  # by nvfp4


def planar_supported(group: int) -> bool:
    """Scale groups the planar kernels handle: NVFP4's 16, int4 16/32/64, multiples of 128, or per
    channel (0)."""
    return group in (0, 16, 32, 64) or group % 128 == 0


def pick_tiles(m: int, n: int, k: int, device: torch.device, nvfp4: bool = True) -> Tiles:
    """Decode: mma.sync tiles of 2 warps (many CTAs per SM hide the decode's latency); larger M:
    4-warp tiles. K split until the grid holds about 4 CTAs per SM.

    int4 decode on layers with fewer than two 64-row tiles per SM (qkv, o, down) runs with 96
    registers and 2 stages instead: 10 CTAs per SM instead of 8, and twice the K split. Measured on
    an H200 (docs/kernel-notes.md): qkv -5%, down -9%, o +5%; gate_up (12% slower) and lm_head
    (7% slower) keep the default; NVFP4 needs its registers (slower capped at every shape)."""
    m = invariance.tiles_m(m)  # the batch-invariant mode: M = 1's tiles for every M
    sms, chunks = _sm_count(device), triton.cdiv(k, CHUNK)
    if m <= 16:
        t = Tiles(16, 64, CHUNK, warps=2, stages=4)
        tiles = triton.cdiv(n, t.bn)
        if not nvfp4 and tiles < 2 * sms:
            split = max(1, min(triton.cdiv(8 * sms, tiles), chunks // 2, 16))
            return Tiles(16, 64, CHUNK, split, warps=2, stages=2, maxnreg=96)
    else:
        t = Tiles(32 if m <= 32 else 64, 64 if nvfp4 else 128, CHUNK, warps=4, stages=3)
    tiles = triton.cdiv(m, t.bm) * triton.cdiv(n, t.bn)
    split = max(1, min(triton.cdiv(4 * sms, tiles), chunks // 4, 16))
    return Tiles(t.bm, t.bn, t.bk, split, t.warps, t.stages)


def _scales(nvfp4: bool, scale: torch.Tensor, row_scale: torch.Tensor | None, group: int):
    """(group scale or None, row scale or None, GROUP): int4 per-channel scales are row scales."""
    if nvfp4:
        return scale.view(torch.uint8), row_scale, 16
    if scale.shape[1] == 1:
        return None, scale[:, 0], 0
    return scale, row_scale, group


def w4_linear(x: torch.Tensor, planar: torch.Tensor, nvfp4: bool, k: int, scale: torch.Tensor,
              zero: torch.Tensor | None = None, group: int = 16, row_scale: torch.Tensor | None = None,
              bias: torch.Tensor | None = None, tiles: Tiles | None = None, use_asm: bool = True,
              dense_min_m: int | None = None) -> torch.Tensor:
    """x [..., K] (bf16/fp16) @ W.T for planar 4-bit weights (see the module docstring)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, n = x2.shape[0], planar.shape[0]
    if m >= (dense_min_m or DENSE_MIN_M[nvfp4]) and invariance.m_dependent_paths():
        w = dense_weight(planar, nvfp4, k, scale, zero, group, row_scale, x.dtype)
        return torch.nn.functional.linear(x, w, bias)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out.reshape(*lead, n)
    s, rs, grp = _scales(nvfp4, scale, row_scale, group)
    t = tiles or pick_tiles(m, n, k, x.device, nvfp4)
    chunks = triton.cdiv(k, CHUNK)
    per_split = triton.cdiv(chunks, t.split)
    split = triton.cdiv(chunks, per_split)
    dst = out if split == 1 else torch.empty((split, m, n), dtype=torch.float32, device=x.device)
    _w4_kernel[(triton.cdiv(m, t.bm) * triton.cdiv(n, t.bn), split)](
        x2, planar, s if s is not None else planar, zero if zero is not None else planar,
        rs if rs is not None else planar, bias if bias is not None else planar, dst,
        m, n, k, s.shape[1] if s is not None else 1, x2.stride(0), planar.stride(0), s.stride(0) if s is not None else 0,
        zero.stride(0) if zero is not None else 0, n, m * n, per_split,
        NVFP4=nvfp4, GROUP=grp, HAS_ZP=zero is not None, HAS_ROW_SCALE=rs is not None,
        HAS_BIAS=bias is not None and split == 1, EVEN_K=k % CHUNK == 0, USE_ASM=use_asm and not interpreting(),
        UPCAST=interpreting() and x.dtype == torch.bfloat16, BM=t.bm, BN=t.bn,
        num_warps=t.warps, num_stages=t.stages, **({"maxnreg": t.maxnreg} if t.maxnreg and not interpreting() else {}))
    if split > 1:
        block = 1024
        _splitk_reduce_kernel[(triton.cdiv(m * n, block),)](
            dst, bias if bias is not None else dst, out, m * n, n, SPLIT=split, HAS_BIAS=bias is not None,
            BLOCK=block)
    return out.reshape(*lead, n)


def dense_weight(planar: torch.Tensor, nvfp4: bool, k: int, scale: torch.Tensor, zero: torch.Tensor | None,
                 group: int, row_scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The dequantized weight [N, K] in `dtype` (all scales applied), from planar words."""
    n = planar.shape[0]
    s, rs, grp = _scales(nvfp4, scale, row_scale, group)
    out = torch.empty((n, k), dtype=dtype, device=planar.device)
    bn = 64
    _dense_kernel[(triton.cdiv(n, bn), triton.cdiv(k, CHUNK))](
        planar, s if s is not None else planar, zero if zero is not None else planar,
        rs if rs is not None else planar, out, n, k, planar.stride(0), s.stride(0) if s is not None else 0,
        zero.stride(0) if zero is not None else 0, out.stride(0),
        NVFP4=nvfp4, GROUP=grp, HAS_ZP=zero is not None, HAS_ROW_SCALE=rs is not None, BN=bn, num_warps=4)
    return out
