"""A/B on one GPU: NVFP4 at M = 1, 2 through _nvfp4_gemv_kernel vs the general planar kernel,
on the Llama-3-8B shapes (bf16 matmul alongside). `PYTHONPATH=. python benchmarks/nvfp4_gemv_ab.py`"""
import torch

from benchmarks.kernels import SHAPES, Weights, bench
from lowbit.kernels import w4 as W4

print(torch.cuda.get_device_name())
totals = {}
for shape, (n, k) in SHAPES.items():
    w = Weights(n, k)
    _, bs, rs = w.nvfp4
    for m in (1, 2):
        x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
        t = {"bf16": bench(lambda: torch.matmul(x, w.bf16.t()))}
        for name, cap in (("gemv", 2), ("general", 0)):
            W4.GEMV_MAX_M = cap
            t[name] = bench(lambda: W4.w4_linear(x, w.nvfp4_planar, True, k, bs, row_scale=rs))
        W4.GEMV_MAX_M = 2
        for key, v in t.items():
            totals[m, key] = totals.get((m, key), 0) + v
        print(f"{shape:8} M={m} " + " ".join(f"{key} {v * 1e3:7.1f} us" for key, v in t.items()), flush=True)
    del w
    torch.cuda.empty_cache()
for m in (1, 2):
    print(f"summed M={m}: x bf16 gemv {totals[m, 'bf16'] / totals[m, 'gemv']:.2f}, "
          f"general {totals[m, 'bf16'] / totals[m, 'general']:.2f}")
