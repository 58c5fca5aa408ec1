"""Bit-exact encodings of the on-disk formats (spec section 2), in plain PyTorch.

Every scheme unit, every kernel test and `lowbit quantize` uses these functions, so there is one
definition of each format in the code base. They run on CPU and GPU tensors alike.
"""
from __future__ import annotations

import sys

import torch

FP8_MAX = 448.0  # float8_e4m3fn
E2M1_MAX = 6.0
NVFP4_BLOCK = 16
# Magnitudes of the 8 E2M1 codes (bits 0-2); bit 3 is the sign.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def _e2m1_table(device) -> torch.Tensor:
    mags = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=device)
    return torch.cat([mags, -mags])  # code c -> value, c in 0..15


# ---------------------------------------------------------------- E2M1 (NVFP4 elements)
def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K/2] -> codes uint8 [..., K]; element 2j is the low nibble, 2j+1 the high one."""
    lo = packed & 0x0F
    hi = packed >> 4
    return torch.stack([lo, hi], dim=-1).flatten(-2)


def pack_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """codes uint8 [..., K] (K even) -> uint8 [..., K/2], low nibble first."""
    c = codes.to(torch.uint8).unflatten(-1, (-1, 2))
    return c[..., 0] | (c[..., 1] << 4)


def e2m1_to_float(codes: torch.Tensor) -> torch.Tensor:
    return _e2m1_table(codes.device)[codes.long()]


def float_to_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest E2M1 value, ties to the even mantissa, clamp at 6 -> codes uint8.

    Ties: 0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4 (spec section 2).
    """
    x = x.float()
    a = x.abs()
    # Midpoints between consecutive magnitudes; a tie goes to the code with an even mantissa bit,
    # i.e. to the lower neighbour when that one is even (codes 0,2,4,6) and upward otherwise.
    bounds = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], device=x.device)
    idx = torch.bucketize(a, bounds, right=False)  # a <= bound -> lower code
    # bucketize(right=False) puts a tie a == bound in the lower bucket; move ties to odd-lower up.
    tie = (idx < 7) & (a == bounds[idx.clamp(max=6)])
    lower_is_odd = (idx % 2) == 1
    idx = torch.where(tie & lower_is_odd, idx + 1, idx)
    idx = idx.clamp(max=7).to(torch.uint8)
    sign = ((x < 0) & (idx > 0)).to(torch.uint8) << 3
    return idx | sign


# ---------------------------------------------------------------- NVFP4 weights
def _e2m1_byte_table(device) -> torch.Tensor:
    """[256, 2]: the values of a packed byte's low and high nibble (one gather decodes two codes)."""
    t = _e2m1_table(device)
    b = torch.arange(256, device=device)
    return torch.stack([t[b & 0x0F], t[b >> 4]], dim=-1)


def dequant_nvfp4(
    packed: torch.Tensor, block_scale: torch.Tensor, row_scale: torch.Tensor | float
) -> torch.Tensor:
    """NVFP4 weight -> float32 [N, K].

    packed uint8 [N, K/2]; block_scale float8_e4m3fn [N, K/16]; row_scale: the multiplying global
    scale (ModelOpt `weight_scale_2`, or 1/`weight_global_scale` for compressed-tensors), a
    scalar or one value per output row [N].
    """
    n = packed.shape[0]
    vals = _e2m1_byte_table(packed.device)[packed.long()].reshape(n, -1)  # [N, K]
    k = vals.shape[1]
    nb = block_scale.shape[1]
    if nb * NVFP4_BLOCK == k:  # the usual case: scale whole blocks without materializing [N, K] scales
        vals = (vals.view(n, nb, NVFP4_BLOCK) * block_scale.float()[..., None]).view(n, k)
    else:
        vals = vals * block_scale.float().repeat_interleave(NVFP4_BLOCK, dim=1)[:, :k]
    rs = torch.as_tensor(row_scale, dtype=torch.float32, device=vals.device).reshape(-1)
    rs = rs.reshape(-1, 1) if rs.numel() == n else rs.reshape(())
    return vals * rs


def fake_quant_nvfp4_activation(x: torch.Tensor, global_scale: torch.Tensor | float) -> torch.Tensor:
    """NVFP4 W4A4 activation numerics (Blackwell reference semantics), returned dequantized.

    g = decode global scale (ModelOpt `input_scale`; compressed-tensors 1/`input_global_scale`).
    Per 16-element block along the last dim: bs = e4m3(clamp(amax/(6g), 2^-9, 448));
    x_q = e2m1_round(x / (bs*g)); result x_q*bs*g, in x's dtype.
    """
    g = torch.as_tensor(global_scale, dtype=torch.float32, device=x.device).reshape(())
    shape = x.shape
    k = shape[-1]
    pad = (-k) % NVFP4_BLOCK
    xf = x.float()
    if pad:
        xf = torch.nn.functional.pad(xf, (0, pad))
    blocks = xf.unflatten(-1, (-1, NVFP4_BLOCK))
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    bs = (amax / (E2M1_MAX * g)).clamp(2.0**-9, FP8_MAX).to(torch.float8_e4m3fn).float()
    q = e2m1_to_float(float_to_e2m1(blocks / (bs * g)))
    out = (q * bs * g).flatten(-2)[..., :k]
    return out.to(x.dtype)


# ---------------------------------------------------------------- FP8
def quantize_fp8(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """x / scale, saturated to +-448, cast to float8_e4m3fn (scale broadcasts)."""
    s = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    return (x.float() / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def fake_quant_fp8_activation(x: torch.Tensor, scale: torch.Tensor | None,
                              amax: torch.Tensor | None = None) -> torch.Tensor:
    """FP8 activation quant-dequant. scale=None: dynamic per-token (amax/448 per row), from each
    row's own amax or from `amax` ([..., 1]; e.g. reduced over the whole K under tensor parallelism)."""
    xf = x.float()
    if scale is None:
        if amax is None:
            amax = xf.abs().amax(dim=-1, keepdim=True)
        s = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))  # an all-zero row stays zero
    else:
        s = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    return (quantize_fp8(xf, s).float() * s).to(x.dtype)


# ---------------------------------------------------------------- int8 activations (compressed-tensors)
INT8_TOKEN_DIVISOR = 127.5  # compressed-tensors: amax / ((127 - (-128)) / 2)


def quantize_int8_per_token(x: torch.Tensor, amax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """compressed-tensors' dynamic symmetric per-token int8 rule (0.20: `calculate_qparams`, then
    `forward._quantize_dequantize`), every step in x's dtype as it computes them:

      s = dtype(amax / 127.5), a zero s -> finfo(dtype).eps;  v = dtype(x / s) + 0;
      q = round_half_even(clamp(v, -128, 127))

    (vLLM's serving kernels use amax / 127 in fp32 instead; a row's positive extreme then maps to
    127, here to 127 and its negative extreme to -128.) Rows are the last dimension: compressed-
    tensors reduces every dimension but the first two, so for the [batch, seq, hidden] inputs of a
    transformers forward the two agree. amax ([..., 1], e.g. over the whole K under tensor
    parallelism) replaces each row's own. float64 inputs (the exact tensor-parallel checks) are
    quantized as float32, as the other activation quantizers take them, so that a float32 amax
    all-reduced over ranks is exact. Returns (q as float32 integers, s as float32 [..., 1]).
    """
    if x.dtype == torch.float64:
        x = x.float()
    dt = x.dtype
    if amax is None:
        amax = x.abs().amax(dim=-1, keepdim=True)
    amax = amax.to(dt)  # the max of dt values: exact
    s = amax / amax.new_tensor(INT8_TOKEN_DIVISOR)  # a 0-d divisor on the device: the IEEE quotient everywhere
    s = torch.where(s == 0, s.new_tensor(torch.finfo(dt).eps), s)
    v = x / s + x.new_zeros(())  # CT adds its zero point (0), turning x = -0 into +0
    return torch.round(v.clamp(-128, 127)).float(), s.float()


def fake_quant_int8_per_token(x: torch.Tensor, amax: torch.Tensor | None = None) -> torch.Tensor:
    """quantize_int8_per_token dequantized in x's dtype: bit for bit compressed-tensors'
    `forward_quantize` of a dynamic per-token int8 input."""
    q, s = quantize_int8_per_token(x, amax)
    return q.to(x.dtype) * s.to(x.dtype)


# ---------------------------------------------------------------- compressed-tensors int packing
def pack_int32(q: torch.Tensor, bits: int, dim: int = -1) -> torch.Tensor:
    """Signed ints in [-2^(b-1), 2^(b-1)) -> int32 words along `dim` (CT pack-quantized).

    Each value is offset by 2^(b-1) and stored unsigned; element i occupies bits [i*b, i*b+b) of
    the int32 stream, least-significant first. The last word is zero-padded.
    """
    per_word = 32 // bits
    q = q.movedim(dim, -1)
    u = (q.to(torch.int64) + (1 << (bits - 1))) & ((1 << bits) - 1)
    pad = (-u.shape[-1]) % per_word
    if pad:
        u = torch.nn.functional.pad(u, (0, pad))
    u = u.unflatten(-1, (-1, per_word))
    shifts = torch.arange(per_word, device=q.device, dtype=torch.int64) * bits
    words = (u << shifts).sum(dim=-1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.movedim(-1, dim)


def unpack_int32(packed: torch.Tensor, bits: int, length: int, dim: int = -1) -> torch.Tensor:
    """Inverse of pack_int32: int32 words -> signed int8 values, `length` of them along `dim`."""
    p = packed.movedim(dim, -1).contiguous()
    if bits in (4, 8) and p.dtype == torch.int32 and sys.byteorder == "little":
        # int32 words are little-endian in memory: byte j of a row holds elements in stream order,
        # so a byte view decodes without 64-bit shifts (several times faster on CPU).
        b = p.view(torch.uint8)
        if bits == 8:
            u = b.to(torch.int16)
        else:
            u = torch.stack([b & 0x0F, b >> 4], dim=-1).flatten(-2).to(torch.int16)
    else:
        per_word = 32 // bits
        w = p.to(torch.int64) & 0xFFFFFFFF
        shifts = torch.arange(per_word, device=packed.device, dtype=torch.int64) * bits
        u = ((w.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).flatten(-2)
    q = (u[..., :length] - (1 << (bits - 1))).to(torch.int8)
    return q.movedim(-1, dim)


def dequant_int(
    q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None = None, group_size: int | None = None
) -> torch.Tensor:
    """(q - zp) * scale -> float32 [N, K]; scale [N, K/group] (group) or [N, 1] (channel) or [1]."""
    qf = q.float()
    s = scale.float()
    z = zero_point.float() if zero_point is not None else None
    if group_size and s.dim() == 2 and s.shape[1] > 1:
        k = qf.shape[1]
        s = s.repeat_interleave(group_size, dim=1)[:, :k]
        if z is not None:
            z = z.repeat_interleave(group_size, dim=1)[:, :k]
    if z is not None:
        qf = qf - z
    return qf * s
