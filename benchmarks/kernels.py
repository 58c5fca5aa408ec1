"""Quantized GEMM benchmark on real layer shapes (lowbit/kernels against bf16, torch int4 and gemlite).

    PYTHONPATH=. python benchmarks/kernels.py [--ms 1,16,256] [--shapes llama3-8b|qwen3-30b-a3b|qwen3.5-27b|qkv,o]
                                              [--json out.json] [--sweep]

For every shape x M: median time of each kernel (captured once in a CUDA graph, the graph replayed
under triton.testing.do_bench: L2 flushed before every replay, CUDA events), ratio to bf16 torch.matmul
and to the peers measured in the same process: torch's int4 kernel (_weight_int4pack_mm, the
gpt-fast/torchao path) and, when it is installed, gemlite's A16W4 group-128 Triton kernel
(A16W4_HQQ_INT, symmetric: zero point 8; autotuned on its first call, outside the timing); achieved
GB/s (weight + x + y bytes) against the device copy bandwidth measured here, and TFLOP/s. Each kernel
is first checked against its plain-PyTorch reference on the same weights. Prints a table and a summary
against the targets of issue 14; --json writes every number. --sweep times alternative tilings instead.

--shapes takes a preset or shape names: llama3-8b (default; the targets are sums over its five
shapes), qwen3-30b-a3b (attention for hidden 2048 with 32 q / 4 kv heads of 128, one expert's
gate_up and down), qwen3.5-27b (hidden 5120, FFN 17408, 24 q / 4 kv heads of 256, q_proj doubled
for the output gate). q/k/v and gate/up are one GEMM each, as lowbit runs them.

gemlite (0.6.0.post2) is on PyPI as a pure-Python sdist only; the GPU machine has no network, so
build the wheel here and carry it (numpy, tqdm and triton are already there):

    pip wheel gemlite==0.6.0.post2 --no-deps -w wheels/   # -> gemlite-0.6.0.post2-py3-none-any.whl
    # on the GPU machine: pip install --no-deps wheels/gemlite-0.6.0.post2-py3-none-any.whl
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform

import torch
import triton

from lowbit import kernels
from lowbit.kernels import gemm as G
from lowbit.kernels import w4 as W4
from lowbit.kernels import ops
from lowbit.kernels.act_quant import quant_rows
from lowbit.quant import numerics as nm

PRESETS = {  # name -> {shape: (N, K)}; fused q/k/v and gate/up as lowbit runs them
    "llama3-8b": {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
                  "lm_head": (128256, 4096)},
    # hidden 2048; q 32 x 128 = 4096 rows, k and v 4 x 128 = 512 each; experts: moe_intermediate 768
    "qwen3-30b-a3b": {"a3b_qkv": (5120, 2048), "a3b_o": (2048, 4096), "a3b_expert_gate_up": (1536, 2048),
                      "a3b_expert_down": (2048, 768)},
    # hidden 5120; q 24 x 256 x 2 (output gate) = 12288 rows, k and v 4 x 256 = 1024 each; o from 24 x 256
    "qwen3.5-27b": {"q35_qkv": (14336, 5120), "q35_o": (5120, 6144), "q35_gate_up": (34816, 5120),
                    "q35_down": (5120, 17408)},
}
SHAPES = {name: nk for preset in PRESETS.values() for name, nk in preset.items()}
MS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096]
GROUP = 128  # int4 group size benchmarked (CT W4A16 default, and the torch int4 kernel's)
_W4_TARGETS = {1: 2.6, 4: 2.5, 16: 2.3, 64: 1.7, 256: 1.0, 1024: 0.95, 4096: 0.95}
TARGETS = {  # issue 14, summed over the five Llama-3-8B shapes: kernel time ratio over bf16
    "nvfp4": _W4_TARGETS, "int4": _W4_TARGETS,
    "fp8": {1: 1.6, 4096: 1.5},
}
PEERS = ("tinygemm", "gemlite")  # other projects' 4-bit kernels, timed in the same process


def shape_names(arg: str) -> list[str]:
    """--shapes: a preset name or comma-separated shape names."""
    names = list(PRESETS[arg]) if arg in PRESETS else arg.split(",")
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        raise SystemExit(f"unknown shapes {unknown}; presets: {', '.join(PRESETS)}; shapes: {', '.join(SHAPES)}")
    return names


def _gemlite_int4(q: torch.Tensor, scale: torch.Tensor):
    """gemlite's A16W4 group-128 layer for the int4 weight q (int in [-8, 8)) with bf16 group scales,
    or None when gemlite is not installed (or cannot build it here)."""
    try:
        from gemlite.helper import A16W4_HQQ_INT
    except ImportError:
        return None
    try:  # HQQ convention: W = (W_q - zero) * scale, W_q uint8 in [0, 16)
        return A16W4_HQQ_INT(device="cuda", dtype=torch.bfloat16).from_weights(
            (q + 8).to(torch.uint8), scale, torch.full_like(scale, 8))
    except Exception as e:  # a gemlite that does not run here is reported, not fatal
        print(f"gemlite unavailable: {type(e).__name__}: {e}")
        return None


def bench(fn) -> float:
    """Median milliseconds of one call of fn on the GPU, L2 flushed before each call.

    fn runs from a CUDA graph, as a decode step does under graphs: timed eagerly, a few-microsecond
    kernel measures Python and launch overhead (the Triton launcher's argument binding is tens of
    microseconds) whenever that outlasts the L2 flush that precedes it.
    """
    fn()  # compile, create handles
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    t = triton.testing.do_bench(g.replay, warmup=10, rep=40, return_mode="median")
    del g
    return t


def copy_bandwidth() -> float:
    a = torch.empty(2 ** 31, dtype=torch.uint8, device="cuda")
    a.random_()
    b = torch.empty_like(a)
    t = triton.testing.do_bench(lambda: b.copy_(a), warmup=10, rep=100, return_mode="median")
    return 2 * a.numel() / t / 1e6  # GB/s, bytes read + written


class Weights:
    """One shape's weights in every format, random but valid (no zeros)."""

    def __init__(self, n: int, k: int):
        self.n, self.k = n, k
        dev = "cuda"
        self.bf16 = torch.randn(n, k, dtype=torch.bfloat16, device=dev) * 0.02
        codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, device=dev)
        self.nvfp4 = (nm.pack_e2m1(codes), (torch.rand(n, k // 16, device=dev) * 8 + 0.5).to(torch.float8_e4m3fn),
                      torch.rand(n, device=dev) * 1e-3 + 1e-4)
        q = torch.randint(-8, 8, (n, k), device=dev)
        self.int4 = (nm.pack_int32(q, 4), (torch.rand(n, k // GROUP, device=dev) * 0.01 + 1e-3).bfloat16())
        # the fast path's load-time layout (same bytes)
        self.nvfp4_planar = kernels.prepare_nvfp4(self.nvfp4[0])
        self.int4_planar = kernels.prepare_int4(self.int4[0], k)
        # torch's tinygemm layout: uint8 [N, K/2] (high nibble first) and [K/g, N, 2] scale/zero
        u = (q + 8).to(torch.uint8)
        self.tinygemm = None
        try:
            packed = torch.ops.aten._convert_weight_to_int4pack((u[:, ::2] << 4 | u[:, 1::2]).contiguous(), 8)
            sz = torch.stack([self.int4[1].t().float(), torch.zeros(k // GROUP, n, device=dev)], -1).bfloat16()
            self.tinygemm = (packed, sz.contiguous())
        except (RuntimeError, AttributeError) as e:
            print(f"torch int4 kernel unavailable: {e}")
        self.gemlite = _gemlite_int4(q, self.int4[1])
        self.fp8 = ((torch.randn(n, k, device=dev) * 100).clamp(-448, 448).to(torch.float8_e4m3fn),
                    torch.rand(n, device=dev) * 1e-3 + 1e-4)
        self.int8 = (torch.randint(-127, 128, (n, k), dtype=torch.int8, device=dev), torch.rand(n, device=dev) * 1e-3)

    def nbytes(self, fmt: str) -> int:
        n, k = self.n, self.k
        fmt = fmt.replace("_ckpt", "")
        return {"bf16": 2 * n * k, "nvfp4": n * k // 2 + n * k // 16 + 4 * n, "int4": n * k // 2 + 2 * n * k // GROUP,
                "tinygemm": n * k // 2 + 4 * n * k // GROUP, "gemlite": n * k // 2 + 4 * n * k // GROUP,
                "fp8": n * k + 4 * n, "fp8_wo": n * k + 4 * n,
                "fp8_triton": n * k + 4 * n, "fp8_scaled_mm": n * k + 4 * n, "int8": n * k + 4 * n}[fmt]


def kernel_fns(w: Weights, x: torch.Tensor) -> dict:
    """name -> (fn, fp32 reference or None); every fn computes x @ W.T for that format."""
    k = w.k
    p, bs, rs = w.nvfp4
    p4, s4 = w.int4
    w8, ws8 = w.fp8
    wi, wsi = w.int8
    deq_nvfp4 = lambda: nm.dequant_nvfp4(p, bs, rs)  # noqa: E731
    deq_int4 = lambda: nm.dequant_int(nm.unpack_int32(p4, 4, k), s4, None, GROUP)  # noqa: E731
    fns = {
        "bf16": (lambda: torch.matmul(x, w.bf16.t()), None),
        "nvfp4": (lambda: kernels.nvfp4_linear(x, w.nvfp4_planar, bs, rs), deq_nvfp4),
        "int4": (lambda: kernels.int_linear(x, w.int4_planar, s4, None, 4, GROUP, k, planar=True), deq_int4),
        "nvfp4_ckpt": (lambda: kernels.nvfp4_linear(x, p, bs, rs), deq_nvfp4),
        "int4_ckpt": (lambda: kernels.int_linear(x, p4, s4, None, 4, GROUP, k), deq_int4),
        "fp8": (lambda: kernels.fp8_linear(x, w8, ws8), None),
        "fp8_triton": (lambda: _fp8_triton(x, w8, ws8), None),
        "fp8_scaled_mm": (lambda: _fp8_scaled_mm(x, w8, ws8), None),
        "fp8_wo": (lambda: kernels.fp8_linear(x, w8, ws8, quantize_input=False), lambda: w8.float() * ws8[:, None]),
        "int8": (lambda: kernels.int8_linear(x, wi, wsi), None),
    }
    if w.tinygemm is not None:
        tp, sz = w.tinygemm
        fns["tinygemm"] = (lambda: torch.ops.aten._weight_int4pack_mm(x, tp, GROUP, sz), deq_int4)
    if w.gemlite is not None:
        fns["gemlite"] = (lambda: w.gemlite(x), deq_int4)
    return fns


def _fp8_triton(x, w, ws):
    xq, xs = quant_rows(x, torch.float8_e4m3fn)
    return G.gemm(xq, w, G.FMT_FP8, w.shape[1], row_scale=ws, x_scale=xs, out_dtype=x.dtype)


def _fp8_scaled_mm(x, w, ws):
    xq, xs = quant_rows(x, torch.float8_e4m3fn)
    return torch._scaled_mm(xq, w.t(), scale_a=xs[:, None], scale_b=ws[None, :], out_dtype=torch.bfloat16)


def check(w: Weights, m: int) -> dict:
    """Relative error of each kernel against its fp32 reference, on fresh random x."""
    x = torch.randn(m, w.k, dtype=torch.bfloat16, device="cuda")
    errs = {}
    for name, (fn, ref) in kernel_fns(w, x).items():
        if name in ("fp8", "fp8_triton", "fp8_scaled_mm"):
            r = nm.fake_quant_fp8_activation(x.float(), None) @ (w.fp8[0].float() * w.fp8[1][:, None]).T
        elif name == "int8":
            q, xs = nm.quantize_int8_per_token(x)
            r = q @ w.int8[0].float().T * xs * w.int8[1]
        elif ref is not None:
            r = x.float() @ ref().T
        else:
            continue
        y = fn().float()
        errs[name] = ((y - r).norm() / r.norm()).item()
    return errs


def run(shapes: list[str], ms: list[int], json_path: str | None) -> None:
    bw = copy_bandwidth()
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                date=datetime.datetime.now().isoformat(timespec="seconds"), python=platform.python_version(),
                copy_gbs=round(bw, 1), scaled_mm_min_m=ops.SCALED_MM_MIN_M)
    print(f"{meta['gpu']}  torch {meta['torch']}  triton {meta['triton']}  copy {bw:.0f} GB/s", flush=True)
    rows, checks = [], {}
    for shape in shapes:
        n, k = SHAPES[shape]
        w = Weights(n, k)
        checks[shape] = {m: check(w, m) for m in (1, 300)}
        print(f"check {shape}: " + "  ".join(f"M={m} " + " ".join(f"{a}={e:.1e}" for a, e in c.items())
                                             for m, c in checks[shape].items()), flush=True)
        for m in ms:
            x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            line = []
            for name, (fn, _) in kernel_fns(w, x).items():
                t = bench(fn)
                nbytes = w.nbytes(name) + 2 * m * k + 2 * m * n
                rows.append(dict(shape=shape, m=m, kernel=name, ms=t, gbs=nbytes / t / 1e6,
                                 tflops=2 * m * n * k / t / 1e9))
                line.append(f"{name}={t * 1e3:.1f}")
            print(f"{shape} M={m} us: " + " ".join(line), flush=True)
        del w
        torch.cuda.empty_cache()
    add_ratios(rows)
    summary = summarize(rows, shapes, ms, bw)
    print_table(rows, bw)
    print_summary(summary)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(dict(meta=meta, checks=checks, rows=rows, summary=summary), f, indent=1)


def add_ratios(rows: list[dict]) -> None:
    by = {(r["shape"], r["m"], r["kernel"]): r["ms"] for r in rows}
    for r in rows:
        r["x_bf16"] = by[(r["shape"], r["m"], "bf16")] / r["ms"]
        for peer in PEERS:
            t = by.get((r["shape"], r["m"], peer))
            r[f"x_{peer}"] = t / r["ms"] if t else None


def summarize(rows: list[dict], shapes: list[str], ms: list[int], bw: float) -> dict:
    """Per kernel and M: bf16 time / kernel time, both summed over the shapes; M=1 bandwidth."""
    tot = {}
    for r in rows:
        tot[(r["kernel"], r["m"])] = tot.get((r["kernel"], r["m"]), 0.0) + r["ms"]
    kernels_ = sorted({r["kernel"] for r in rows})
    out = {"sum_x_bf16": {}, "m1_bw_frac": {}} | {f"sum_x_{peer}": {} for peer in PEERS}
    for kn in kernels_:
        out["sum_x_bf16"][kn] = {m: tot[("bf16", m)] / tot[(kn, m)] for m in ms}
        for peer in PEERS:
            if (peer, ms[0]) in tot:
                out[f"sum_x_{peer}"][kn] = {m: tot[(peer, m)] / tot[(kn, m)] for m in ms}
    for r in rows:
        if r["m"] == 1:
            out["m1_bw_frac"].setdefault(r["kernel"], {})[r["shape"]] = r["gbs"] / bw
    return out


def print_table(rows: list[dict], bw: float) -> None:
    print(f"\n{'shape':18} {'M':>5} {'kernel':14} {'us':>9} {'x bf16':>7} {'x i4tg':>7} {'x gmlt':>7} {'GB/s':>6} "
          f"{'%bw':>4} {'TFLOP/s':>8}")
    for r in rows:
        peers = " ".join(f"{r[f'x_{p}']:7.2f}" if r[f"x_{p}"] else "      -" for p in PEERS)
        print(f"{r['shape']:18} {r['m']:5d} {r['kernel']:14} {r['ms'] * 1e3:9.1f} {r['x_bf16']:7.2f} {peers} "
              f"{r['gbs']:6.0f} {100 * r['gbs'] / bw:4.0f} {r['tflops']:8.1f}")


def print_summary(s: dict) -> None:
    print("\nsummed over shapes, bf16 time / kernel time (target in brackets):")
    for kn, per_m in s["sum_x_bf16"].items():
        tgt = TARGETS.get(kn, {})
        cells = [f"M={m}:{v:.2f}" + (f"[{tgt[m]}]" if m in tgt else "") for m, v in per_m.items()]
        print(f"  {kn:14} " + " ".join(cells))
    for peer in PEERS:
        if s[f"sum_x_{peer}"]:
            print(f"summed over shapes, {peer} time / kernel time:")
            for kn in ("nvfp4", "int4"):
                if kn in s[f"sum_x_{peer}"]:
                    print(f"  {kn:14} " + " ".join(f"M={m}:{v:.2f}" for m, v in s[f"sum_x_{peer}"][kn].items()))
    print("M=1 achieved / copy bandwidth (target 0.75 on gate_up, down, lm_head):")
    for kn in ("bf16", "nvfp4", "int4", *PEERS, "fp8", "int8"):
        if kn in s["m1_bw_frac"]:
            print(f"  {kn:14} " + " ".join(f"{sh}:{v:.2f}" for sh, v in s["m1_bw_frac"][kn].items()))


SWEEP_TILES = {  # planar kernel candidates per M bucket: (bm, bn, warps, stages[, maxnreg])
    "small": [(16, 64, 2, 4), (16, 64, 2, 3, 96), (16, 64, 2, 3, 80), (16, 64, 2, 2, 96), (16, 32, 1, 3, 96),
              (16, 128, 2, 4), (16, 128, 2, 3, 168)],
    "mid": [(32, 64, 2, 4), (32, 64, 4, 4), (64, 64, 4, 3), (64, 64, 2, 4), (64, 128, 4, 3)],
}


def sweep(shapes: list[str], ms: list[int], json_path: str | None) -> None:
    """Time alternative tilings and split-K factors of the planar 4-bit kernel, the plain Triton
    decoder, and the dequantize + cuBLAS path, to tune w4.pick_tiles and w4.DENSE_MIN_M."""
    results = []
    for shape in shapes:
        n, k = SHAPES[shape]
        w = Weights(n, k)
        _, bs, rs = w.nvfp4
        s4 = w.int4[1]
        fmts = {"nvfp4": lambda x, **kw: W4.w4_linear(x, w.nvfp4_planar, True, k, bs, row_scale=rs, **kw),
                "int4": lambda x, **kw: W4.w4_linear(x, w.int4_planar, False, k, s4, None, GROUP, **kw)}
        for m in ms:
            x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            t_bf16 = bench(lambda: torch.matmul(x, w.bf16.t()))
            for bm, bn, warps, stages, *cap in SWEEP_TILES["small" if m <= 16 else "mid"]:
                if bm > max(16, m):
                    continue
                auto = W4.pick_tiles(m, n, k, x.device).split * bn // 64 or 1
                for split in sorted({max(1, auto // 2), auto, min(16, 2 * auto)}):
                    t = G.Tiles(bm, bn, W4.CHUNK, split, warps, stages, *cap)
                    for fmt, fn in fmts.items():
                        results.append(_sweep_one(shape, m, fmt, str(t), t_bf16, lambda: fn(x, tiles=t, dense_min_m=1 << 30)))
            for fmt, fn in fmts.items():
                results.append(_sweep_one(shape, m, fmt + "-noasm", "heuristic", t_bf16,
                                          lambda: fn(x, use_asm=False, dense_min_m=1 << 30)))
                if m >= 32:
                    results.append(_sweep_one(shape, m, fmt + "-dense", "cublas", t_bf16, lambda: fn(x, dense_min_m=1)))
            for fmt in fmts:
                mine = [r for r in results if r and r["shape"] == shape and r["m"] == m and r["fmt"] == fmt]
                best = min(mine, key=lambda r: r["ms"])
                extra = {r["fmt"]: round(r["ms"] * 1e3, 1) for r in results
                         if r and r["shape"] == shape and r["m"] == m and r["fmt"].startswith(fmt + "-")}
                print(f"sweep {shape:8} M={m:5d} {fmt:6} best {best['tiles']} {best['ms'] * 1e3:8.1f} us "
                      f"x{best['x_bf16']:.2f} heuristic {W4.pick_tiles(m, n, k, x.device)} {extra}", flush=True)
        del w
        torch.cuda.empty_cache()
    if json_path:
        with open(json_path, "w") as f:
            json.dump([r for r in results if r], f, indent=1)


def _sweep_one(shape, m, fmt, tiles: str, t_bf16, fn):
    try:
        t = bench(fn)
    except Exception as e:  # a tiling that does not compile or fit is reported and skipped
        print(f"skip {fmt} {tiles}: {type(e).__name__}: {str(e)[:80]}")
        return None
    return dict(shape=shape, m=m, fmt=fmt, tiles=tiles, ms=t, x_bf16=t_bf16 / t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="llama3-8b", help=f"a preset ({', '.join(PRESETS)}) or shape names")
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--json")
    ap.add_argument("--sweep", action="store_true")
    a = ap.parse_args()
    shapes, ms = shape_names(a.shapes), [int(v) for v in a.ms.split(",")]
    (sweep if a.sweep else run)(shapes, ms, a.json)


if __name__ == "__main__":
    main()
