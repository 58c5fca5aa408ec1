"""Mamba2 mixer (lowbit/layers/mamba2.py) and its kernels (lowbit/kernels/mamba2.py).

- the mixer against transformers' own NemotronHMamba2Mixer (fp32, torch path, random weights);
- cached prefill + decode equals the cache-less forward, through the references and the kernels;
- the Triton scan / step / gated-norm kernels against the references (CPU: interpreted; CUDA: compiled),
  sequence lengths not multiples of the chunk included; the chunked reference against the plain
  token-by-token recurrence;
- config parsing (time_step_limit spellings, cache dtype) and the tensor-parallel split.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from conftest import requires_cuda
from lowbit import parallel
from lowbit.kernels import decoder as ops
from lowbit.errors import ConfigError
from lowbit.kernels import mamba2 as k
from lowbit.layers.context import ForwardContext
from lowbit.layers.mamba2 import Mamba2Config, Mamba2Mixer, in_proj_shard_sizes, parse_time_step_limit

triton = pytest.importorskip("triton")

INF = math.inf
CFG = Mamba2Config(hidden_size=40, num_heads=4, head_dim=12, n_groups=2, state_size=20, conv_kernel=4,
                   norm_eps=1e-5)


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture
def kernels(monkeypatch):
    """Run the Triton kernels on CPU tensors (interpreted)."""
    monkeypatch.setattr(ops, "interpret_on_cpu", True)


# ------------------------------------------------------------------ config
def test_time_step_limit_spellings():
    assert parse_time_step_limit(None) == (0.0, INF)
    assert parse_time_step_limit([0.0, {"__float__": "Infinity"}]) == (0.0, INF)
    assert parse_time_step_limit([0.0, float("inf")]) == (0.0, INF)  # json's bare Infinity token
    assert parse_time_step_limit(["0.001", "inf"]) == (0.001, INF)
    assert parse_time_step_limit((0, 0.1)) == (0.0, 0.1)
    for bad in ([0.1], [0.2, 0.1], [-1.0, 1.0], [0.0, {"__float__": "NaN"}], [0.0, "big"], [0.0, True], 0.5):
        with pytest.raises(ConfigError, match="time_step_limit"):
            parse_time_step_limit(bad)


def test_config_from_hf():
    raw = {"hidden_size": 256, "mamba_num_heads": 8, "mamba_head_dim": 64, "n_groups": 2, "ssm_state_size": 32,
           "conv_kernel": 4, "use_conv_bias": True, "layer_norm_epsilon": 1e-5, "mamba_ssm_cache_dtype": "bfloat16",
           "time_step_limit": [0.0, {"__float__": "Infinity"}], "mamba_hidden_act": "silu"}
    c = Mamba2Config.from_hf(raw)
    assert (c.intermediate_size, c.conv_dim, c.time_step_limit, c.ssm_cache_dtype) == (512, 640, (0.0, INF), torch.bfloat16)
    assert in_proj_shard_sizes(c) == (512, 512, 64, 64, 8)  # 1160 rows, as the fixture's in_proj
    old = {k_: v for k_, v in raw.items() if k_ not in ("n_groups", "conv_kernel", "time_step_limit")}
    old |= {"mamba_n_groups": 4, "mamba_d_conv": 3, "mamba_dt_limit": [0.001, 0.1]}
    c = Mamba2Config.from_hf(old)
    assert (c.n_groups, c.conv_kernel, c.time_step_limit) == (4, 3, (0.001, 0.1))
    for key, val, msg in [("mamba_ssm_cache_dtype", "float64", "mamba_ssm_cache_dtype"),
                          ("mamba_hidden_act", "gelu", "mamba_hidden_act"), ("n_groups", 3, "multiple of n_groups"),
                          ("mamba_num_heads", None, "mamba_num_heads")]:
        with pytest.raises(ConfigError, match=msg):
            Mamba2Config.from_hf(raw | {key: val})
    with pytest.raises(ConfigError, match="divisible by the tensor-parallel size"):
        Mamba2Mixer(c, 0, {"in_proj": None, "out_proj": None}, torch.float32, tp_size=3)


# ------------------------------------------------------------------ kernels vs references
def random_scan_inputs(b, t, h, p, g, n, dtype=torch.float32, device="cpu"):
    x = torch.randn(b, t, h, p, device=device).to(dtype)
    dt = (torch.randn(b, t, h, device=device) - 1).to(dtype)
    B = torch.randn(b, t, g, n, device=device).to(dtype)
    C = torch.randn(b, t, g, n, device=device).to(dtype)
    A_log = torch.rand(h, device=device).mul(3).log()  # A in (-3, 0)
    D = torch.randn(h, device=device)
    dt_bias = torch.randn(h, device=device)
    return x, dt, A_log, B, C, D, dt_bias


def test_chunked_reference_equals_recurrence():
    x, dt, A_log, B, C, D, dtb = random_scan_inputs(2, 45, 4, 8, 2, 12)
    init = torch.randn(2, 4, 8, 12)
    for lim in [(0.0, INF), (0.2, 0.9)]:
        y0, s0 = k.ssd_recurrent_ref(x, dt, A_log, B, C, D, dtb, lim, initial_state=init)
        for chunk in (16, 64):  # 45 = 2 * 16 + 13; one partial chunk of 64
            y1, s1 = k.ssd_chunked_ref(x, dt, A_log, B, C, D, dtb, lim, chunk_size=chunk, initial_state=init)
            assert rel_err(y1, y0) < 1e-5 and rel_err(s1, s0) < 1e-5


def check_scan(device, t, dtype, state_dtype, load_state, tol, b=2, p=40):
    h, g, n = 4, 2, 24  # P = 40: two blocks of 32; N: padded to 32
    x, dt, A_log, B, C, D, dtb = random_scan_inputs(b, t, h, p, g, n, dtype, device)
    lim = (0.0, INF) if t % 2 else (0.05, 1.5)
    state = torch.randn(4, h, p, n, device=device).to(state_dtype)  # slots 0..2 + pad slot 3
    before = state.clone()
    slots = torch.tensor([2, 0][:b], device=device)
    init = state[slots].float() if load_state else None
    y_ref, s_ref = k.ssd_recurrent_ref(x, dt, A_log, B, C, D, dtb, lim, initial_state=init)
    y = k.ssd_scan(x, dt, A_log, B, C, D, dtb, lim, state=state, slots=slots, load_state=load_state)
    assert y.dtype == dtype
    ey, es = rel_err(y, y_ref), rel_err(state[slots], s_ref)
    assert ey < tol and es < tol, (t, dtype, ey, es)
    untouched = [s for s in range(4) if s not in slots.tolist()]
    assert torch.equal(state[untouched], before[untouched])
    if not load_state:  # without a cache: the same output
        assert torch.equal(k.ssd_scan(x, dt, A_log, B, C, D, dtb, lim), y)
    return ey, es


@pytest.mark.parametrize("t, b, p, load", [(1, 2, 20, False), (75, 1, 40, True), (130, 1, 20, False)])
def test_scan_kernel_cpu(kernels, t, b, p, load):
    check_scan("cpu", t, torch.float32, torch.float32, load_state=load, tol=1e-5, b=b, p=p)


def test_scan_kernel_cpu_low_precision(kernels):
    check_scan("cpu", 64, torch.bfloat16, torch.bfloat16, load_state=True, tol=1e-2, b=1, p=20)


def check_step(device, dtype, state_dtype, tol, lims=((0.0, INF), (0.3, 0.8))):
    b, h, p, g, n = 3, 4, 40, 2, 24
    x, dt, A_log, B, C, D, dtb = random_scan_inputs(b, 1, h, p, g, n, dtype, device)
    state = torch.randn(6, h, p, n, device=device).to(state_dtype)
    ref = state.clone()
    slots = torch.tensor([4, 1, 5], device=device)  # 5: the pad slot
    for lim in lims:
        y = k.ssd_step(state, slots, x[:, 0], dt[:, 0], A_log, B[:, 0], C[:, 0], D, dtb, lim)
        y_ref = k.ssd_step_ref(ref, slots, x[:, 0], dt[:, 0], A_log, B[:, 0], C[:, 0], D, dtb, lim)
        assert y.dtype == dtype
        ey, es = rel_err(y, y_ref), rel_err(state, ref)
        assert ey < tol and es < tol, (dtype, ey, es)
    return ey, es


def test_step_kernel_cpu(kernels):
    check_step("cpu", torch.float32, torch.float32, 1e-6)
    check_step("cpu", torch.bfloat16, torch.bfloat16, 1e-2, lims=[(0.3, 0.8)])


def test_gated_norm_kernel_cpu(kernels):
    y, z = torch.randn(5, 3, 96), torch.randn(5, 3, 200)[..., 10:106]  # z: a strided view, as in the mixer
    w = 1 + 0.1 * torch.randn(96)
    out = k.gated_rms_norm(y, z, w, 24, 1e-5, torch.float32)
    assert rel_err(out, k.gated_rms_norm_ref(y, z, w, 24, 1e-5, torch.float32)) < 1e-6


def test_softplus_kernel_matches_torch_small_inputs(kernels):
    """dt far below zero: softplus ~ exp(x); the scan must not round it to 0 (log(1 + tiny))."""
    x, dt, A_log, B, C, D, dtb = random_scan_inputs(1, 1, 4, 16, 1, 16)
    dt = torch.tensor([[[-30.0, -18.0, 0.5, 25.0]]])
    y = k.ssd_scan(x, dt, A_log, B, C, D, torch.zeros(4), (0.0, INF))
    y_ref, _ = k.ssd_recurrent_ref(x, dt, A_log, B, C, D, torch.zeros(4), (0.0, INF))
    assert rel_err(y - D[:, None] * x, y_ref - D[:, None] * x) < 1e-5


@requires_cuda
@pytest.mark.parametrize("t", [1, 64, 75, 1000])
def test_scan_kernel_cuda(t):
    check_scan("cuda", t, torch.float32, torch.float32, load_state=t == 75, tol=1e-5)
    check_scan("cuda", t, torch.bfloat16, torch.float32, load_state=True, tol=2e-2)


@requires_cuda
def test_step_and_norm_kernels_cuda():
    check_step("cuda", torch.float32, torch.float32, 1e-5)
    check_step("cuda", torch.bfloat16, torch.float32, 1e-2)
    check_step("cuda", torch.bfloat16, torch.bfloat16, 1e-2)
    y, z, w = torch.randn(7, 2048, device="cuda"), torch.randn(7, 2048, device="cuda"), torch.randn(2048, device="cuda")
    assert rel_err(k.gated_rms_norm(y, z, w, 1024, 1e-5), k.gated_rms_norm_ref(y, z, w, 1024, 1e-5, torch.float32)) < 1e-5


# ------------------------------------------------------------------ the mixer
def transformers_mixer(cfg: Mamba2Config, seed: int = 0):
    """transformers' NemotronHMamba2Mixer (fp32, random weights) with the same sizes."""
    tf = pytest.importorskip("transformers.models.nemotron_h.modeling_nemotron_h")
    from transformers import NemotronHConfig
    hf = NemotronHConfig(hidden_size=cfg.hidden_size, mamba_num_heads=cfg.num_heads, mamba_head_dim=cfg.head_dim,
                         n_groups=cfg.n_groups, ssm_state_size=cfg.state_size, conv_kernel=cfg.conv_kernel,
                         chunk_size=16, layer_norm_epsilon=cfg.norm_eps, layers_block_type=["linear_attention"],
                         vocab_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    torch.manual_seed(seed)
    m = tf.NemotronHMamba2Mixer(hf, layer_idx=0).eval()
    with torch.no_grad():
        for prm in m.parameters():
            prm.copy_(torch.randn_like(prm) * (0.3 if prm.dim() > 1 else 1.0))
        m.A_log.copy_(torch.rand(cfg.num_heads).mul(2).log())
        m.norm.weight.copy_(1 + 0.1 * torch.randn(cfg.intermediate_size))
    # transformers 5.24 clamps the chunked path's dt to (time_step_min, inf) and its recurrent step not
    # at all; the config's time_step_limit (what mamba_ssm and NVIDIA's code apply) is set explicitly
    m.time_step_limit = cfg.time_step_limit
    return m


def lowbit_mixer(cfg: Mamba2Config, ref, tp_size=1, rank=0):
    i_sizes = in_proj_shard_sizes(cfg)
    w_in = ref.in_proj.weight.detach()
    if tp_size > 1:  # what LinearMethod.tp_slice does for a fused column-parallel tensor
        parts, start = [], 0
        for s in i_sizes:
            per = s // tp_size
            parts.append(w_in[start + rank * per: start + (rank + 1) * per])
            start += s
        w_in = torch.cat(parts)
    w_out = ref.out_proj.weight.detach()
    w_out = w_out.chunk(tp_size, dim=1)[rank]
    in_proj = nn.Linear(w_in.shape[1], w_in.shape[0], bias=False)
    out_proj = nn.Linear(w_out.shape[1], w_out.shape[0], bias=False)
    in_proj.weight.data.copy_(w_in)
    out_proj.weight.data.copy_(w_out)
    m = Mamba2Mixer(cfg, 0, {"in_proj": in_proj, "out_proj": out_proj}, torch.float32, tp_size)
    assert all(torch.isnan(prm).all() for name, prm in m.named_parameters() if "proj" not in name)
    state = {name: prm for name, prm in ref.named_parameters() if "proj" not in name}
    for name, prm in m.named_parameters():
        if "proj" in name:
            continue
        with torch.no_grad():
            prm.copy_(m.tp_slice(name, state.pop(name).detach(), rank))
    assert not state, f"transformers parameters without a lowbit counterpart: {list(state)}"
    return m


@pytest.mark.parametrize("lim", [(0.0, INF), (0.3, 1.2)])
def test_mixer_matches_transformers(lim, monkeypatch):
    cfg = Mamba2Config(**{**CFG.__dict__, "time_step_limit": lim})
    ref = transformers_mixer(cfg)
    mine = lowbit_mixer(cfg, ref)
    x = torch.randn(2, 37, cfg.hidden_size)
    with torch.no_grad():
        err = rel_err(mine(x), ref(x))
        assert err < 1e-5, err
        if lim[0] > 0:  # once more through the interpreted kernels
            monkeypatch.setattr(ops, "interpret_on_cpu", True)
            err_k = rel_err(mine(x[:1]), ref(x[:1]))
            assert err_k < 1e-5, err_k


def cached_run(m, x, split, num_slots=3, slots=(2, 0), state_dtype=torch.float32):
    """Prefill x[:, :split] into `slots`, then decode the rest one token at a time."""
    b, t, _ = x.shape
    spec = Mamba2Mixer.state_spec(m.cfg, torch.float32, m.tp_size)
    assert spec.kind == "state"
    caches = {0: {name: torch.full((num_slots + 1, *shape), float("nan"), dtype=state_dtype if name == "ssm" else dt)
                  for name, (shape, dt) in spec.tensors.items()}}
    sl = torch.tensor(slots)
    pos = torch.arange(t)[None].expand(b, t)
    outs = [m(x[:, :split], ForwardContext(sl, pos[:, :split], False, caches))]
    for i in range(split, t):
        outs.append(m(x[:, i:i + 1], ForwardContext(sl, pos[:, i:i + 1], True, caches)))
    untouched = [s for s in range(num_slots + 1) if s not in slots]
    assert all(torch.isnan(c[untouched]).all() for c in caches[0].values())
    return torch.cat(outs, 1)


@pytest.mark.parametrize("use_kernels", [False, True])
def test_cached_decode_equals_full_forward(use_kernels, monkeypatch):
    monkeypatch.setattr(ops, "interpret_on_cpu", use_kernels)
    cfg = Mamba2Config(**{**CFG.__dict__, "time_step_limit": (0.0, 1.5)})
    m = lowbit_mixer(cfg, transformers_mixer(cfg, seed=1))
    x = torch.randn(2, 12 if use_kernels else 24, cfg.hidden_size)
    with torch.no_grad():
        full = m(x)
        # token by token after the first; prefill of part + decode of the rest
        for split in ((9,) if use_kernels else (1, 17)):
            err = rel_err(cached_run(m, x, split), full)
            assert err < 1e-5, (split, err)


def test_cached_decode_bf16_ssm_state():
    cfg = Mamba2Config(**{**CFG.__dict__, "ssm_cache_dtype": torch.bfloat16})
    m = lowbit_mixer(cfg, transformers_mixer(cfg, seed=2))
    assert Mamba2Mixer.state_spec(cfg, torch.float32).tensors["ssm"] == ((4, 12, 20), torch.bfloat16)
    x = torch.randn(2, 12, cfg.hidden_size)
    with torch.no_grad():
        err = rel_err(cached_run(m, x, 5, state_dtype=torch.bfloat16), m(x))
    assert 0 < err < 2e-2, err  # the state is rounded to bf16 between steps: close, not exact


def test_tensor_parallel_split_sums_to_full(monkeypatch):
    """Two ranks' mixers (heads split in whole groups) whose out_proj partial sums add up to the full output."""
    monkeypatch.setattr(parallel, "all_reduce", lambda t: t)  # each rank's partial sum, added below
    ref = transformers_mixer(CFG, seed=3)
    full = lowbit_mixer(CFG, ref)
    ranks = [lowbit_mixer(CFG, ref, tp_size=2, rank=r) for r in range(2)]
    assert ranks[0].num_heads == 2 and ranks[0].conv1d.weight.shape == (24 + 2 * 20, 1, 4)
    assert Mamba2Mixer.state_spec(CFG, torch.float32, 2).tensors["conv"] == ((64, 3), torch.float32)
    x = torch.randn(1, 10, CFG.hidden_size)
    with torch.no_grad():
        err = rel_err(ranks[0](x) + ranks[1](x), full(x))
    assert err < 1e-5, err


@requires_cuda
def test_mixer_cuda_graph_decode():
    """A decode step captured in a CUDA graph equals the eager step (slots read on the device)."""
    cfg = CFG
    m = lowbit_mixer(cfg, transformers_mixer(cfg, seed=4)).cuda()
    spec = Mamba2Mixer.state_spec(cfg, torch.float32)
    caches = {0: {name: torch.zeros((5, *shape), dtype=dt, device="cuda") for name, (shape, dt) in spec.tensors.items()}}
    x = torch.randn(2, 20, cfg.hidden_size, device="cuda")
    slots = torch.tensor([3, 1], device="cuda")
    pos = torch.arange(20, device="cuda")[None].expand(2, 20)
    with torch.no_grad():
        full = m(x)
        m(x[:, :10], ForwardContext(slots, pos[:, :10], False, caches))
        step_in = x[:, 10:11].clone()
        ctx = ForwardContext(slots, pos[:, 10:11].clone(), True, caches)
        saved = {n_: t.clone() for n_, t in caches[0].items()}
        m(step_in, ctx)  # warm up (compiles), then restore the state
        for n_, t in caches[0].items():
            t.copy_(saved[n_])
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = m(step_in, ctx)
        for n_, t in caches[0].items():
            t.copy_(saved[n_])
        outs = []
        for i in range(10, 20):
            step_in.copy_(x[:, i:i + 1])
            graph.replay()
            outs.append(out.clone())
    err = rel_err(torch.cat(outs, 1), full[:, 10:])
    assert err < 1e-4, err


def test_fixture_mixer_tensors_match_parameters():
    """The tiny real checkpoint's mixer tensors are exactly Mamba2Mixer's parameters (names, shapes),
    and its config.json (time_step_limit as {"__float__": "Infinity"}) parses."""
    import json

    from safetensors import safe_open

    from conftest import fixture_dir
    d = fixture_dir("base-nemotronh-bf16")
    raw = json.loads((d / "config.json").read_text())
    cfg = Mamba2Config.from_hf(raw)
    assert cfg.time_step_limit == (0.0, INF) and in_proj_shard_sizes(cfg) == (512, 512, 64, 64, 8)
    m = Mamba2Mixer(cfg, 0, {"in_proj": nn.Linear(cfg.hidden_size, sum(in_proj_shard_sizes(cfg)), bias=False),
                             "out_proj": nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)},
                    torch.bfloat16)
    mine = {name: tuple(p.shape) for name, p in m.named_parameters()}
    prefix = "backbone.layers.0.mixer."
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        disk = {key[len(prefix):]: tuple(f.get_slice(key).get_shape()) for key in f.keys() if key.startswith(prefix)}
    assert disk == mine
