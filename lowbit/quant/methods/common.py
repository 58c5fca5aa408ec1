"""What the quantized scheme units (fp8, nvfp4, intpack, int8) share.

`QuantMethod` owns the parts of the loading protocol that do not depend on the weight format:
poisoned parameters, shape/dtype checks that name the tensor, the bias, the activation scales of
fused shards (one value per layer, spec section 5), the unwritten-slot check, the activation-quant
mode and the hook into lowbit.kernels. A subclass declares its weight parameters, loads its weight
roles and defines the plain-PyTorch reference forward and `dequantize`.
"""
from __future__ import annotations

import functools
import math

import torch
from torch import nn

from ...errors import CheckpointError, ConfigError
from ..base import LinearMethod, fill_poison
from ..formats import expected_tensors

ACTIVATION_QUANT_MODES = ("auto", "emulate", "weight-only")
TP_FIX = "use a tensor-parallel size that splits the layer into whole blocks"


def identity(v: torch.Tensor) -> torch.Tensor:
    return v


def reciprocal(v: torch.Tensor) -> torch.Tensor:
    """compressed-tensors stores global scales as divisors; lowbit keeps multipliers."""
    return 1.0 / v


class QuantMethod(LinearMethod):
    """Base class of the quantized units. Subclasses implement create_weights, load_weight,
    reference_forward and dequantize, and may override act_roles."""

    # ------------------------------------------------------------------ protocol
    def disk_tensors(self, out_features, in_features):
        return expected_tensors(self.scheme, out_features, in_features, self.spec.bias)

    def create(self, layer: nn.Module) -> None:
        if self.options.activation_quant not in ACTIVATION_QUANT_MODES:
            raise ConfigError(f"activation_quant={self.options.activation_quant!r}; "
                              f"use one of {', '.join(ACTIVATION_QUANT_MODES)}")
        s = self.spec
        if s.tp_size > 1 and s.parallel == "column":
            for size in s.shard_sizes:
                self.require_multiple("the rows of a shard", size, s.tp_size, "use a tensor-parallel size that "
                                      "divides every shard's rows (vocabulary, heads x head_dim, intermediate)")
        if s.tp_size > 1 and s.parallel == "row":
            self.require_multiple("in_features", s.in_features, s.tp_size, TP_FIX)
        self.create_weights(layer)
        layer.bias = self.new_param(layer, "bias", (s.local_out_features,), self.dtype) if s.bias else None
        # Activation scales arrive once per shard; they are merged into one value in finalize.
        self._act_shards = {}
        for role, (name, _) in self.act_roles().items():
            self.new_param(layer, name, (), torch.float32)
            self._act_shards[name] = torch.full((len(s.shard_sizes),), math.nan)

    def load(self, layer, role, tensor, shard):
        if role == "bias":
            return self._load_bias(layer, tensor, shard)
        acts = self.act_roles()
        if role in acts:
            name, transform = acts[role]
            value = transform(self.scalar(tensor, role, shard))
            self._act_shards[name][slice(None) if shard is None else shard] = value
            return None
        if role in ("input_scale", "input_global_scale", "input_zero_point"):
            return f"{role} ignored: {self.scheme.label()} does not quantize activations with a static scale"
        return self.load_weight(layer, role, tensor, shard)

    def finalize(self, layer) -> list[str]:
        notes = self._merge_act_scales(layer)
        unwritten = [name for name, p in layer.named_parameters(recurse=False) if _poisoned(p)]
        if unwritten:
            raise CheckpointError([f"{self.spec.name}.{n}: part of it was never written by the checkpoint "
                                   f"(a shard's tensor is missing) or it holds NaN" for n in unwritten])
        return notes

    def forward(self, layer, x):
        if self.options.use_kernels and x.is_cuda:
            fast = _kernel_entry()
            y = fast(self, layer, x) if fast is not None else None
            if y is not None:
                return y
        return self.reference_forward(layer, x)

    # ------------------------------------------------------------------ for subclasses
    def create_weights(self, layer: nn.Module) -> None:
        raise NotImplementedError

    def load_weight(self, layer, role: str, tensor: torch.Tensor, shard: int | None) -> str | None:
        raise NotImplementedError

    def reference_forward(self, layer, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def act_roles(self) -> dict[str, tuple[str, callable]]:
        """On-disk activation-scale role -> (in-memory parameter, value transform)."""
        s = self.scheme
        if s.activation == "none" or s.act_dynamic:
            return {}
        roles = {"input_scale": ("input_scale", identity)}
        if not s.act_symmetric:
            roles["input_zero_point"] = ("input_zero_point", identity)
        return roles

    def quantize_activations(self) -> bool:
        """Whether the forward quantizes x as the checkpoint says (RunOptions.activation_quant)."""
        mode = self.options.activation_quant
        if self.scheme.activation == "none" or mode == "weight-only":
            return False
        # auto: FP4 activations need FP4 tensor cores, so NVFP4 W4A4 runs weight-only by default
        return mode == "emulate" or self.scheme.activation != "nvfp4"

    def new_param(self, layer, name: str, shape: tuple, dtype: torch.dtype) -> nn.Parameter:
        p = nn.Parameter(fill_poison(torch.empty(shape, dtype=dtype)), requires_grad=False)
        setattr(layer, name, p)
        return p

    def where(self, role: str, shard: int | None) -> str:
        part = "" if shard is None else f" (shard {shard} of {len(self.spec.shard_sizes)})"
        return f"{self.spec.name}{part} {role}"

    def put(self, layer, name: str, index, value: torch.Tensor, role: str, shard: int | None,
            dtype: torch.dtype | None = None, disk_shape=None) -> None:
        """Write `value` into parameter `name`[index], refusing a shape or dtype that does not fit."""
        target = getattr(layer, name).data[index]
        found = list(disk_shape if disk_shape is not None else value.shape)
        if dtype is not None:
            self.require_dtype(value, dtype, role, shard)
        if tuple(value.shape) != tuple(target.shape):
            raise CheckpointError([f"{self.where(role, shard)}: shape {found} does not fit "
                                   f"{list(target.shape)} for {self.scheme.label()} (K={self.spec.in_features}, "
                                   f"rows {list(self.spec.shard_sizes)}); the config's scheme or group size "
                                   f"does not match the tensors"])
        target.copy_(value)

    def put_row_scale(self, layer, name: str, role: str, tensor: torch.Tensor, shard: int | None,
                      per_tensor: bool, transform=identity) -> None:
        """Fill the per-output-row float32 scale `name` from a per-tensor value (each shard's rows get
        its own: fused shards stay lossless) or from a per-channel vector ([N], or CT's [N, 1])."""
        rows = self.shard_rows(shard)
        if per_tensor:
            value = transform(self.scalar(tensor, role, shard))
            self.put(layer, name, rows, value.expand(rows.stop - rows.start), role, shard)
        else:
            t = tensor.squeeze(-1) if tensor.dim() == 2 and tensor.shape[1] == 1 else tensor
            self.put(layer, name, rows, self.tp_slice(t.float(), 0, None, shard=shard), role, shard,
                     disk_shape=tensor.shape)

    def require_dtype(self, tensor: torch.Tensor, dtype: torch.dtype, role: str, shard: int | None) -> None:
        if tensor.dtype != dtype:
            raise CheckpointError([f"{self.where(role, shard)}: expected dtype {dtype}, found {tensor.dtype} "
                                   f"{list(tensor.shape)}; the tensor does not hold {self.scheme.label()} data "
                                   f"(check that the quantization config matches the export)"])

    def scalar(self, tensor: torch.Tensor, role: str, shard: int | None) -> torch.Tensor:
        """A per-tensor value stored 0-d (ModelOpt) or [1] (compressed-tensors) -> 0-d float32."""
        if tensor.numel() != 1:
            raise CheckpointError([f"{self.where(role, shard)}: expected a per-tensor value ([] or [1]), "
                                   f"found shape {list(tensor.shape)}; the config's granularity does not "
                                   f"match the tensors"])
        return tensor.reshape(()).float()

    def require_multiple(self, what: str, size: int, unit: int, fix: str) -> None:
        """Refuse a layer whose `what` (`size` elements) is not made of whole `unit`s."""
        if size % unit:
            raise ConfigError(f"{self.spec.name}: {what} is {size}, not a multiple of {unit} "
                              f"({self.scheme.label()}); {fix}")

    def unexpected(self, role: str, shard: int | None):
        raise CheckpointError([f"{self.where(role, shard)}: unexpected tensor for {self.scheme.label()} "
                               f"(expected {', '.join(sorted(self.disk_tensors(1, 1)))})"])

    # ------------------------------------------------------------------ internals
    def _load_bias(self, layer, tensor, shard):
        t = tensor.to(self.dtype)
        if self.spec.parallel == "row" and self.spec.tp_rank != 0:
            t = torch.zeros_like(t)  # a row-parallel bias is added once, on rank 0
        self.put(layer, "bias", self.shard_rows(shard), self.tp_slice(t, 0, None, shard=shard), "bias", shard)
        return None

    def _merge_act_scales(self, layer) -> list[str]:
        """Fused shards quantize the same input, so they share one activation scale (spec section 5):
        equal values merge silently; different ones -> the largest (no clipping) and a note."""
        if not self._act_shards:
            return []
        scale_name = next(iter(self._act_shards))
        scales = self._act_shards[scale_name]
        for name, values in self._act_shards.items():
            if torch.isnan(values).any():
                missing = [i for i, v in enumerate(values.tolist()) if math.isnan(v)]
                role = next(r for r, (n, _) in self.act_roles().items() if n == name)
                raise CheckpointError([f"{self.where(role, None)}: never written for shard(s) {missing} "
                                       f"(the checkpoint lacks that shard's {role})"])
        pick = int(torch.argmax(scales))
        for name, values in self._act_shards.items():
            getattr(layer, name).data.fill_(float(values[pick]))
        notes = []
        if any((values != values[0]).any() for values in self._act_shards.values()):
            notes.append(f"fused shards have different activation scales {[f'{v:.6g}' for v in scales.tolist()]}; "
                         f"using shard {pick}'s ({float(scales[pick]):.6g}, the largest) for the shared input")
        self._act_shards = {}
        return notes


def _poisoned(p: torch.Tensor) -> bool:
    if p.dtype == torch.float8_e4m3fn:
        return bool(((p.view(torch.uint8) & 0x7F) == 0x7F).any())  # e4m3fn NaN (fill_poison's 0x7F)
    return p.is_floating_point() and bool(torch.isnan(p).any())


@functools.cache
def _kernel_entry():
    """lowbit.kernels.linear(method, layer, x) -> output or None (no fast path for this case)."""
    try:
        from ... import kernels
    except ImportError:
        return None
    return getattr(kernels, "linear", None)
