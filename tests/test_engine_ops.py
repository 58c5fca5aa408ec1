"""The fused decoder ops (lowbit/kernels/decoder.py): Triton kernels against their PyTorch references.

On CPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET before
triton loads when there is no GPU). The interpreter has no bf16 matmul and rounds FP8 wrongly at
exponent boundaries, so there fp16/fp32 are checked and bf16/FP8 are checked on a GPU. Compiled
for a GPU, the rotary kernel is 1 ulp off eager PyTorch on a rare element (seen on an H200).
"""
from __future__ import annotations

import pytest
import torch

from conftest import requires_cuda
from lowbit.kernels import decoder as ops

triton = pytest.importorskip("triton")


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def without_triton(fn, *args):
    """Run an op through its reference path."""
    real = ops.use_triton
    ops.use_triton = lambda x: False
    try:
        return fn(*args)
    finally:
        ops.use_triton = real


def check_ops(device: str, dtypes, exact_fp8: bool) -> None:
    for dt in dtypes:
        x = torch.randn(7, 1000, dtype=dt, device=device)
        r = torch.randn(7, 1000, dtype=dt, device=device)
        w = (1 + 0.1 * torch.randn(1000, device=device)).to(dt)
        a, ra = ops.rms_norm(x, w, 1e-5, r)
        b, rb = without_triton(ops.rms_norm, x, w, 1e-5, r)
        tol = 1e-6 if dt == torch.float32 else 1e-3  # sum order of the statistics: rare 1-ulp flips
        assert torch.equal(ra, rb) and rel_err(a, b) < tol
        assert rel_err(ops.rms_norm(x, w, 1e-5)[0], without_triton(ops.rms_norm, x, w, 1e-5)[0]) < tol
        wz = (0.1 * torch.randn(1000, device=device)).to(dt)  # (1 + w) norms store w near zero
        a, ra = ops.rms_norm(x, wz, 1e-6, r, True)
        b, rb = without_triton(ops.rms_norm, x, wz, 1e-6, r, True)
        assert torch.equal(ra, rb) and rel_err(a, b) < tol
        y = torch.randn(3, 2 * 1500, dtype=dt, device=device)
        # exp differs in the last fp32 bit between libraries: a rare 1-ulp flip after rounding
        assert rel_err(ops.silu_mul(y), ops.silu_mul_ref(y)) < (1e-6 if dt == torch.float32 else 1e-3)
        for d, rot in ((64, 64), (96, 48)):  # full and partial rotary
            _check_rope(dt, device, d, rot, exact_fp8)
            _check_decode_attention(dt, device, d)


def _check_rope(dt, device, d, rot, exact_fp8):
    b, t, h, hkv = 2, 3, 4, 2
    qkv = torch.randn(b, t, (h + 2 * hkv) * d, dtype=dt, device=device)
    q, k, v = qkv.split([h * d, hkv * d, hkv * d], -1)
    q, k, v = q.view(b, t, h, d), k.view(b, t, hkv, d), v.view(b, t, hkv, d)
    ang = torch.randn(b, t, rot // 2, device=device).repeat(1, 1, 2)
    cos, sin = ang.cos().to(dt), ang.sin().to(dt)
    rows = torch.tensor([[8, 9, 10], [33, 34, 35]], device=device)  # flat pool rows (through block tables)
    for fp8 in (False, True):
        store = torch.float8_e4m3fn if fp8 else dt
        caches = [torch.randn(40, hkv, d, device=device).to(store) for _ in range(2)]
        caches += [c.clone() for c in caches]
        scales = (torch.tensor(0.05, device=device), torch.tensor(0.03, device=device)) if fp8 else (None, None)
        qa, ka = ops.rope_and_store(q, k, v, cos, sin, caches[0], caches[1], rows, *scales)
        qb, kb = without_triton(ops.rope_and_store, q, k, v, cos, sin, caches[2], caches[3], rows, *scales)
        # the interpreter matches eager bit for bit; compiled for a GPU (fused multiply-adds), an element
        # may round differently by one ulp of the inputs' scale: where q*cos and q'*sin cancel, that is
        # a large relative but a tiny absolute difference (seen on an H200: 3.36e-4 vs 0 at |q| ~ 1.5)
        ulp = {torch.float32: 0.0, torch.float16: 2**-10, torch.bfloat16: 2**-7}[dt]

        def close(a, b, rtol):
            return torch.allclose(a.float(), b.float(), rtol=rtol, atol=max(1e-6, rtol * b.float().abs().max().item()))

        assert close(qa, qb, ulp) and close(ka, kb, ulp)
        if exact_fp8 or not fp8:  # one E4M3 step (2^-3) where a 1-ulp input difference crosses a boundary
            assert close(caches[0], caches[2], 2**-3 if fp8 else ulp) and close(caches[1], caches[3], 2**-3 if fp8 else ulp)


def paged(kc, block_size: int, gen: torch.Generator):
    """Scatter slot caches [S, L, Hkv, D] into a block pool in a random block order:
    (pool [NB + 1, BS, Hkv, D], block_tables [S, L / BS] int32)."""
    s, length = kc.shape[:2]
    nb = s * length // block_size
    order = torch.randperm(nb, generator=gen).to(kc.device)
    tables = order.view(s, length // block_size).to(torch.int32)
    pool = torch.zeros((nb + 1, block_size) + kc.shape[2:], dtype=kc.dtype, device=kc.device)
    pool[tables.long()] = kc.view(s, length // block_size, block_size, *kc.shape[2:])
    return pool, tables


def slot_attention(q, kc, vc, slots, pos, scale, ks, vs, window):
    """Decode attention over contiguous slot caches (an independent spelling of the reference)."""
    outs = []
    for b in range(q.shape[0]):
        lo = 0 if window is None else max(0, int(pos[b]) - window + 1)
        k, v = kc[slots[b], lo:int(pos[b]) + 1], vc[slots[b], lo:int(pos[b]) + 1]
        if ks is not None:
            k, v = ops.dequantize_kv(k, ks, q.dtype), ops.dequantize_kv(v, vs, q.dtype)
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1).float(), v.repeat_interleave(rep, 1).float()
        p = torch.softmax(torch.einsum("hd,nhd->hn", q[b].float(), k) * scale, -1)
        outs.append(torch.einsum("hn,nhd->hd", p, v))
    return torch.stack(outs)


def _check_decode_attention(dt, device, d):
    s, length, h, hkv, bs = 5, 160, 8, 2, 16
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    for fp8 in (False, True):
        kc, vc = torch.randn(s, length, hkv, d, device=device), torch.randn(s, length, hkv, d, device=device)
        ks = vs = None
        if fp8:
            ks, vs = torch.tensor(0.02, device=device), torch.tensor(0.03, device=device)
            kc, vc = ops.quantize_kv(kc * 0.1, ks), ops.quantize_kv(vc * 0.1, vs)
        else:
            kc, vc = kc.to(dt), vc.to(dt)
        kp, tables = paged(kc, bs, gen)
        vp = torch.zeros_like(kp)
        vp[tables.long()] = vc.view(s, length // bs, bs, hkv, d)
        q = torch.randn(3, h, d, dtype=dt, device=device)
        slots, pos = torch.tensor([4, 1, 0], device=device), torch.tensor([0, 149, 70], device=device)
        for window in (None, 1, 16, 100):  # sliding window: only the last `window` keys
            a = ops.decode_attention(q, kp, vp, tables, slots, pos, d ** -0.5, ks, vs, window)
            b = ops.decode_attention_ref(q, kp, vp, tables, slots, pos, d ** -0.5, ks, vs, window)
            c = slot_attention(q, kc, vc, slots, pos, d ** -0.5, ks, vs, window)
            assert rel_err(a, b) < (1e-5 if dt == torch.float32 else 1e-2), (dt, d, fp8, window)
            assert rel_err(b, c) < (1e-5 if dt == torch.float32 else 1e-2), (dt, d, fp8, window)
        full = ops.decode_attention_ref(q, kp, vp, tables, slots, pos, d ** -0.5, ks, vs)
        assert rel_err(ops.decode_attention_ref(q, kp, vp, tables, slots, pos, d ** -0.5, ks, vs, 16), full) > 1e-3
        # speculative verify at batch 1: one slot expanded over its tokens is a stride-0 view
        one = torch.tensor([[3]], device=device).expand(1, 3).reshape(-1)
        assert one.stride() == (0,)
        vpos = torch.tensor([[90, 91, 92]], device=device).reshape(-1)
        a = ops.decode_attention(q, kp, vp, tables, one, vpos, d ** -0.5, ks, vs)
        b = ops.decode_attention_ref(q, kp, vp, tables, one.contiguous(), vpos, d ** -0.5, ks, vs)
        assert rel_err(a, b) < (1e-5 if dt == torch.float32 else 1e-2), (dt, d, fp8, "stride-0 slots")


@pytest.mark.skipif(not ops.INTERPRET, reason="needs TRITON_INTERPRET=1 before triton loads")
def test_triton_ops_in_the_interpreter(monkeypatch):
    monkeypatch.setattr(ops, "interpret_on_cpu", True)
    check_ops("cpu", (torch.float16, torch.float32), exact_fp8=False)


@requires_cuda
def test_triton_ops_on_gpu():
    check_ops("cuda", (torch.bfloat16, torch.float16), exact_fp8=True)
