"""Fast quantized GEMMs for Hopper (H100/H200): Triton kernels plus cuBLAS FP8 for large batches.

The scheme units call these from `forward` when `x.is_cuda` and `available()`; their plain-PyTorch
dequantize-then-matmul stays the reference that every kernel is tested against. Inputs are the
units' in-memory layouts, unchanged (no repacking at load):

  nvfp4_linear(x, weight_packed, weight_scale, row_scale, bias=None)
  int_linear(x, weight_packed, weight_scale, zero_point, bits, group_size, k, bias=None)
  fp8_linear(x, weight, weight_scale, input_scale=None, bias=None, quantize_input=True)
  int8_linear(x, weight, weight_scale, input_scale=None, bias=None, quantize_input=True)

`nvfp4_supported(k)` and `int_supported(bits, group_size)` say whether a shape has a kernel;
`linear(method, layer, x)` is the units' hook (lowbit/kernels/dispatch.py). Importing this package
does not import Triton; `available()` says whether the kernels can run.
docs/benchmarks.md has the measured speed, docs/kernel-notes.md the design notes.
"""
from __future__ import annotations

from .dispatch import available, linear
from .ops import fp8_linear, int8_linear, int_linear, int_supported, nvfp4_linear, nvfp4_supported

__all__ = ["available", "linear", "nvfp4_linear", "int_linear", "fp8_linear", "int8_linear", "nvfp4_supported",
           "int_supported"]
