"""compressed-tensors pack-quantized integer weights (W4A16 / W8A16): int4 or int8 values packed
into int32 words, group or channel scales, symmetric or with zero points. Weight-only.

In memory: `weight_packed` int32 [N, ceil(K*b/32)] as on disk; `weight_scale` [N, ceil(K/g)]
(channel: [N, 1]) in the model dtype; `weight_zero_point` int8 of the scale's shape for asymmetric
schemes (packed along N on disk: unpacked at load, so fused shards simply stack). The true K comes
from `weight_shape`, which must agree with the model.
"""
from __future__ import annotations

from math import ceil

import torch

from ...errors import CheckpointError, ConfigError
from ...kernels import invariance
from ..numerics import dequant_int, unpack_int32
from . import register
from .common import TP_FIX, QuantMethod

BITS = {"int4": 4, "int8": 8}


@register(lambda s: s.weight in BITS and s.packed and s.activation == "none")
class PackedIntMethod(QuantMethod):
    def create_weights(self, layer):
        s, sch = self.spec, self.scheme
        self.bits = BITS[sch.weight]
        n, k = s.local_out_features, s.local_in_features
        if sch.granularity == "group" and sch.group_size:
            self.group = sch.group_size
        elif sch.granularity == "channel":
            self.group = None
        else:
            raise ConfigError(f"{s.name}: pack-quantized {sch.weight} with {sch.granularity} scales is not "
                              f"supported (supported: group, channel)")
        if s.parallel == "row" and s.tp_size > 1:
            self.require_multiple("in_features per rank", k, 32 // self.bits, TP_FIX)
            if self.group:
                self.require_multiple("in_features per rank", k, self.group, TP_FIX)
        groups = ceil(k / self.group) if self.group else 1
        self.new_param(layer, "weight_packed", (n, ceil(k * self.bits / 32)), torch.int32)
        self.new_param(layer, "weight_scale", (n, groups), self.dtype)
        if not sch.symmetric:
            self.new_param(layer, "weight_zero_point", (n, groups), torch.int8)

    def load_weight(self, layer, role, tensor, shard):
        rows = self.shard_rows(shard)
        k_col = 1 if self.group else None  # group scales split with K; channel scales are replicated
        if role == "weight_packed":
            self.put(layer, role, rows, self.tp_slice(tensor, 0, 1, shard=shard), role, shard,
                     dtype=torch.int32, disk_shape=tensor.shape)
        elif role == "weight_scale":
            self.put(layer, role, rows, self.tp_slice(tensor, 0, k_col, shard=shard), role, shard,
                     disk_shape=tensor.shape)
            return _rounding_note(tensor, self.dtype)
        elif role == "weight_zero_point" and not self.scheme.symmetric:
            self.require_dtype(tensor, torch.int32, role, shard)
            zp = unpack_int32(tensor, self.bits, self._disk_rows(shard), dim=0)
            self.put(layer, role, rows, self.tp_slice(zp, 0, k_col, shard=shard), role, shard,
                     disk_shape=tensor.shape)
        elif role == "weight_shape":
            self._check_shape(tensor, shard)
        else:
            return self.unexpected(role, shard)
        return None

    def _disk_rows(self, shard):
        return self.spec.out_features if shard is None else self.spec.shard_sizes[shard]

    def _check_shape(self, tensor, shard):
        expected = [self._disk_rows(shard), self.spec.in_features]
        found = [int(v) for v in tensor.reshape(-1).tolist()]
        if found != expected:
            raise CheckpointError([f"{self.where('weight_shape', shard)}: records the unpacked weight as {found}, "
                                   f"but the model needs {expected}; the checkpoint was packed for a different "
                                   f"shape (wrong config.json, or a truncated export)"])

    def finalize(self, layer):
        notes = super().finalize(layer)
        if self._use_planar(layer):
            # int4 on a GPU: repack once into the kernels' planar layout (same bytes, exact inverse);
            # the fast decode kernel reads it with fewer instructions per weight (docs/kernel-notes.md)
            from ... import kernels

            layer.weight_packed.data = kernels.prepare_int4(layer.weight_packed.data, self.spec.local_in_features)
            layer.weight_layout = "planar"
        return notes

    def _use_planar(self, layer) -> bool:
        if self.bits != 4 or not self.options.use_kernels or layer.weight_packed.device.type != "cuda":
            return False
        try:
            from ... import kernels
        except ImportError:
            return False
        return kernels.available(layer.weight_packed.device) and kernels.int_supported(4, self.group, planar=True)

    def packed_weight(self, layer) -> torch.Tensor:
        """weight_packed in the checkpoint's layout (undoing the planar repack when there was one)."""
        if getattr(layer, "weight_layout", None) == "planar":
            from ... import kernels

            return kernels.unprepare_int4(layer.weight_packed, self.spec.local_in_features)
        return layer.weight_packed

    def dequantize(self, layer):
        q = unpack_int32(self.packed_weight(layer), self.bits, self.spec.local_in_features)
        zp = getattr(layer, "weight_zero_point", None)
        return dequant_int(q, layer.weight_scale, zp, self.group)

    def reference_forward(self, layer, x):
        return invariance.linear(x, self.dequantize(layer).to(x.dtype), layer.bias)


def _rounding_note(scale: torch.Tensor, dtype: torch.dtype) -> str | None:
    """Scales are kept in the model dtype; say so when that changes any of them (bf16 -> fp16)."""
    changed = int((scale.to(dtype).to(scale.dtype) != scale).sum())
    if not changed:
        return None
    return (f"{changed} of {scale.numel()} weight scales ({scale.dtype}) rounded to the model dtype {dtype}; "
            f"load with dtype={str(scale.dtype).replace('torch.', '')} to keep them exact")
