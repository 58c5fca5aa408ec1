"""Issue 2: lowbit's bf16/fp32 path equals transformers for every supported architecture."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import lowbit
from conftest import fixture_dir
from tiny_models import ARCH_CONFIGS, make_tiny


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def assert_greedy_matches(hf, prompt, ours):
    """Every token lowbit chose greedily is transformers' argmax at that step (teacher-forced).

    Random tiny models have near-ties; where lowbit and transformers differ by float rounding the
    tie may break either way, so a different token is accepted only if its logit is within 1e-5
    (relative) of the maximum. Anything else is a real divergence.
    """
    ids = torch.tensor([prompt + ours])
    with torch.no_grad():
        logits = hf(ids).logits[0, len(prompt) - 1:-1]
    for step, tok in enumerate(ours):
        row = logits[step]
        gap = (row.max() - row[tok]).item()
        assert gap <= 1e-5 * row.abs().max().item(), f"step {step}: token {tok} is {gap:.2e} below the argmax"


@pytest.mark.parametrize("arch", list(ARCH_CONFIGS))
@pytest.mark.parametrize("tie", [False, True])
def test_logits_and_greedy_match_transformers(tmp_path, arch, tie):
    hf = make_tiny(tmp_path, arch, tie=tie)
    model = lowbit.load(tmp_path, device="cpu", dtype="float32")
    ids = torch.randint(3, 320, (2, 24))
    with torch.no_grad():
        ref = hf(ids).logits
    out = model.logits(ids)
    assert out.shape == ref.shape
    assert rel_err(out, ref) < 1e-4
    prompt = ids[0, :7].tolist()
    ours = model.generate([prompt], max_new_tokens=32, ignore_eos=True)[0].output_ids
    assert len(ours) == 32
    assert_greedy_matches(hf, prompt, ours)


@pytest.mark.parametrize("scaling", [
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "dynamic", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 16},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
])
def test_rope_scaling_types(tmp_path, scaling):
    # max_position_embeddings 32 and 40-token inputs: dynamic NTK kicks in past 32
    hf = make_tiny(tmp_path, "llama", max_position_embeddings=32,
                   rope_parameters={"rope_theta": 10000.0, **scaling})
    model = lowbit.load(tmp_path, device="cpu", dtype="float32")
    assert model.config.rope_scaling["rope_type"] == scaling["rope_type"]
    ids = torch.randint(3, 320, (1, 40))
    with torch.no_grad():
        ref = hf(ids).logits
    assert rel_err(model.logits(ids), ref) < 1e-4


def test_transformers4_config_spelling(tmp_path):
    hf = make_tiny(tmp_path, "llama")
    cfg = json.loads((tmp_path / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope["rope_theta"]
    cfg["rope_scaling"] = None
    cfg["torch_dtype"] = cfg.pop("dtype", "float32")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    model = lowbit.load(tmp_path, device="cpu")
    assert model.dtype == torch.float32
    ids = torch.randint(3, 320, (1, 12))
    with torch.no_grad():
        assert rel_err(model.logits(ids), hf(ids).logits) < 1e-4


def test_batched_generation_equals_alone(tmp_path):
    make_tiny(tmp_path, "qwen2")
    model = lowbit.load(tmp_path, device="cpu", dtype="float32")
    prompts = [torch.randint(3, 320, (n,)).tolist() for n in (3, 11, 6, 1)]
    batch = model.generate(prompts, max_new_tokens=20, ignore_eos=True)
    for p, r in zip(prompts, batch):
        alone = model.generate([p], max_new_tokens=20, ignore_eos=True)[0]
        assert r.prompt_ids == p
        if r.output_ids != alone.output_ids:  # allowed only at an exact near-tie (see assert_greedy_matches)
            i = next(i for i, (a, b) in enumerate(zip(r.output_ids, alone.output_ids)) if a != b)
            row = model.logits(torch.tensor([p + alone.output_ids[:i]]))[0, -1]
            assert (row[alone.output_ids[i]] - row[r.output_ids[i]]).abs() <= 1e-5 * row.abs().max()


@pytest.mark.parametrize("name", ["base-llama-bf16", "base-phi3-bf16"])
def test_fixture_greedy_equals_transformers(name):
    import transformers

    path = fixture_dir(name)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model = lowbit.load(path, device="cpu", dtype="float32")
    prompt = [1, 42, 293, 468, 276]
    ours = model.generate([prompt], max_new_tokens=32, ignore_eos=True)[0].output_ids
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                      pad_token_id=2)[0, len(prompt):].tolist()
    assert ours == ref


def test_sampling_is_seeded_and_respects_top_k(tmp_path):
    make_tiny(tmp_path, "llama")
    model = lowbit.load(tmp_path, device="cpu", dtype="float32")
    p = torch.randint(3, 320, (5,)).tolist()
    a = model.generate([p], max_new_tokens=12, temperature=1.0, seed=7, ignore_eos=True)[0].output_ids
    b = model.generate([p], max_new_tokens=12, temperature=1.0, seed=7, ignore_eos=True)[0].output_ids
    assert a == b
    # top_k=1 is greedy whatever the temperature
    g = model.generate([p], max_new_tokens=12, ignore_eos=True)[0].output_ids
    k1 = model.generate([p], max_new_tokens=12, temperature=5.0, top_k=1, seed=3, ignore_eos=True)[0].output_ids
    assert k1 == g
    # a tiny top_p keeps only the most likely token: greedy again
    tp = model.generate([p], max_new_tokens=12, temperature=5.0, top_p=1e-6, seed=3, ignore_eos=True)[0].output_ids
    assert tp == g


def test_sampling_distribution():
    from lowbit.sampling import SamplingParams, sample

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]])).expand(20000, 3).contiguous()
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    toks = sample(logits, SamplingParams(temperature=1.0), gen)
    freq = torch.bincount(toks, minlength=3).float() / len(toks)
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.2]), atol=0.02)
    toks = sample(logits, SamplingParams(temperature=1.0, top_p=0.75), gen)  # keeps {0.5, 0.3}
    freq = torch.bincount(toks, minlength=3).float() / len(toks)
    assert freq[2] == 0 and abs(freq[0] - 0.625) < 0.02


def test_eos_stops_generation(tmp_path):
    make_tiny(tmp_path, "llama")
    model = lowbit.load(tmp_path, device="cpu", dtype="float32")
    p = torch.randint(3, 320, (4,)).tolist()
    free = model.generate([p], max_new_tokens=8, ignore_eos=True)[0].output_ids
    model.config.eos_token_ids = [free[2]]  # pretend the third token is EOS
    eos = set(model.eos_token_ids)  # also generation_config.json's ids, which a random token may hit first
    first = next(i for i, t in enumerate(free) if t in eos)
    assert first <= 2
    r = model.generate([p], max_new_tokens=8)[0]
    assert r.output_ids == free[: first + 1]
    assert r.finish_reason == "eos"


@pytest.mark.parametrize("name", ["base-llama-bf16", "base-phi3-bf16"])
def test_base_fixtures_match_reference(name):
    path = fixture_dir(name)
    ref = load_file(path / "reference_logits.safetensors")
    # fp32 compute vs transformers' fp32 forward of the same bf16 weights
    m32 = lowbit.load(path, device="cpu", dtype="float32")
    assert rel_err(m32.logits(ref["input_ids"]), ref["logits_fp32_compute"]) < 1e-4
    # bf16 compute vs transformers' bf16 forward: same arithmetic, rounding-order differences only
    m16 = lowbit.load(path, device="cpu")
    assert m16.dtype == torch.bfloat16
    assert (m16.logits(ref["input_ids"]) - ref["logits"]).abs().max() < 0.05


def test_fixture_text_generation_and_stop_strings():
    path = fixture_dir("base-llama-bf16")
    model = lowbit.load(path, device="cpu", dtype="float32")
    r = model.generate(["Hello world"], max_new_tokens=12, ignore_eos=True)[0]
    assert r.text == model.decode(r.output_ids)
    stop = r.text[3:6]
    assert stop
    s = model.generate(["Hello world"], max_new_tokens=12, stop=[stop], ignore_eos=True)[0]
    assert s.finish_reason == "stop" and stop not in s.text and r.text.startswith(s.text)
    events = list(model.stream("Hello world", max_new_tokens=12, ignore_eos=True))
    assert "".join(e.text for e in events) == r.text
    assert [e.token_id for e in events] == r.output_ids
