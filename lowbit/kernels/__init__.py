"""Fast quantized GEMMs for Hopper (H100/H200): Triton kernels plus cuBLAS FP8 for large batches.

The scheme units call these from `forward` when `x.is_cuda` and `available()`; their plain-PyTorch
dequantize-then-matmul stays the reference that every kernel is tested against. Inputs are the
units' in-memory layouts, or, for the fast 4-bit path, a planar repack made once at load (same
bytes, exact inverse; lowbit/kernels/w4.py):

  nvfp4_linear(x, weight, weight_scale, row_scale, bias=None)   weight: uint8 checkpoint or planar
  int_linear(x, weight_packed, weight_scale, zero_point, bits, group_size, k, bias=None, planar=False)
  prepare_nvfp4(weight_packed) / unprepare_nvfp4(planar, k)
  prepare_int4(weight_packed, k) / unprepare_int4(planar, k)
  fp8_linear(x, weight, weight_scale, input_scale=None, bias=None, quantize_input=True)
  int8_linear(x, weight, weight_scale, input_scale=None, bias=None, quantize_input=True)

`nvfp4_supported(k)` and `int_supported(bits, group_size)` say whether a shape has a kernel;
`linear(method, layer, x)` is the units' hook (lowbit/kernels/dispatch.py). Importing this package
does not import Triton; `available()` says whether the kernels can run.
docs/benchmarks.md has the measured speed, docs/kernel-notes.md the design notes.
"""
from __future__ import annotations

from .dispatch import available, linear
from .ops import (fp8_linear, int8_linear, int_linear, int_supported, nvfp4_linear, nvfp4_supported, prepare_int4,
                  prepare_nvfp4, unprepare_int4, unprepare_nvfp4)

__all__ = ["available", "linear", "nvfp4_linear", "int_linear", "fp8_linear", "int8_linear", "nvfp4_supported",
           "int_supported", "prepare_nvfp4", "unprepare_nvfp4", "prepare_int4", "unprepare_int4"]
