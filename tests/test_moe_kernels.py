"""The MoE kernels (lowbit/kernels/moe.py) against their plain-PyTorch references.

Routing ids equal the reference's and weights agree to fp32 rounding; the sort by expert is equal
element for element (CUDA-graph shapes: fixed by T, k, E); the grouped GEMM and the whole expert MLP
on the kernels match the stacked-experts unit's reference for every scheme. On CPU the kernels run
in Triton's interpreter on small shapes (tests/conftest.py sets TRITON_INTERPRET); on a GPU the
same tests run compiled, plus a decode-sized case.

Bounds (relative Frobenius error; `BOUNDS`): each grouped GEMM against the unit's reference on the
same input. Both round to the activation dtype in different places (the reference rounds the
dequantized weight, the fake-quantized x and the output; the kernel keeps fp32 partial products), so
they agree to a few roundings: fp16 (2^-11) measured <= 6e-4 for every scheme, bound 3e-3; bf16
bound 2e-2. The whole MLP: the same bounds weight-only, plus "no less accurate than the reference"
against the float64 reference (1.5x); W8A8 see W8A8_CHAIN_BOUND.
Triton's interpreter converts fp32 to bf16 by truncation (checked: 1 + 2^-8 + 2^-10 -> 1.0), so
the CPU runs fp16 and the GPU both.
"""
from __future__ import annotations

import pytest
import torch

from conftest import requires_cuda
from lowbit.kernels import moe
from lowbit.kernels.moe_ref import Routing, align_ref, grouped_gemm_ref, route_ref
from lowbit.quant.scheme import Scheme
from test_experts import ALL, build_experts, routed

pytest.importorskip("triton")
# CPU tensors run the kernels only in Triton's interpreter (conftest sets TRITON_INTERPRET on CPU-only
# machines); on a GPU machine the CPU variants skip and the CUDA ones run
INTERPRETED = pytest.mark.skipif(not moe.interpreting(), reason="CPU tensors need Triton's interpreter "
                                                                   "(TRITON_INTERPRET=1: CPU-only machines)")
DEVICES = [pytest.param("cpu", marks=INTERPRETED), pytest.param("cuda", marks=requires_cuda)]
W8A8 = ("modelopt-fp8", "modelopt-fp8-channel-token", "ct-w8a8-dynamic", "ct-fp8-tensor-static", "ct-fp8-dynamic",
        "ct-fp8-block")
KERNEL_SCHEMES = ("bf16", "modelopt-nvfp4", "ct-nvfp4a16", "ct-w4a16-g32-asym", "ct-w4a16-channel-asym",
                  "ct-w8a16-g32-asym", "ct-w8a16-channel", "modelopt-fp8-pb-wo", "ct-fp8-w8a16") + W8A8
# on CPU (interpreted), every kernel path once: float; NVFP4; int4 group (element scales) and
# channel, both with zero points; int8 group; FP8 weight-only block / channel; FP8 W8A8 static
# per expert, dynamic per token, dynamic per block group; int8 W8A8 dynamic (the GPU runs them all)
CPU_SCHEMES = ("bf16", "modelopt-nvfp4", "ct-w4a16-g32-asym", "ct-w4a16-channel-asym", "ct-w8a16-g32-asym",
               "modelopt-fp8-pb-wo", "ct-fp8-w8a16", "modelopt-fp8", "ct-fp8-dynamic", "ct-fp8-block",
               "ct-w8a8-dynamic")
REFERENCE_ONLY = ("ct-w8a8-static-asym",)  # asymmetric activations: the unit's reference runs them


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setattr(moe, "interpret_on_cpu", True)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("device", DEVICES)
def test_route(device):
    t, e = 37, 20
    logits = torch.randn(t, e, device=device)
    bias = torch.randn(e, device=device)
    for r in (Routing(4), Routing(4, renormalize=True), Routing(1), Routing(3, "sigmoid", True, 2.5)):
        b = bias if r.scoring == "sigmoid" else None
        w, ids = moe.route(logits, r, b)
        w0, ids0 = route_ref(logits, r, b)
        assert torch.equal(ids, ids0) and ids.dtype == torch.int32
        assert torch.allclose(w, w0, rtol=1e-6, atol=1e-7)
    # bf16 logits (the kernel works in fp32 like the reference); bf16 makes ties, which either
    # side may break its own way: the chosen probabilities agree
    lb = logits.bfloat16()
    w, ids = moe.route(lb, Routing(2, renormalize=True))
    w0, ids0 = route_ref(lb, Routing(2, renormalize=True))
    p = torch.softmax(lb.float(), -1)
    assert torch.equal(p.gather(1, ids.long()), p.gather(1, ids0.long()))
    assert torch.allclose(w, w0, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
def test_align(device):
    for t, k, e, bm in ((1, 8, 128, 16), (9, 2, 6, 16), (40, 4, 8, 32), (3, 2, 300, 16)):
        ids = torch.stack([torch.randperm(e)[:k] for _ in range(t)]).to(torch.int32).to(device)
        got = moe.align(ids, e, bm)
        want = align_ref(ids, e, bm)
        for a, b in zip(got, want):
            assert torch.equal(a, b)
        sorted_ids, block_expert, npad = got
        assert sorted_ids.numel() == moe.max_blocks(t * k, e, bm) * bm  # shapes only: graph friendly
        flat = ids.reshape(-1)
        live = sorted_ids[: int(npad)]
        real = live[live < t * k].long()
        assert torch.equal(real.sort()[0], torch.arange(t * k, device=device))  # every pair once
        blocks = torch.arange(int(npad), device=device) // bm
        assert torch.equal(flat[real].long(), block_expert[blocks[live < t * k]].long())  # right segment


@pytest.mark.parametrize("device", DEVICES)
def test_grouped_gemm_float_and_routed_weight(device):
    e, n, k, t, topk = 5, 80, 96, 7, 2
    w = (torch.randn(e, n, k, device=device) / k ** 0.5).half()
    x = torch.randn(t, k, device=device).half()
    ids, rw = routed(t, e, topk)
    ids, rw = ids.to(device), rw.to(device)
    bm = 16
    s, be, npad = moe.align(ids, e, bm)
    ops = moe.StackOperands(moe.FMT_FLOAT, w, k)
    y = moe.grouped_gemm(x, ops, s, be, npad, topk, t * topk, bm, routed_weights=rw.reshape(-1))
    want = grouped_gemm_ref(x, w, ids, topk, rw.reshape(-1))
    assert rel(y, want) < 2e-3


@INTERPRETED
@pytest.mark.parametrize("activation,gated", [("silu", True), ("gelu_tanh", True), ("relu2", False)])
def test_act(activation, gated):
    from lowbit.quant.experts import ACTIVATIONS

    h = torch.randn(6, 40)
    fn = ACTIVATIONS[activation]
    want = fn(h[:, :20]) * h[:, 20:] if gated else fn(h)
    assert rel(moe.act_and_mul(h, activation, gated), want) < 1e-6


# relative error bounds of each grouped GEMM against the unit's per-expert reference on the same
# input, by activation dtype (measured on CPU in fp16: <= 6e-4 for every scheme, W8A8 included)
BOUNDS = {torch.float16: 3e-3, torch.bfloat16: 2e-2}
# the whole MLP with W8A8: the two sides' intermediates differ by one fp16/bf16 rounding (the kernel's
# act is fused in fp32), which moves a value across an FP8/int8 rounding boundary now and then; with
# random-byte FP8 weights (magnitudes 2^-9..448) one product can dominate an output (seen: 9% on one
# token, 5.8% overall). The GEMMs' own accuracy is checked stage by stage.
W8A8_CHAIN_BOUND = 0.2


def _per_pair(stack, inp, ids, top_k, rw=None):
    """The unit's reference, pair by pair: row p = stack expert ids[p] applied to inp[p // top_k]."""
    flat = ids.reshape(-1).tolist()
    out = torch.stack([stack.reference(inp[p // top_k][None], e)[0] for p, e in enumerate(flat)])
    return out if rw is None else (out * rw.reshape(-1, 1)).to(out.dtype)


def _check_experts(name, device, t=3, num_experts=3, k=2, dtype=torch.bfloat16):
    """Each grouped GEMM vs the unit's reference on the same input; the whole MLP on the kernels vs
    the unit's reference, and (weight-only) both against the reference in float64: the kernels may
    not be less accurate than the reference."""
    scheme = ALL[name]
    experts, disk = build_experts(scheme, num_experts=num_experts, dtype=dtype)
    experts.to(device)
    x = (torch.randn(t, experts.first.spec.hidden, device=device) * 0.5).to(dtype)  # fp16: no overflow
    ids, w = routed(t, num_experts, k)
    ids, w = ids.to(device), w.to(device)
    first, down = moe.stack_operands(experts.first), moe.stack_operands(experts.down)
    assert first is not None and down is not None, f"{name}: no kernel path"
    bm = moe.pick_block_m(t * k, num_experts)
    sorted_ids, block_expert, npad = moe.align(ids, num_experts, bm)
    h = moe.grouped_gemm(x, first, sorted_ids, block_expert, npad, k, t * k, bm)
    h_ref = _per_pair(experts.first, x, ids, k)
    assert rel(h, h_ref) < BOUNDS[dtype], (name, "first")
    a = experts.act(h_ref)
    yp = moe.grouped_gemm(a, down, sorted_ids, block_expert, npad, 1, t * k, bm, routed_weights=w.reshape(-1))
    assert rel(yp, _per_pair(experts.down, a, ids, 1, w)) < BOUNDS[dtype], (name, "down")

    y = moe.experts_forward(experts, x, ids, w)
    want = experts.reference(x, ids, w)
    if name in W8A8:
        assert rel(y, want) < W8A8_CHAIN_BOUND, name
    else:
        assert rel(y, want) < BOUNDS[dtype], name
        exact, _ = build_experts(scheme, num_experts=num_experts, dtype=torch.float64, disk=disk)
        truth = exact.reference(x.double().cpu(), ids.cpu(), w.double().cpu())
        err, err_ref = rel(y.cpu(), truth), rel(want.cpu(), truth)
        assert err < max(1.5 * err_ref, BOUNDS[dtype] / 2), (name, err, err_ref)
    return experts, x, ids, w, y


@INTERPRETED
@pytest.mark.parametrize("name", CPU_SCHEMES)
def test_experts_on_kernels(name):
    """fp16 on CPU: the interpreter converts to bf16 by truncation (a bias of half a bf16 ulp that
    a GPU does not have), so bf16 is checked on the GPU."""
    experts, x, ids, w, y = _check_experts(name, "cpu", dtype=torch.float16)
    if name == "bf16":
        assert torch.equal(experts(x, ids, w), y)  # the unit's forward takes the kernels


@requires_cuda
@pytest.mark.parametrize("name", KERNEL_SCHEMES)
def test_experts_on_kernels_cuda(name):
    _check_experts(name, "cuda")
    _check_experts(name, "cuda", dtype=torch.float16)
    _check_experts(name, "cuda", t=1, num_experts=16, k=4)  # decode: top-k of many experts
    _check_experts(name, "cuda", t=300, num_experts=8, k=2)  # prefill-sized blocks (block_m 64)


@INTERPRETED
def test_no_tokens():
    experts, _ = build_experts(ALL["bf16"], dtype=torch.float16)
    x = torch.zeros(0, experts.first.spec.hidden, dtype=torch.float16)
    ids, w = torch.zeros(0, 2, dtype=torch.int32), torch.zeros(0, 2)
    assert moe.experts_forward(experts, x, ids, w).shape == (0, experts.first.spec.hidden)
    assert moe.route(torch.zeros(0, 3), Routing(2))[1].shape == (0, 2)


def test_reference_only_schemes_fall_back():
    for name in REFERENCE_ONLY:
        experts, _ = build_experts(ALL[name], dtype=torch.bfloat16)
        x = torch.randn(3, experts.first.spec.hidden).bfloat16()
        ids, w = routed(3, 3, 2)
        assert moe.experts_forward(experts, x, ids, w) is None
        assert torch.equal(experts(x, ids, w), experts.reference(x, ids, w))
    experts, _ = build_experts(Scheme(weight="fp32"))  # fp32 models take the reference
    x = torch.randn(3, experts.first.spec.hidden)
    assert moe.experts_forward(experts, x, *routed(3, 3, 2)) is None
