"""Issue 6: `lowbit bench` runs end to end on CPU with a tiny model (functional: no timing asserts)."""
from __future__ import annotations

import json

from conftest import fixture_dir
from lowbit.cli import main

SMALL = ["--prompt-lens", "12,20", "--batches", "1,3", "--new-tokens", "2", "--decode-prompt", "6", "--device", "cpu"]


def test_bench_table_synthetic(capsys):
    assert main(["bench", "--synthetic", "tiny", "--scheme", "bf16", *SMALL]) == 0
    out = capsys.readouterr().out
    for text in ("W:bf16 A:none; lm_head W:bf16", "copy bandwidth", "prefill tokens", "decode batch",
                 "Model.generate, batch 1"):
        assert text in out
    assert out.count("\n            20 ") == 1 and out.count("\n             3 ") == 1


def test_bench_json_checkpoint_and_transformers(capsys):
    path = fixture_dir("modelopt-fp8-lmhead")
    assert main(["bench", str(path), "--json", "--compare-hf", "--hf-new-tokens", "3", *SMALL]) == 0
    r = json.loads(capsys.readouterr().out)
    assert set(r["prefill"]) == {"12", "20"} and set(r["decode"]) == {"1", "3"}
    assert all(v["tok_s"] > 0 and v["ms_per_step"] > 0 for v in r["decode"].values())
    assert r["weight_bytes_per_step"] > 0 and r["disk_bytes"] > 0
    assert r["memory_vs_disk"] <= 1.15  # the memory target: quantized weights stay quantized
    assert r["hf"]["decode_b1_tok_s"] > 0 and r["speedup_vs_hf_b1"] > 0


def test_bench_errors(capsys):
    assert main(["bench", "--device", "cpu"]) == 2
    assert "give a checkpoint PATH or --synthetic NAME" in capsys.readouterr().err
    assert main(["bench", "--synthetic", "tiny", "--batches", "1,x", "--device", "cpu"]) == 2
    assert "--batches takes comma-separated integers" in capsys.readouterr().err
    assert main(["bench", "--synthetic", "llama-9b", "--device", "cpu"]) == 2
    assert "unknown --synthetic model 'llama-9b'" in capsys.readouterr().err
