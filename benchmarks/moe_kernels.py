"""One Qwen3-30B-A3B MoE layer at decode: routing + experts against the roofline.

    PYTHONPATH=. python benchmarks/moe_kernels.py [--ts 1,2,4,8] [--formats bf16,nvfp4,int4] [--json f]

Layer: hidden 2048, 128 experts of intermediate 768, top-8 with renormalised softmax (Qwen3 norm_topk_prob);
router logits from x @ router.T in bf16. Stacks are random but valid, in the scheme units' stacked
layouts (lowbit/kernels/moe.py StackOperands): bf16, NVFP4 (E4M3 block scales of ModelOpt magnitude,
fp32 per-expert global scale), int4 group 128 (compressed-tensors W4A16, symmetric). Each path runs
route -> experts, captured once in a CUDA graph and replayed under do_bench (L2 flushed before each
replay), as benchmarks/kernels.py times: align + grouped MMA GEMM + act + grouped GEMM + sum.
(A dot-free GEMV path for 4-bit stacks measured 0.53x of this one at T=1 on an H200 and was
dropped: docs/kernel-notes.md.)
Roofline: bytes read (the router weight, the distinct experts' gate_up and down weights and scales
actually routed to, x and y) at the copy bandwidth measured in the same process. Each path is first
checked against the stacked reference (grouped_gemm_ref on the dequantized stacks).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

from kernels import bench, copy_bandwidth  # noqa: E402  (benchmarks/kernels.py)
from lowbit.kernels import moe  # noqa: E402
from lowbit.kernels.moe_ref import Routing  # noqa: E402
from lowbit.quant import numerics as nm  # noqa: E402

E, H, I, TOP_K = 128, 2048, 768, 8
DEV = "cuda"  # a CPU smoke run (Triton interpreter) sets this and smaller sizes
GROUP = 128


def stack(fmt: str, n: int, k: int) -> moe.StackOperands:
    dev = DEV
    if fmt == "bf16":
        return moe.StackOperands(moe.FMT_FLOAT, torch.randn(E, n, k, dtype=torch.bfloat16, device=dev) * 0.02, k)
    if fmt == "nvfp4":
        codes = torch.randint(0, 16, (E * n, k), dtype=torch.uint8, device=dev)
        scale = (torch.rand(E, n, k // 16, device=dev) * 8 + 0.5).to(torch.float8_e4m3fn)
        return moe.StackOperands(moe.FMT_NVFP4, nm.pack_e2m1(codes).view(E, n, k // 2), k, scale=scale, group=16,
                                 row_scale=torch.rand(E, n, device=dev) * 1e-3 + 1e-4)
    q = torch.randint(-8, 8, (E * n, k), device=dev)
    scale = (torch.rand(E, n, k // GROUP, device=dev) * 0.01 + 1e-3).bfloat16()
    return moe.StackOperands(moe.FMT_INT4, nm.pack_int32(q, 4).view(E, n, k // 8), k, scale=scale, group=GROUP)


def dequant(ops: moe.StackOperands) -> torch.Tensor:
    """float32 [E, N, K] of a stack (the reference's weights), one expert at a time."""
    out = []
    for e in range(E):
        if ops.fmt == moe.FMT_FLOAT:
            out.append(ops.units[e].float())
        elif ops.fmt == moe.FMT_NVFP4:
            out.append(nm.dequant_nvfp4(ops.units[e], ops.scale[e], ops.row_scale[e]))
        else:
            out.append(nm.dequant_int(nm.unpack_int32(ops.units[e], 4, ops.k), ops.scale[e], None, GROUP))
    return torch.stack(out)


def stack_bytes(ops: moe.StackOperands, experts: int) -> int:
    per = ops.units[0].numel() * ops.units.element_size()
    for t in (ops.scale, ops.row_scale, ops.zero):
        if t is not None:
            per += t[0].numel() * t.element_size()
    return experts * per


class Layer:
    def __init__(self, fmt: str):
        self.fmt = fmt
        self.router = torch.randn(E, H, dtype=torch.bfloat16, device=DEV) * 0.02
        self.first, self.down = stack(fmt, 2 * I, H), stack(fmt, H, I)
        self.routing = Routing(TOP_K, renormalize=True)

    def forward(self, x):
        w, ids = moe.route(x @ self.router.t(), self.routing)
        return moe.fused_experts(x, ids, w, self.first, self.down, "silu", True)

    def reference(self, x):
        w, ids = moe.route(x @ self.router.t(), self.routing)
        wf, wd = dequant(self.first), dequant(self.down)
        h = torch.einsum("pk,pnk->pn", x.float().repeat_interleave(TOP_K, 0), wf[ids.reshape(-1).long()])
        a = torch.nn.functional.silu(h[:, :I]) * h[:, I:]
        y = torch.einsum("pk,pnk->pn", a, wd[ids.reshape(-1).long()]) * w.reshape(-1, 1)
        return y.view(-1, TOP_K, H).sum(1), ids

    def roofline_bytes(self, t: int, ids: torch.Tensor) -> int:
        distinct = int(torch.unique(ids).numel())
        return (self.router.numel() * 2 + stack_bytes(self.first, distinct) + stack_bytes(self.down, distinct)
                + 2 * t * H * 2)


def run(ts, formats, json_path):
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}  copy {bw:.0f} GB/s; Qwen3-30B-A3B MoE layer (E={E}, H={H}, I={I}, "
          f"top-{TOP_K}); us, and fraction of the roofline (bytes read / copy bandwidth)")
    print(f"{'fmt':6} {'T':>3} {'experts':>7} {'roofline':>9} {'time':>16}")
    rows = []
    for fmt in formats:
        layer = Layer(fmt)
        for t in ts:
            x = torch.randn(t, H, dtype=torch.bfloat16, device=DEV)
            ref, ids = layer.reference(x)
            roof = layer.roofline_bytes(t, ids) / bw / 1e6  # ms
            y = layer.forward(x)
            err = ((y.float() - ref).norm() / ref.norm()).item()
            ms = bench(lambda: layer.forward(x))
            print(f"{fmt:6} {t:3d} {int(torch.unique(ids).numel()):7d} {roof * 1e3:9.1f} {ms * 1e3:7.1f} "
                  f"{100 * roof / ms:4.0f}%   err {err:.1e}", flush=True)
            rows.append(dict(fmt=fmt, t=t, roofline_ms=roof, ms=ms, err=err))
        del layer
        torch.cuda.empty_cache()
    if json_path:
        with open(json_path, "w") as f:
            json.dump(dict(copy_gbs=bw, rows=rows), f, indent=1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ts", default="1,2,4,8")
    ap.add_argument("--formats", default="bf16,nvfp4,int4")
    ap.add_argument("--json")
    a = ap.parse_args()
    ts, formats = [int(v) for v in a.ts.split(",")], a.formats.split(",")
    run(ts, formats, a.json)


if __name__ == "__main__":
    main()
