"""Dot-free decode kernels for 4-bit weights (M <= GEMV_MAX_M tokens): dense and grouped (MoE).

Why: at decode the MMA kernels of w4.py pad the token side to 16 rows and route the weight words and
x tiles through shared memory for the MMA layouts (H200, ncu: L1/shared 76% busy, 23% occupancy, DRAM
at 42% of peak). Here every thread loads whole 128-element chunks of a few weight rows as 16-byte
vectors straight into registers, decodes them to fp32 with integer bit tricks, multiplies by x
(loaded by the same thread, converted once and reused for all its rows) and accumulates in fp32; the
only cross-thread step is one reduction per program at the end. No shared memory in the loop.

Layouts (constexpr PLANAR):
  planar (w4.prepare_w4, the dense layers): nibble j of word w of a chunk = element 16j + w (int4:
    words 2p, 2p+1 exchange 16-bit halves, see w4._pair_lanes). A sum does not care about the order
    of K inside a chunk, so x is gathered in the planar order: block a (16 elements) of a chunk
    comes out as 4 contiguous x values per 4-word vector.
  natural (the checkpoint's: NVFP4 uint8 [N, K/2] read as int32 words, compressed-tensors int4
    int32 [N, ceil(K/8)]): word w = elements 8w..8w+7. The MoE expert stacks stay in this layout
    (the grouped MMA GEMM for prefill reads it; no repack at load).

Decode (fp32, exact; instruction counts in docs/kernel-notes.md):
  int4: ((word & (0xF << 4m)) | 0x4B000000) is the float 2^23 + c * 16^m for the nibble at bit 4m
    (m < 4; nibbles 4..7 use word >> 16); one subtraction of 2^23 + 8 * 16^m leaves (c - 8) * 16^m.
    The 16^-m goes into the block's scale factor (planar: one m per block) or into x (natural).
    Zero points: -zp * sum(x over the group), once per (row, group).
  NVFP4: two words per 32-bit word (T1: nibbles 0,1,4,5; T2: 2,3,6,7, three integer ops each) hold
    every nibble's sign 9 bits above its 3 magnitude bits, so one shift + one AND per nibble give
    the fp32 bits sign | e1 e0 m << 22 = E2M1 * 2^-126 (e = 0: an fp32 subnormal, exact). x is
    pre-scaled by 2^X_EXP so that the products are normal floats; the epilogue undoes 2^(126-X_EXP).
  Block / group scales multiply fp32 partial sums of 16 elements (one FMA per block per row).

Programs and modes (constexpr MODE):
  MODE_DENSE  program (n-tile, K split): rows 0..M-1 of x, M <= 4 (one fp32 accumulator per token);
              split K writes fp32 partials [split, M, N] reduced by w4's reduction kernel (no atomics).
  MODE_PAIRS  program (n-tile, pair p): expert ids[p], x row p // TOP_K, out row p; GATED: the program
              computes the gate rows n and the up rows I + n and stores act(gate) * up ([P, I]).
  MODE_TOKENS program (n-tile, token t): the TOP_K pairs of token t in order, each times its routed
              weight (and expert row scale), summed in registers: y[t] directly, deterministic.
Grids come from shapes only (no host sync): CUDA-graph friendly.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gemm import _sm_count, _splitk_reduce_kernel, interpreting

GEMV_MAX_M = 4  # tokens up to which w4_linear takes this kernel (when USE_GEMV)
MODE_DENSE, MODE_PAIRS, MODE_TOKENS = 0, 1, 2
_X_EXP = tl.constexpr(32)  # NVFP4: x * 2^X_EXP keeps E2M1 * 2^-126 * x products in the normal fp32 range
ACT_CODES = {"silu": 0, "gelu_tanh": 1, "gelu_pytorch_tanh": 1, "relu2": 2}


# ---------------------------------------------------------------- decoders (fp32, exact)
@triton.jit
def _nvfp4_pair_words(u):
    """int32 words -> (T1, T2): in T1 nibbles 0,1,4,5 keep their magnitude bits and have their sign
    moved up by 6 (to 9, 13, 25, 29); in T2 nibbles 2,3,6,7 have their magnitude moved down by 6 (to
    2, 6, 18, 22) and keep their sign (11, 15, 27, 31): each sign sits 9 bits above its magnitude,
    as in an fp32 whose sign is bit 31 and whose exponent's low two bits + mantissa's top bit are
    bits 22..24."""
    t1 = (u & 0x00770077) | ((u << 6) & 0x22002200)
    t2 = ((u >> 6) & 0x01DC01DC) | (u & -2013231104)  # 0x88008800
    return t1, t2


@triton.jit
def _e2m1(t1, t2, j: tl.constexpr):
    """Nibble j's E2M1 value * 2^-126 as fp32 (sign | magnitude << 22; e = 0 gives subnormals)."""
    if j == 0:
        b = t1 << 22
    elif j == 1:
        b = t1 << 18
    elif j == 4:
        b = t1 << 6
    elif j == 5:
        b = t1 << 2
    elif j == 2:
        b = t2 << 20
    elif j == 3:
        b = t2 << 16
    elif j == 6:
        b = t2 << 4
    else:
        b = t2
    return (b & -2118123520).to(tl.float32, bitcast=True)  # 0x81C00000: bits 31, 22..24


@triton.jit
def _q4(src, m: tl.constexpr):
    """The nibble at bits 4m..4m+3 of src (m < 4) as (code - 8) * 16^m in fp32, exactly."""
    f = ((src & (15 << (4 * m))) | 0x4B000000).to(tl.float32, bitcast=True)
    return f - (8388608.0 + 8.0 * (16.0 ** m))


@triton.jit
def _e4m3(b):
    """E4M3 scale bytes (uint8) -> fp32, exactly."""
    return b.to(tl.float8e4nv, bitcast=True).to(tl.float32)


# ---------------------------------------------------------------- x in the order the weights need
@triton.jit
def _x_quad(x_row, k, K, c_ok, XS: tl.constexpr, EVEN_K: tl.constexpr):
    """x[k] for a [CH, 4] index tile as fp32 times XS (a power of two), zero past K / past the
    program's chunks (c_ok [CH, 1]: one predicate per vector when K % 128 == 0)."""
    ok = c_ok if EVEN_K else (k < K) & c_ok
    return tl.load(x_row + k, mask=ok, other=0.0).to(tl.float32) * XS


@triton.jit
def _scale_col(s_rows, z_rows, col, ok, G, NVFP4: tl.constexpr, GROUP: tl.constexpr, HAS_ZP: tl.constexpr):
    """(group scale, zero point) [BN, CH] of the per-group column `col` [CH] (GROUP 0: scale 1 and
    the row's one zero point)."""
    p = col[None, :]
    ok = ok & (p < G)
    s = 1.0
    if GROUP != 0:
        s = tl.load(s_rows[:, None] + p, mask=ok, other=0)
        s = _e4m3(s) if NVFP4 else s.to(tl.float32)
    z = 0.0
    if HAS_ZP:
        z = tl.load(z_rows[:, None] + p, mask=ok, other=0).to(tl.float32)
    return s, z


@triton.jit
def _col(k0, GROUP: tl.constexpr):
    """The scale column of the block starting at K-element k0 (GROUP 0: the row's only column)."""
    if GROUP == 0:
        return k0 * 0
    return k0 // GROUP


@triton.jit
def _block_done(acc, part, xsum, s, z, HAS_ZP: tl.constexpr):
    """acc + (part - z * xsum) * s for one 16-element block (part [BN, CH], xsum [CH])."""
    if HAS_ZP:
        part -= z * xsum[None, :]
    return acc + part * s



# ---------------------------------------------------------------- the rows x K loop
@triton.jit
def _rows_dot(w_rows, s_rows, z_rows, xr0, xr1, xr2, xr3, n_ok, c_begin, c_end, K, KW, G,
              NVFP4: tl.constexpr, PLANAR: tl.constexpr, GROUP: tl.constexpr, HAS_ZP: tl.constexpr,
              EVEN_K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, CH: tl.constexpr):
    """Rows w_rows [BN] (pointers to each row's words) over the chunks c_begin..c_end, against up to
    four x rows (pointers). Returns four [BN] fp32 sums (the first BM meaningful); NVFP4 scaled by
    2^(X_EXP - 126); row scales are the caller's. EVEN_K: K % 128 == 0 (no per-element x mask)."""
    XS: tl.constexpr = 2.0 ** _X_EXP if NVFP4 else 1.0
    acc0 = tl.zeros((BN, CH), dtype=tl.float32)
    acc1 = acc0
    acc2 = acc0
    acc3 = acc0
    i4 = tl.arange(0, 4)
    for c0 in range(c_begin, c_end, CH):
        offs_c = c0 + tl.arange(0, CH)
        c_ok = (offs_c < c_end)[:, None]
        ok2 = n_ok[:, None] & (offs_c < c_end)[None, :]
        # a chunk's 16 words as 4 vectors of 4 (16 bytes): each thread holds whole chunks of its rows
        col = (offs_c * 16)[None, :, None] + i4[None, None, :]
        ok3 = ok2[:, :, None]
        wp = w_rows[:, None, None] + col
        if PLANAR:  # rows are whole chunks
            u0 = tl.load(wp, mask=ok3, other=0)
            u1 = tl.load(wp + 4, mask=ok3, other=0)
            u2 = tl.load(wp + 8, mask=ok3, other=0)
            u3 = tl.load(wp + 12, mask=ok3, other=0)
        else:
            u0 = tl.load(wp, mask=ok3 & (col < KW), other=0)
            u1 = tl.load(wp + 4, mask=ok3 & (col + 4 < KW), other=0)
            u2 = tl.load(wp + 8, mask=ok3 & (col + 8 < KW), other=0)
            u3 = tl.load(wp + 12, mask=ok3 & (col + 12 < KW), other=0)
        kc = (offs_c * 128)[:, None]
        if PLANAR:
            acc0, acc1, acc2, acc3 = _planar_chunks(u0, u1, u2, u3, kc, i4, c_ok, acc0, acc1, acc2, acc3, s_rows,
                                                    z_rows, offs_c, ok2, xr0, xr1, xr2, xr3, K, G, NVFP4, GROUP,
                                                    HAS_ZP, EVEN_K, BM, XS)
        else:
            for q in tl.static_range(4):
                uq = u0 if q == 0 else u1 if q == 1 else u2 if q == 2 else u3
                acc0, acc1, acc2, acc3 = _natural_vec(uq, q, kc, i4, c_ok, acc0, acc1, acc2, acc3, s_rows, z_rows,
                                                      offs_c, ok2, xr0, xr1, xr2, xr3, K, G, NVFP4, GROUP, HAS_ZP,
                                                      EVEN_K, BM, XS)
    return tl.sum(acc0, axis=1), tl.sum(acc1, axis=1), tl.sum(acc2, axis=1), tl.sum(acc3, axis=1)


@triton.jit
def _planar_block(u, t1, t2, ue, uo, a: tl.constexpr, NVFP4: tl.constexpr):
    """Block a's 4 values of one 4-word vector q, [BN, CH, 4] fp32, in the order of x[16a + 4q + b]."""
    if NVFP4:
        v = _e2m1(t1, t2, a)
    else:  # paired lanes: element 16a + 4q + 2r + s is nibble (a % 4) + 4s of word 4q + 2r + a // 4
        src = ue if a < 4 else uo
        v = tl.reshape(tl.join(_q4(src, a % 4), _q4(src >> 16, a % 4)), (u.shape[0], u.shape[1], 4))
    return v


@triton.jit
def _planar_chunks(u0, u1, u2, u3, kc, i4, c_ok, acc0, acc1, acc2, acc3, s_rows, z_rows, offs_c, ok2,
                   xr0, xr1, xr2, xr3, K, G, NVFP4: tl.constexpr, GROUP: tl.constexpr, HAS_ZP: tl.constexpr,
                   EVEN_K: tl.constexpr, BM: tl.constexpr, XS: tl.constexpr):
    if NVFP4:
        a0, b0 = _nvfp4_pair_words(u0)
        a1, b1 = _nvfp4_pair_words(u1)
        a2, b2 = _nvfp4_pair_words(u2)
        a3, b3 = _nvfp4_pair_words(u3)
        e0, o0, e1, o1, e2, o2, e3, o3 = u0, u0, u1, u1, u2, u2, u3, u3
    else:
        a0, b0, a1, b1, a2, b2, a3, b3 = u0, u0, u1, u1, u2, u2, u3, u3
        e0, o0 = tl.split(tl.reshape(u0, (u0.shape[0], u0.shape[1], 2, 2)))
        e1, o1 = tl.split(tl.reshape(u1, (u1.shape[0], u1.shape[1], 2, 2)))
        e2, o2 = tl.split(tl.reshape(u2, (u2.shape[0], u2.shape[1], 2, 2)))
        e3, o3 = tl.split(tl.reshape(u3, (u3.shape[0], u3.shape[1], 2, 2)))
    for a in tl.static_range(8):
        v0 = _planar_block(u0, a0, b0, e0, o0, a, NVFP4)
        v1 = _planar_block(u1, a1, b1, e1, o1, a, NVFP4)
        v2 = _planar_block(u2, a2, b2, e2, o2, a, NVFP4)
        v3 = _planar_block(u3, a3, b3, e3, o3, a, NVFP4)
        k = kc + 16 * a + i4[None, :]  # [CH, 4]: x of vector q at k + 4q
        s, z = _scale_col(s_rows, z_rows, _col(offs_c * 128 + 16 * a, GROUP), ok2, G, NVFP4, GROUP, HAS_ZP)
        if not NVFP4:  # the decode's values carry 16^m
            s = s * (1.0 / 16.0 ** (a % 4))
            z = z * 16.0 ** (a % 4)
        acc0 = _planar_token(acc0, v0, v1, v2, v3, xr0, k, K, c_ok, s, z, HAS_ZP, EVEN_K, XS)
        if BM > 1:
            acc1 = _planar_token(acc1, v0, v1, v2, v3, xr1, k, K, c_ok, s, z, HAS_ZP, EVEN_K, XS)
        if BM > 2:
            acc2 = _planar_token(acc2, v0, v1, v2, v3, xr2, k, K, c_ok, s, z, HAS_ZP, EVEN_K, XS)
        if BM > 3:
            acc3 = _planar_token(acc3, v0, v1, v2, v3, xr3, k, K, c_ok, s, z, HAS_ZP, EVEN_K, XS)
    return acc0, acc1, acc2, acc3


@triton.jit
def _planar_token(acc, v0, v1, v2, v3, x_row, k, K, c_ok, s, z, HAS_ZP: tl.constexpr, EVEN_K: tl.constexpr,
                  XS: tl.constexpr):
    """One token, one planar block: each (row, chunk)'s 16 products, scaled, into acc."""
    x0 = _x_quad(x_row, k, K, c_ok, XS, EVEN_K)
    x1 = _x_quad(x_row, k + 4, K, c_ok, XS, EVEN_K)
    x2 = _x_quad(x_row, k + 8, K, c_ok, XS, EVEN_K)
    x3 = _x_quad(x_row, k + 12, K, c_ok, XS, EVEN_K)
    part = tl.sum(v0 * x0[None] + v1 * x1[None] + v2 * x2[None] + v3 * x3[None], axis=2)
    xsum = part
    if HAS_ZP:
        xsum = tl.sum(x0 + x1 + x2 + x3, axis=1)
    return _block_done(acc, part, xsum, s, z, HAS_ZP)


@triton.jit
def _natural_vec(u, q: tl.constexpr, kc, i4, c_ok, acc0, acc1, acc2, acc3, s_rows, z_rows, offs_c, ok2,
                 xr0, xr1, xr2, xr3, K, G, NVFP4: tl.constexpr, GROUP: tl.constexpr, HAS_ZP: tl.constexpr,
                 EVEN_K: tl.constexpr, BM: tl.constexpr, XS: tl.constexpr):
    """Checkpoint layout: vector q of a chunk holds elements 32q + 8i + n (word i, nibble n), the
    16-element blocks 2q (words 0-1) and 2q + 1 (words 2-3)."""
    if NVFP4:
        t1, t2 = _nvfp4_pair_words(u)
        hi = u
    else:
        t1, t2 = u, u
        hi = u >> 16
    v0 = _natural_code(u, hi, t1, t2, 0, NVFP4)
    v1 = _natural_code(u, hi, t1, t2, 1, NVFP4)
    v2 = _natural_code(u, hi, t1, t2, 2, NVFP4)
    v3 = _natural_code(u, hi, t1, t2, 3, NVFP4)
    v4 = _natural_code(u, hi, t1, t2, 4, NVFP4)
    v5 = _natural_code(u, hi, t1, t2, 5, NVFP4)
    v6 = _natural_code(u, hi, t1, t2, 6, NVFP4)
    v7 = _natural_code(u, hi, t1, t2, 7, NVFP4)
    k = kc + 32 * q + 8 * i4[None, :]  # [CH, 4]: nibble n of word i at k + n
    s_lo, z_lo = _scale_col(s_rows, z_rows, _col(offs_c * 128 + 32 * q, GROUP), ok2, G, NVFP4, GROUP, HAS_ZP)
    s_hi, z_hi = _scale_col(s_rows, z_rows, _col(offs_c * 128 + 32 * q + 16, GROUP), ok2, G, NVFP4, GROUP, HAS_ZP)
    acc0 = _natural_token(acc0, v0, v1, v2, v3, v4, v5, v6, v7, xr0, k, K, c_ok, s_lo, z_lo, s_hi, z_hi,
                          NVFP4, GROUP, HAS_ZP, EVEN_K, XS)
    if BM > 1:
        acc1 = _natural_token(acc1, v0, v1, v2, v3, v4, v5, v6, v7, xr1, k, K, c_ok, s_lo, z_lo, s_hi, z_hi,
                              NVFP4, GROUP, HAS_ZP, EVEN_K, XS)
    if BM > 2:
        acc2 = _natural_token(acc2, v0, v1, v2, v3, v4, v5, v6, v7, xr2, k, K, c_ok, s_lo, z_lo, s_hi, z_hi,
                              NVFP4, GROUP, HAS_ZP, EVEN_K, XS)
    if BM > 3:
        acc3 = _natural_token(acc3, v0, v1, v2, v3, v4, v5, v6, v7, xr3, k, K, c_ok, s_lo, z_lo, s_hi, z_hi,
                              NVFP4, GROUP, HAS_ZP, EVEN_K, XS)
    return acc0, acc1, acc2, acc3


@triton.jit
def _natural_code(u, hi, t1, t2, n: tl.constexpr, NVFP4: tl.constexpr):
    if NVFP4:
        return _e2m1(t1, t2, n)
    return _q4(u if n < 4 else hi, n % 4)  # (c - 8) * 16^(n % 4): x carries 16^-(n % 4)


@triton.jit
def _natural_x(x_row, k, K, c_ok, n: tl.constexpr, NVFP4: tl.constexpr, EVEN_K: tl.constexpr, XS: tl.constexpr):
    if NVFP4:
        return _x_quad(x_row, k + n, K, c_ok, XS, EVEN_K)
    return _x_quad(x_row, k + n, K, c_ok, 1.0 / 16.0 ** (n % 4), EVEN_K)


@triton.jit
def _natural_token(acc, v0, v1, v2, v3, v4, v5, v6, v7, x_row, k, K, c_ok, s_lo, z_lo, s_hi, z_hi,
                   NVFP4: tl.constexpr, GROUP: tl.constexpr, HAS_ZP: tl.constexpr, EVEN_K: tl.constexpr,
                   XS: tl.constexpr):
    """One token, one checkpoint-layout vector: two 16-element blocks per (row, chunk) into acc."""
    x0 = _natural_x(x_row, k, K, c_ok, 0, NVFP4, EVEN_K, XS)
    x1 = _natural_x(x_row, k, K, c_ok, 1, NVFP4, EVEN_K, XS)
    x2 = _natural_x(x_row, k, K, c_ok, 2, NVFP4, EVEN_K, XS)
    x3 = _natural_x(x_row, k, K, c_ok, 3, NVFP4, EVEN_K, XS)
    x4 = _natural_x(x_row, k, K, c_ok, 4, NVFP4, EVEN_K, XS)
    x5 = _natural_x(x_row, k, K, c_ok, 5, NVFP4, EVEN_K, XS)
    x6 = _natural_x(x_row, k, K, c_ok, 6, NVFP4, EVEN_K, XS)
    x7 = _natural_x(x_row, k, K, c_ok, 7, NVFP4, EVEN_K, XS)
    part = (v0 * x0[None] + v1 * x1[None] + v2 * x2[None] + v3 * x3[None] + v4 * x4[None] + v5 * x5[None]
            + v6 * x6[None] + v7 * x7[None])  # [BN, CH, 4]: one sum per word
    # [.., 4 words] -> [.., 2 blocks, 2 words]: split takes the word axis, the sum leaves the blocks
    w_even, w_odd = tl.split(tl.reshape(part, (part.shape[0], part.shape[1], 2, 2)))
    b_lo, b_hi = tl.split(w_even + w_odd)
    xs_lo = b_lo
    xs_hi = b_hi
    if HAS_ZP:  # sums of the true x over each block (x0..x7 carry 16^-(n % 4))
        xs = (x0 + x4) + 16.0 * (x1 + x5) + 256.0 * (x2 + x6) + 4096.0 * (x3 + x7)
        xa, xb = tl.split(tl.reshape(xs, (xs.shape[0], 2, 2)))
        xs_lo, xs_hi = tl.split(xa + xb)
    if GROUP == 0 and not HAS_ZP:
        return acc + b_lo + b_hi
    acc = _block_done(acc, b_lo, xs_lo, s_lo, z_lo, HAS_ZP)
    return _block_done(acc, b_hi, xs_hi, s_hi, z_hi, HAS_ZP)


# ---------------------------------------------------------------- the kernel
@triton.jit
def _act(g, ACT: tl.constexpr):
    if ACT == 0:  # silu
        return g / (1.0 + tl.exp(-g))
    if ACT == 1:  # gelu, tanh approximation
        return g / (1.0 + tl.exp(-1.5957691216057308 * (g + 0.044715 * g * g * g)))
    r = tl.maximum(g, 0.0)  # relu^2
    return r * r


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, rs_ptr, b_ptr, ids_ptr, rw_ptr, out_ptr,
    M, N, K, KW, G, stride_xm, stride_we, stride_wn, stride_se, stride_sn, stride_ze, stride_zn,
    stride_rse, stride_rsn, stride_om, stride_os, chunks_per_split,
    MODE: tl.constexpr, TOP_K: tl.constexpr, NVFP4: tl.constexpr, PLANAR: tl.constexpr, GROUP: tl.constexpr,
    HAS_ZP: tl.constexpr, HAS_ROW_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, GATED: tl.constexpr,
    ACT: tl.constexpr, HAS_RW: tl.constexpr, EVEN_K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, CH: tl.constexpr,
):
    """N: output rows (GATED: the gate half; up rows are N + n). ACT: -1 none, else ACT_CODES (MODE_PAIRS:
    act(gate) * up when GATED, act(rows) otherwise). See the module docstring."""
    EPI: tl.constexpr = 2.0 ** (126 - _X_EXP) if NVFP4 else 1.0
    offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
    n_ok = offs_n < N
    chunks = tl.cdiv(K, 128)
    if MODE == 0:
        c_begin = tl.program_id(1) * chunks_per_split
        c_end = tl.minimum(chunks, c_begin + chunks_per_split)
        xr0 = x_ptr
        xr1 = x_ptr + tl.minimum(1, M - 1) * stride_xm  # rows past M: row 0 again, never stored
        xr2 = x_ptr + tl.minimum(2, M - 1) * stride_xm
        xr3 = x_ptr + tl.minimum(3, M - 1) * stride_xm
        a0, a1, a2, a3 = _rows_dot(w_ptr + offs_n.to(tl.int64) * stride_wn, s_ptr + offs_n * stride_sn,
                                   z_ptr + offs_n * stride_zn, xr0, xr1, xr2, xr3, n_ok, c_begin, c_end, K, KW, G,
                                   NVFP4, PLANAR, GROUP, HAS_ZP, EVEN_K, BM, BN, CH)
        f = tl.full((BN,), EPI, tl.float32)
        if HAS_ROW_SCALE:
            f *= tl.load(rs_ptr + offs_n * stride_rsn, mask=n_ok, other=0.0).to(tl.float32)
        bias = tl.zeros((BN,), dtype=tl.float32)
        if HAS_BIAS:  # split K adds the bias in the reduction instead
            bias = tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        out = out_ptr + tl.program_id(1) * stride_os + offs_n
        tl.store(out, (a0 * f + bias).to(out_ptr.dtype.element_ty), mask=n_ok)
        if BM > 1:
            tl.store(out + stride_om, (a1 * f + bias).to(out_ptr.dtype.element_ty), mask=n_ok)
        if BM > 2:
            tl.store(out + 2 * stride_om, (a2 * f + bias).to(out_ptr.dtype.element_ty), mask=n_ok)
        if BM > 3:
            tl.store(out + 3 * stride_om, (a3 * f + bias).to(out_ptr.dtype.element_ty), mask=n_ok)
    else:
        row = tl.program_id(1)  # MODE 1: a pair; MODE 2: a token
        acc = tl.zeros((BN,), dtype=tl.float32)
        for j in tl.static_range(TOP_K if MODE == 2 else 1):
            p = row * TOP_K + j if MODE == 2 else row
            e = tl.load(ids_ptr + p).to(tl.int64)
            xr = x_ptr + (p if MODE == 2 else p // TOP_K).to(tl.int64) * stride_xm
            w_rows = w_ptr + e * stride_we + offs_n.to(tl.int64) * stride_wn
            s_rows = s_ptr + e * stride_se + offs_n * stride_sn
            z_rows = z_ptr + e * stride_ze + offs_n * stride_zn
            g, _, _, _ = _rows_dot(w_rows, s_rows, z_rows, xr, xr, xr, xr, n_ok, 0, chunks, K, KW, G,
                                   NVFP4, PLANAR, GROUP, HAS_ZP, EVEN_K, 1, BN, CH)
            f = tl.full((BN,), EPI, tl.float32)
            if HAS_ROW_SCALE:
                f *= tl.load(rs_ptr + e * stride_rse + offs_n * stride_rsn, mask=n_ok, other=0.0).to(tl.float32)
            g = g * f
            if GATED:
                up, _, _, _ = _rows_dot(w_rows + N * stride_wn, s_rows + N * stride_sn, z_rows + N * stride_zn,
                                        xr, xr, xr, xr, n_ok, 0, chunks, K, KW, G, NVFP4, PLANAR, GROUP, HAS_ZP,
                                        EVEN_K, 1, BN, CH)
                fu = tl.full((BN,), EPI, tl.float32)
                if HAS_ROW_SCALE:
                    fu *= tl.load(rs_ptr + e * stride_rse + (N + offs_n) * stride_rsn, mask=n_ok,
                                  other=0.0).to(tl.float32)
                g = _act(g, ACT) * (up * fu)
            elif ACT >= 0:
                g = _act(g, ACT)
            if HAS_RW:
                g = g * tl.load(rw_ptr + p).to(tl.float32)
            acc += g
        tl.store(out_ptr + row.to(tl.int64) * stride_om + offs_n, acc.to(out_ptr.dtype.element_ty), mask=n_ok)


# ---------------------------------------------------------------- launchers
class GemvTiles:
    """bn rows x ch chunks (of 128 K) per step; split: K slices (dense only)."""

    def __init__(self, bn: int = 32, ch: int = 4, split: int = 1, warps: int = 4, stages: int = 2):
        self.bn, self.ch, self.split, self.warps, self.stages = bn, ch, split, warps, stages

    def __repr__(self):
        return f"GemvTiles(bn={self.bn}, ch={self.ch}, split={self.split}, warps={self.warps}, stages={self.stages})"


def pick_tiles(m: int, n: int, k: int, device: torch.device) -> GemvTiles:
    """Dense decode: 128-row tiles of 4 chunks per step (4 rows a thread share each x value: 5.4
    SASS instructions a weight against 7.7 at 32 rows), K split until about 4 programs per SM.
    Not measured yet: benchmarks/kernels.py --sweep --ms 1,2,4 times the alternatives."""
    sms, chunks = _sm_count(device), triton.cdiv(k, 128)
    t = GemvTiles(bn=128)
    tiles = triton.cdiv(n, t.bn)
    split = max(1, min(triton.cdiv(4 * sms, tiles), chunks // t.ch, 16))
    return GemvTiles(t.bn, t.ch, split, t.warps, t.stages)


def _scales(nvfp4: bool, scale: torch.Tensor, row_scale: torch.Tensor | None, group: int):
    """(group scale or None, row scale or None, GROUP): int4 per-channel scales are row scales;
    works on [N, G] and stacked [E, N, G]."""
    if nvfp4:
        return scale.view(torch.uint8), row_scale, 16
    if scale.shape[-1] == 1:
        return None, scale[..., 0], 0
    return scale, row_scale, group


def _launch_args(words, s, zero, rs):
    """Stand-ins for absent tensors (their constexpr flags keep the kernel off them) and strides."""
    unused = words
    st = lambda t, d: t.stride(d) if t is not None else 0  # noqa: E731
    return (s if s is not None else unused, zero if zero is not None else unused, rs if rs is not None else unused,
            st)


def gemv_w4(x: torch.Tensor, words: torch.Tensor, nvfp4: bool, k: int, scale: torch.Tensor,
            zero: torch.Tensor | None = None, group: int = 16, row_scale: torch.Tensor | None = None,
            bias: torch.Tensor | None = None, planar: bool = True, tiles: GemvTiles | None = None) -> torch.Tensor:
    """x [M, K] (M <= GEMV_MAX_M, bf16/fp16) @ W.T for 4-bit words [N, KW] (planar or natural
    layout), scales as w4.w4_linear takes them. Returns [M, N] in x's dtype."""
    m, n = x.shape[0], words.shape[0]
    if m > GEMV_MAX_M:
        raise ValueError(f"gemv_w4: {m} tokens; the GEMV kernel takes at most {GEMV_MAX_M}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    s, rs, grp = _scales(nvfp4, scale, row_scale, group)
    t = tiles or pick_tiles(m, n, k, x.device)
    chunks = triton.cdiv(k, 128)
    per_split = triton.cdiv(chunks, max(1, t.split))
    split = triton.cdiv(chunks, per_split)
    dst = out if split == 1 else torch.empty((split, m, n), dtype=torch.float32, device=x.device)
    s_, z_, rs_, st = _launch_args(words, s, zero, rs)
    _gemv_kernel[(triton.cdiv(n, t.bn), split)](
        x, words, s_, z_, rs_, bias if bias is not None else words, words, words, dst,
        m, n, k, words.shape[1], s.shape[-1] if s is not None else 1, x.stride(0), 0, words.stride(0),
        0, st(s, 0), 0, st(zero, 0), 0, st(rs, 0), n, m * n, per_split,
        MODE=MODE_DENSE, TOP_K=1, NVFP4=nvfp4, PLANAR=planar, GROUP=grp, HAS_ZP=zero is not None,
        HAS_ROW_SCALE=rs is not None, HAS_BIAS=bias is not None and split == 1, GATED=False, ACT=0, HAS_RW=False,
        EVEN_K=k % 128 == 0, BM=m, BN=t.bn, CH=t.ch, num_warps=t.warps, num_stages=t.stages)
    if split > 1:
        block = 1024
        _splitk_reduce_kernel[(triton.cdiv(m * n, block),)](
            dst, bias if bias is not None else dst, out, m * n, n, SPLIT=split, HAS_BIAS=bias is not None,
            BLOCK=block)
    return out


MOE_TILES = dict(bn=32, ch=4, warps=4, stages=2)  # moe_gemv's default tiling (benchmarks/moe_kernels.py --sweep)


def moe_gemv(x: torch.Tensor, words: torch.Tensor, nvfp4: bool, k: int, scale: torch.Tensor,
             zero: torch.Tensor | None, group: int, row_scale: torch.Tensor | None, topk_ids: torch.Tensor,
             top_k: int, *, gated: bool = False, activation: str | None = None, routed_weights: torch.Tensor | None = None,
             sum_topk: bool = False, planar: bool = False, tiles: dict | None = None) -> torch.Tensor:
    """One projection of a MoE layer on stacked 4-bit experts words [E, N, KW], per (token, expert) pair.

    x: [T, K] (first projection: pair p reads row p // top_k) or [P, K] (sum_topk: pair p reads row p).
    topk_ids [T, top_k]. activation (first projection): act(rows), or with gated (the stack's rows are
    [gate; up]) act(gate) * up ([P, N/2]). routed_weights fp32 [P]: multiplied per pair. sum_topk: the top_k pairs of each token
    summed in the program (fixed order) -> [T, N]; else [P, N or N/2].
    """
    e, n_all = words.shape[0], words.shape[1]
    n = n_all // 2 if gated else n_all
    pairs = topk_ids.numel()
    rows = pairs // top_k if sum_topk else pairs
    out = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    if pairs == 0:
        return out
    if x.stride(-1) != 1:
        x = x.contiguous()
    ids = topk_ids.reshape(-1)
    if ids.dtype != torch.int32:
        ids = ids.to(torch.int32)
    s, rs, grp = _scales(nvfp4, scale, row_scale, group)
    s_, z_, rs_, st = _launch_args(words, s, zero, rs)
    t = dict(MOE_TILES, **(tiles or {}))
    bn = t["bn"]
    _gemv_kernel[(triton.cdiv(n, bn), rows)](
        x, words, s_, z_, rs_, words, ids.contiguous(), routed_weights if routed_weights is not None else words, out,
        rows, n, k, words.shape[2], s.shape[-1] if s is not None else 1, x.stride(0), words.stride(0),
        words.stride(1), st(s, 0), st(s, 1), st(zero, 0), st(zero, 1), st(rs, 0), st(rs, 1), out.stride(0), 0, 0,
        MODE=MODE_TOKENS if sum_topk else MODE_PAIRS, TOP_K=top_k, NVFP4=nvfp4, PLANAR=planar, GROUP=grp,
        HAS_ZP=zero is not None, HAS_ROW_SCALE=rs is not None, HAS_BIAS=False, GATED=gated,
        ACT=-1 if activation is None else ACT_CODES[activation], HAS_RW=routed_weights is not None, EVEN_K=k % 128 == 0, BM=1, BN=bn, CH=t["ch"],
        num_warps=t["warps"], num_stages=t["stages"])
    return out
