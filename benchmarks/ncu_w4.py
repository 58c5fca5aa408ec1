"""Profile target for Nsight Compute: the planar 4-bit kernel at decode on Llama-3-8B shapes.

    ncu --kernel-name regex:_w4_kernel --launch-skip 2 --launch-count 1 --section WarpStateStats \
        python3 benchmarks/ncu_w4.py int4 lm_head
"""
import sys

import torch

sys.path.insert(0, ".")
from benchmarks.kernels import SHAPES, Weights  # noqa: E402
from lowbit.kernels import w4 as W4  # noqa: E402

fmt, shape = sys.argv[1], sys.argv[2]
m = int(sys.argv[3]) if len(sys.argv) > 3 else 1
n, k = SHAPES[shape]
w = Weights(n, k)
x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
for _ in range(4):
    if fmt == "int4":
        W4.w4_linear(x, w.int4_planar, False, k, w.int4[1], None, 128)
    else:
        _, bs, rs = w.nvfp4
        W4.w4_linear(x, w.nvfp4_planar, True, k, bs, row_scale=rs)
torch.cuda.synchronize()
