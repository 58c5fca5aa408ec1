"""The dot-free GEMV decode kernel (lowbit/kernels/gemv.py) against plain-PyTorch references.

Dense: x [M <= 4, K] @ dequant(W).T in fp32 for NVFP4 and int4 weights in the planar layout (w4's, as
loaded) and in the checkpoint layout, every int4 group layout with and without zero points, split K,
K not a multiple of 128; w4_linear's switch takes the kernel. MoE: the stacked-experts unit's forward
on the GEMV (gate_up with the fused activation, down summing each token's experts) against the unit's
reference. Random data, fresh each run. On CPU Triton's interpreter runs small shapes in fp16 (it
converts fp32 to bf16 by truncation, see test_moe_kernels.py); on a GPU real Llama-3-8B and
Qwen3-30B-A3B shapes in bf16 and fp16.

Bounds: the kernel accumulates exact fp32 products of the dequantized weight and x and rounds once
to the output dtype, so its error against the fp32 reference is the output rounding: TOL (8e-3,
test_kernels_gemm's) for bf16, measured ~2e-4 in fp16 on CPU.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the kernels' import

pytest.importorskip("triton")

from lowbit import kernels  # noqa: E402
from lowbit.kernels import gemv, moe, w4  # noqa: E402
from lowbit.quant import numerics as nm  # noqa: E402

from conftest import requires_cuda  # noqa: E402
from test_experts import ALL, build_experts, routed  # noqa: E402
from test_kernels_gemm import DEV, TOL, int_weight, nvfp4_weight, reference, rel_err  # noqa: E402

FP16_TOL = 1e-3  # fp16 output rounding is 2^-11; the kernel measured ~2e-4


def _dense_case(nvfp4, m, n, k, group, asym, dtype, planar):
    """(y from gemv_w4 with a given tiling, fp32 reference) for one random weight."""
    x = torch.randn(m, k, dtype=dtype, device=DEV)
    if nvfp4:
        packed, bs, rs = nvfp4_weight(n, k)
        ref = reference(x, nm.dequant_nvfp4(packed, bs, rs), None)
        words = kernels.prepare_nvfp4(packed) if planar else packed.view(torch.int32)
        return x, words, dict(scale=bs, row_scale=rs, group=16), ref
    words, scale, zp, w = int_weight(n, k, 4, group, asym, dtype)
    words = kernels.prepare_int4(words, k) if planar else words
    return x, words, dict(scale=scale, zero=zp, group=group or 0), reference(x, w, None)


# every layout/format/group once; M 1..4; K 96..384 incl. not multiples of 128; splits 1..3
CPU_CASES = [
    # nvfp4, planar, group, asym, m, n, k, split
    (True, True, 16, False, 1, 40, 256, 2),
    (True, True, 16, False, 3, 33, 208, 1),
    (True, False, 16, False, 4, 24, 256, 2),
    (False, True, 32, True, 2, 40, 256, 1),
    (False, True, 128, False, 2, 16, 384, 3),
    (False, True, None, True, 1, 33, 130, 1),
    (False, True, 16, False, 3, 24, 208, 2),
    (False, False, 64, True, 2, 24, 200, 1),
]


@pytest.mark.parametrize("nvfp4,planar,group,asym,m,n,k,split", CPU_CASES)
def test_dense_matches_reference(nvfp4, planar, group, asym, m, n, k, split):
    dtype = torch.float16 if DEV == "cpu" else torch.bfloat16
    x, words, kw, ref = _dense_case(nvfp4, m, n, k, group, asym, dtype, planar)
    y = gemv.gemv_w4(x, words, nvfp4, k, planar=planar, tiles=gemv.GemvTiles(16, 2, split), **kw)
    assert y.dtype == dtype and y.shape == (m, n)
    assert rel_err(y, ref) < (FP16_TOL if dtype == torch.float16 else TOL)


def test_w4_linear_switch_takes_the_gemv(monkeypatch):
    """With w4.USE_GEMV, nvfp4_linear / int_linear on planar weights run the GEMV for M <= 4 (bias
    included) and the MMA kernel above it; the two agree with the reference."""
    n, k = 24, 256
    packed, bs, rs = nvfp4_weight(n, k)
    planar = kernels.prepare_nvfp4(packed)
    x = torch.randn(2, k, dtype=torch.float16, device=DEV)
    bias = torch.randn(n, dtype=torch.float16, device=DEV)
    ref = reference(x, nm.dequant_nvfp4(packed, bs, rs), bias)
    calls = []
    real = gemv.gemv_w4
    monkeypatch.setattr(gemv, "gemv_w4", lambda *a, **kw: calls.append(a[0].shape) or real(*a, **kw))
    monkeypatch.setattr(w4, "USE_GEMV", True)
    y = kernels.nvfp4_linear(x, planar, bs, rs, bias)
    assert calls == [(2, k)] and rel_err(y, ref) < FP16_TOL
    words, scale, zp, w = int_weight(n, k, 4, 64, True, torch.float16)
    y = kernels.int_linear(x, kernels.prepare_int4(words, k), scale, zp, 4, 64, k, bias, planar=True)
    assert len(calls) == 2 and rel_err(y, reference(x, w, bias)) < FP16_TOL
    with pytest.raises(ValueError, match="at most 4"):
        gemv.gemv_w4(torch.randn(5, k, dtype=torch.float16, device=DEV), planar, True, k, bs, row_scale=rs)


@pytest.mark.parametrize("name", ["modelopt-nvfp4", "ct-w4a16-g32-asym"])  # per channel: the GPU test
def test_moe_experts_on_gemv(name, monkeypatch):
    """experts_forward with moe.USE_GEMV: gate_up (act fused) and down (routed weights, each token's
    experts summed in the program) against the unit's reference; H = 96 is not a multiple of 128."""
    monkeypatch.setattr(moe, "interpret_on_cpu", True)
    monkeypatch.setattr(moe, "USE_GEMV", True)
    dtype = torch.float16 if DEV == "cpu" else torch.bfloat16
    experts, _ = build_experts(ALL[name], num_experts=3, dtype=dtype)
    experts.to(DEV)
    t, k = 2, 2
    x = (torch.randn(t, experts.first.spec.hidden, device=DEV) * 0.5).to(dtype)
    ids, w = routed(t, 3, k)
    ids, w = ids.to(DEV), w.to(DEV)
    first, down = moe.stack_operands(experts.first), moe.stack_operands(experts.down)
    assert moe.gemv_covers(first) and moe.gemv_covers(down), name
    calls = []
    real = moe.gemv_experts
    monkeypatch.setattr(moe, "gemv_experts", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    y = moe.experts_forward(experts, x, ids, w)
    assert calls == [1]
    want = experts.reference(x, ids, w)
    assert rel(y, want) < (3e-3 if dtype == torch.float16 else 2e-2), name  # test_moe_kernels' BOUNDS


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# ---------------------------------------------------------------- GPU: real shapes
LLAMA3_8B = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
             "lm_head": (128256, 4096)}


@requires_cuda
@pytest.mark.parametrize("shape", list(LLAMA3_8B))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_llama3_shapes(shape, dtype):
    n, k = LLAMA3_8B[shape]
    tol = TOL if dtype == torch.bfloat16 else FP16_TOL
    for m in (1, 2, 3, 4):
        for nvfp4, group, asym in ((True, 16, False), (False, 128, False), (False, 128, True), (False, 32, True)):
            if m in (2, 3) and not nvfp4 and group == 32:
                continue
            x, words, kw, ref = _dense_case(nvfp4, m, n, k, group, asym, dtype, True)
            for tiles in (None, gemv.GemvTiles(32, 4, 1)):  # the heuristic's split, and none
                y = gemv.gemv_w4(x, words, nvfp4, k, tiles=tiles, **kw)
                assert rel_err(y, ref) < tol, (shape, m, nvfp4, group, asym, tiles)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_odd_k_and_checkpoint_layout(dtype):
    """K not a multiple of 128 (planar pads the last chunk), per-channel int4, the checkpoint layout."""
    tol = TOL if dtype == torch.bfloat16 else FP16_TOL
    for nvfp4, planar, group, asym, k in ((True, True, 16, False, 4160), (False, True, None, True, 4130),
                                          (True, False, 16, False, 2056), (False, False, 128, True, 2048)):
        x, words, kw, ref = _dense_case(nvfp4, 4, 1536, k, group, asym, dtype, planar)
        y = gemv.gemv_w4(x, words, nvfp4, k, planar=planar, **kw)
        assert rel_err(y, ref) < tol, (nvfp4, planar, group, k)


@requires_cuda
@pytest.mark.parametrize("name", ["modelopt-nvfp4", "ct-nvfp4a16", "ct-w4a16-g32-asym", "ct-w4a16-channel-asym"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_qwen3_30b_a3b_experts(name, dtype, monkeypatch):
    """Qwen3-30B-A3B expert shapes (H 2048, I 768, top-8 of 16 experts here), T = 1..4."""
    monkeypatch.setattr(moe, "USE_GEMV", True)
    experts, _ = build_experts(ALL[name], num_experts=16, h=2048, i=768, dtype=dtype)
    experts.to("cuda")
    for t in (1, 2, 4):
        x = (torch.randn(t, 2048, device="cuda") * 0.5).to(dtype)
        ids, w = routed(t, 16, 8)
        y = moe.experts_forward(experts, x, ids.cuda(), w.cuda())
        want = experts.reference(x, ids.cuda(), w.cuda())
        assert rel(y, want) < (3e-3 if dtype == torch.float16 else 2e-2), (name, t)
