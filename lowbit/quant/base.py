"""The boundary between the loader/model and the scheme units.

A `QLinear` is a Linear-like module whose parameters and forward come from a `LinearMethod`, one
subclass per scheme family (lowbit/quant/methods/*.py). Models never branch on the scheme and
methods never branch on the model: a method only sees a `LinearSpec` (shapes, fused shards, tensor
parallel position) and the tensors the loader hands it.

Loading protocol (driven by lowbit/loader.py):
  1. `method.create(layer)`  registers parameters/buffers, poisoned (NaN for floats, a sentinel for
     ints) so that an unwritten slot can never pass for data.
  2. `method.load(layer, role, tensor, shard)` once per on-disk tensor: `role` is the on-disk leaf
     name (`weight`, `weight_scale`, `weight_packed`, ...); `shard` is the index of the fused
     shard it belongs to (q=0, k=1, v=2), or None when the tensor is stored fused on disk and covers
     every shard (Phi-3). Scalar scales arrive 0-d or [1]; accept both.
  3. `method.finalize(layer)` once all tensors are in: merge activation scales of fused shards,
     repack for kernels; returns notes for the load report.
The loader checks "every required (role, shard) slot written exactly once" from `disk_tensors`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .scheme import Scheme


@dataclass(frozen=True)
class LinearSpec:
    """Shapes of one in-memory Linear-like module (possibly several shards fused along N)."""

    name: str  # canonical in-memory name, e.g. model.layers.0.self_attn.qkv_proj
    in_features: int  # K (global, before tensor parallelism)
    shard_sizes: tuple[int, ...]  # output rows of each fused shard (global)
    bias: bool = False
    parallel: str | None = None  # 'column' | 'row' | None (tensor parallelism)
    tp_rank: int = 0
    tp_size: int = 1

    @property
    def out_features(self) -> int:
        return sum(self.shard_sizes)

    # Local (this rank's) sizes under tensor parallelism.
    @property
    def local_shard_sizes(self) -> tuple[int, ...]:
        if self.parallel == "column" and self.tp_size > 1:
            return tuple(s // self.tp_size for s in self.shard_sizes)
        return self.shard_sizes

    @property
    def local_in_features(self) -> int:
        if self.parallel == "row" and self.tp_size > 1:
            return self.in_features // self.tp_size
        return self.in_features

    @property
    def local_out_features(self) -> int:
        return sum(self.local_shard_sizes)

    def shard_offsets(self) -> list[int]:
        """Start row of each shard in the local fused output (plus the end)."""
        offs = [0]
        for s in self.local_shard_sizes:
            offs.append(offs[-1] + s)
        return offs


@dataclass(frozen=True)
class TensorSpec:
    """What one on-disk tensor of a module should look like (for the cross-check and for loading)."""

    dtype: str  # safetensors spelling (BF16, F8_E4M3, U8, I32, F32, ...); "float" = any of BF16/F16/F32
    shape: tuple[int, ...] | None  # None: scalar accepted as [] or [1]
    optional: bool = False  # e.g. a stray input_scale on a weight-only scheme
    note: str = ""


@dataclass
class RunOptions:
    """How to run what was loaded (not what is on disk)."""

    # NVFP4 W4A4 on GPUs without FP4 tensor cores: "weight-only" (default) or "emulate" (reproduce
    # the activation numerics exactly). "auto" = weight-only for nvfp4 activations, as the
    # checkpoint says for fp8/int8 activations.
    activation_quant: str = "auto"
    kv_cache: str = "auto"  # "auto" (as the checkpoint says) | "bf16" (keep a full-precision cache)
    use_kernels: bool = True  # fast Triton/cuBLAS paths when available; False: plain-PyTorch reference
    trust_tensors: bool = False  # resolve from the tensors when config and tensors disagree
    # rows computed independently of the batch on the GPU too (lowbit/kernels/invariance.py: the
    # switch is process-wide; a model built with it on turns it on)
    batch_invariant: bool = False
    notes: list[str] = field(default_factory=list)


def fill_poison(t: torch.Tensor) -> torch.Tensor:
    """Fill a fresh parameter with a value that cannot be mistaken for data."""
    if t.is_floating_point():
        if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            t.view(torch.uint8).fill_(0x7F)  # e4m3fn NaN
        else:
            t.fill_(float("nan"))
    elif t.dtype == torch.bool:
        t.fill_(False)
    else:
        t.fill_(-1 if t.dtype.is_signed else 0xFF if t.dtype == torch.uint8 else 0)
    return t


def scalar(t: torch.Tensor) -> torch.Tensor:
    """A per-tensor scale stored 0-d (ModelOpt) or [1] (compressed-tensors) -> 0-d float32."""
    if t.numel() != 1:
        raise ValueError(f"expected a per-tensor scale (0-d or [1]), got shape {list(t.shape)}")
    return t.reshape(()).float()


class LinearMethod:
    """Base class: one instance per QLinear. Subclasses implement one scheme family."""

    def __init__(self, scheme: Scheme, spec: LinearSpec, dtype: torch.dtype, options: RunOptions):
        self.scheme = scheme
        self.spec = spec
        self.dtype = dtype  # activation / output dtype
        self.options = options

    def disk_tensors(self, out_features: int, in_features: int) -> dict[str, TensorSpec]:
        """Tensors one on-disk module of shape [out_features, in_features] holds, by role."""
        raise NotImplementedError

    def create(self, layer: nn.Module) -> None:
        raise NotImplementedError

    def load(self, layer: nn.Module, role: str, tensor: torch.Tensor, shard: int | None) -> str | None:
        """Write one on-disk tensor. Return a note for the load report, or None."""
        raise NotImplementedError

    def finalize(self, layer: nn.Module) -> list[str]:
        return []

    def forward(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dequantize(self, layer: nn.Module) -> torch.Tensor:
        """float32 [N_local, K_local]: what the stored weight means (the reference for every kernel)."""
        raise NotImplementedError

    def weight_bytes(self, layer: nn.Module) -> int:
        return sum(t.numel() * t.element_size() for t in list(layer.parameters()) + list(layer.buffers()))

    # helpers for subclasses
    def shard_rows(self, shard: int | None) -> slice:
        """Rows of the local fused output that one shard (None: all) occupies."""
        if shard is None:
            return slice(0, self.spec.local_out_features)
        offs = self.spec.shard_offsets()
        return slice(offs[shard], offs[shard + 1])

    def tp_slice(self, tensor: torch.Tensor, row_dim: int | None, col_dim: int | None,
                 k_per_col: int = 1, shard: int | None = None) -> torch.Tensor:
        """This rank's part of an on-disk tensor. row_dim indexes output rows (column-parallel),
        col_dim indexes K (row-parallel) in units of k_per_col elements (e.g. 16 for block scales).
        For a fused-on-disk tensor (shard None) of a column-parallel layer, each shard is split
        separately so rank r gets [q_r; k_r; v_r]."""
        spec = self.spec
        if spec.tp_size == 1:
            return tensor
        r, n = spec.tp_rank, spec.tp_size
        if spec.parallel == "column" and row_dim is not None and tensor.dim() > 0 and tensor.shape[row_dim] > 1:
            sizes = spec.shard_sizes if shard is None else (spec.shard_sizes[shard],)
            total = tensor.shape[row_dim]
            scale = total / sum(sizes)  # rows of this tensor per output row (1, or 1/8 for packed zp)
            parts, start = [], 0
            for s in sizes:
                rows = int(s * scale)
                per = rows // n
                parts.append(tensor.narrow(row_dim, start + r * per, per))
                start += rows
            return torch.cat(parts, dim=row_dim) if len(parts) > 1 else parts[0]
        if spec.parallel == "row" and col_dim is not None and tensor.dim() > 0 and tensor.shape[col_dim] > 1:
            per = tensor.shape[col_dim] // n
            return tensor.narrow(col_dim, r * per, per)
        return tensor


class QLinear(nn.Module):
    """A Linear-like module whose parameters and forward belong to a LinearMethod."""

    def __init__(self, method: LinearMethod):
        super().__init__()
        self.method = method
        self.spec = method.spec
        method.create(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.forward(self, x)

    def extra_repr(self) -> str:
        s = self.spec
        return f"{s.local_in_features} -> {list(s.local_shard_sizes)}, {self.method.scheme.label()}"


class LinearGroup(nn.Module):
    """One logical projection (e.g. qkv) run as one fused QLinear, or as several when its shards
    have different schemes (lowbit rule, spec section 3); the output is always the fused output."""

    def __init__(self, parts: list[QLinear]):
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.parts) == 1:
            return self.parts[0](x)
        return torch.cat([p(x) for p in self.parts], dim=-1)
