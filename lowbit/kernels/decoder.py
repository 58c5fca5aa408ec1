"""Fused decoder kernels: RMSNorm (with the residual add; plain or (1 + w) weights), SiLU-and-mul,
rotary + KV-cache store, and decode attention over the paged KV cache (full or sliding-window).

The KV cache of a layer is a pool of fixed-size blocks [num_blocks, block_size, Hkv, D]; a sequence
owns a row of the block table [slots, max_blocks], and its position p lives in pool row
`block_tables[slot, p // block_size] * block_size + p % block_size` (`cache_rows`).

A decode step of an 8B model is ~4 ms of weight reads in bf16 and ~1 ms in 4 bits; the eager
PyTorch spelling of these ops is ~40 small kernels per layer, which alone would cost more than
that. Each op here is one Triton kernel on CUDA (graph-capturable: no host syncs, lengths read on
the device) and a plain-PyTorch reference elsewhere. The kernels round every intermediate to the
activation dtype where eager PyTorch does, so both paths compute the same function.

CPU tensors take the references; with `TRITON_INTERPRET=1` (set before triton loads) and
`interpret_on_cpu = True` the kernels run on them in Triton's interpreter (the ops tests do this).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ..quant.numerics import quantize_fp8

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
interpret_on_cpu = False  # tests only: run the kernels on CPU tensors (needs INTERPRET)


def use_triton(x: torch.Tensor) -> bool:
    return triton is not None and (x.is_cuda or (INTERPRET and interpret_on_cpu))


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


# ------------------------------------------------------------------ references
def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D]; cos/sin [B, T, d] with d <= D (partial rotary: the rest passes through)."""
    d = cos.shape[-1]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    rot, rest = x[..., :d], x[..., d:]
    x1, x2 = rot[..., : d // 2], rot[..., d // 2:]
    rotated = torch.cat([-x2, x1], dim=-1)
    out = rot * cos + rotated * sin
    return torch.cat([out, rest], dim=-1) if rest.shape[-1] else out


def rms_norm_ref(x, weight, eps, residual=None, unit_offset=False):
    """transformers' RMSNorm: fp32 statistics, cast back, then times the weight (in x's dtype).
    unit_offset (Gemma, Qwen3.5): the weight is stored as w and applied as (1 + w), in fp32 before
    the cast back, as those families' norms do."""
    if residual is not None:
        x = x + residual
        residual = x
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if unit_offset:
        return (xf * (1.0 + weight.float())).to(x.dtype), residual
    return weight * xf.to(x.dtype), residual


def silu_mul_ref(x):
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def quantize_kv(x, scale):
    """What an FP8 cache stores: x / scale saturated to E4M3 (the FP8 encoding of numerics)."""
    return quantize_fp8(x, scale)


def dequantize_kv(x, scale, dtype):
    return (x.float() * scale).to(dtype)


def cache_rows(block_tables, slots, positions, block_size: int):
    """Flat pool rows of positions [B, T] of sequences in `slots` [B] (through their block tables)."""
    return block_tables[slots[:, None], positions // block_size].long() * block_size + positions % block_size


def decode_attention_ref(q, k_cache, v_cache, block_tables, slots, positions, scale, k_scale=None, v_scale=None,
                         window=None):
    """q [B, H, D]; block pools [NB, BS, Hkv, D]; each row b attends to keys [0, positions[b]] of the
    sequence in slots[b] (with a sliding window w: keys (positions[b] - w, positions[b]]).

    Row by row, over exactly that row's keys: padding rows to the batch's longest length and masking
    gives another bf16 result for the same row, so a sequence's tokens would depend on what else is in
    the batch (the Triton kernel also walks each row's own keys)."""
    bs = k_cache.shape[1]
    out = torch.empty_like(q)
    for b in range(q.shape[0]):
        pos = int(positions[b])
        first = max(0, pos - window + 1) if window is not None else 0
        keys = torch.arange(first, pos + 1, device=q.device)[None, :]
        rows = cache_rows(block_tables, slots[b:b + 1], keys, bs)[0]
        k, v = k_cache.flatten(0, 1)[rows], v_cache.flatten(0, 1)[rows]
        if k_scale is not None:
            k, v = dequantize_kv(k, k_scale, q.dtype), dequantize_kv(v, v_scale, q.dtype)
        o = F.scaled_dot_product_attention(q[b, :, None], k.transpose(0, 1), v.transpose(0, 1), scale=scale,
                                           enable_gqa=q.shape[1] != k.shape[1])
        out[b] = o[:, 0]
    return out


# ------------------------------------------------------------------ public ops
def rms_norm(x, weight, eps, residual=None, unit_offset=False):
    """RMSNorm of x (+ residual, added first). Returns (normed, new residual or None)."""
    if not use_triton(x):
        return rms_norm_ref(x, weight, eps, residual, unit_offset)
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    res_out = torch.empty_like(out) if residual is not None else out
    res_in = residual.reshape(-1, n) if residual is not None else x2
    block = _pow2(n)
    _rms_norm_kernel[(x2.shape[0],)](x2, res_in, weight, out, res_out, x2.stride(0), res_in.stride(0), n, eps,
                                     HAS_RES=residual is not None, UNIT_OFFSET=unit_offset, BLOCK=block, num_warps=8 if block >= 2048 else 4)
    return out.view(x.shape), (res_out.view(x.shape) if residual is not None else None)


def silu_mul(x):
    """[..., 2I] (gate then up) -> silu(gate) * up [..., I]."""
    if not use_triton(x):
        return silu_mul_ref(x)
    i = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * i)
    out = torch.empty(x2.shape[0], i, dtype=x.dtype, device=x.device)
    block = 1024
    _silu_mul_kernel[(x2.shape[0], triton.cdiv(i, block))](x2, out, x2.stride(0), i, BLOCK=block, num_warps=4)
    return out.view(*x.shape[:-1], i)


def rope_and_store(q, k, v, cos, sin, k_cache, v_cache, rows, k_scale=None, v_scale=None):
    """Rotate q and k, write k and v into the flat cache rows `rows` [B, T] (`cache_rows`).

    q [B, T, H, D], k/v [B, T, Hkv, D] (views into the qkv output are fine: last dim contiguous);
    cos/sin [B, T, d]; caches [P, Hkv, D] (a block pool flattened), FP8 when k_scale is given.
    Returns rotated (q, k).
    """
    if not use_triton(q):
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if k_scale is not None:
            k_cache[rows], v_cache[rows] = quantize_kv(k, k_scale), quantize_kv(v, v_scale)
        else:
            k_cache[rows], v_cache[rows] = k, v
        return q, k
    b, t, h, d = q.shape
    hkv = k.shape[2]
    half = cos.shape[-1] // 2
    qo, ko = torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(k.shape, dtype=k.dtype, device=k.device)
    cos, sin, rows = cos.contiguous(), sin.contiguous(), rows.contiguous()
    fp8 = k_scale is not None
    _rope_store_kernel[(b * t, h + hkv)](
        q, k, v, cos, sin, qo, ko, k_cache, v_cache, rows,
        k_scale if fp8 else cos, v_scale if fp8 else cos,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *cos.stride()[:2], *qo.stride()[:3], *ko.stride()[:3],
        *k_cache.stride()[:2], t,
        H=h, HALF=half, HALF_PAD=_pow2(half), REST=d - 2 * half, REST_PAD=_pow2(max(1, d - 2 * half)), FP8=fp8,
        num_warps=1)
    return qo, ko


def decode_attention(q, k_cache, v_cache, block_tables, slots, positions, scale, k_scale=None, v_scale=None,
                     window=None):
    """One query token per row: q [B, H, D] -> [B, H, D], over keys [0, positions[b]] of the sequence
    in slots[b], read through its block-table row (only the last `window` keys for sliding-window
    attention). Pools [NB, BS, Hkv, D] (contiguous); block_tables [S, max_blocks] int32."""
    if not use_triton(q):
        return decode_attention_ref(q, k_cache, v_cache, block_tables, slots, positions, scale, k_scale, v_scale,
                                    window)
    b, h, d = q.shape
    bs, hkv = k_cache.shape[1], k_cache.shape[2]
    g = h // hkv
    # the kernel reads row b's slot and position at offset b: a stride-0 view (one slot expanded over a
    # verify step's tokens) would make it read past the tensor
    slots, positions = slots.contiguous(), positions.contiguous()
    out = torch.empty_like(q)
    fp8 = k_scale is not None
    _decode_attention_kernel[(b, hkv)](
        q, k_cache, v_cache, out, block_tables, slots, positions, k_scale if fp8 else q, v_scale if fp8 else q,
        q.stride(0), q.stride(1), block_tables.stride(0), bs, k_cache.stride(1), k_cache.stride(2),
        out.stride(0), out.stride(1), scale,
        window if window is not None else 0, G=g, G_PAD=max(16, _pow2(g)), D=d, D_PAD=max(16, _pow2(d)), BLOCK_N=64, FP8=fp8, num_warps=4)
    return out


# ------------------------------------------------------------------ kernels
if triton is not None:

    @triton.jit
    def _round(x, dtype: tl.constexpr):
        """Round an fp32 value to the activation dtype and back: what an eager op's output does."""
        return x.to(dtype).to(tl.float32)

    @triton.jit
    def _rms_norm_kernel(X, R, W, OUT, ROUT, stride_x, stride_r, n, eps, HAS_RES: tl.constexpr,
                         UNIT_OFFSET: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n
        dtype = OUT.dtype.element_ty
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RES:
            x = _round(x + tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32), dtype)
            tl.store(ROUT + row * n + cols, x.to(dtype), mask=mask)
        var = tl.sum(x * x, axis=0) / n
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        if UNIT_OFFSET:
            tl.store(OUT + row * n + cols, (x * tl.rsqrt(var + eps) * (1.0 + w)).to(dtype), mask=mask)
        else:
            y = _round(x * tl.rsqrt(var + eps), dtype)
            tl.store(OUT + row * n + cols, (w * y).to(dtype), mask=mask)

    @triton.jit
    def _silu_mul_kernel(X, OUT, stride_x, i, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < i
        dtype = OUT.dtype.element_ty
        gate = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(X + row * stride_x + i + cols, mask=mask, other=0.0).to(tl.float32)
        act = _round(gate / (1.0 + tl.exp(-gate)), dtype)
        tl.store(OUT + row * i + cols, (act * up).to(dtype), mask=mask)

    @triton.jit
    def _rotate(src, cos_row, sin_row, dst, HALF: tl.constexpr, HALF_PAD: tl.constexpr, REST: tl.constexpr,
                REST_PAD: tl.constexpr, dtype: tl.constexpr):
        """rotate_half rotary of one head, rounding as the eager `rot*cos + cat(-x2, x1)*sin` does.
        Returns the two rotated halves (fp32 holding dtype values); writes them and the pass-through
        part to dst."""
        i = tl.arange(0, HALF_PAD)
        m = i < HALF
        x1 = tl.load(src + i, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF + i, mask=m, other=0.0).to(tl.float32)
        c1 = tl.load(cos_row + i, mask=m, other=0.0).to(tl.float32)
        c2 = tl.load(cos_row + HALF + i, mask=m, other=0.0).to(tl.float32)
        s1 = tl.load(sin_row + i, mask=m, other=0.0).to(tl.float32)
        s2 = tl.load(sin_row + HALF + i, mask=m, other=0.0).to(tl.float32)
        o1 = _round(_round(x1 * c1, dtype) + _round(-x2 * s1, dtype), dtype)
        o2 = _round(_round(x2 * c2, dtype) + _round(x1 * s2, dtype), dtype)
        tl.store(dst + i, o1.to(dtype), mask=m)
        tl.store(dst + HALF + i, o2.to(dtype), mask=m)
        if REST > 0:
            j = tl.arange(0, REST_PAD)
            tl.store(dst + 2 * HALF + j, tl.load(src + 2 * HALF + j, mask=j < REST), mask=j < REST)
        return o1, o2

    @triton.jit
    def _to_fp8(x, scale):
        """x / scale (IEEE division), saturated to +-448, rounded to nearest-even E4M3: quantize_kv."""
        return tl.clamp(tl.math.div_rn(x, scale), -448.0, 448.0).to(tl.float8e4nv, fp_downcast_rounding="rtne")

    @triton.jit
    def _store_cache(row_ptr, o1, o2, src, scale_ptr, HALF: tl.constexpr, HALF_PAD: tl.constexpr,
                     REST: tl.constexpr, REST_PAD: tl.constexpr, FP8: tl.constexpr):
        """Write one head (rotated halves + the untouched rest of src) into a cache row."""
        i = tl.arange(0, HALF_PAD)
        m = i < HALF
        if FP8:
            s = tl.load(scale_ptr)
            tl.store(row_ptr + i, _to_fp8(o1, s), mask=m)
            tl.store(row_ptr + HALF + i, _to_fp8(o2, s), mask=m)
        else:
            tl.store(row_ptr + i, o1.to(row_ptr.dtype.element_ty), mask=m)
            tl.store(row_ptr + HALF + i, o2.to(row_ptr.dtype.element_ty), mask=m)
        if REST > 0:
            j = tl.arange(0, REST_PAD)
            r = tl.load(src + 2 * HALF + j, mask=j < REST, other=0.0).to(tl.float32)
            if FP8:
                tl.store(row_ptr + 2 * HALF + j, _to_fp8(r, tl.load(scale_ptr)), mask=j < REST)
            else:
                tl.store(row_ptr + 2 * HALF + j, r.to(row_ptr.dtype.element_ty), mask=j < REST)

    @triton.jit
    def _rope_store_kernel(Q, K, V, COS, SIN, QO, KO, KC, VC, ROWS, KS, VS,
                           sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, scb, sct, sqob, sqot, sqoh,
                           skob, skot, skoh, scn, sch, T,
                           H: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr, REST: tl.constexpr,
                           REST_PAD: tl.constexpr, FP8: tl.constexpr):
        tok = tl.program_id(0)
        head = tl.program_id(1)
        b = tok // T
        t = tok % T
        dtype = QO.dtype.element_ty
        cos_row = COS + b * scb + t * sct
        sin_row = SIN + b * scb + t * sct
        if head < H:
            _rotate(Q + b * sqb + t * sqt + head * sqh, cos_row, sin_row, QO + b * sqob + t * sqot + head * sqoh,
                    HALF, HALF_PAD, REST, REST_PAD, dtype)
        else:
            kh = head - H
            src = K + b * skb + t * skt + kh * skh
            o1, o2 = _rotate(src, cos_row, sin_row, KO + b * skob + t * skot + kh * skoh,
                             HALF, HALF_PAD, REST, REST_PAD, dtype)
            pos = tl.load(ROWS + b * T + t)
            row = pos * scn + kh * sch
            _store_cache(KC + row, o1, o2, src, KS, HALF, HALF_PAD, REST, REST_PAD, FP8)
            # v is not rotated: copy it as two "halves" plus the rest
            vsrc = V + b * svb + t * svt + kh * svh
            i = tl.arange(0, HALF_PAD)
            v1 = tl.load(vsrc + i, mask=i < HALF, other=0.0).to(tl.float32)
            v2 = tl.load(vsrc + HALF + i, mask=i < HALF, other=0.0).to(tl.float32)
            _store_cache(VC + row, v1, v2, vsrc, VS, HALF, HALF_PAD, REST, REST_PAD, FP8)

    @triton.jit
    def _decode_attention_kernel(Q, KC, VC, OUT, BT, SLOTS, POS, KS, VS, sqb, sqh, sbt, bs, scn, sch, sob, soh,
                                 scale, window, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
                                 D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, FP8: tl.constexpr):
        """One program per (sequence, KV head): its G query heads against keys [0, pos] (online softmax);
        window > 0: only keys (pos - window, pos]. Key n lives in pool row BT[slot, n // bs] * bs + n % bs."""
        b = tl.program_id(0)
        h = tl.program_id(1)
        dtype = OUT.dtype.element_ty
        slot = tl.load(SLOTS + b)
        length = tl.load(POS + b) + 1
        g = tl.arange(0, G_PAD)
        d = tl.arange(0, D_PAD)
        dm = d < D
        q = tl.load(Q + b * sqb + (h * G + g)[:, None] * sqh + d[None, :], mask=(g < G)[:, None] & dm[None, :],
                    other=0.0)
        m_i = tl.full([G_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, D_PAD], tl.float32)
        base = h * sch
        table = BT + slot * sbt
        first = length * 0  # same type as length (int64)
        if window > 0:
            first = tl.maximum(length - window, 0)
        for start in range((first // BLOCK_N) * BLOCK_N, length, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            nm = (n < length) & (n >= first)
            blk = tl.load(table + n // bs, mask=nm, other=0).to(tl.int64)
            offs = base + (blk * bs + n % bs)[:, None] * scn + d[None, :]
            k = tl.load(KC + offs, mask=nm[:, None] & dm[None, :], other=0.0)
            v = tl.load(VC + offs, mask=nm[:, None] & dm[None, :], other=0.0)
            if FP8:
                k = (k.to(tl.float32) * tl.load(KS)).to(dtype)
                v = (v.to(tl.float32) * tl.load(VS)).to(dtype)
            s = tl.dot(q, tl.trans(k)) * scale
            s = tl.where(nm[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(dtype), v)
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(OUT + b * sob + (h * G + g)[:, None] * soh + d[None, :], out.to(dtype),
                 mask=(g < G)[:, None] & dm[None, :])
