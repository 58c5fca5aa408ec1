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
        two = tmp_path / "two.json"  # the same load from two client processes
        assert bench.main(["--url", url, "--rates", "inf", "--requests", "5", "--prompt-len", "12",
                           "--max-tokens", "4", "--clients", "2", "--json", str(two)]) == 0
    r = json.loads(two.read_text())["rates"][0]
    assert r["clients"] == 2 and r["ok"] == 5 and r["errors"] == 0 and r["server_tok_s"] == r["output_tok_s"] > 0
    res = json.loads(out.read_text())
    assert [r["rate"] for r in res["rates"]] == [20.0, float("inf")]
    for r in res["rates"]:
        assert r["ok"] == 6 and r["errors"] == 0 and r["output_tok_s"] > 0
        assert 0 < r["ttft_p50_ms"] <= r["ttft_p99_ms"] and 0 < r["itl_p50_ms"] <= r["itl_p99_ms"]
    probe = res["prefix_probe"]
    assert probe["prefix_len"] == 64 and probe["cold_ttft_ms"] > 0 and probe["speedup_vs_unshared"] > 0


def test_serve_host_stand_in_smoke(tmp_path):
    """benchmarks/serve_host.py: the real server with a modelled device; all requests served, the
    modelled device's steps counted, and its busy share a fraction."""
    spec = importlib.util.spec_from_file_location("serve_host", BENCH.parent / "serve_host.py")
    host = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(host)
    out = tmp_path / "host.json"
    assert host.main(["--seqs", "4", "--requests", "6", "--prompt-len", "20", "--max-tokens", "5", "--clients", "2",
                      "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    r = res["rates"][0]
    assert r["ok"] == 6 and r["errors"] == 0 and r["clients"] == 2
    assert res["decode_steps"] >= 5 and 1 <= res["mean_rows"] <= 4  # 6 x 4 decoded tokens in batches of <= 4
    assert 0 < res["device_busy_share"][0] <= 1
