"""Stacked experts: all E experts of one projection kind of a MoE layer as one module.

A MoE layer has two projection kinds, each an `ExpertLinear` of E stacked experts:
  gate_up  E x [2I, H]: shards gate_proj and up_proj fused along the rows (column-parallel);
  up       E x [I, H]: the non-gated first projection (Nemotron-H relu^2 experts; column-parallel);
  down     E x [H, I]: row-parallel.
`Experts` pairs the first projection with `down` and runs the whole expert MLP.

The per-scheme knowledge is the 2-D scheme units' (lowbit/quant/methods): an `ExpertLinear` holds one
`LinearMethod` for the shape of one expert and stacks that unit's parameters along a leading expert
dimension. Loading expert e hands the unit a view of slice e (`_ExpertView`), so the unit's own code
places each on-disk tensor (role tables, reciprocal global scales, zero-point unpacking, block scales,
tensor-parallel slicing of each shard) straight into the stack. Every expert keeps its own weight,
global and input scales (no collapse across experts); gate and up share their input, so their static
activation scales merge per expert as the 2-D unit merges fused shards (the larger, with a note).

Loading protocol (as lowbit/quant/base.py, plus the expert index):
  1. construction registers the stacked parameters, poisoned;
  2. `load(role, tensor, expert, shard)` once per on-disk tensor: `expert` the expert index, or None
     for a tensor covering every expert along its first dimension (transformers 5's fused bf16 form
     `mlp.experts.gate_up_proj` [E, 2I, H] / `mlp.experts.down_proj` [E, H, I], role "weight");
     `shard` the index in `shard_names` (gate_proj=0, up_proj=1), or None for a tensor holding every
     shard fused along its rows (the fused form);
  3. `finalize()` merges activation scales, refuses any slot left unwritten (naming the experts),
     and returns the notes for the load report (one line per distinct note, with its expert count).
`disk_tensors(rows, cols)` is what one expert's on-disk module holds; `fused_disk_tensors()` the
fused form (unquantized stacks only).
"""
from __future__ import annotations

import dataclasses
import re
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, ConfigError
from .base import LinearSpec, RunOptions, TensorSpec, fill_poison
from .formats import FLOAT
from .methods import method_class
from .scheme import Scheme

KINDS = {  # kind -> (on-disk shard names, tensor-parallel position)
    "gate_up": (("gate_proj", "up_proj"), "column"),
    "up": (("up_proj",), "column"),
    "down": (("down_proj",), "row"),
}
FUSED_NAMES = {"gate_up": "gate_up_proj", "up": "up_proj", "down": "down_proj"}  # transformers 5 fused form


def _gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


def _relu2(x):
    return torch.square(F.relu(x))


ACTIVATIONS = {"silu": F.silu, "gelu_tanh": _gelu_tanh, "gelu_pytorch_tanh": _gelu_tanh, "relu2": _relu2}


@dataclass(frozen=True)
class ExpertSpec:
    """Shapes of one stacked projection (global sizes, before tensor parallelism)."""

    name: str  # canonical in-memory name, e.g. model.layers.0.mlp.experts.gate_up_proj
    kind: str  # gate_up | up | down
    num_experts: int
    hidden: int  # H
    intermediate: int  # I (per expert)
    tp_rank: int = 0
    tp_size: int = 1

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown expert projection kind {self.kind!r}; known: {', '.join(KINDS)}")

    @property
    def shard_names(self) -> tuple[str, ...]:
        return KINDS[self.kind][0]

    @property
    def shard_shape(self) -> tuple[int, int]:
        """[rows, cols] of one on-disk shard of one expert (gate_proj / up_proj [I, H], down_proj [H, I])."""
        return (self.hidden, self.intermediate) if self.kind == "down" else (self.intermediate, self.hidden)

    def linear_spec(self) -> LinearSpec:
        """The 2-D spec of one expert (what the scheme unit sees)."""
        shards, parallel = KINDS[self.kind]
        if self.kind == "down":
            return LinearSpec(self.name, self.intermediate, (self.hidden,), False, parallel, self.tp_rank, self.tp_size)
        return LinearSpec(self.name, self.hidden, (self.intermediate,) * len(shards), False, parallel,
                          self.tp_rank, self.tp_size)


class _ExpertView:
    """Slice e of every stacked parameter, under the parameter's name: what a scheme unit reads and
    writes as its `layer`. Writes through `.data[...]` land in the stack."""

    bias = None

    def __init__(self, stack: "ExpertLinear", e: int):
        for name in stack.param_names:
            setattr(self, name, getattr(stack, name)[e])


class ExpertLinear(nn.Module):
    """E experts of one projection kind, stacked: parameters [E, *one expert's parameter shape]."""

    def __init__(self, scheme: Scheme, spec: ExpertSpec, dtype: torch.dtype, options: RunOptions | None = None):
        super().__init__()
        self.scheme, self.spec, self.dtype = scheme, spec, dtype
        self.options = options or RunOptions()
        self.method = method_class(scheme)(scheme, spec.linear_spec(), dtype, self.options)
        proto = nn.Module()
        with torch.device("meta"):  # learn the unit's parameters (names, shapes, dtypes) without memory
            self.method.create(proto)
        self.param_names = [n for n, _ in proto.named_parameters(recurse=False) if n != "bias"]
        for name, p in proto.named_parameters(recurse=False):
            if name == "bias":
                continue
            t = fill_poison(torch.empty((spec.num_experts, *p.shape), dtype=p.dtype))
            setattr(self, name, nn.Parameter(t, requires_grad=False))
        # static activation scales arrive once per expert and shard; merged per expert in finalize
        self._acts = {role: (name, transform, torch.full((spec.num_experts, len(spec.shard_names)), float("nan")))
                      for role, (name, transform) in self._act_roles().items()}
        self._notes: Counter = Counter()

    # ------------------------------------------------------------------ loading
    def disk_tensors(self, rows: int, cols: int) -> dict[str, TensorSpec]:
        """The tensors of one expert's on-disk module [rows, cols] (e.g. gate_proj [I, H]), by role."""
        return self.method.disk_tensors(rows, cols)

    def fused_disk_tensors(self) -> dict[str, TensorSpec]:
        """transformers 5's fused bf16 form of this stack: role "weight", covering every expert."""
        s = self.spec
        if self.scheme.quantized:
            raise ConfigError(f"{s.name}: a fused {FUSED_NAMES[s.kind]} tensor holds unquantized weights, but the "
                              f"experts are {self.scheme.label()}")
        rows, cols = s.shard_shape
        return {"weight": TensorSpec(FLOAT, (s.num_experts, rows * len(s.shard_names), cols))}

    def load(self, role: str, tensor: torch.Tensor, expert: int | None, shard: int | None) -> str | None:
        """Write one on-disk tensor (see the module docstring). Notes are gathered for finalize."""
        s = self.spec
        if shard is not None and not 0 <= shard < len(s.shard_names):
            raise CheckpointError([f"{s.name}: shard {shard} does not exist ({', '.join(s.shard_names)})"])
        if expert is None:
            if tensor.dim() == 0 or tensor.shape[0] != s.num_experts:
                raise CheckpointError([f"{self._where(None, shard)} {role}: a tensor for every expert must have "
                                       f"{s.num_experts} rows in its first dimension, found shape {list(tensor.shape)}"])
            for e in range(s.num_experts):
                self.load(role, tensor[e], e, shard)
            return None
        if not 0 <= expert < s.num_experts:
            raise CheckpointError([f"{self._where(expert, shard)} {role}: expert {expert} does not exist "
                                   f"(num_experts={s.num_experts}); the config's expert count does not match"])
        if role == "bias":
            raise CheckpointError([f"{self._where(expert, shard)} bias: biased experts are not supported"])
        if role in self._acts:
            _, transform, values = self._acts[role]
            value = transform(self.method.scalar(tensor, role, shard))
            values[expert, slice(None) if shard is None else shard] = value
            return None
        self.method.spec = dataclasses.replace(self.method.spec, name=self._where(expert, None))
        try:
            note = self.method.load(_ExpertView(self, expert), role, tensor, shard)
        finally:
            self.method.spec = dataclasses.replace(self.method.spec, name=s.name)
        if note:
            self._notes[note] += 1
        return None

    def finalize(self) -> list[str]:
        """Notes for the load report (the loader prefixes the stack's name, as for 2-D units)."""
        notes = self._merge_act_scales()
        problems = []
        for name in self.param_names:
            bad = _poisoned_experts(getattr(self, name))
            if bad:
                problems.append(f"{self.spec.name}.{name}: never written for expert(s) {_ranges(bad)} (the "
                                f"checkpoint lacks those experts' tensors, or they hold NaN)")
        if problems:
            raise CheckpointError(problems)
        if self.scheme.activation == "nvfp4" and self.options.activation_quant == "auto":
            from .methods.nvfp4 import WEIGHT_ONLY_NOTE

            notes.append(WEIGHT_ONLY_NOTE)
        notes += [f"{n} ({c} of {self.spec.num_experts} experts' tensors)" if c > 1 else n
                  for n, c in self._notes.items()]
        self._notes.clear()
        return notes

    def _act_roles(self):
        return self.method.act_roles() if hasattr(self.method, "act_roles") else {}

    def _merge_act_scales(self) -> list[str]:
        """Gate and up read the same input, so each expert's shards share one activation scale: the
        largest (no clipping), with a note naming the experts whose shards differed."""
        notes, pick = [], None
        for role, (name, _, values) in self._acts.items():
            missing = torch.isnan(values).any(dim=1).nonzero().flatten().tolist()
            if missing:
                raise CheckpointError([f"{self.spec.name} {role}: never written for expert(s) {_ranges(missing)}"])
        for role, (name, _, values) in self._acts.items():
            if pick is None:  # the first role picks the shard; a zero point follows its scale
                pick = values.argmax(dim=1)
                differ = (values != values[:, :1]).any(dim=1).nonzero().flatten().tolist()
                if differ:
                    notes.append(f"experts {_ranges(differ)} have different {role} for "
                                 f"{' and '.join(self.spec.shard_names)}; using the larger for their shared input")
            getattr(self, name).data.copy_(values.gather(1, pick[:, None])[:, 0])
        return notes

    # ------------------------------------------------------------------ reading
    def expert(self, e: int) -> _ExpertView:
        """Expert e's parameters as the scheme unit's `layer` (for its dequantize / reference)."""
        return _ExpertView(self, e)

    def dequantize(self, e: int) -> torch.Tensor:
        """float32 [N_local, K_local]: what expert e's stored weight means."""
        return self.method.dequantize(self.expert(e))

    def reference(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """Expert e's projection of x [T, K_local] -> [T, N_local], the scheme unit's reference
        (activation quantization included, as RunOptions.activation_quant says)."""
        run = getattr(self.method, "reference_forward", self.method.forward)  # unquantized: F.linear
        return run(self.expert(e), x)

    def _where(self, expert: int | None, shard: int | None) -> str:
        base = re.sub(r"\.[a-z_]+$", "", self.spec.name)  # ...mlp.experts
        e = "*" if expert is None else expert
        proj = FUSED_NAMES[self.spec.kind] if shard is None else self.spec.shard_names[shard]
        return f"{base}.{e}.{proj}"

    def extra_repr(self) -> str:
        s = self.spec
        n = s.intermediate * len(s.shard_names) if s.kind != "down" else s.hidden
        k = s.hidden if s.kind != "down" else s.intermediate
        return f"{s.num_experts} x [{n}, {k}] ({s.kind}, tp {s.tp_rank}/{s.tp_size}), {self.scheme.label()}"


class Experts(nn.Module):
    """The routed expert MLP of one layer: first projection (gate_up, or up for non-gated experts)
    -> act(gate) * up (or act(up)) -> down, each token's experts weighted and summed.

    Under tensor parallelism the intermediate dimension is split: the output is this rank's partial
    sum, which the MoE block all-reduces."""

    def __init__(self, first: ExpertLinear, down: ExpertLinear, activation: str = "silu"):
        super().__init__()
        if first.spec.kind not in ("gate_up", "up") or down.spec.kind != "down":
            raise ValueError("Experts(first, down): first must be a gate_up or up stack, down a down stack")
        if activation not in ACTIVATIONS:
            raise ConfigError(f"{first.spec.name}: expert activation {activation!r} is not supported "
                              f"(supported: {', '.join(ACTIVATIONS)})")
        if (first.spec.num_experts, first.spec.intermediate) != (down.spec.num_experts, down.spec.intermediate):
            raise ValueError("Experts: the two stacks disagree on num_experts / intermediate size")
        self.first, self.down, self.activation = first, down, activation
        self.gated = first.spec.kind == "gate_up"
        self.num_experts = first.spec.num_experts

    def finalize(self) -> list[str]:
        return self.first.finalize() + self.down.finalize()

    def act(self, h: torch.Tensor) -> torch.Tensor:
        """[.., 2I] -> act(gate) * up, or [.., I] -> act(up)."""
        fn = ACTIVATIONS[self.activation]
        if not self.gated:
            return fn(h)
        gate, up = h.chunk(2, dim=-1)
        return fn(gate) * up

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """x [T, H], topk_ids [T, k], topk_weights [T, k] -> [T, H] in x's dtype."""
        if self.first.options.use_kernels:
            try:
                from ..kernels import moe as moe_kernels
            except ImportError:  # pragma: no cover - no Triton
                moe_kernels = None
            y = moe_kernels.experts_forward(self, x, topk_ids, topk_weights) if moe_kernels else None
            if y is not None:
                return y
        return self.reference(x, topk_ids, topk_weights)

    def reference(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """Plain PyTorch, expert by expert in ascending order (as transformers' experts loop)."""
        out = torch.zeros_like(x)
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            return self._reference_capturable(x, topk_ids, topk_weights, out)
        for e in torch.unique(topk_ids).tolist():
            if not 0 <= e < self.num_experts:
                raise ValueError(f"{self.first.spec.name}: routed to expert {e}, but there are {self.num_experts}")
            tok, slot = torch.where(topk_ids == e)
            h = self.act(self.first.reference(x[tok], e))
            y = self.down.reference(h, e) * topk_weights[tok, slot, None]
            out.index_add_(0, tok, y.to(out.dtype))
        return out

    def _reference_capturable(self, x, topk_ids, topk_weights, out):
        """The reference without host syncs (inside a CUDA-graph capture, where the experts a batch
        routes to cannot be read back): every expert on every row, in the same ascending order, each
        row taking only the experts it was routed to. E times the work; only for models whose experts
        have no kernel on the GPU (e.g. float32)."""
        for e in range(self.num_experts):
            hit = topk_ids == e  # [T, k]
            w = (topk_weights * hit).sum(dim=1, keepdim=True)  # a row routes to an expert at most once
            y = self.down.reference(self.act(self.first.reference(x, e)), e) * w
            out += torch.where(hit.any(dim=1, keepdim=True), y, torch.zeros_like(y)).to(out.dtype)
        return out


def _poisoned_experts(p: torch.Tensor) -> list[int]:
    """Experts whose slice of a stacked parameter still holds the poison of fill_poison (floats:
    NaN; E4M3: its NaN code). Integer slots are checked by the loader's slot accounting."""
    if p.dtype == torch.float8_e4m3fn:
        bad = ((p.view(torch.uint8) & 0x7F) == 0x7F)
    elif p.is_floating_point():
        bad = torch.isnan(p)
    else:
        return []
    return bad.reshape(p.shape[0], -1).any(dim=1).nonzero().flatten().tolist()


def _ranges(ids: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    out, start = [], None
    for i, v in enumerate(ids):
        if start is None:
            start = v
        if i + 1 == len(ids) or ids[i + 1] != v + 1:
            out.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ", ".join(out)
