"""compressed-tensors int-quantized W8A8: int8 weights with tensor or channel scales, int8
activations quantized per token at run time (dynamic) or with a static scale (+ zero point).

In memory: `weight` int8 [N, K]; `weight_scale` float32 per output row [N] (a per-tensor scale of
each fused shard fills that shard's rows); static activations: `input_scale` (+ `input_zero_point`)
float32 0-d. Dynamic per-token activations store nothing.

The reference forward is exact integer arithmetic, as an int8 GEMM computes it: x is quantized
to int8 (dynamic per token: compressed-tensors' own rule, numerics.quantize_int8_per_token; the
kernel in lowbit/kernels/act_quant.py computes the same codes and scales), the products are summed exactly (int32 on a GPU; float64 here, exact below 2^53), then
scaled by input scale x weight scale in float32 (float64 for a float64 model, whose tensor-parallel
partial outputs must reach the all-reduce unrounded).
"""
from __future__ import annotations

import torch

from ...errors import ConfigError
from ...kernels import invariance
from ...parallel import whole_k_amax
from ..numerics import quantize_int8_per_token
from . import register
from .common import QuantMethod

INT8_MAX = 127.0


def quantize_int8_static(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None):
    """Static quantization with the checkpoint's scale (+ zero point): clamp(round(x/s) + zp)."""
    q = torch.round(x.float() / scale)
    if zero_point is not None:
        q = q + zero_point
    return q.clamp(-INT8_MAX - 1, INT8_MAX)


@register(lambda s: s.weight == "int8" and not s.packed and s.activation in ("none", "int8"))
class Int8Method(QuantMethod):
    def create_weights(self, layer):
        s, sch = self.spec, self.scheme
        if sch.granularity not in ("tensor", "channel") or not sch.symmetric:
            raise ConfigError(f"{s.name}: int8 weights with {sch.granularity} "
                              f"{'symmetric' if sch.symmetric else 'asymmetric'} scales are not supported "
                              f"(supported: symmetric tensor or channel scales)")
        if sch.activation == "int8" and not sch.act_dynamic and sch.act_granularity not in (None, "tensor"):
            raise ConfigError(f"{s.name}: static int8 activations per {sch.act_granularity} are not supported "
                              f"(supported: static per-tensor, dynamic per-token)")
        if sch.activation == "int8" and sch.act_dynamic and sch.act_granularity != "token":
            raise ConfigError(f"{s.name}: dynamic int8 activations per {sch.act_granularity} are not supported "
                              f"(supported: static per-tensor, dynamic per-token)")
        self.new_param(layer, "weight", (s.local_out_features, s.local_in_features), torch.int8)
        self.new_param(layer, "weight_scale", (s.local_out_features,), torch.float32)

    def load_weight(self, layer, role, tensor, shard):
        rows = self.shard_rows(shard)
        if role == "weight":
            self.put(layer, role, rows, self.tp_slice(tensor, 0, 1, shard=shard), role, shard,
                     dtype=torch.int8, disk_shape=tensor.shape)
        elif role == "weight_scale":
            self.put_row_scale(layer, role, role, tensor, shard, per_tensor=self.scheme.granularity == "tensor")
        else:
            return self.unexpected(role, shard)
        return None

    def dequantize(self, layer):
        return layer.weight.float() * layer.weight_scale[:, None]

    def reference_forward(self, layer, x):
        if not self.quantize_activations():
            return invariance.linear(x, self.dequantize(layer).to(x.dtype), layer.bias)
        if self.scheme.act_dynamic:
            q, x_scale = quantize_int8_per_token(x, whole_k_amax(x, self.spec))
            zp = None
        else:
            x_scale = layer.input_scale
            zp = getattr(layer, "input_zero_point", None)
            q = quantize_int8_static(x, x_scale, zp)
        if zp is not None:
            q = q - zp  # integers in [-255, 255]: still exact
        acc = (q.double() @ layer.weight.double().t()).to(torch.promote_types(x.dtype, torch.float32))
        y = acc * x_scale * layer.weight_scale
        if layer.bias is not None:
            y = y + layer.bias.to(y.dtype)
        return y.to(x.dtype)
