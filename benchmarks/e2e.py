"""End-to-end benchmark matrix for docs/benchmarks.md: `lowbit bench` over several schemes of one
synthetic model in one process on one GPU, then the issue's target ratios from the same run.

    python benchmarks/e2e.py --out DIR [--model llama-3-8b] [--configs bf16,nvfp4+lm,nvfp4,int4-g128,fp8]

Rewrites DIR/summary.json after each configuration (a timeout keeps what finished) and writes
DIR/summary.md at the end. The bf16 run also times transformers (--compare-hf).
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lowbit.bench import bench  # noqa: E402

DEFAULTS = dict(path=None, lm_head_quant=False, kv_cache_fp8=False, prompt_lens="512,2048", batches="1,8,32",
                new_tokens=256, decode_prompt=128, no_graphs=False, compare_hf=False, hf_new_tokens=64, tp=1,
                device=None, dtype=None, activation_quant="auto", kv_cache="auto", trust_tensors=False,
                no_kernels=False)


def targets(results: dict) -> list[tuple[str, float, str, bool]]:
    """(what, measured, target, met) for every issue target the run can speak to."""
    rows = []
    bf16 = results.get("bf16")
    head = results.get("nvfp4+lm")
    if bf16:
        b1 = bf16["decode"]["1"]
        rows.append(("bf16 decode b1, share of copy bandwidth", b1["share_of_copy_bw"], ">= 0.75",
                     b1["share_of_copy_bw"] >= 0.75))
        if "hf" in bf16:
            rows.append(("bf16 decode b1 vs transformers bf16", bf16["speedup_vs_hf_b1"], ">= 10x",
                         bf16["speedup_vs_hf_b1"] >= 10))
    if head:
        b1 = head["decode"]["1"]
        rows.append(("nvfp4 (weight-only) + quantized lm_head, decode b1, share of copy bandwidth",
                     b1["share_of_copy_bw"], ">= 0.60", b1["share_of_copy_bw"] >= 0.6))
        if bf16:
            r = b1["tok_s"] / bf16["decode"]["1"]["tok_s"]
            rows.append(("nvfp4 + quantized lm_head vs bf16, decode b1", r, ">= 3.0x", r >= 3.0))
    if bf16 and results.get("nvfp4"):
        r = results["nvfp4"]["prefill"]["2048"]["tok_s"] / bf16["prefill"]["2048"]["tok_s"]
        rows.append(("nvfp4 vs bf16, prefill 2048", r, ">= 0.7x", r >= 0.7))
    for name, res in results.items():
        d = res["decode"]
        if "1" in d and "32" in d:
            r = d["32"]["tok_s"] / d["1"]["tok_s"]
            rows.append((f"{name}: batch-32 aggregate vs batch-1 decode", r, ">= 15x", r >= 15))
        rows.append((f"{name}: GPU memory of the model vs its on-disk bytes", res["memory_vs_disk"], "<= 1.15x",
                     res["memory_vs_disk"] <= 1.15))
    return rows


def markdown(results: dict, rows) -> str:
    gb = 1e9
    first = next(iter(results.values()))
    out = [f"{first['device']}, torch {first['torch']}, Triton {first['triton']}, {first['date']}; "
           f"copy bandwidth measured {first['copy_gbps']:.0f} GB/s (read + write)", "",
           "| config | weights/step GB | prefill 512 tok/s | prefill 2048 tok/s | decode b1 tok/s (ms) | b1 share of "
           "copy BW | decode b8 tok/s | decode b32 tok/s | generate b1 tok/s | memory / disk | peak GB running "
           "(loading) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        d, p = r["decode"], r["prefill"]
        out.append(f"| {name} | {r['weight_bytes_per_step'] / gb:.2f} | {p['512']['tok_s']:.0f} | "
                   f"{p['2048']['tok_s']:.0f} | {d['1']['tok_s']:.1f} ({d['1']['ms_per_step']:.2f}) | "
                   f"{d['1']['share_of_copy_bw']:.0%} | {d['8']['tok_s']:.0f} | {d['32']['tok_s']:.0f} | "
                   f"{r['generate_b1_tok_s']:.1f} | {r['memory_vs_disk']:.2f} | {r.get('peak_gpu_bytes', 0) / gb:.1f} "
                   f"({r.get('load_peak_gpu_bytes', 0) / gb:.1f}) |")
    hf = results.get("bf16", {}).get("hf")
    if hf:
        out += ["", f"transformers {hf.get('version', '')} bf16, same shapes: decode b1 {hf['decode_b1_tok_s']:.1f} "
                    f"tok/s; prefill 512 {hf['prefill']['512']['tok_s']:.0f} tok/s, 2048 "
                    f"{hf['prefill']['2048']['tok_s']:.0f} tok/s"]
    out += ["", "| target | measured | wanted | met |", "|---|---|---|---|"]
    out += [f"| {what} | {value:.2f} | {want} | {'yes' if ok else 'no'} |" for what, value, want, ok in rows]
    notes = sorted({n for r in results.values() for n in r["notes"]})
    out += [""] + [f"note: {n}" for n in notes]
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="llama-3-8b")
    ap.add_argument("--configs", default="bf16,nvfp4+lm,nvfp4,int4-g128,fp8")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in args.configs.split(","):
        scheme, _, lm = name.partition("+")
        opts = DEFAULTS | dict(synthetic=args.model, scheme=scheme, lm_head_quant=lm == "lm",
                               compare_hf=scheme == "bf16")
        try:
            results[name] = bench(opts)
        except Exception as e:  # keep the other configurations
            print(f"{name}: FAILED {type(e).__name__}: {e}", flush=True)
            continue
        finally:
            gc.collect()
            torch.cuda.empty_cache()
        (out / "summary.json").write_text(json.dumps({"results": results, "targets": targets(results)}, indent=1))
        d = results[name]["decode"]
        print(f"{name}: decode b1 {d['1']['tok_s']:.1f} tok/s ({d['1']['share_of_copy_bw']:.0%} of copy BW), "
              f"b32 {d['32']['tok_s']:.0f} tok/s", flush=True)
    text = markdown(results, targets(results)) if results else "no configuration finished"
    (out / "summary.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
