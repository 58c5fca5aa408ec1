"""NVFP4 weights (E2M1 elements, E4M3 scales per 16 elements along K, a global scale per tensor):
ModelOpt NVFP4 / W4A16_NVFP4 and compressed-tensors NVFP4 / NVFP4A16 (nvfp4-pack-quantized).

In memory: `weight_packed` uint8 [N, K/2] as on disk (low nibble = even element); `weight_scale`
float8_e4m3fn [N, K/16]; `row_scale` float32 [N], the *multiplying* global scale of each output row
(ModelOpt weight_scale_2; compressed-tensors 1/weight_global_scale), so fused shards with different
global scales are lossless; `input_scale` float32 0-d, the activation global decode scale g
(ModelOpt input_scale; compressed-tensors 1/input_global_scale), W4A4 only.
"""
from __future__ import annotations

from math import ceil

import torch

from ...kernels import invariance
from ..numerics import NVFP4_BLOCK, dequant_nvfp4, fake_quant_nvfp4_activation
from . import register
from .common import TP_FIX, QuantMethod, identity, reciprocal

# on-disk role -> in-memory parameter, per format
WEIGHT_ROLES = {
    "modelopt": {"weight": "weight_packed", "weight_scale": "weight_scale", "weight_scale_2": "row_scale"},
    "compressed-tensors": {"weight_packed": "weight_packed", "weight_scale": "weight_scale",
                           "weight_global_scale": "row_scale"},
}
ACT_ROLES = {"modelopt": ("input_scale", identity), "compressed-tensors": ("input_global_scale", reciprocal)}
WEIGHT_ONLY_NOTE = ("NVFP4 W4A4 runs weight-only (activation_quant='auto': no FP4 tensor cores); "
                    "activation_quant='emulate' reproduces the W4A4 activation numerics")


@register(lambda s: s.weight == "nvfp4" and s.activation in ("none", "nvfp4"))
class NVFP4Method(QuantMethod):
    def create_weights(self, layer):
        s = self.spec
        n, k = s.local_out_features, s.local_in_features
        self.require_multiple("in_features", s.in_features, 2, "NVFP4 packs two elements per byte")
        if s.parallel == "row" and s.tp_size > 1:
            self.require_multiple("in_features per rank", k, NVFP4_BLOCK, TP_FIX)
        self.new_param(layer, "weight_packed", (n, k // 2), torch.uint8)
        self.new_param(layer, "weight_scale", (n, ceil(k / NVFP4_BLOCK)), torch.float8_e4m3fn)
        self.new_param(layer, "row_scale", (n,), torch.float32)

    def act_roles(self):
        if self.scheme.activation != "nvfp4":
            return {}
        role, transform = ACT_ROLES[self.scheme.fmt]
        return {role: ("input_scale", transform)}

    def load_weight(self, layer, role, tensor, shard):
        name = WEIGHT_ROLES[self.scheme.fmt].get(role)
        rows = self.shard_rows(shard)
        if name == "weight_packed":
            self.put(layer, name, rows, self.tp_slice(tensor, 0, 1, shard=shard), role, shard,
                     dtype=torch.uint8, disk_shape=tensor.shape)
        elif name == "weight_scale":
            self.put(layer, name, rows, self.tp_slice(tensor, 0, 1, shard=shard), role, shard,
                     dtype=torch.float8_e4m3fn, disk_shape=tensor.shape)
        elif name == "row_scale":
            ct = self.scheme.fmt == "compressed-tensors"
            self.put_row_scale(layer, name, role, tensor, shard, per_tensor=True, transform=reciprocal if ct else identity)
        else:
            return self.unexpected(role, shard)
        return None

    def finalize(self, layer):
        notes = super().finalize(layer)
        if self.scheme.activation == "nvfp4" and self.options.activation_quant == "auto":
            notes.append(WEIGHT_ONLY_NOTE)
        if self._use_planar(layer):
            # on a GPU: repack once into the kernels' planar layout (same bytes, exact inverse); on an
            # H200 it decodes faster at M <= 16 and M >= 1024 (docs/benchmarks.md, nvfp4 vs nvfp4_ckpt)
            from ... import kernels

            layer.weight_packed.data = kernels.prepare_nvfp4(layer.weight_packed.data)
        return notes

    def _use_planar(self, layer) -> bool:
        if not self.options.use_kernels or layer.weight_packed.device.type != "cuda" or self.quantize_activations():
            return False
        try:
            from ... import kernels
        except ImportError:
            return False
        return kernels.available(layer.weight_packed.device)

    def packed_weight(self, layer) -> torch.Tensor:
        """weight_packed in the checkpoint's layout (the planar repack is int32)."""
        if layer.weight_packed.dtype == torch.int32:
            from ... import kernels

            return kernels.unprepare_nvfp4(layer.weight_packed, self.spec.local_in_features)
        return layer.weight_packed

    def dequantize(self, layer):
        return dequant_nvfp4(self.packed_weight(layer), layer.weight_scale, layer.row_scale)

    def reference_forward(self, layer, x):
        if self.quantize_activations():
            x = fake_quant_nvfp4_activation(x, layer.input_scale)
        return invariance.linear(x, self.dequantize(layer).to(x.dtype), layer.bias)
