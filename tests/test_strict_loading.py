"""Issue 2: strict loading. Every violation is an error naming the tensor, expected and found."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import lowbit
from lowbit.errors import CheckpointError, LowbitError
from tiny_models import make_tiny


def edit(path, fn):
    f = path / "model.safetensors"
    t = load_file(f)
    fn(t)
    save_file(t, f, metadata={"format": "pt"})


@pytest.fixture
def llama(tmp_path):
    make_tiny(tmp_path, "llama")
    return tmp_path


def load_err(path) -> str:
    with pytest.raises(CheckpointError) as e:
        lowbit.load(path, device="cpu")
    return str(e.value)


def test_missing_tensor(llama):
    edit(llama, lambda t: t.pop("model.layers.1.post_attention_layernorm.weight"))
    msg = load_err(llama)
    assert "model.layers.1.post_attention_layernorm.weight" in msg and "missing" in msg


def test_missing_projection_weight(llama):
    edit(llama, lambda t: t.pop("model.layers.0.self_attn.k_proj.weight"))
    msg = load_err(llama)
    assert "model.layers.0.self_attn.k_proj" in msg


def test_extra_tensor(llama):
    edit(llama, lambda t: t.__setitem__("model.layers.0.mystery.weight", torch.randn(4)))
    assert "model.layers.0.mystery.weight" in load_err(llama)


def test_wrong_shape(llama):
    edit(llama, lambda t: t.__setitem__("model.norm.weight", torch.randn(63)))
    msg = load_err(llama)
    assert "model.norm.weight" in msg and "[64]" in msg and "[63]" in msg


def test_wrong_projection_shape(llama):
    edit(llama, lambda t: t.__setitem__("model.layers.1.mlp.up_proj.weight", torch.randn(95, 64)))
    msg = load_err(llama)
    assert "model.layers.1.mlp.up_proj.weight" in msg and "[96, 64]" in msg and "[95, 64]" in msg


def test_wrong_dtype(llama):
    edit(llama, lambda t: t.__setitem__("model.norm.weight", torch.ones(64, dtype=torch.int32)))
    msg = load_err(llama)
    assert "model.norm.weight" in msg and "I32" in msg


def test_all_violations_listed(llama):
    def two(t):
        t.pop("model.layers.0.input_layernorm.weight")
        t["model.norm.weight"] = torch.randn(10)
    lowbit.load(llama, device="cpu")  # the clean model loads
    edit(llama, two)
    msg = load_err(llama)
    assert "model.layers.0.input_layernorm.weight" in msg and "model.norm.weight" in msg
    assert "2 problem" in msg


def test_fused_on_disk_wrong_size(tmp_path):
    make_tiny(tmp_path, "phi3")
    # q 64 + k 32 + v 32 = 128 rows; drop the last 16
    edit(tmp_path, lambda t: t.__setitem__("model.layers.0.self_attn.qkv_proj.weight",
                                           t["model.layers.0.self_attn.qkv_proj.weight"][:-16].clone()))
    msg = load_err(tmp_path)
    assert "model.layers.0.self_attn.qkv_proj.weight" in msg and "[128, 64]" in msg and "[112, 64]" in msg


def test_sharded_index_missing_file(tmp_path):
    make_tiny(tmp_path, "llama")
    t = load_file(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    names = sorted(t)
    half = len(names) // 2
    save_file({n: t[n] for n in names[:half]}, tmp_path / "model-00001-of-00002.safetensors")
    wm = {n: ("model-00001-of-00002.safetensors" if i < half else "model-00002-of-00002.safetensors")
          for i, n in enumerate(names)}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    with pytest.raises(LowbitError) as e:
        lowbit.load(tmp_path, device="cpu")
    assert "model-00002-of-00002.safetensors" in str(e.value)
    # with the second shard present it loads and matches the unsharded model
    save_file({n: t[n] for n in names[half:]}, tmp_path / "model-00002-of-00002.safetensors")
    m = lowbit.load(tmp_path, device="cpu")
    assert m.report.tensors_read == len(names)


def test_clean_model_reports_everything_consumed(llama):
    m = lowbit.load(llama, device="cpu")
    n = len(load_file(llama / "model.safetensors"))
    assert m.report.tensors_read + len(m.report.skipped) == n


def test_poison_catches_unwritten_slots(llama):
    # A write that silently covers only part of a parameter must not pass for data.
    from lowbit.quant.methods.unquantized import UnquantizedMethod

    orig = UnquantizedMethod.load

    def partial(self, layer, role, tensor, shard):
        if role == "weight" and self.spec.name.endswith("layers.0.mlp.down_proj"):
            layer.weight.data[:-1] = tensor[:-1].to(self.dtype)
            return None
        return orig(self, layer, role, tensor, shard)

    UnquantizedMethod.load = partial
    try:
        msg = load_err(llama)
    finally:
        UnquantizedMethod.load = orig
    assert "down_proj" in msg and "not (fully) written" in msg


def cli(*args):
    return subprocess.run([sys.executable, "-m", "lowbit.cli", *args], capture_output=True, text=True, timeout=120)


def test_cli_missing_path_exits_2_without_traceback(tmp_path):
    r = cli("generate", str(tmp_path / "nope"), "--prompt", "hi")
    assert r.returncode == 2
    assert "no such checkpoint directory" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_cli_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    r = cli("generate", str(tmp_path), "--prompt", "hi")
    assert r.returncode == 2 and "unsupported architecture GPT2LMHeadModel" in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_malformed_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    r = cli("generate", str(tmp_path), "--prompt", "hi")
    assert r.returncode == 2 and "malformed JSON" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 8}))
    r = cli("generate", str(tmp_path), "--prompt", "hi")
    assert r.returncode == 2 and "missing required key" in r.stderr


def test_cli_generate_json(llama):
    r = cli("generate", str(llama), "--prompt", "x", "--max-new-tokens", "3", "--json", "--device", "cpu")
    # the tiny model has no tokenizer: a one-line error, not a traceback
    assert r.returncode == 2 and "tokenizer" in r.stderr and "Traceback" not in r.stderr
