"""benchmarks/serve.py's CPU smoke run: Poisson arrivals and the prefix probe against a real server
on a tiny synthetic model; every request succeeds and every figure is filled in."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from lowbit import synthetic
from lowbit.serve import create_app
from serve_helpers import one_thread, serving  # noqa: F401

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "serve.py"


def test_serve_benchmark_smoke(tmp_path, one_thread):  # noqa: F811
    spec = importlib.util.spec_from_file_location("serve_bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    model = synthetic.build("tiny", "bf16", device="cpu", dtype=torch.float32, seed=1)
    with serving(create_app(model, "tiny", max_batch=4, max_len=256)) as url:
        out = tmp_path / "serve.json"
        assert bench.main(["--url", url, "--rates", "20,inf", "--requests", "6", "--prompt-len", "12",
                           "--max-tokens", "5", "--prefix-probe", "--prefix-len", "64", "--prefix-repeats", "2",
                           "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [r["rate"] for r in res["rates"]] == [20.0, float("inf")]
    for r in res["rates"]:
        assert r["ok"] == 6 and r["errors"] == 0 and r["output_tok_s"] > 0
        assert 0 < r["ttft_p50_ms"] <= r["ttft_p99_ms"] and 0 < r["itl_p50_ms"] <= r["itl_p99_ms"]
    probe = res["prefix_probe"]
    assert probe["prefix_len"] == 64 and probe["cold_ttft_ms"] > 0 and probe["speedup_vs_unshared"] > 0
