"""Register-level dequantization of packed weight tiles, for the GEMM kernels (Triton device code).

A tile arrives as int32 words [R, W] holding 8 4-bit codes each (element 8w+i at bits 4i; NVFP4
bytes read as little-endian words have the same order). It leaves as [R, 8W] in the activation
dtype, ready for tl.dot. Each format has two spellings that compute the same bits:

  * `USE_ASM`: PTX that decodes two words at once, one 32-bit register holding the same element of
    both (bf16x2/f16x2), so every integer and multiply instruction does two elements. About 3
    instructions per element instead of ~10 for the Triton spelling, which at decode is the
    difference between being bound by HBM and being bound by instruction issue.
  * plain Triton (the CPU interpreter, and a fallback): fp32 arithmetic, rounded once at the end.

NVFP4 values come out scaled: code * block_scale * 2^-NVFP4_EXP(dtype) (2^-26 for bf16, 2^-14 for
fp16), because the decoding bit trick yields E2M1 * 2^-126 (bf16) / 2^-14 (fp16) and the rest of
the power of two is cheaper in the epilogue than per element. All scalings are exact.
"""
from __future__ import annotations

import triton
import triton.language as tl

NVFP4_EXP_BF16 = 26
NVFP4_EXP_FP16 = 14


@triton.jit
def join8(v0, v1, v2, v3, v4, v5, v6, v7):
    """Eight [R, W] tensors, v_i holding element 8w+i -> [R, 8W] in natural element order."""
    a = tl.join(tl.join(tl.join(v0, v4), tl.join(v2, v6)), tl.join(tl.join(v1, v5), tl.join(v3, v7)))
    return tl.reshape(a, (a.shape[0], a.shape[1] * 8))


@triton.jit
def join4(v0, v1, v2, v3):
    a = tl.join(tl.join(v0, v2), tl.join(v1, v3))
    return tl.reshape(a, (a.shape[0], a.shape[1] * 4))


# Inline-PTX decoders take int32 words two at a time (pack=2: $8, $9) plus optional 32-bit operands,
# and give eight registers of two DT values each (one per K-block or element slot).
def _constraints(extra_operands: int) -> tl.constexpr:
    return tl.constexpr(",".join(["=r"] * 8 + ["r"] * (2 + extra_operands)))


_WORDS = _constraints(0)
_WORDS_1 = _constraints(1)
_WORDS_2 = _constraints(2)
_EIGHT = tl.constexpr({dt: (dt,) * 8 for dt in (tl.bfloat16, tl.float16)})  # the eight outputs' dtypes


@triton.jit
def _asm8(text: tl.constexpr, constraints: tl.constexpr, args, DT: tl.constexpr):
    return tl.inline_asm_elementwise(text, constraints, args, dtype=_EIGHT[DT], is_pure=True, pack=2)


# ---------------------------------------------------------------- NVFP4
@triton.jit
def nvfp4_scale(block_scale, DT: tl.constexpr):
    """E4M3 block scales -> the per-unit scale operand of nvfp4_tile (DT; bf16 carries 2^100)."""
    f = block_scale.to(tl.float32)
    if DT == tl.bfloat16:
        f = f * (2.0 ** 100)
    return f.to(DT)


@triton.jit
def _e2m1_f32(c):
    """E2M1 code (int32 0..15) -> fp32 value * 2^-14, exactly: the magnitude bits go to the low
    exponent bits and top mantissa bit of an fp16 (e=0 codes become fp16 subnormals)."""
    bits = ((c & 7) << 9) | ((c & 8) << 12)
    return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _nvfp4_pure(units, scale, DT: tl.constexpr):
    # _e2m1_f32 gives v * 2^-14; bf16 scales carry 2^100: 2^-14 * 2^100 * 2^-112 = 2^-26
    f = scale.to(tl.float32) * (2.0 ** -112 if DT == tl.bfloat16 else 1.0)
    return join8((_e2m1_f32(units & 0xF) * f).to(DT), (_e2m1_f32((units >> 4) & 0xF) * f).to(DT),
                 (_e2m1_f32((units >> 8) & 0xF) * f).to(DT), (_e2m1_f32((units >> 12) & 0xF) * f).to(DT),
                 (_e2m1_f32((units >> 16) & 0xF) * f).to(DT), (_e2m1_f32((units >> 20) & 0xF) * f).to(DT),
                 (_e2m1_f32((units >> 24) & 0xF) * f).to(DT), (_e2m1_f32((units >> 28) & 0xF) * f).to(DT))


# Per element pair: PRMT moves byte e of both words into the top byte of each 16-bit lane, even
# elements (low nibble) shift up by 4, then sign -> bit 15 and the 3 magnitude bits -> the low
# exponent bits + top mantissa bit: bf16 gets E2M1 * 2^-126, fp16 gets E2M1 * 2^-14 (subnormals
# for e=0, which mul.bf16x2 / mul.f16x2 without .ftz keep). One multiply applies the block scale
# (bf16: carrying 2^100, so that the product lands at 2^-26 and never overflows).
_NVFP4_PAIR = """
    prmt.b32 t, $8, $9, {sel};
    {shift}
    and.b32 v, t, 0x80008000;
    shr.b32 w, t, {mshift};
    and.b32 w, w, {mmask};
    or.b32 v, v, w;
    mul.rn.{ty} ${out}, v, {mult};"""
# the multiplier register without a scale operand: 2^126 (bf16x2) / 2^14 (f16x2) -> exact E2M1
_UNIT = {True: "0x7E807E80", False: "0x74007400"}


def _nvfp4_asm_text(bf16: bool, scaled: bool = True) -> str:
    body = []
    for j in range(8):
        e = j // 2
        body.append(_NVFP4_PAIR.format(
            sel=hex((e << 4) | ((4 + e) << 12)), shift="shl.b32 t, t, 4;" if j % 2 == 0 else "",
            mshift=6 if bf16 else 3, mmask="0x01C001C0" if bf16 else "0x0E000E00",
            ty="bf16x2" if bf16 else "f16x2", out=j, mult="$10" if scaled else "c"))
    head = "" if scaled else f"\n    mov.b32 c, {_UNIT[bf16]};"
    return "{\n    .reg .b32 t, v, w, c;" + head + "".join(body) + "\n}"


_NVFP4_ASM_BF16 = tl.constexpr(_nvfp4_asm_text(True))
_NVFP4_ASM_FP16 = tl.constexpr(_nvfp4_asm_text(False))
_E2M1_ASM_BF16 = tl.constexpr(_nvfp4_asm_text(True, scaled=False))
_E2M1_ASM_FP16 = tl.constexpr(_nvfp4_asm_text(False, scaled=False))


@triton.jit
def _nvfp4_asm(units, scale, DT: tl.constexpr):
    if DT == tl.bfloat16:
        v = _asm8(_NVFP4_ASM_BF16, _WORDS_1, (units, scale), DT)
    else:
        v = _asm8(_NVFP4_ASM_FP16, _WORDS_1, (units, scale), DT)
    return join8(v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7])


@triton.jit
def nvfp4_tile(units, scale, DT: tl.constexpr, USE_ASM: tl.constexpr):
    """int32 words [R, W] + per-word scale from nvfp4_scale [R, W] -> [R, 8W] in DT, equal to
    E2M1 * block_scale * 2^-NVFP4_EXP(DT)."""
    if USE_ASM:
        return _nvfp4_asm(units, scale, DT)
    return _nvfp4_pure(units, scale, DT)


# ---------------------------------------------------------------- int4 (compressed-tensors)
@triton.jit
def _int_code(c, offset):
    """Unsigned code (int32 < 2^23) minus `offset` (2^23 + q offset + zero point), exactly:
    OR-ing the code into the mantissa of 2^23 gives 2^23 + c without an int->float instruction."""
    return (c | 0x4B000000).to(tl.float32, bitcast=True) - offset


@triton.jit
def _int4_pure(units, offset, scale, DT: tl.constexpr, HAS_SCALE: tl.constexpr):
    off = offset.to(tl.float32) + 8388608.0
    v0 = _int_code(units & 0xF, off)
    v1 = _int_code((units >> 4) & 0xF, off)
    v2 = _int_code((units >> 8) & 0xF, off)
    v3 = _int_code((units >> 12) & 0xF, off)
    v4 = _int_code((units >> 16) & 0xF, off)
    v5 = _int_code((units >> 20) & 0xF, off)
    v6 = _int_code((units >> 24) & 0xF, off)
    v7 = _int_code((units >> 28) & 0xF, off)
    if HAS_SCALE:
        s = scale.to(DT).to(tl.float32)  # as the PTX spelling: the scale in DT, one rounding after
        v0, v1, v2, v3, v4, v5, v6, v7 = v0 * s, v1 * s, v2 * s, v3 * s, v4 * s, v5 * s, v6 * s, v7 * s
    return join8(v0.to(DT), v1.to(DT), v2.to(DT), v3.to(DT), v4.to(DT), v5.to(DT), v6.to(DT), v7.to(DT))


# Per element pair: PRMT puts byte e of both words into the low byte of each lane, the nibble is
# OR-ed into the mantissa of 128.0 (bf16) / 1024.0 (fp16), and one subtraction of
# (128|1024) + 8 + zero_point leaves q - zp exactly; an optional multiply applies a group scale.
_INT4_PAIR = """
    prmt.b32 t, $8, $9, {sel};
    {shift}
    and.b32 t, t, 0x000F000F;
    or.b32 t, t, {magic};
    sub.rn.{ty} ${out}, t, {off};{scale}"""


def _int4_asm_text(bf16: bool, scaled: bool) -> str:
    body = []
    ty = "bf16x2" if bf16 else "f16x2"
    for j in range(8):
        e = j // 2
        body.append(_INT4_PAIR.format(
            sel=hex(e | ((4 + e) << 8)), shift="shr.b32 t, t, 4;" if j % 2 else "",
            magic="0x43004300" if bf16 else "0x64006400", ty=ty, out=j, off="$10",
            scale=f"\n    mul.rn.{ty} ${j}, ${j}, $11;" if scaled else ""))
    return "{\n    .reg .b32 t;" + "".join(body) + "\n}"


# Planar int4 (w4.py pairs the lanes): $8 holds blocks 0-3 of an element pair, $9 blocks 4-7, block j
# of both elements in the two 16-bit lanes at bits 4(j % 4). bf16: shift the nibble to bit 0, one
# LOP3 ((t & mask) | 128.0) and one subtraction of 136 give q = code - 8. fp16 has mantissa room
# for the odd nibbles in place (1024 + 16 c): a fused multiply-add by 1/16 and -72 replaces the shift.
def _q4_pair_asm_text(bf16: bool) -> str:
    body = ["{\n    .reg .b32 t, u, c, d, e;",
            f"    mov.b32 c, {'0x43084308' if bf16 else '0x64086408'};",  # 136 / 1032
            "    mov.b32 d, 0x2C002C00;\n    mov.b32 e, 0xD480D480;"]  # 1/16, -72 (fp16)
    for j in range(8):
        src, pos = ("$8", "$9")[j // 4], j % 4
        if bf16:
            shifted = src if pos == 0 else "u"
            if pos:
                body.append(f"    shr.b32 u, {src}, {4 * pos};")
            body.append(f"    lop3.b32 t, {shifted}, 0x000F000F, 0x43004300, 0xEA;")
            body.append(f"    sub.rn.bf16x2 ${j}, t, c;")
        else:
            if pos == 2:
                body.append(f"    shr.b32 u, {src}, 8;")
            shifted = src if pos < 2 else "u"
            if pos % 2 == 0:
                body.append(f"    lop3.b32 t, {shifted}, 0x000F000F, 0x64006400, 0xEA;")
                body.append(f"    sub.rn.f16x2 ${j}, t, c;")
            else:
                body.append(f"    lop3.b32 t, {shifted}, 0x00F000F0, 0x64006400, 0xEA;")
                body.append(f"    fma.rn.f16x2 ${j}, t, d, e;")
    return "\n".join(body) + "\n}"


_INT4_ASM_BF16_S = tl.constexpr(_int4_asm_text(True, True))
_INT4_ASM_BF16 = tl.constexpr(_int4_asm_text(True, False))
_INT4_ASM_FP16_S = tl.constexpr(_int4_asm_text(False, True))
_INT4_ASM_FP16 = tl.constexpr(_int4_asm_text(False, False))
_Q4_ASM_BF16 = tl.constexpr(_q4_pair_asm_text(True))
_Q4_ASM_FP16 = tl.constexpr(_q4_pair_asm_text(False))


@triton.jit
def _int4_asm(units, offset, scale, DT: tl.constexpr, HAS_SCALE: tl.constexpr):
    # the offset in the lane dtype: (128|1024) + 8 + zp is an exact small integer in bf16 and fp16;
    # the unscaled PTX leaves the scale operand unread
    if DT == tl.bfloat16:
        args = (units, (offset.to(tl.float32) + 128.0).to(DT), scale.to(DT))
        if HAS_SCALE:
            v = _asm8(_INT4_ASM_BF16_S, _WORDS_2, args, DT)
        else:
            v = _asm8(_INT4_ASM_BF16, _WORDS_2, args, DT)
    else:
        args = (units, (offset.to(tl.float32) + 1024.0).to(DT), scale.to(DT))
        if HAS_SCALE:
            v = _asm8(_INT4_ASM_FP16_S, _WORDS_2, args, DT)
        else:
            v = _asm8(_INT4_ASM_FP16, _WORDS_2, args, DT)
    return join8(v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7])


@triton.jit
def int4_tile(units, offset, scale, DT: tl.constexpr, HAS_SCALE: tl.constexpr, USE_ASM: tl.constexpr):
    """int32 words [R, W] -> (code - offset) [* scale] as [R, 8W] in DT.

    offset: q offset + zero point (8 + zp), broadcastable to [R, W]; scale: per word, if HAS_SCALE.
    """
    if USE_ASM:
        return _int4_asm(units, offset, scale, DT, HAS_SCALE)
    return _int4_pure(units, offset, scale, DT, HAS_SCALE)


# ---------------------------------------------------------------- int8 (compressed-tensors)
@triton.jit
def int8_tile(units, offset, scale, DT: tl.constexpr, HAS_SCALE: tl.constexpr):
    """int32 words [R, W] of 4 bytes (element 4w+i at bits 8i) -> (code - offset) [* scale]."""
    off = offset.to(tl.float32) + 8388608.0
    v0 = _int_code(units & 0xFF, off)
    v1 = _int_code((units >> 8) & 0xFF, off)
    v2 = _int_code((units >> 16) & 0xFF, off)
    v3 = _int_code((units >> 24) & 0xFF, off)
    if HAS_SCALE:
        s = scale.to(tl.float32)
        v0, v1, v2, v3 = v0 * s, v1 * s, v2 * s, v3 * s
    return join4(v0.to(DT), v1.to(DT), v2.to(DT), v3.to(DT))


# ---------------------------------------------------------------- planar 4-bit words (w4.py)
# In the planar layout nibble j of a word belongs to K-block j of a 128-element chunk, so the eight
# outputs of one decode are eight contiguous K-blocks. The decode takes the words alone (no scale,
# no offset operand): Triton then loads the words from shared memory straight into the MMA operand
# layout and runs the PTX there, with no shared-memory round trip for the decoded weights. The
# scales are applied to the MMA results instead (w4.py).
@triton.jit
def _planar_code(units, j: tl.constexpr, NVFP4: tl.constexpr, DT: tl.constexpr):
    """Nibble j (K-block j) of every element of a planar word tile [R, W], as its value in DT."""
    if NVFP4:
        v = (_e2m1_f32((units >> (4 * j)) & 0xF) * 16384.0).to(DT)
    else:  # paired lanes: element 2p's block j in word 2p + j // 4, at bit 4 (j % 4); 2p+1's 16 bits up
        lo, hi = tl.split(tl.reshape(units, (units.shape[0], units.shape[1] // 2, 2)))
        src = hi if j >= 4 else lo
        pair = tl.join((src >> (4 * (j % 4))) & 0xF, (src >> (16 + 4 * (j % 4))) & 0xF)
        v = (tl.reshape(pair, units.shape) - 8).to(tl.float32).to(DT)
    return v


@triton.jit
def planar_tile(units, NVFP4: tl.constexpr, DT: tl.constexpr, USE_ASM: tl.constexpr):
    """int32 words [R, W] -> 8 tensors [R, W] in DT: nibble j as its exact value (E2M1, or the
    int4 q = code - 8)."""
    if USE_ASM:
        if NVFP4 and DT == tl.bfloat16:
            v = _asm8(_E2M1_ASM_BF16, _WORDS, (units,), DT)
        elif NVFP4:
            v = _asm8(_E2M1_ASM_FP16, _WORDS, (units,), DT)
        elif DT == tl.bfloat16:
            v = _asm8(_Q4_ASM_BF16, _WORDS, (units,), DT)
        else:
            v = _asm8(_Q4_ASM_FP16, _WORDS, (units,), DT)
    else:
        v = (_planar_code(units, 0, NVFP4, DT), _planar_code(units, 1, NVFP4, DT), _planar_code(units, 2, NVFP4, DT),
             _planar_code(units, 3, NVFP4, DT), _planar_code(units, 4, NVFP4, DT), _planar_code(units, 5, NVFP4, DT),
             _planar_code(units, 6, NVFP4, DT), _planar_code(units, 7, NVFP4, DT))
    return v
