"""`lowbit quantize` on the command line: overwrite protection, user errors (exit 2, one line naming
the problem and the fix), shards and index, and the layer-by-layer memory claim."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from ckpt_utils import model_tensors, tiny_config
from lowbit.checkpoint import Checkpoint
from lowbit.cli import main
from tiny_models import make_tiny


@pytest.fixture
def src(tmp_path):
    path = tmp_path / "src"
    make_tiny(path, "llama", dtype=torch.bfloat16, hidden_size=128, intermediate_size=256)
    return path


def _fails(capsys, argv, *fragments):
    assert main(["quantize", *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for f in fragments:
        assert f in err, f"{f!r} not in: {err}"
    return err


def test_refuses_non_empty_output_without_force(src, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "model-00007-of-00009.safetensors").write_bytes(b"stale")
    _fails(capsys, [str(src), str(out), "--scheme", "w4a16", "--format", "compressed-tensors"],
           "not empty", "notes.txt", "--force")
    assert (out / "notes.txt").read_text() == "mine"
    assert main(["quantize", str(src), str(out), "--scheme", "w4a16", "--format", "compressed-tensors",
                 "--force", "--no-progress"]) == 0
    assert (out / "notes.txt").exists(), "--force removes only what quantize writes"
    assert not (out / "model-00007-of-00009.safetensors").exists(), "stale shards must not survive"
    assert "wrote" in capsys.readouterr().out


def test_refuses_to_write_into_the_source(src, capsys):
    _fails(capsys, [str(src), str(src), "--scheme", "w4a16", "--format", "compressed-tensors", "--force"],
           "is the source folder")


@pytest.mark.parametrize("argv,fragments", [
    (["--scheme", "int3", "--format", "modelopt"], ["unknown --scheme 'int3'", "nvfp4a16", "w4a16"]),
    (["--scheme", "w4a16", "--format", "modelopt"], ["cannot be written as modelopt", "--format compressed-tensors"]),
    (["--scheme", "w8a8", "--format", "modelopt"], ["cannot be written as modelopt"]),
    (["--scheme", "mixed", "--format", "compressed-tensors"], ["MIXED_PRECISION", "--format modelopt"]),
    (["--scheme", "mixed:attn=w4a16", "--format", "modelopt"], ["attn=w4a16-g128", "fp8, nvfp4 or nvfp4a16"]),
    (["--scheme", "mixed:bogus", "--format", "modelopt"], ["mixed:attn=P,mlp=P"]),
    (["--scheme", "w4a16", "--format", "compressed-tensors", "--exclude", "*.qkv"],
     ["--exclude '*.qkv' matches no Linear module", "model.layers.0.self_attn.q_proj"]),
    (["--scheme", "w4a16-g96", "--format", "compressed-tensors"],
     ["and 10 more: in_features 128 is not a multiple of the int4-g96 group size 96", "--exclude"]),
    (["--scheme", "w4a16", "--format", "compressed-tensors", "--max-shard-size", "lots"], ["invalid shard size"]),
    (["--scheme", "fp8", "--format", "modelopt", "--calib", "/nonexistent/calib.txt"],
     ["cannot read calibration text /nonexistent/calib.txt"]),
])
def test_user_errors(src, tmp_path, capsys, argv, fragments):
    _fails(capsys, [str(src), str(tmp_path / "out"), *argv], *fragments)
    assert not (tmp_path / "out").exists(), "nothing is written when the request is invalid"


def test_lm_head_of_a_tied_model(tmp_path, capsys):
    make_tiny(tmp_path / "tied", "llama", tie=True, dtype=torch.bfloat16, hidden_size=128, intermediate_size=256)
    _fails(capsys, [str(tmp_path / "tied"), str(tmp_path / "out"), "--scheme", "w4a16", "--format",
                    "compressed-tensors", "--lm-head"], "tie_word_embeddings", "drop --lm-head")


def test_source_must_be_unquantized(src, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", str(src), str(out), "--scheme", "w8a16", "--format", "compressed-tensors",
                 "--no-progress"]) == 0
    _fails(capsys, [str(out), str(tmp_path / "qq"), "--scheme", "w4a16", "--format", "compressed-tensors"],
           "already quantized")
    _fails(capsys, [str(tmp_path / "missing"), str(tmp_path / "qq"), "--scheme", "w4a16", "--format",
                    "compressed-tensors"], "no such checkpoint directory")


def test_non_float_weight_is_named(tmp_path, capsys):
    cfg = tiny_config(hidden_size=128, intermediate_size=256)
    tensors = {n: torch.randn(s).to(torch.bfloat16) for n, (_, s) in model_tensors(cfg).items()}
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.randint(-8, 8, tensors["model.layers.1.mlp.up_proj.weight"]
                                                                 .shape, dtype=torch.int8)
    (tmp_path / "src").mkdir()
    save_file(tensors, tmp_path / "src" / "model.safetensors")
    (tmp_path / "src" / "config.json").write_text(json.dumps(cfg))
    _fails(capsys, [str(tmp_path / "src"), str(tmp_path / "out"), "--scheme", "w4a16", "--format",
                    "compressed-tensors"], "model.layers.1.mlp.up_proj.weight: I8 is not an unquantized weight")


def test_small_shards_get_an_index(src, tmp_path):
    one, many = tmp_path / "one", tmp_path / "many"
    args = ["--scheme", "nvfp4a16", "--format", "modelopt", "--lm-head", "--no-progress"]
    assert main(["quantize", str(src), str(one), *args]) == 0
    assert main(["quantize", str(src), str(many), *args, "--max-shard-size", "20KB"]) == 0
    index = json.loads((many / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(p.name for p in many.glob("*.safetensors")) == shards
    a, b = Checkpoint(one), Checkpoint(many)
    assert sorted(a.tensors) == sorted(b.tensors) == sorted(index["weight_map"])
    for name in a.tensors:
        x, y = a.read(name), b.read(name)
        assert x.dtype == y.dtype and torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)), name
    assert index["metadata"]["total_size"] == sum(i.nbytes for i in b.tensors.values())
    for shard in shards:  # a shard exceeds the limit only when one tensor alone does
        names = [n for n, f in index["weight_map"].items() if f == shard]
        assert sum(b.tensors[n].nbytes for n in names) <= 20_000 or len(names) == 1


MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys, threading, time
    import tqdm.auto  # imported by quantize: load it before the baseline is taken
    from lowbit.quantize import quantize

    def anon_kb():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1])

    peak, done = [0], threading.Event()
    def poll():
        while not done.is_set():
            peak[0] = max(peak[0], anon_kb())
            time.sleep(0.001)
    base = anon_kb()
    t = threading.Thread(target=poll)
    t.start()
    quantize(sys.argv[1], sys.argv[2], "fp8-dynamic", "modelopt", max_shard_size="4MB", device="cpu")
    done.set(); t.join()
    print(json.dumps({"base_kb": base, "peak_kb": peak[0]}))
""")


def test_memory_is_about_one_layer(tmp_path):
    """Peak anonymous memory while quantizing stays near one layer, far below the model size.

    (File-backed pages of the memory-mapped source are not counted: the kernel drops them under
    pressure, which is what lets a model larger than RAM quantize.)"""
    cfg = tiny_config(hidden_size=512, intermediate_size=1536, num_hidden_layers=16, num_attention_heads=8,
                      num_key_value_heads=8, vocab_size=4096)
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(cfg))
    shapes = model_tensors(cfg)
    names = list(shapes)
    for i in range(4):  # four source shards, written without ever holding the whole model
        part = {n: (torch.randn(shapes[n][1]) * 0.02).to(torch.bfloat16) for n in names[i::4]}
        save_file(part, src / f"model-0000{i + 1}-of-00004.safetensors")
    model_bytes = sum(Checkpoint(src).tensors[n].nbytes for n in names)
    layer_bytes = model_bytes // cfg["num_hidden_layers"]
    r = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(src), str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout.strip().splitlines()[-1])
    grew = (m["peak_kb"] - m["base_kb"]) * 1024
    print(f"\nmodel {model_bytes / 1e6:.1f} MB, one layer {layer_bytes / 1e6:.1f} MB, "
          f"peak anonymous memory growth {grew / 1e6:.1f} MB")
    assert grew < 0.5 * model_bytes  # measured: ~32-35 MB for 63, 117 and 227 MB models (8, 16, 32 layers)
