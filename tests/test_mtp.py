"""MTP speculative decoding for Qwen3.5 (issue 12; lowbit/speculative.py, lowbit/models/qwen3_5.py).

Tiny checkpoints are transformers' Qwen3.5 models (fresh random weights) plus an MTP head written the
way releases store it (`mtp.*`, `mtp_num_hidden_layers` in the config): its decoder layer is a copy
of transformers' own full-attention layer layout. Checked: the head against a transformers reference
(fp32), strict loading of every mtp tensor, greedy output identical with and without speculation
(dense and MoE, with both accepted and rejected drafts), acceptance ~1 on the agreeing synthetic
construction, the refusals, and the CLI.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import lowbit
from conftest import requires_cuda
from lowbit import synthetic
from lowbit.errors import CheckpointError, LowbitError
from lowbit.models.qwen3_5 import MTP_REASON
from test_families import FAMILIES, make_family_model, rel

FULL_LAYER = 1  # a full-attention layer of both tiny configs (transformers' layout for the MTP layer)
TINY = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4,
            linear_key_head_dim=16, linear_value_head_dim=16, max_position_embeddings=1024)
TINY_MOE = TINY | dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64,
                       shared_expert_intermediate_size=64)
SYNTH = {"dense": ("qwen3.5-27b", TINY), "moe": ("qwen3.5-35b-a3b", TINY_MOE)}
PROMPTS = [[5, 17, 300, 42, 9], [100, 200, 300], list(range(3, 20)), [7]]
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]


def mtp_tensors(state: dict, hidden: int) -> dict[str, torch.Tensor]:
    """A random MTP head in the released layout: fc [H, 2H], three norms, and one decoder layer with
    transformers' full-attention layer names and shapes (fresh values)."""
    out = {"mtp.fc.weight": torch.randn(hidden, 2 * hidden) * 0.05}
    for n in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
        out[f"mtp.{n}.weight"] = torch.randn(hidden) * 0.1
    src = f"model.layers.{FULL_LAYER}."
    for name, t in state.items():
        if name.startswith(src):
            std = float(t.float().std()) if t.numel() > 1 else 0.1
            out["mtp.layers.0." + name[len(src):]] = torch.randn(t.shape) * max(std, 0.05)
    return out


def write_mtp_checkpoint(path, key: str, mtp_layers: int = 1, tensors: bool = True):
    """A tiny transformers Qwen3.5 checkpoint with (or without) an MTP head; returns the HF model."""
    hf = make_family_model(path, key)
    cfg = json.loads((path / "config.json").read_text())
    cfg["mtp_num_hidden_layers"] = mtp_layers
    (path / "config.json").write_text(json.dumps(cfg))
    if tensors:
        st = load_file(path / "model.safetensors")
        st |= mtp_tensors(st, cfg["hidden_size"])
        save_file(st, path / "model.safetensors", metadata={"format": "pt"})
    return hf


def edit_tensors(path, drop=(), add=None):
    st = load_file(path / "model.safetensors")
    for n in drop:
        del st[n]
    st |= add or {}
    save_file(st, path / "model.safetensors", metadata={"format": "pt"})


def plain_and_spec(model, prompts, n):
    """(plain greedy results, speculative results, speculation stats) of one model."""
    spec = model.speculative
    model.speculative = None
    try:
        plain = model.generate(prompts, max_new_tokens=n, ignore_eos=True)
    finally:
        model.speculative = spec
    run = model.stream(prompts, max_new_tokens=n, ignore_eos=True)
    for _ in run:
        pass
    return plain, run.results, run.spec_stats


# ---------------------------------------------------------------------------------------- loading
@pytest.mark.parametrize("key", ["qwen3_5", "qwen3_5-moe"])
def test_mtp_head_loads_and_matches_a_transformers_reference(tmp_path, key):
    import transformers

    hf = write_mtp_checkpoint(tmp_path, key)
    off = lowbit.load(tmp_path, device="cpu", dtype="float32", progress=False)
    assert off.net.mtp is None and off.report.skipped["mtp.fc.weight"] == MTP_REASON
    model = lowbit.load(tmp_path, device="cpu", dtype="float32", progress=False, speculative="mtp")
    assert not [n for n in model.report.skipped if n.startswith("mtp.")]
    assert "mtp.fc" in model.plan.layers and "mtp.layers.0.self_attn.q_proj" in model.plan.layers
    st = load_file(tmp_path / "model.safetensors")

    # reference: transformers' own full-attention decoder layer (one-layer model) carrying the MTP weights
    cfg = hf.config.to_dict()
    cfg.update(num_hidden_layers=1, layer_types=["full_attention"])
    cfg.pop("full_attention_interval", None)
    rcfg = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    ref = type(hf)(rcfg).float().eval()
    sd = {n.replace("mtp.layers.0.", "model.layers.0."): t for n, t in st.items() if n.startswith("mtp.layers.0.")}
    sd |= {"model.norm.weight": st["mtp.norm.weight"], "lm_head.weight": st["lm_head.weight"],
           "model.embed_tokens.weight": st["model.embed_tokens.weight"]}
    experts = sorted({int(n.split(".")[5]) for n in sd if ".mlp.experts." in n})
    if experts:  # transformers' modules hold the experts stacked: gate_up [E, 2I, H], down [E, H, I]
        e = "model.layers.0.mlp.experts"
        sd[f"{e}.gate_up_proj"] = torch.stack([torch.cat([sd.pop(f"{e}.{i}.gate_proj.weight"),
                                                          sd.pop(f"{e}.{i}.up_proj.weight")]) for i in experts])
        sd[f"{e}.down_proj"] = torch.stack([sd.pop(f"{e}.{i}.down_proj.weight") for i in experts])
    missing, unexpected = ref.load_state_dict(sd, strict=False)
    assert not unexpected and not [m for m in missing if "rotary" not in m], (missing, unexpected)

    ids = torch.randint(3, 320, (2, 11))
    nxt = torch.randint(3, 320, (2, 11))  # the tokens following each position
    with torch.no_grad():
        h = hf.model(ids).last_hidden_state  # after model.norm: what lm_head (and the MTP head) reads

        def norm(x, w):
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + rcfg.rms_norm_eps)
            return x * (1 + w)

        e = st["model.embed_tokens.weight"][nxt]
        x = torch.cat([norm(e, st["mtp.pre_fc_norm_embedding.weight"]), norm(h, st["mtp.pre_fc_norm_hidden.weight"])],
                      -1) @ st["mtp.fc.weight"].T
        want = ref(inputs_embeds=x).logits
    pos = torch.arange(11).expand(2, 11)
    with torch.inference_mode():
        hidden = model.net(ids, pos)
        got = model.net.compute_logits(model.net.mtp_forward(nxt, hidden, pos)).float()
    assert rel(hidden, h) < 1e-5
    assert rel(got, want) < 1e-5, f"MTP head differs from the transformers reference by {rel(got, want):.3g}"


def test_mtp_loading_is_strict(tmp_path):
    write_mtp_checkpoint(tmp_path, "qwen3_5")
    edit_tensors(tmp_path, drop=["mtp.norm.weight", "mtp.layers.0.mlp.down_proj.weight"],
                 add={"mtp.layers.0.extra.weight": torch.zeros(4)})
    lowbit.load(tmp_path, device="cpu", dtype="float32", progress=False)  # without speculation: all skipped
    with pytest.raises(CheckpointError) as e:
        lowbit.load(tmp_path, device="cpu", dtype="float32", progress=False, speculative="mtp")
    msg = str(e.value)
    for name in ("mtp.norm.weight", "mtp.layers.0.mlp.down_proj", "mtp.layers.0.extra.weight"):
        assert name in msg, msg


def test_refusals(tmp_path):
    write_mtp_checkpoint(tmp_path / "none", "qwen3_5", tensors=False)
    with pytest.raises(LowbitError, match="holds no mtp.* tensors"):
        lowbit.load(tmp_path / "none", device="cpu", dtype="float32", progress=False, speculative="mtp")
    write_mtp_checkpoint(tmp_path / "zero", "qwen3_5", mtp_layers=0, tensors=False)
    with pytest.raises(LowbitError, match="mtp_num_hidden_layers is 0 or absent"):
        lowbit.load(tmp_path / "zero", device="cpu", dtype="float32", progress=False, speculative="mtp")
    make_family_model(tmp_path / "llama", "llama")
    with pytest.raises(LowbitError, match="the llama family .* has none"):
        lowbit.load(tmp_path / "llama", device="cpu", dtype="float32", progress=False, speculative="mtp")
    with pytest.raises(LowbitError, match="unknown speculative method"):
        lowbit.load(tmp_path / "llama", device="cpu", progress=False, speculative="eagle")
    model = synthetic.build("qwen3.5-27b", device="cpu", dtype=torch.float32, overrides=TINY, speculative="mtp",
                            num_speculative_tokens=2)
    with pytest.raises(LowbitError, match="greedily only"):
        model.generate([[5, 6, 7]], max_new_tokens=4, temperature=0.8)


# ---------------------------------------------------------------------------------------- decoding
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind,k", [("dense", 1), ("dense", 3), ("moe", 2)])
def test_greedy_identical_with_accepts_and_rejects(kind, k, device):
    """The agreeing construction with full-size output projections (scale 1): the main model follows
    perm only part of the time, so drafts are accepted and rejected; the tokens must not change."""
    name, over = SYNTH[kind]
    model = synthetic.build(name, device=device, dtype=torch.float32, overrides=over, speculative="mtp",
                            num_speculative_tokens=k, mtp_agree=True, agree_scale=1.0)
    plain, spec, stats = plain_and_spec(model, PROMPTS, 24)
    assert [r.output_ids for r in spec] == [r.output_ids for r in plain]
    assert all(len(r.output_ids) == 24 for r in spec)
    assert 0 < stats["accepted"] < stats["drafted"], stats  # both accepted and rejected drafts occurred


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_agreeing_construction_accepts_every_draft(kind, device):
    name, over = SYNTH[kind]
    model = synthetic.build(name, device=device, dtype=torch.float32, overrides=over, speculative="mtp",
                            num_speculative_tokens=2, mtp_agree=True)
    plain, spec, stats = plain_and_spec(model, PROMPTS[:2], 16)
    assert [r.output_ids for r in spec] == [r.output_ids for r in plain]
    assert stats["acceptance_rate"] > 0.95, stats
    if device == "cuda":  # the verify/draft steps were replayed from CUDA graphs
        assert model._engine.speculator.cuda_graphs, model._engine.notes
    plain, spec, _ = plain_and_spec(model, PROMPTS[:1], 12)  # batch 1 (bench's case: one slot per verify row)
    assert [r.output_ids for r in spec] == [r.output_ids for r in plain]
    assert stats["steps"] <= 2 * 6  # 15 tokens after the first, 3 per step


@pytest.mark.parametrize("key", ["qwen3_5", "qwen3_5-moe"])
def test_checkpoint_greedy_identical_with_random_head(tmp_path, key):
    """A real-layout checkpoint whose random head is (nearly) always rejected: rollback every step."""
    write_mtp_checkpoint(tmp_path, key)
    model = lowbit.load(tmp_path, device="cpu", dtype="float32", progress=False, speculative="mtp",
                        num_speculative_tokens=2)
    plain, spec, stats = plain_and_spec(model, PROMPTS[:3], 12)
    assert [r.output_ids for r in spec] == [r.output_ids for r in plain]
    assert stats["drafted"] > stats["accepted"]


def test_cli_generate_speculative(tmp_path, capsys):
    from lowbit.cli import main

    write_mtp_checkpoint(tmp_path, "qwen3_5")
    from lowbit import demo

    demo.build_tokenizer(tmp_path, vocab_size=320)
    args = ["generate", str(tmp_path), "--prompt", "a b c a", "--max-new-tokens", "6", "--json", "--device", "cpu",
            "--dtype", "float32"]
    assert main(args) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(args + ["--speculative", "mtp", "--num-speculative-tokens", "2"]) == 0
    spec = json.loads(capsys.readouterr().out)
    assert spec["output_ids"] == plain["output_ids"] and spec["output_ids"]
    assert main(args + ["--speculative", "mtp", "--temperature", "0.7"]) == 2
    assert "greedily only" in capsys.readouterr().err
    write_mtp_checkpoint(tmp_path / "none", "qwen3_5", tensors=False)
    assert main(["generate", str(tmp_path / "none"), "--prompt", "x", "--speculative", "mtp", "--device", "cpu"]) == 2
    assert "holds no mtp.* tensors" in capsys.readouterr().err


def test_bench_reports_acceptance_and_speedup(monkeypatch, capsys):
    from lowbit.cli import main

    monkeypatch.setitem(synthetic.CONFIGS, "tiny-qwen3.5", synthetic.CONFIGS["qwen3.5-27b"] | TINY)
    assert main(["bench", "--synthetic", "tiny-qwen3.5", "--speculative", "mtp", "--mtp-agree", "--json",
                 "--device", "cpu", "--dtype", "float32", "--prompt-lens", "8", "--batches", "1", "--new-tokens", "8",
                 "--decode-prompt", "6"]) == 0
    r = json.loads(capsys.readouterr().out)["speculative"]
    assert r["identical"] and r["acceptance_rate"] > 0.95 and r["speedup"] > 0
    assert "lm_head[perm(t)] = embed[t]" in r["construction"]
    assert main(["bench", "--synthetic", "tiny", "--mtp-agree", "--device", "cpu"]) == 2
    assert "--mtp-agree" in capsys.readouterr().err


def test_inspect_reports_the_head_as_used_with_speculation(tmp_path, capsys):
    from lowbit.cli import main
    from lowbit.inspect import report

    write_mtp_checkpoint(tmp_path, "qwen3_5-moe")
    off = report(tmp_path)
    assert off["skipped"]["mtp.fc.weight"] == MTP_REASON
    on = report(tmp_path, speculative="mtp")
    assert on["loadable"] and not [n for n in on["skipped"] if n.startswith("mtp.")]
    names = {e["name"] for e in on["layers"]}
    assert {"mtp.fc", "mtp.layers.0.self_attn.q_proj", "mtp.layers.0.mlp.shared_expert.down_proj"} <= names
    assert main(["inspect", str(tmp_path), "--speculative", "mtp"]) == 0
    assert "mtp.fc" in capsys.readouterr().out


@pytest.mark.skipif(not __import__("lowbit.kernels.decoder", fromlist=["x"]).INTERPRET,
                    reason="needs TRITON_INTERPRET=1 before triton loads")
def test_speculation_on_the_kernels_in_the_interpreter(monkeypatch):
    """Batch 1 through the decode kernels (Triton's interpreter on CPU): each verify row is the same
    slot (a stride-0 slot view once made the attention kernel read past it: an illegal memory access
    on the H200 at Qwen3.5-27B's shapes)."""
    from lowbit.kernels import decoder

    monkeypatch.setattr(decoder, "interpret_on_cpu", True)
    name, over = SYNTH["dense"]
    model = synthetic.build(name, device="cpu", dtype=torch.float32, overrides=over, speculative="mtp",
                            num_speculative_tokens=2, mtp_agree=True)
    plain, spec, stats = plain_and_spec(model, PROMPTS[:1], 8)
    assert [r.output_ids for r in spec] == [r.output_ids for r in plain]
    assert stats["accepted"] > 0
