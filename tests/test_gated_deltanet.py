"""Gated DeltaNet: the layer (lowbit/layers/gated_deltanet.py) against transformers' own Qwen3.5 module,
its cached prefill/decode against its full forward, and its Triton kernels (lowbit/kernels/conv1d.py,
lowbit/kernels/gated_delta.py) against their PyTorch references on random inputs.

The kernels run on CPU in Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py without a GPU)
and, with a GPU, on CUDA. Relative-error bounds (Frobenius norm of the difference over the
reference's): fp32 1e-5 for the chunked prefill and the decode step (measured <= 3e-6 in the
interpreter over 300 draws), 1e-6 for the conv (one fp32 sum); bf16 (GPU only: the interpreter has no bf16 dot)
2e-2 for the gated delta rule (TF32 dots on top of the output's bf16 rounding) and 1e-2 for the conv.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import requires_cuda
from lowbit import parallel
from lowbit.kernels import decoder
from lowbit.errors import ConfigError
from lowbit.kernels import conv1d as cv
from lowbit.kernels import gated_delta as gd
from lowbit.layers.context import ForwardContext
from lowbit.layers.gated_deltanet import GatedDeltaNet

triton = pytest.importorskip("triton")
qwen3_5 = pytest.importorskip("transformers.models.qwen3_5.modeling_qwen3_5")


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(params=["interpreter", "cuda"])
def device(request, monkeypatch):
    """Where the Triton kernels run: CPU tensors through the interpreter, or a GPU."""
    if request.param == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU")
        return "cuda"
    if not decoder.INTERPRET:
        pytest.skip("needs TRITON_INTERPRET=1 before triton loads")
    monkeypatch.setattr(decoder, "interpret_on_cpu", True)
    return "cpu"


def dtypes(device):
    return (torch.float32, torch.bfloat16) if device == "cuda" else (torch.float32,)


# ------------------------------------------------------------------ conv1d
def test_causal_conv1d_kernels(device):
    c, k = 96, 4  # one partial channel block (128)
    for dt in dtypes(device):
        tol = 1e-6 if dt == torch.float32 else 1e-2
        w = torch.randn(c, k, device=device).to(dt)
        for t, bias, act in ((1, True, "silu"), (5, False, None), (40, True, "silu")):  # 40: two time blocks
            x = torch.randn(1, t, c, device=device).to(dt)
            b = torch.randn(c, device=device).to(dt) if bias else None
            y, state = cv.causal_conv1d(x, w, b, act)
            y_ref, state_ref = cv.causal_conv1d_ref(x, w, b, act)
            assert rel_err(y, y_ref) < tol, (dt, t)
            assert torch.equal(state, state_ref)  # the last K-1 inputs, zeros before position 0
        for slots in (torch.tensor([3, 0], device=device), None):
            cache = torch.randn(5 if slots is not None else 2, c, k - 1, device=device).to(dt)
            cache_ref = cache.clone()
            x = torch.randn(2, c, device=device).to(dt)
            b = torch.randn(c, device=device).to(dt)
            y = cv.causal_conv1d_update(x, cache, w, b, "silu", slots)
            y_ref = cv.causal_conv1d_update_ref(x, cache_ref, w, b, "silu", slots)
            assert rel_err(y, y_ref) < tol and torch.equal(cache, cache_ref)


def test_conv1d_prefill_then_steps_equal_one_prefill():
    """The state a prefill leaves, advanced by update steps, reproduces the longer prefill (reference path)."""
    c, k, t, p = 12, 4, 9, 2
    x, w, b = torch.randn(3, t, c), torch.randn(c, k), torch.randn(c)
    y_all, state_all = cv.causal_conv1d(x, w, b, "silu")
    y, state = cv.causal_conv1d(x[:, :p], w, b, "silu")
    cache = torch.randn(4, c, k - 1)
    slots = torch.tensor([2, 0, 3])
    cache[slots] = state
    steps = [cv.causal_conv1d_update(x[:, i], cache, w, b, "silu", slots) for i in range(p, t)]
    torch.testing.assert_close(torch.cat([y, torch.stack(steps, 1)], 1), y_all, rtol=1e-6, atol=1e-6)
    assert torch.equal(cache[slots], state_all)


def test_conv1d_errors():
    with pytest.raises(ConfigError, match="activation 'gelu'"):
        cv.causal_conv1d(torch.randn(1, 3, 8), torch.randn(8, 4), None, "gelu")
    with pytest.raises(ConfigError, match="8 channels"):
        cv.causal_conv1d(torch.randn(1, 3, 8), torch.randn(6, 4))
    with pytest.raises(ConfigError, match=r"\[C, K\]"):
        cv.causal_conv1d(torch.randn(1, 3, 8), torch.randn(8, 1, 4))


# ------------------------------------------------------------------ gated delta rule
def _rule_inputs(b, t, hk, hv, dk, dv, device, dt, correlated=False):
    q = torch.randn(b, t, hk, dk, device=device)
    k = torch.randn(b, t, hk, dk, device=device)
    v = torch.randn(b, t, hv, dv, device=device)
    a, bb = torch.randn(b, t, hv, device=device), torch.randn(b, t, hv, device=device)
    if correlated:  # near-identical keys, beta ~ 1, almost no decay: the ill-conditioned in-chunk system
        k = torch.randn(b, 1, hk, dk, device=device) + 0.05 * k
        bb, a = bb.abs() + 4, a - 8
    a_log, dt_bias = torch.rand(hv, device=device) * 2 - 1, torch.randn(hv, device=device)
    g, beta = gd.gates(a.to(dt), bb.to(dt), a_log.to(dt), dt_bias.to(dt))
    return q.to(dt), k.to(dt), v.to(dt), g, beta


def test_chunk_gated_delta_rule(device):
    """Chunked prefill vs the recurrent reference, at lengths around the chunk (64)."""
    for dt in dtypes(device):
        tol = 1e-5 if dt == torch.float32 else 2e-2
        # T = 1 with one head is o = beta (q . k) v: a cancelling q . k alone leaves a 1e-5 relative error (seen)
        for t, b, hv, dv, h0, corr in ((1, 2, 2, 16, False, False), (63, 1, 2, 16, False, False),
                                       (64, 1, 1, 16, True, False), (65, 2, 2, 48, True, False),
                                       (130, 1, 1, 16, False, True)):
            # at 65: 2 value heads per key head, d_v 48 in two blocks; d_k 24 is not a power of two
            q, k, v, g, beta = _rule_inputs(b, t, 1, hv, 24, dv, device, dt, corr)
            init = torch.randn(b, hv, 24, dv, device=device) if h0 else None
            o, state = gd.chunk_gated_delta_rule(q, k, v, g, beta, initial_state=init)
            o_ref, state_ref = gd.gated_delta_rule_ref(q, k, v, g, beta, initial_state=init)
            assert o.dtype == dt and state.dtype == torch.float32
            assert rel_err(o, o_ref) < tol, (dt, t, rel_err(o, o_ref))
            assert rel_err(state, state_ref) < tol, (dt, t, rel_err(state, state_ref))


def test_reference_matches_transformers():
    """gated_delta_rule_ref is transformers' recurrent rule, and agrees with its chunked one."""
    q, k, v, g, beta = _rule_inputs(2, 70, 2, 4, 16, 8, "cpu", torch.float32)
    h0 = torch.randn(2, 4, 16, 8)
    o, s = gd.gated_delta_rule_ref(q, k, v, g, beta, initial_state=h0)
    # transformers >= 5.2x repeats q/k over the value heads inside these functions, older 5.x in the
    # layer before calling them: hand them repeated heads (consecutive value heads share a q/k head).
    rep = v.shape[2] // q.shape[2]
    qr, kr = q.repeat_interleave(rep, dim=2), k.repeat_interleave(rep, dim=2)
    for fn in (qwen3_5.torch_recurrent_gated_delta_rule, qwen3_5.torch_chunk_gated_delta_rule):
        o_hf, s_hf = fn(qr, kr, v, g, beta, initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=True)
        assert rel_err(o, o_hf) < 1e-5 and rel_err(s, s_hf) < 1e-5


def test_gated_delta_rule_decode(device):
    """Several decode steps on permuted slots vs the reference; other slots untouched."""
    b, hk, hv, dk, dv, steps = 2, 1, 2, 16, 48, 2
    for dt in dtypes(device):
        tol = 1e-5 if dt == torch.float32 else 2e-2
        state = torch.randn(6, hv, dk, dv, device=device)
        state_ref = state.clone()
        slots = torch.tensor([4, 2], device=device)
        a_log, dt_bias = (torch.rand(hv, device=device) * 2 - 1).to(dt), torch.randn(hv, device=device).to(dt)
        for _ in range(steps):
            q, k = torch.randn(b, hk, dk, device=device).to(dt), torch.randn(b, hk, dk, device=device).to(dt)
            v = torch.randn(b, hv, dv, device=device).to(dt)
            a, bb = (5 * torch.randn(b, hv, device=device)).to(dt), torch.randn(b, hv, device=device).to(dt)
            o = gd.gated_delta_rule_decode(q, k, v, a, bb, a_log, dt_bias, state, slots)
            o_ref = gd.gated_delta_rule_decode_ref(q, k, v, a, bb, a_log, dt_bias, state_ref, slots)
            assert rel_err(o, o_ref) < tol, (dt, rel_err(o, o_ref))
        assert rel_err(state, state_ref) < 1e-5
        others = torch.tensor([0, 1, 3, 5], device=device)
        assert torch.equal(state[others], state_ref[others])


# ------------------------------------------------------------------ the layer
def tiny_config(**kw):
    from transformers import Qwen3_5TextConfig

    base = dict(hidden_size=64, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                linear_value_head_dim=16, linear_conv_kernel_dim=4, rms_norm_eps=1e-6, num_hidden_layers=4,
                layer_types=["linear_attention"] * 4, vocab_size=32, intermediate_size=64, num_attention_heads=2,
                num_key_value_heads=1, head_dim=16)
    base.update(kw)
    return Qwen3_5TextConfig(**base)


def _linear(w: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight.data.copy_(w)
    return lin


def layer_pair(cfg, layer_idx=0):
    """transformers' Qwen3_5GatedDeltaNet with random weights and a lowbit layer holding the same."""
    hf = qwen3_5.Qwen3_5GatedDeltaNet(cfg, layer_idx).float().eval()
    with torch.no_grad():
        hf.dt_bias.normal_()
        hf.A_log.uniform_(-5, 0)  # mild decays (the init draws A up to 16: forgotten within a few tokens)
        hf.norm.weight.normal_(1.0, 0.3)
    sd = hf.state_dict()
    projections = {n: _linear(sd[f"{n}.weight"]) for n in ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a",
                                                           "out_proj")}
    ours = GatedDeltaNet(cfg, layer_idx, projections, torch.float32)
    assert {"conv1d.weight", "A_log", "dt_bias", "norm.weight"} <= dict(ours.named_parameters()).keys()
    for name, p in ours.named_parameters():
        p.data.copy_(sd[name])
    assert not any(torch.isnan(p).any() for p in ours.parameters())
    return hf, ours


def make_ctx(layer, cfg, num_slots, slots, t, decode, start=0):
    spec = GatedDeltaNet.state_spec(cfg, torch.float32)
    assert spec.kind == "state"
    dev = slots.device
    caches = {layer.layer_idx: {n: torch.randn(num_slots + 1, *shape, dtype=dt, device=dev) for n, (shape, dt) in
                                spec.tensors.items()}}  # garbage: a prefill must not read it
    pos = torch.arange(start, start + t, device=dev).expand(len(slots), t)
    return ForwardContext(slots=slots, positions=pos, decode=decode, caches=caches)


MODES = ["reference", "interpreter", "cuda"]


def kernel_mode(mode, monkeypatch) -> str:
    """The device for a layer test: the CPU reference path, the Triton kernels in the interpreter, or a GPU."""
    if mode == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if mode == "interpreter":
        if not decoder.INTERPRET:
            pytest.skip("needs TRITON_INTERPRET=1 before triton loads")
        monkeypatch.setattr(decoder, "interpret_on_cpu", True)
    return "cuda" if mode == "cuda" else "cpu"


@pytest.mark.parametrize("mode", MODES)
def test_layer_matches_transformers(mode, monkeypatch):
    dev = kernel_mode(mode, monkeypatch)
    cfg = tiny_config()
    hf, ours = layer_pair(cfg, layer_idx=0)
    hf, ours = hf.to(dev), ours.to(dev)
    # the interpreter is slow: one row, one token past the first chunk
    x = torch.randn(1, 65, cfg.hidden_size) if mode == "interpreter" else torch.randn(2, 140, cfg.hidden_size)
    x = x.to(dev)
    with torch.no_grad():
        want = hf(x)
        got = ours(x, None)
    err = rel_err(got, want)
    assert err <= 1e-5, err


@pytest.mark.parametrize("mode", MODES)
def test_cached_decode_equals_full_forward(mode, monkeypatch):
    """Prefill of the first p tokens into slots, then one token at a time, equals the cache-less forward."""
    dev = kernel_mode(mode, monkeypatch)
    cfg = tiny_config(linear_num_key_heads=1, linear_num_value_heads=2)
    _, layer = layer_pair(cfg, layer_idx=3)
    layer = layer.to(dev)
    t = 5 if mode == "interpreter" else 12
    x = torch.randn(2, t, cfg.hidden_size, device=dev)
    slots = torch.tensor([2, 0], device=dev)
    with torch.no_grad():
        with monkeypatch.context() as m:
            m.setattr(decoder, "interpret_on_cpu", False)
            full = layer(x, None)  # CPU: the reference path; GPU: the chunk kernel
        for p in ((2,) if mode == "interpreter" else (1, 2, 7)):  # 2 < K-1: the conv tail starts with zeros
            ctx = make_ctx(layer, cfg, 3, slots, p, decode=False)
            untouched = ctx.caches[3]["ssm"][1].clone()
            outs = [layer(x[:, :p], ctx)]
            for i in range(p, t):
                pos = torch.full((2, 1), i, device=dev)
                outs.append(layer(x[:, i:i + 1], ForwardContext(slots, pos, decode=True, caches=ctx.caches)))
            err = rel_err(torch.cat(outs, 1), full)
            assert err <= 1e-5, (p, err)
            assert torch.equal(ctx.caches[3]["ssm"][1], untouched)


def test_tensor_parallel_split_sums_to_whole(monkeypatch):
    """Two ranks built as the docstring says (column/row slices, shard_param) sum to the whole layer."""
    cfg = tiny_config()
    _, whole = layer_pair(cfg)
    monkeypatch.setattr(parallel, "all_reduce", lambda x: x)  # the test sums the ranks itself
    x = torch.randn(1, 9, cfg.hidden_size)
    tp, total = 2, 0
    kd, vd = whole.key_dim // tp, whole.value_dim // tp
    for rank in range(tp):
        rows = GatedDeltaNet.conv_channels(cfg, rank, tp)
        col = lambda name, n: _linear(getattr(whole, name).weight[rank * n:(rank + 1) * n])  # noqa: E731
        projections = {"in_proj_qkv": _linear(whole.in_proj_qkv.weight[rows]), "in_proj_z": col("in_proj_z", vd),
                       "in_proj_b": col("in_proj_b", 2), "in_proj_a": col("in_proj_a", 2),
                       "out_proj": _linear(whole.out_proj.weight[:, rank * vd:(rank + 1) * vd])}
        part = GatedDeltaNet(cfg, 0, projections, torch.float32, tp_size=tp)
        assert part.key_dim == kd and part.value_dim == vd
        for name, p in part.named_parameters():
            if not name.startswith(("in_proj", "out_proj")):
                p.data.copy_(GatedDeltaNet.shard_param(cfg, name, dict(whole.named_parameters())[name].data, rank, tp))
        with torch.no_grad():
            total = total + part(x, None)
    with torch.no_grad():
        assert rel_err(total, whole(x, None)) < 1e-5


def test_layer_errors():
    cfg = tiny_config()
    _, layer = layer_pair(cfg)
    ctx = make_ctx(layer, cfg, 2, torch.tensor([0]), 2, decode=True)
    with pytest.raises(ConfigError, match="one token per row"):
        layer(torch.randn(1, 2, cfg.hidden_size), ctx)
    with pytest.raises(ConfigError, match="tensor-parallel size 3"):
        GatedDeltaNet.state_spec(cfg, torch.float32, tp_size=3)
    with pytest.raises(ConfigError, match="projections"):
        GatedDeltaNet(cfg, 0, {}, torch.float32)
    with pytest.raises(ConfigError, match="hidden_act='gelu'"):
        GatedDeltaNet.state_spec(tiny_config(hidden_act="gelu"), torch.float32)


@pytest.fixture(autouse=True)
def _one_thread():
    """The shapes here are tiny: a second thread only adds synchronisation (30x slower matmuls seen on a
    loaded 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
