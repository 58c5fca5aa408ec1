"""Unquantized Linear (bf16/fp16/fp32 on disk): the weight is kept in the model's compute dtype."""
from __future__ import annotations

import torch
from torch import nn

from ...kernels import invariance
from ..base import LinearMethod, TensorSpec, fill_poison


class UnquantizedMethod(LinearMethod):
    def disk_tensors(self, out_features, in_features):
        t = {"weight": TensorSpec("float", (out_features, in_features))}
        if self.spec.bias:
            t["bias"] = TensorSpec("float", (out_features,))
        return t

    def create(self, layer):
        s = self.spec
        layer.weight = nn.Parameter(fill_poison(torch.empty(s.local_out_features, s.local_in_features, dtype=self.dtype)),
                                    requires_grad=False)
        if s.bias:
            layer.bias = nn.Parameter(fill_poison(torch.empty(s.local_out_features, dtype=self.dtype)), requires_grad=False)
        else:
            layer.bias = None

    def load(self, layer, role, tensor, shard):
        rows = self.shard_rows(shard)
        if role == "weight":
            layer.weight.data[rows] = self.tp_slice(tensor, 0, 1, shard=shard).to(self.dtype)
        elif role == "bias":
            # a row-parallel bias is added once, on rank 0 (the others hold zeros)
            t = tensor.to(self.dtype)
            if self.spec.parallel == "row" and self.spec.tp_rank != 0:
                t = torch.zeros_like(t)
            layer.bias.data[rows] = self.tp_slice(t, 0, None, shard=shard)
        else:
            raise KeyError(role)
        return None

    def forward(self, layer, x):
        return invariance.linear(x, layer.weight, layer.bias)

    def dequantize(self, layer):
        return layer.weight.float()
