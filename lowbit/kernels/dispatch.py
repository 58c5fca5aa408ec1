"""The scheme units' hook: `linear(method, layer, x)` runs a unit's forward on a kernel, or returns
None when no kernel covers the case (the unit then runs its plain-PyTorch reference).

It reads the units' in-memory parameters by their names (lowbit/quant/methods/*: weight_packed,
weight_scale, weight_zero_point, row_scale, weight, input_scale, bias) and follows their numerics:
activations are quantized exactly when `method.quantize_activations()` says so. 4-bit weights take
the fast path when the unit keeps them in the planar layout (prepare_nvfp4 / prepare_int4 at load):
NVFP4 is recognised by its int32 dtype, int4 by `layer.weight_layout == "planar"`.
"""
from __future__ import annotations

import importlib.util

import torch

from .. import parallel
from . import ops


def available(device: torch.device | str | None = None) -> bool:
    """True when Triton is installed and `device` (default: the current one) is a CUDA GPU."""
    if importlib.util.find_spec("triton") is None or not torch.cuda.is_available():
        return False
    return device is None or torch.device(device).type == "cuda"


def linear(method, layer, x: torch.Tensor) -> torch.Tensor | None:
    if x.dtype not in (torch.bfloat16, torch.float16) or not available(x.device):
        return None
    s, k, bias = method.scheme, x.shape[-1], layer.bias
    quant_x = method.quantize_activations()
    if s.weight == "nvfp4":
        planar = layer.weight_packed.dtype == torch.int32
        if quant_x or not (planar or ops.nvfp4_supported(k)):  # W4A4 emulation stays on the reference
            return None
        return ops.nvfp4_linear(x, layer.weight_packed, layer.weight_scale, layer.row_scale, bias)
    if s.weight in ("int4", "int8") and s.packed:
        bits, group = method.bits, method.group
        planar = getattr(layer, "weight_layout", None) == "planar"
        if not ops.int_supported(bits, group, planar):
            return None
        return ops.int_linear(x, layer.weight_packed, layer.weight_scale, getattr(layer, "weight_zero_point", None),
                              bits, group, k, bias, planar=planar)
    if s.weight in ("fp8", "int8") and s.granularity in ("tensor", "channel"):
        input_scale = amax = None
        if quant_x:
            if not s.act_dynamic and s.act_symmetric and s.act_granularity in (None, "tensor"):
                input_scale = layer.input_scale
            elif s.act_dynamic and s.act_granularity == "token":
                # a row-parallel rank's tokens: their amax over the whole K (None: x holds all of K)
                amax = parallel.whole_k_amax(x.reshape(-1, k), method.spec)
            else:
                return None  # per-tensor dynamic, per-group or asymmetric activations: reference
        fn = ops.fp8_linear if s.weight == "fp8" else ops.int8_linear
        return fn(x, layer.weight, layer.weight_scale, input_scale, bias, quantize_input=quant_x, amax=amax)
    return None
