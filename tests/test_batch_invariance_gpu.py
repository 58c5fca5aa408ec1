"""The batch-invariant mode on the GPU (lowbit/kernels/invariance.py): a row's logits are the same
bits alone and inside a batch of other rows, in every scheme (bf16, FP8, NVFP4, int4-g128: the
synthetic "small" model, whose shapes take the kernels' real tilings) and in bf16 and fp16.

- each linear of a layer, and lm_head, at token counts across every tiling bucket and path switch
  (16/32/64 buckets, the GEMV range, DENSE_MIN_M, SCALED_MM_MIN_M): rows alone == rows in the batch;
- decode: engine decode steps (eager and CUDA-graph replays) of one slot alone and among 1..63
  other slots, padded to the engine's buckets;
- prefill: `Model.logits` of a prompt alone and among 1..63 other prompts (M up to 1024 rows; the
  prompts are short enough that flash attention has one key block: the engine prefills one
  sequence per call, so its attention never sees another request);
- MoE: a token's expert MLP alone and among 63 tokens that share its experts (bf16, NVFP4);
- serve: test_serve_invariance.check_invariance (256 mixed greedy/seeded requests at concurrency
  32 against the same requests alone) with the mode on, bf16 and NVFP4.
All comparisons are bitwise (torch.equal). Run: python -m pytest -q tests/test_batch_invariance_gpu.py
"""
from __future__ import annotations

import pytest
import torch

from conftest import requires_cuda

pytestmark = requires_cuda

SCHEMES = ["bf16", "fp8", "nvfp4", "int4-g128"]
DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]
# token counts across the tilings' buckets and the M-dependent paths of the default mode
TOKEN_COUNTS = [2, 3, 4, 5, 8, 16, 17, 33, 64, 65, 127, 128, 129, 512, 600]
DECODE_BATCHES = [2, 3, 7, 16, 33, 64]
PREFILL_BATCHES = [2, 5, 16, 64]


@pytest.fixture(autouse=True)
def _mode_on():
    from lowbit.kernels import invariance

    with invariance.scope(True):
        yield


_models: dict = {}


def small(scheme: str, dtype: torch.dtype):
    """The synthetic "small" model (4 layers, hidden 1024, vocab 32000), built once per case."""
    from lowbit import synthetic

    key = (scheme, dtype)
    if key not in _models:
        _models.clear()  # one model at a time on the GPU
        _models[key] = synthetic.build("small", scheme, device="cuda", dtype=dtype, seed=3, batch_invariant=True)
    return _models[key]


def _linears(model):
    """(name, module) of layer 0's linear units and lm_head."""
    from lowbit.quant.base import QLinear

    return [(n, m) for n, m in model.net.named_modules()
            if isinstance(m, QLinear) and (".layers.0." in f".{n}." or "lm_head" in n)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_linear_rows_alone_equal_rows_in_a_batch(scheme, dtype):
    model = small(scheme, dtype)
    linears = _linears(model)
    assert len(linears) >= 5, [n for n, _ in linears]
    with torch.inference_mode():
        for name, mod in linears:
            k = mod.spec.local_in_features
            x = torch.randn(max(TOKEN_COUNTS), k, device="cuda").to(dtype)
            alone = [mod(x[i:i + 1]) for i in range(3)]
            for m in TOKEN_COUNTS:
                y = mod(x[:m])
                for i in range(min(m, 3)):
                    assert torch.equal(y[i], alone[i][0]), f"{scheme} {name}: row {i} of {m} differs from alone"
                assert torch.equal(y[m - 1], mod(x[m - 1:m])[0]), f"{scheme} {name}: last row of {m}"


def _prefilled_engine(model, slots: int):
    from lowbit.sampling import SamplingParams

    engine = model.engine(slots, 64, cuda_graphs=True)
    g = torch.Generator().manual_seed(11)
    held = []
    for _ in range(slots):
        s = engine.acquire()
        n = int(torch.randint(3, 21, (1,), generator=g))
        engine.prefill(s, torch.randint(3, model.config.vocab_size, (n,), generator=g).tolist(), SamplingParams())
        engine.reserve(s, n + 1)  # the decode position's block
        held.append(s)
    return engine, held


def _padded(engine, ids: list[int]) -> list[int]:
    bucket = next(b for b in engine.buckets if b >= len(ids))
    return ids + [engine.cache.pad_slot] * (bucket - len(ids))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_decode_step_rows_alone_equal_rows_in_a_batch(scheme, dtype):
    """The captured part of a decode step (`Engine._decode_logits`: slot list -> float32 logits),
    eager and as the engine replays it in a CUDA graph; it rewrites each slot's KV row at the same
    position with the same values, so it can be repeated."""
    model = small(scheme, dtype)
    engine, slots = _prefilled_engine(model, max(DECODE_BATCHES))
    with torch.inference_mode():
        def eager(ids):
            return engine._decode_logits(torch.tensor(_padded(engine, ids), device="cuda"))

        def graphed(ids):
            graph = engine._graph(len(_padded(engine, ids)))
            assert graph is not None, engine.notes
            g, buf, logits = graph
            buf.copy_(torch.tensor(_padded(engine, ids), device="cuda"))
            g.replay()
            return logits.clone()

        for run in (eager, graphed):
            alone = {s: run([s])[0] for s in (slots[0], slots[-1])}
            for b in DECODE_BATCHES:
                first = run(slots[:b])
                assert torch.equal(first[0], alone[slots[0]]), f"{scheme} {run.__name__}: slot alone vs among {b}"
                last = run(slots[-b:])
                assert torch.equal(last[b - 1], alone[slots[-1]]), f"{scheme} {run.__name__}: last of {b}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_prefill_rows_alone_equal_rows_in_a_batch(scheme, dtype):
    model = small(scheme, dtype)
    t = 16
    ids = torch.randint(3, model.config.vocab_size, (max(PREFILL_BATCHES), t), device="cuda")
    alone = model.logits(ids[:1])[0]
    for b in PREFILL_BATCHES:
        assert torch.equal(model.logits(ids[:b])[0], alone), f"{scheme}: prompt alone vs among {b} ({b * t} rows)"


@pytest.mark.parametrize("name", ["bf16", "modelopt-nvfp4"])
def test_moe_token_alone_equals_token_among_others(name):
    """A token's expert MLP does not depend on how many tokens share its experts (fixed blocks)."""
    from lowbit.kernels import moe
    from test_experts import ALL, build_experts

    experts, _ = build_experts(ALL[name], num_experts=8, dtype=torch.bfloat16)
    experts.to("cuda")
    t, k = 64, 2
    x = (torch.randn(t, experts.first.spec.hidden, device="cuda") * 0.5).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(8)[:k] for _ in range(t)]).to(torch.int32)
    ids[: t // 2] = ids[0]  # half the tokens share token 0's experts
    ids = ids.cuda()
    w = torch.rand(t, k, device="cuda") + 0.1
    alone = moe.experts_forward(experts, x[:1], ids[:1], w[:1])
    assert alone is not None, f"{name}: no kernel path"
    for n in (2, 5, 17, 33, 64):
        y = moe.experts_forward(experts, x[:n], ids[:n], w[:n])
        assert torch.equal(y[0], alone[0]), f"{name}: token alone vs among {n}"


@pytest.mark.parametrize("scheme", ["bf16", "nvfp4"])
def test_serve_batch_invariance(scheme):
    """The issue's acceptance check on the GPU: 256 mixed requests at concurrency 32 vs alone."""
    from test_serve_invariance import check_invariance

    check_invariance(small(scheme, torch.bfloat16), 256, 32)


def test_float_gemm_real_sizes():
    """The mode's unquantized GEMM (gemm.py FMT_FLOAT) against torch in float32 at Llama sizes."""
    from lowbit.kernels import invariance

    for dtype, tol in ((torch.bfloat16, 8e-3), (torch.float16, 2e-3), (torch.float32, 2e-6)):
        for m, n, k in ((1, 4096, 4096), (64, 6144, 4096), (1000, 128256 // 8, 4096), (3, 8, 2048)):
            x = torch.randn(m, k, device="cuda").to(dtype)
            w = (torch.randn(n, k, device="cuda") / k ** 0.5).to(dtype)
            ref = x.double() @ w.double().T
            y = invariance.linear(x, w)
            err = ((y.double() - ref).norm() / ref.norm()).item()
            assert err < tol, (dtype, m, n, k, err)
