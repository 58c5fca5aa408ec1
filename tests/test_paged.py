"""Issue 15: the paged KV cache and its scheduler. Block manager; prompt chunks after cached positions
give the logits of the whole-prompt forward (attention-only, sliding-window and hybrid families);
chunked prefill mixed with decode under a token budget, and preemption under a tiny block pool, give
the tokens of each prompt run alone; prefix-cache hits give the logits of a cold run.
(The paged decode-attention kernel against its reference: tests/test_engine_ops.py.)"""
from __future__ import annotations

import random

import pytest
import torch

import lowbit
from conftest import requires_cuda
from lowbit import synthetic
from lowbit.blocks import BlockManager, OutOfBlocks
from lowbit.engine import Engine
from lowbit.errors import LowbitError
from lowbit.generate import Scheduler, Sequence
from lowbit.sampling import SamplingParams
from test_families import make_family_model, rel

GREEDY = SamplingParams()


def test_block_manager_allocates_frees_and_caches_prefixes():
    m = BlockManager(6, 4, prefix_caching=True)
    new = m.grow(0, 9)  # 9 positions: 3 blocks
    assert [i for i, _ in new] == [0, 1, 2] and m.free_blocks == 3 and m.needed(0, 12) == 0 and m.needed(0, 13) == 1
    with pytest.raises(OutOfBlocks, match="needs 5 more blocks"):
        m.grow(1, 17)
    assert m.free_blocks == 3 and not m.tables.get(1)  # a refused allocation changes nothing
    toks = [random.randrange(1000) for _ in range(9)]
    m.register(0, toks)  # 2 full blocks registered
    blocks0 = list(m.tables[0])
    m.free(0)
    assert m.free_blocks == 6  # cached blocks nobody holds count as free
    assert m.match(1, toks[:8] + [7, 7]) == 8 and m.tables[1] == blocks0[:2]
    assert m.match(2, toks[:8]) == 4  # the last token is always computed: only the first block
    assert m.match(3, [toks[0] + 1] + toks[1:8] + [1]) == 0  # chain hash: another first block, no hit
    assert m.stats["hit_blocks"] == 3 and m.stats["queries"] == 3
    m.free(1), m.free(2), m.free(3)
    m.grow(4, 24)  # the whole pool: the cached blocks are evicted
    assert m.stats["evictions"] == 2 and m.match(5, toks) == 0
    m.free(4)
    assert m.free_blocks == 6


def chunked_logits(engine, slot, ids, chunks):
    out = []
    with torch.inference_mode():
        start = engine.begin(slot, ids)
        for n in chunks:
            out.append(engine.net.compute_logits(engine._run_chunk(slot, ids[start:start + n]))[0].float())
            start += n
    return torch.cat(out)


@pytest.mark.parametrize("key", ["llama", "mistral-sliding", "qwen3_5", "nemotron-h"])
def test_chunked_prefill_equals_whole_prompt(tmp_path, key):
    """Chunks of 5, 1, 7, 8 tokens over blocks of 4 (crossing block boundaries mid-chunk), into a
    slot whose blocks come after another sequence's, equal the cache-less forward (fp32)."""
    make_family_model(tmp_path, key)
    model = lowbit.load(tmp_path, device="cpu", dtype="float32", progress=False)
    engine = Engine(model, 2, 32, cuda_graphs=False, block_size=4, prefix_caching=False)
    other = engine.acquire()
    engine.prefill(other, torch.randint(3, 320, (6,)).tolist(), GREEDY)  # takes the first blocks
    ids = torch.randint(3, 320, (21,)).tolist()
    slot = engine.acquire()
    got = chunked_logits(engine, slot, ids, [5, 1, 7, 8])
    want = model.logits(torch.tensor([ids]))[0]
    assert rel(got, want) < 1e-5, f"{key}: chunked prefill differs from the whole prompt by {rel(got, want):.3g}"
    # and decoding after the chunks continues from the right caches/states
    engine.tokens[slot] = 5
    engine.positions[slot] = len(ids)
    toks = engine.decode([slot], GREEDY).get()
    assert toks == [int(model.logits(torch.tensor([ids + [5]]))[0, -1].argmax())]


def run_scheduler(engine, prompts, lengths, budget):
    scheduler = Scheduler(engine, token_budget=budget, chunk_size=4)
    seqs = [Sequence(i, p, GREEDY, n, set()) for i, (p, n) in enumerate(zip(prompts, lengths))]
    for s in seqs[:2]:
        scheduler.add(s)
    steps = 0
    while scheduler.busy or steps < 3:
        if steps == 3:  # the rest arrive while the first ones decode
            for s in seqs[2:]:
                scheduler.add(s)
        scheduler.step()
        steps += 1
        assert steps < 500
    assert engine.free_slots == engine.num_slots and engine.free_blocks == engine.blocks.num_blocks
    return [s.out for s in seqs], scheduler


def greedy_reference(model, prompt, n):
    """Greedy continuation by the cache-less forward (Model.logits argmax), one token at a time."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model.logits(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.fixture(scope="module")
def tiny():
    return synthetic.build("tiny", "bf16", device="cpu", dtype=torch.float32, seed=random.randrange(2**31))


def _prompts():
    prompts = [torch.randint(3, 512, (n,)).tolist() for n in (23, 3, 17, 9, 30)]
    return prompts, [9, 12, 6, 10, 7]


def test_chunked_prefill_mixed_with_decode_equals_alone(tiny):
    """A budget of 8 tokens per step, chunks of 4: long prompts are prefilled over several steps while
    others decode."""
    prompts, lengths = _prompts()
    want = [greedy_reference(tiny, p, n) for p, n in zip(prompts, lengths)]
    engine = Engine(tiny, 3, 48, cuda_graphs=False, block_size=4)
    got, _ = run_scheduler(engine, prompts, lengths, budget=8)
    assert got == want
    got, _ = run_scheduler(engine, prompts, lengths, budget=None)  # whole prompts (and warm prefix cache)
    assert got == want


def test_preemption_under_a_tiny_block_pool_completes_every_request(tiny):
    """10 blocks of 4 positions for 3 slots: the running sequences outgrow the pool and are preempted
    (recomputed later); every request completes with the tokens it gets alone."""
    prompts, lengths = _prompts()
    want = [greedy_reference(tiny, p, n) for p, n in zip(prompts, lengths)]
    engine = Engine(tiny, 3, 48, cuda_graphs=False, block_size=4, num_blocks=10)
    got, scheduler = run_scheduler(engine, prompts, lengths, budget=8)
    assert got == want and scheduler.preemptions > 0
    with pytest.raises(LowbitError, match="needs 11 KV-cache blocks; the cache has 10"):
        scheduler.add(Sequence(9, list(range(3, 40)), GREEDY, 5, set()))


@pytest.mark.parametrize("kv_cache", ["auto", "fp8"])
def test_prefix_cache_hits_give_the_cold_logits(tiny, kv_cache):
    """Also with an FP8 KV cache: the cached prefix is read back dequantized, as the cold forward's
    fake-quantized keys and values."""
    if kv_cache == "fp8":
        tiny = synthetic.build("tiny", "bf16", device="cpu", dtype=torch.float32, kv_cache="fp8",
                               seed=random.randrange(2**31))
    engine = Engine(tiny, 2, 64, cuda_graphs=False, block_size=4)
    assert engine.cache.fp8 == (kv_cache == "fp8")
    shared = torch.randint(3, 512, (18,)).tolist()
    a = engine.acquire()
    engine.prefill(a, shared + [5, 6], GREEDY)
    engine.release(a)  # its full blocks stay cached
    ids = shared + torch.randint(3, 512, (5,)).tolist()
    b = engine.acquire()
    before = engine.prefix_cache_stats()["hit_blocks"]
    with torch.inference_mode():
        hit = engine.begin(b, ids)
        assert hit == 16  # 4 full blocks of the shared 18 tokens
        warm = engine.net.compute_logits(engine._run_chunk(b, ids[hit:]))[0]
    cold = tiny.logits(torch.tensor([ids]))[0, hit:]
    assert rel(warm, cold) < 1e-5
    stats = engine.prefix_cache_stats()
    assert stats["hit_blocks"] - before == 4 and stats["hit_tokens"] >= 16 and stats["enabled"]
    engine.release(b)


def test_prefix_caching_is_off_for_recurrent_models(tmp_path):
    make_family_model(tmp_path, "qwen3_5")
    model = lowbit.load(tmp_path, device="cpu", dtype="float32", progress=False)
    assert not Engine(model, 1, 16, cuda_graphs=False).prefix_cache_stats()["enabled"]
    with pytest.raises(LowbitError, match="recurrent"):
        Engine(model, 1, 16, cuda_graphs=False, prefix_caching=True)


@requires_cuda
def test_paged_scheduler_on_gpu_with_cuda_graphs():
    """Chunked prefill, preemption and prefix caching with CUDA graphs (fp32: the reference tokens)."""
    model = synthetic.build("tiny", "bf16", device="cuda", dtype=torch.float32, seed=random.randrange(2**31))
    prompts, lengths = _prompts()
    want = [greedy_reference(model, p, n) for p, n in zip(prompts, lengths)]
    for blocks in (None, 10):
        engine = Engine(model, 3, 48, cuda_graphs=True, block_size=4, num_blocks=blocks)
        got, _ = run_scheduler(engine, prompts, lengths, budget=8)
        assert engine.cuda_graphs, engine.notes
        assert got == want


def test_running_stream_gets_a_token_every_step_while_a_long_prompt_prefills(tiny):
    """A budget of 8 with chunks of 4: a 60-token prompt arriving mid-stream is prefilled over many
    steps, and the running stream gets its token in every one of them (no pause)."""
    engine = Engine(tiny, 2, 96, cuda_graphs=False, block_size=4, prefix_caching=False)
    scheduler = Scheduler(engine, token_budget=8, chunk_size=4)
    a = Sequence(0, torch.randint(3, 512, (5,)).tolist(), GREEDY, 30, set())
    b = Sequence(1, torch.randint(3, 512, (60,)).tolist(), GREEDY, 3, set())
    scheduler.add(a)
    while not a.out:
        scheduler.step()
    scheduler.add(b)
    prefill_steps = 0
    while not b.out:
        before = len(a.out)
        scheduler.step()
        prefill_steps += 1
        assert len(a.out) == before + 1, "the running stream missed a step while a prompt was prefilled"
    assert prefill_steps >= 60 // 8  # the prompt took many steps
    while scheduler.busy:
        scheduler.step()
    assert a.out == greedy_reference(tiny, a.prompt, 30) and b.out == greedy_reference(tiny, b.prompt, 3)


def test_a_later_chunk_reads_no_value_back_from_the_device(tiny, monkeypatch):
    """A chunk after cached positions knows its key length on the host (ForwardContext.key_len) and
    makes the key rows once per step, not once per layer: no host sync inside the forward."""
    from lowbit.kernels import decoder

    e = tiny.engine(1, 64)
    slot = e.acquire()
    ids = torch.randint(3, 512, (40,)).tolist()
    e.begin(slot, ids[:24], cached=False)
    e.extend(slot, ids[:24], sample_next=False)
    whole = tiny.logits(torch.tensor([ids]))[0, 24:]
    calls = []
    real_rows = decoder.cache_rows
    monkeypatch.setattr(decoder, "cache_rows", lambda *a: calls.append(1) or real_rows(*a))

    def no_sync(self, *a):
        raise AssertionError("a value was read back from the device inside the forward")

    seen = []
    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "__int__", no_sync)
        m.setattr(torch.Tensor, "item", no_sync)
        e.extend(slot, ids[24:], sample_next=False, on_hidden=seen.append)
    assert len(tiny.net.model.layers) > 1 and len(calls) == 1  # the prefix's rows, shared by the layers
    got = tiny.net.compute_logits(seen[0][0]).float()
    assert ((got - whole).norm() / whole.norm()).item() < 1e-5
    e.release(slot)
