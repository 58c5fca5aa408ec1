"""quant_rows int8 (dynamic per token) time: this tree vs /work/main's (amax/127), same process each."""
import sys, torch, triton
from lowbit.kernels.act_quant import quant_rows
def bench(fn):
    fn(); torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return triton.testing.do_bench(g.replay, warmup=10, rep=50, return_mode="median") * 1e3
for m in (1, 16, 256, 4096):
    for k in (4096, 14336):
        x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
        print(f"{sys.argv[1]} M={m} K={k}: int8 {bench(lambda: quant_rows(x, torch.int8)):.2f} us, "
              f"fp8 {bench(lambda: quant_rows(x, torch.float8_e4m3fn)):.2f} us", flush=True)
