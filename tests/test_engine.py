"""Issue 6: the decode engine. Slots: sequences joining and leaving a running batch give the same
greedy tokens as running alone; FP8 KV cache; CUDA graphs give the same tokens as eager steps."""
from __future__ import annotations

import random

import pytest
import torch

import lowbit
from conftest import fixture_dir, requires_cuda
from lowbit import synthetic
from lowbit.engine import Engine
from lowbit.errors import LowbitError
from lowbit.sampling import SamplingParams

GREEDY = SamplingParams()


def fresh_seed() -> int:
    return random.randrange(2**31)


@pytest.fixture(scope="module")
def tiny():
    return synthetic.build("tiny", "bf16", device="cpu", dtype=torch.float32, seed=fresh_seed())


def alone(model, prompt, n):
    return model.generate([prompt], max_new_tokens=n, ignore_eos=True)[0].output_ids


def test_join_and_leave_mid_run_equals_alone(tiny):
    """5 sequences through 3 slots: they join at different steps (into slots others left, whose
    cache rows still hold old keys), leave after different lengths, and the batch order varies."""
    prompts = [torch.randint(3, 512, (n,)).tolist() for n in (7, 2, 13, 5, 9)]
    lengths = [12, 5, 9, 14, 6]
    joins = {0: [0], 2: [1], 3: [2], 6: [3, 4]}  # step -> sequences that want to join
    want = [alone(tiny, p, n) for p, n in zip(prompts, lengths)]

    engine = Engine(tiny, 3, 64)
    out, slot_of, waiting = {}, {}, []
    for step in range(60):
        waiting += joins.get(step, [])
        while waiting and engine.free_slots:  # join: take a free slot, prefill
            j = waiting.pop(0)
            slot_of[j] = engine.acquire()
            out[j] = engine.prefill(slot_of[j], prompts[j], GREEDY).get()
        running = [j for j in slot_of if len(out[j]) < lengths[j]]
        random.shuffle(running)
        if running:
            toks = engine.decode([slot_of[j] for j in running], GREEDY).get()
            for j, t in zip(running, toks):
                out[j].append(t)
        for j in [j for j in slot_of if len(out[j]) >= lengths[j]]:  # leave
            engine.release(slot_of.pop(j))
        if len(out) == len(prompts) and not slot_of:
            break
    assert [out[j] for j in range(len(prompts))] == want
    assert engine.free_slots == 3


def test_sequences_leaving_on_eos_mid_batch(tiny):
    """A sequence that hits EOS leaves while the others run on; the step launched before its EOS
    was read (pipelining) must not leak a token."""
    prompts = [torch.randint(3, 512, (n,)).tolist() for n in (4, 9, 6)]
    free = [alone(tiny, p, 16) for p in prompts]
    eos = free[0][3]
    tiny.config.eos_token_ids = [eos]
    try:
        got = tiny.generate(prompts, max_new_tokens=16)
    finally:
        tiny.config.eos_token_ids = [2]
    for r, f in zip(got, free):
        expect = f[: f.index(eos) + 1] if eos in f else f
        assert r.output_ids == expect
        assert r.finish_reason == ("eos" if eos in f else "length")


def test_stream_closed_early_releases_slots(tiny):
    p = torch.randint(3, 512, (5,)).tolist()
    it = iter(tiny.stream([p, p], max_new_tokens=10, ignore_eos=True))
    next(it)
    it.close()
    engine = tiny.engine(2, 15)
    assert engine.free_slots == engine.num_slots


def test_engine_errors(tiny):
    engine = Engine(tiny, 2, 16)
    a, b = engine.acquire(), engine.acquire()
    with pytest.raises(LowbitError, match="slots are in use"):
        engine.acquire()
    with pytest.raises(LowbitError, match="does not fit a KV cache of 16"):
        engine.prefill(a, list(range(3, 30)), GREEDY)
    engine.prefill(a, list(range(3, 17)), GREEDY)  # positions 0-13
    engine.decode([a], GREEDY)  # 14
    engine.decode([a], GREEDY)  # 15: the last one
    with pytest.raises(LowbitError, match=f"slot {a} reached the KV-cache length 16"):
        engine.decode([a], GREEDY)
    engine.release(a)
    engine.release(b)
    with pytest.raises(LowbitError, match="max_position_embeddings"):
        Engine(tiny, 1, 10**6)


def test_fp8_kv_cache_matches_cacheless_forward():
    """The FP8 cache stores E4M3 keys/values; greedy decoding through it equals the argmax of the
    cache-less forward, which applies the same quantization to k/v (fp32 compute: same numbers)."""
    model = lowbit.load(fixture_dir("modelopt-fp8-kvfp8"), device="cpu", dtype="float32", progress=False)
    prompt = torch.randint(3, model.config.vocab_size, (6,)).tolist()
    out = model.generate([prompt], max_new_tokens=12, ignore_eos=True)[0].output_ids
    engine = model.engine(1, 18)
    assert engine.cache.fp8 and engine.cache.layers[0]["k"].dtype == torch.float8_e4m3fn
    logits = model.logits(torch.tensor([prompt + out]))[0]
    assert logits[len(prompt) - 1:-1].argmax(-1).tolist() == out
    # the bf16-cache option keeps full precision and reports it
    full = lowbit.load(fixture_dir("modelopt-fp8-kvfp8"), device="cpu", dtype="float32", kv_cache="bf16",
                       progress=False)
    assert full.engine(1, 18).cache.layers[0]["k"].dtype == torch.float32
    assert any("kept in the compute dtype" in n for n in full.report.notes)


def test_synthetic_fp8_kv_cache_decodes_like_its_cacheless_forward():
    model = synthetic.build("tiny", "bf16", device="cpu", dtype=torch.float32, kv_cache="fp8", seed=fresh_seed())
    prompt = torch.randint(3, 512, (9,)).tolist()
    out = model.generate([prompt], max_new_tokens=10, ignore_eos=True)[0].output_ids
    logits = model.logits(torch.tensor([prompt + out]))[0]
    assert logits[len(prompt) - 1:-1].argmax(-1).tolist() == out


# ---------------------------------------------------------------- GPU
@requires_cuda
@pytest.mark.parametrize("scheme", synthetic.scheme_names())
def test_cuda_graphs_give_the_same_greedy_tokens(scheme):
    """Every scheme with a quantized lm_head (fp8 also with an FP8 KV cache), batch of 3 prompts."""
    model = synthetic.build("small", scheme, lm_head_quant=True, device="cuda", seed=fresh_seed(),
                            kv_cache="fp8" if scheme == "fp8" else "auto")
    prompts = [torch.randint(3, 32000, (n,)).tolist() for n in (5, 17, 33)]
    runs = []
    for graphs in (False, True):
        model._engine = None
        model.engine(len(prompts), 33 + 40, cuda_graphs=graphs)
        runs.append([r.output_ids for r in model.generate(prompts, max_new_tokens=40, ignore_eos=True)])
    assert model._engine.cuda_graphs, model._engine.notes
    assert runs[0] == runs[1]


@requires_cuda
def test_failed_capture_falls_back_and_leaves_the_rng_usable():
    """A decode step that cannot be captured (a host sync inside) runs eagerly with a note, and the
    device's random numbers still work afterwards (torch leaves its generator marked as capturing)."""
    from lowbit.engine import capture_graph

    with pytest.raises(RuntimeError):
        capture_graph(lambda: torch.ones(3, device="cuda").sum().item(), torch.cuda.graph_pool_handle())
    assert torch.isfinite(torch.randn(8, device="cuda")).all()
    model = synthetic.build("small", "bf16", device="cuda", seed=fresh_seed())
    e = model.engine(2, 64, cuda_graphs=True)
    real = e._decode_logits
    e._decode_logits = lambda ids: real(ids) + float(ids.sum()) * 0  # a host read: not capturable
    out = model.generate([[5, 6, 7], [8, 9]], max_new_tokens=4, ignore_eos=True, temperature=1.0, seed=3)
    assert not e.cuda_graphs and "CUDA graphs off" in " ".join(e.notes)
    assert all(len(r.output_ids) == 4 for r in out)
    assert torch.isfinite(torch.randn(8, device="cuda")).all()


@requires_cuda
def test_moe_without_expert_kernels_is_captured():
    """float32 MoE on the GPU (no expert kernel: the reference path) is captured in the decode graph
    and gives the eager tokens."""
    over = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=32, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64)
    model = synthetic.build("qwen3-30b-a3b", device="cuda", dtype=torch.float32, overrides=over, seed=fresh_seed())
    prompts = [[5, 17, 300, 42, 9], [100, 200, 300]]
    runs = []
    for graphs in (False, True):
        model._engine = None
        model.engine(len(prompts), 64, cuda_graphs=graphs)
        runs.append([r.output_ids for r in model.generate(prompts, max_new_tokens=12, ignore_eos=True)])
    assert model._engine.cuda_graphs, model._engine.notes
    assert runs[0] == runs[1]
