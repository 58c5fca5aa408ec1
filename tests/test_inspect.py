"""`lowbit inspect`: table, summary, --json shape, exit codes (0 loadable, 1 problems, 2 user error), speed."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from ckpt_utils import llama8b_config, model_tensors, tiny_config, write_checkpoint
from conftest import fixture_dir
from lowbit.cli import main
from lowbit.quant.config import modelopt_scheme
from lowbit.quant.scheme import Scheme

NVFP4 = modelopt_scheme("NVFP4")
BF16 = Scheme()


def modelopt_hf(algo, exclude=(), kv=None):
    return {"producer": {"name": "modelopt", "version": "0.47.0"},
            "quantization": {"quant_algo": algo, "kv_cache_quant_algo": kv, "group_size": 16,
                             "exclude_modules": list(exclude)}}


def ckpt(path, scheme_of, hf=None, fused=False, edit=None, **overrides):
    cfg = tiny_config("Phi3ForCausalLM" if fused else "LlamaForCausalLM", **overrides)
    t = model_tensors(cfg, scheme_of, fused=fused)
    if edit:
        edit(t)
    return write_checkpoint(path, t, cfg, hf, header_only=True)


def run(capsys, *argv):
    rc = main(["inspect", *map(str, argv)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_text_report_of_a_fixture(capsys):
    rc, out, _ = run(capsys, fixture_dir("modelopt-mixed"))
    assert rc == 0
    lines = out.splitlines()
    assert lines[2].split() == ["module", "weight", "activation", "scale", "tensors", "layout", "notes"]
    row = next(line for line in lines if line.startswith("model.layers.{0-1}.mlp.gate_proj"))
    assert row.split()[1:3] == ["nvfp4-g16", "nvfp4-static-group"] and "weight_scale_2" in row and "split" in row
    assert next(line for line in lines if line.startswith("lm_head")).split()[1:3] == ["bf16", "none"]
    for want in ("producer        modelopt 0.47.0 (MIXED_PRECISION", "W:fp8-tensor A:fp8-static-tensor",
                 "lm_head         unquantized (W:bf16 A:none)", "KV cache        model dtype",
                 "tied embeddings no", "no problems: loadable"):
        assert want in out


def test_json_report_uses_canonical_names(capsys):
    rc, out, _ = run(capsys, fixture_dir("modelopt-nvfp4-vlm-new"), "--json")
    assert rc == 0
    rep = json.loads(out)
    assert {"layers", "lm_head", "kv_cache", "problems"} <= set(rep)
    first = rep["layers"][0]
    assert {"name", "weight", "activation", "group_size", "fused", "tensors"} <= set(first)
    assert first["name"] == "model.layers.0.self_attn.q_proj"
    assert (first["weight"], first["activation"], first["group_size"], first["fused"]) == ("nvfp4", "nvfp4", 16, "split")
    assert first["tensors"]["weight"] == {"name": "model.language_model.layers.0.self_attn.q_proj.weight",
                                          "dtype": "U8", "shape": [256, 128]}
    assert [lay["name"] for lay in rep["layers"]][-1] == "lm_head"
    assert rep["lm_head"]["status"] == "unquantized" and rep["lm_head"]["weight"] == "bf16"
    assert rep["kv_cache"] is None and rep["problems"] == [] and rep["loadable"]


def test_json_kv_cache_fused_and_summary(capsys):
    rc, out, _ = run(capsys, fixture_dir("modelopt-fp8-kvfp8"), "--json")
    rep = json.loads(out)
    assert rc == 0 and rep["kv_cache"] == "fp8" and rep["kv_scales"] == 4
    rc, out, _ = run(capsys, fixture_dir("modelopt-nvfp4-phi3"), "--json")
    rep = json.loads(out)
    qkv = next(lay for lay in rep["layers"] if lay["name"] == "model.layers.0.self_attn.qkv_proj")
    assert qkv["fused"] == "fused" and qkv["tensors"]["weight_scale"]["shape"] == [512, 16]
    down = next(lay for lay in rep["layers"] if lay["name"] == "model.layers.0.mlp.down_proj")
    assert down["fused"] is None
    s = rep["summary"]
    assert s["projection_bytes_by_scheme"]["W:bf16 A:none"] == 1024 * 256 * 2  # the bf16 lm_head
    assert 0.5 < s["quantized_share"] < 1


def test_tied_model_summary(tmp_path, capsys):
    path = ckpt(tmp_path, lambda m: BF16, tie_word_embeddings=True)
    rc, out, _ = run(capsys, path)
    assert rc == 0 and "lm_head         tied" in out and "tied embeddings yes" in out


def test_problems_exit_1_and_trust_tensors_overrides(tmp_path, capsys):
    path = ckpt(tmp_path, lambda m: NVFP4, modelopt_hf("NVFP4", ["lm_head*"]))
    rc, out, _ = run(capsys, path)
    assert rc == 1
    assert "problems (1): this checkpoint does not load as is" in out
    assert "  - lm_head: the config says unquantized bf16 (excluded by exclude_modules entry 'lm_head*')" in out
    rc, out, _ = run(capsys, path, "--json")
    rep = json.loads(out)
    assert rc == 1 and not rep["loadable"] and [p["layer"] for p in rep["problems"]] == ["lm_head"]
    rc, out, _ = run(capsys, path, "--trust-tensors", "--json")
    rep = json.loads(out)
    assert rc == 0 and rep["lm_head"]["status"] == "quantized" and rep["lm_head"]["weight"] == "nvfp4"
    assert any(n.startswith("lm_head: override:") for n in rep["notes"])


def test_unfused_shards_are_shown(tmp_path, capsys):
    exclude = ["model.layers.0.self_attn.v_proj", "lm_head"]
    path = ckpt(tmp_path, lambda m: BF16 if m in exclude else NVFP4, modelopt_hf("NVFP4", exclude))
    rc, out, _ = run(capsys, path, "--json")
    rep = json.loads(out)
    fused = {lay["name"]: lay["fused"] for lay in rep["layers"]}
    assert rc == 0 and fused["model.layers.0.self_attn.v_proj"] == "unfused"
    assert fused["model.layers.1.self_attn.v_proj"] == "split"
    assert any("runs unfused" in n for n in rep["notes"])


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "nope", "no such checkpoint directory"),
    (lambda p: (p / "config.json").write_text("{oops") and p, "malformed JSON"),
    (lambda p: ckpt(p, lambda m: BF16, modelopt_hf("W4A8_AWQ")), "unsupported quant_algo W4A8_AWQ; supported: FP8,"),
])
def test_user_errors_exit_2(tmp_path, capsys, make, message):
    rc, out, err = run(capsys, make(tmp_path))
    assert rc == 2 and message in err and out == ""


def test_subprocess_exit_codes_without_traceback(tmp_path):
    broken = ckpt(tmp_path / "b", lambda m: NVFP4, modelopt_hf("NVFP4", ["lm_head*"]))
    cases = [(fixture_dir("llmcompressor-w4a16"), 0), (broken, 1), (tmp_path / "missing", 2)]
    for path, want in cases:
        r = subprocess.run([sys.executable, "-m", "lowbit.cli", "inspect", str(path)], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == want, r.stderr
        assert "Traceback" not in r.stdout + r.stderr


def test_real_size_index_is_fast(tmp_path, capsys):
    """Llama-3-8B shapes, NVFP4 with a quantized head and an FP8 KV cache: 1,030 tensors over 8 header-only
    shards. Prints the time; the figure is in the issue's closing note."""
    cfg = llama8b_config()
    tensors = model_tensors(cfg, lambda m: NVFP4, kv_scales=True)
    path = write_checkpoint(tmp_path, tensors, cfg, modelopt_hf("NVFP4", kv="FP8"), shards=8, header_only=True)
    assert len(tensors) >= 1000
    t0 = time.perf_counter()
    rc, out, _ = run(capsys, path, "--json")
    seconds = time.perf_counter() - t0
    rep = json.loads(out)
    assert rc == 0 and len(rep["layers"]) == 32 * 7 + 1 and rep["summary"]["tensors"] == len(tensors)
    assert rep["lm_head"]["status"] == "quantized" and rep["kv_cache"] == "fp8" and rep["kv_scales"] == 64
    down = next(lay for lay in rep["layers"] if lay["name"] == "model.layers.31.mlp.down_proj")
    assert down["tensors"]["weight"]["shape"] == [4096, 14336 // 2]
    t0 = time.perf_counter()
    rc, out, _ = run(capsys, path)
    text_seconds = time.perf_counter() - t0
    assert rc == 0 and "model.layers.{0-31}.mlp.down_proj" in out
    with capsys.disabled():
        print(f"\ninspect, 8B-shaped NVFP4 index ({len(tensors)} tensors, 8 shards): "
              f"--json {seconds * 1000:.0f} ms, table {text_seconds * 1000:.0f} ms")


def test_experts_are_one_line_per_projection(capsys):
    """A MoE layer's experts show as one row per projection kind with the expert count, not one per expert."""
    from conftest import fixture_dir
    from lowbit.inspect import render, report

    rep = report(fixture_dir("modelopt-nvfp4-qwen3moe"))
    experts = [lay for lay in rep["layers"] if "experts" in lay]
    assert [lay["name"] for lay in experts[:3]] == [f"model.layers.0.mlp.experts.*.{p}"
                                                   for p in ("gate_proj", "up_proj", "down_proj")]
    assert all(lay["experts"] == 4 for lay in experts) and len(experts) == 6
    assert experts[0]["tensors"]["weight"]["name"] == "model.layers.0.mlp.experts.{e}.gate_proj.weight"
    text = render(rep)
    assert "model.layers.{0-1}.mlp.experts.*.gate_proj" in text and "4 experts" in text
    assert "experts.3." not in text
