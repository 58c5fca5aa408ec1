"""FP8 (E4M3) weights: ModelOpt FP8 / FP8_PER_CHANNEL_PER_TOKEN / FP8_PB_WO and compressed-tensors
float-quantized (tensor, channel or block scales; static, dynamic per-token or no activation quant).

In memory: `weight` float8_e4m3fn [N, K] as on disk; `weight_scale` float32 per output row [N] for
tensor and channel scales (a per-tensor scale of each fused shard fills that shard's rows, so shards
with different scales fuse losslessly), or [ceil(N/r), ceil(K/c)] for r x c blocks; `input_scale`
float32 0-d for static activations.
"""
from __future__ import annotations

from math import ceil

import torch
import torch.nn.functional as F

from ...errors import ConfigError
from ...kernels import invariance
from ...parallel import whole_k_amax
from ..numerics import fake_quant_fp8_activation
from . import register
from .common import TP_FIX, QuantMethod


@register(lambda s: s.weight == "fp8" and s.activation in ("none", "fp8"))
class FP8Method(QuantMethod):
    def create_weights(self, layer):
        s, g = self.spec, self.scheme.granularity
        n, k = s.local_out_features, s.local_in_features
        self.new_param(layer, "weight", (n, k), torch.float8_e4m3fn)
        if g in ("tensor", "channel"):
            self.new_param(layer, "weight_scale", (n,), torch.float32)
        elif g == "block" and self.scheme.block:
            br, bc = self.scheme.block
            # a block row must not straddle two fused shards, nor a tensor-parallel cut
            column_tp = s.parallel == "column" and s.tp_size > 1
            for size in s.local_shard_sizes if column_tp else s.local_shard_sizes[:-1]:
                self.require_multiple("the rows of a fused shard (per rank)", size, br,
                                      TP_FIX if column_tp else "a block scale cannot cover two fused shards")
            if s.parallel == "row" and s.tp_size > 1:
                self.require_multiple("in_features per rank", k, bc, TP_FIX)
            self.new_param(layer, "weight_scale", (ceil(n / br), ceil(k / bc)), torch.float32)
        else:
            raise ConfigError(f"{s.name}: FP8 weights with {g} scales are not supported "
                              f"(supported: tensor, channel, block)")
        sch = self.scheme
        if sch.activation == "fp8" and sch.act_dynamic and sch.act_granularity == "group":
            # compressed-tensors FP8_BLOCK: 1 x c activation groups matching the weight blocks' columns
            if g != "block":
                raise ConfigError(f"{s.name}: dynamic FP8 activation groups need block weight scales "
                                  f"(found {g}); the group size is taken from the weight blocks")
            self.act_group = sch.block[1]
        elif sch.activation == "fp8" and sch.act_granularity not in ("token", "tensor"):
            raise ConfigError(f"{s.name}: FP8 activations per {sch.act_granularity} are not supported "
                              f"(supported: static per-tensor, dynamic per-token/tensor/group)")

    def load_weight(self, layer, role, tensor, shard):
        rows = self.shard_rows(shard)
        if role == "weight":
            self.put(layer, "weight", rows, self.tp_slice(tensor, 0, 1, shard=shard), role, shard,
                     dtype=torch.float8_e4m3fn, disk_shape=tensor.shape)
        elif role == "weight_scale":
            self._load_scale(layer, tensor, shard, rows)
        else:
            return self.unexpected(role, shard)
        return None

    def _load_scale(self, layer, tensor, shard, rows):
        g, disk = self.scheme.granularity, tensor.shape
        if g != "block":
            self.put_row_scale(layer, "weight_scale", "weight_scale", tensor, shard, per_tensor=g == "tensor")
            return
        br, _ = self.scheme.block
        if tensor.dim() == 4 and tensor.shape[1] == 1 and tensor.shape[3] == 1:
            tensor = tensor.reshape(tensor.shape[0], tensor.shape[2])  # ModelOpt [N/128, 1, K/128, 1]
        blocks = slice(rows.start // br, ceil(rows.stop / br))
        self.put(layer, "weight_scale", blocks, self.tp_slice(tensor.float(), 0, 1, shard=shard), "weight_scale",
                 shard, disk_shape=disk)

    def dequantize(self, layer):
        w, s = layer.weight.float(), layer.weight_scale
        if self.scheme.granularity != "block":
            return w * s[:, None]
        br, bc = self.scheme.block
        n, k = w.shape
        return w * s.repeat_interleave(br, 0)[:n].repeat_interleave(bc, 1)[:, :k]

    def reference_forward(self, layer, x):
        if self.quantize_activations():
            x = self.fake_quant_input(layer, x)
        return invariance.linear(x, self.dequantize(layer).to(x.dtype), layer.bias)

    def fake_quant_input(self, layer, x):
        """x quantized to FP8 and back, with the checkpoint's static scale or a dynamic one per token,
        per group of columns, or per tensor (each is the per-row rule applied to a reshaped x).
        Token and tensor amaxes span K, so a row-parallel rank takes them over every rank's slice;
        groups lie within one rank's slice (create_weights refuses a cut through a group)."""
        s = self.scheme
        if not s.act_dynamic:
            return fake_quant_fp8_activation(x, layer.input_scale)
        if s.act_granularity == "token":
            return fake_quant_fp8_activation(x, None, whole_k_amax(x, self.spec))
        if s.act_granularity == "group":  # a partial last group is padded with zeros (amax unchanged)
            k = x.shape[-1]
            xp = F.pad(x, (0, (-k) % self.act_group))
            return fake_quant_fp8_activation(xp.unflatten(-1, (-1, self.act_group)), None).flatten(-2)[..., :k]
        flat = x.reshape(1, -1)
        return fake_quant_fp8_activation(flat, None, whole_k_amax(flat, self.spec)).reshape(x.shape)
