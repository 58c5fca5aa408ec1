"""Strict loading: build the model from a resolution and fill it from the checkpoint.

Rules (issue 2): every checkpoint tensor is consumed by exactly one parameter or skipped with a
reported reason; every parameter and scale slot is written exactly once (parameters start poisoned
and are verified after loading). All violations are collected and raised together.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from . import parallel
from .checkpoint import Checkpoint
from .errors import CheckpointError
from .models import family
from .models.slots import ExpertSlot
from .progress import Bar
from .quant.formats import check_tensor, mismatches
from .quant.base import LinearGroup, LinearSpec, QLinear, RunOptions, TensorSpec
from .quant.methods import method_class
from .quant.resolve import LayerPlan, QuantPlan



@dataclass
class LoadReport:
    skipped: dict[str, str] = field(default_factory=dict)  # on-disk tensor -> reason
    notes: list[str] = field(default_factory=list)
    tensors_read: int = 0
    bytes_read: int = 0
    seconds: float = 0.0


@dataclass
class Target:
    """Where one on-disk module's tensors go."""

    layer: QLinear
    shard: int | None  # shard index inside the QLinear, None = all (fused on disk)
    plan: LayerPlan
    disk_rows: int  # output rows of the on-disk module
    disk_sizes: tuple[int, ...]  # on-disk shard sizes of its slot (for KV-head replication)
    kv_factor: int = 1  # copies of each KV head this rank's layout needs (tp > num_kv_heads)

    def expected(self) -> dict[str, TensorSpec]:
        return self.layer.method.disk_tensors(self.disk_rows, self.layer.spec.in_features)

    def label(self) -> str:
        return self.layer.method.scheme.label()

    def write(self, role: str, tensor: torch.Tensor, cfg) -> str | None:
        """Hand one on-disk tensor to the scheme unit (after KV-head replication, if any)."""
        shard = self.plan.shard
        t = parallel.replicate_kv(tensor, role, shard, self.disk_sizes, cfg, self.kv_factor, self.plan.name)
        return self.layer.method.load(self.layer, role, t, self.shard)


@dataclass
class ExpertTarget:
    """Where one on-disk expert module's tensors go (expert None: the fused form, every expert)."""

    stack: nn.Module  # lowbit.quant.experts.ExpertLinear
    expert: int | None
    shard: int | None
    plan: LayerPlan

    def expected(self) -> dict[str, TensorSpec]:
        if self.expert is None:
            return self.stack.fused_disk_tensors()
        return self.stack.disk_tensors(*self.stack.spec.shard_shape)

    def label(self) -> str:
        return self.stack.scheme.label()

    def write(self, role: str, tensor: torch.Tensor, cfg) -> str | None:
        return self.stack.load(role, tensor, self.expert, self.shard)


def build_experts(slot: ExpertSlot, plan: QuantPlan, dtype, options: RunOptions, tp_rank: int, tp_size: int,
                  targets: dict) -> nn.Module:
    from .quant.experts import ExpertLinear, ExpertSpec

    parts = plan.slot_parts(slot)[0]
    spec = ExpertSpec(slot.name, slot.kind, slot.num_experts, slot.hidden, slot.intermediate, tp_rank, tp_size)
    stack = ExpertLinear(parts[0].scheme, spec, dtype, options)
    for p in parts:
        targets[p.name] = ExpertTarget(stack, p.expert, p.shard, p)
    return stack


def spec_sizes(slot, group: list[LayerPlan], tp_size: int) -> tuple[int, ...]:
    """The shard sizes of the QLinear that runs `group` (LayerPlans of one slot): the shards it holds;
    a one-module slot's tensor-parallel sections (slots.py) only under tensor parallelism (at tp=1
    the module is one block of rows, whatever its sections)."""
    if group[0].shard is not None:
        return tuple(slot.shard_sizes[p.shard] for p in group)
    if len(slot.shards) > 1 or tp_size > 1:
        return slot.shard_sizes
    return (slot.out_features,)


def build_linears(plan: QuantPlan, dtype, options: RunOptions, tp_rank=0, tp_size=1):
    """One LinearGroup per slot; returns (name -> group, on-disk module name -> Target)."""
    groups: dict[str, nn.Module] = {}
    targets: dict[str, Target] = {}
    missing: list[str] = []
    kv_factor = parallel.kv_replication(plan.model, tp_size)
    for disk_slot in plan.slots:
        if isinstance(disk_slot, ExpertSlot):
            if plan.slot_parts(disk_slot)[0]:
                groups[disk_slot.name] = build_experts(disk_slot, plan, dtype, options, tp_rank, tp_size, targets)
            else:
                missing.append(f"{disk_slot.name}: no expert tensors in the checkpoint")
            continue
        slot = parallel.tp_slot(disk_slot, plan.model, tp_size)
        parts = []
        fused_stored = slot.fused_name in plan.layers and plan.layers[slot.fused_name].shard is None
        absent = [s for s in slot.shards if s not in plan.layers]
        if not fused_stored and absent:
            alt = f" (or all of them fused as {slot.fused_name})" if len(slot.shards) > 1 else ""
            missing += [f"{s}: missing from the checkpoint (no {s}.* tensors){alt}" for s in absent]
            continue
        for group in plan.slot_parts(slot):
            whole = group[0].shard is None  # one on-disk module: fused on disk, or a one-module slot
            fused_on_disk = whole and len(slot.shards) > 1
            sizes = spec_sizes(slot, group, tp_size)
            name = slot.fused_name if len(group) == len(slot.shards) or fused_on_disk else \
                "+".join(p.name for p in group)
            spec = LinearSpec(name, slot.in_features, sizes, slot.bias, slot.parallel, tp_rank, tp_size)
            scheme = group[0].scheme
            layer = QLinear(method_class(scheme)(scheme, spec, dtype, options))
            parts.append(layer)
            for i, p in enumerate(group):
                rows = disk_slot.out_features if p.shard is None else disk_slot.shard_sizes[p.shard]
                targets[p.name] = Target(layer, None if whole else (i if len(sizes) > 1 else None), p,
                                         rows, disk_slot.shard_sizes, kv_factor if parallel.is_qkv(slot) else 1)
        groups[slot.fused_name] = LinearGroup(parts)
    if missing:
        raise CheckpointError(missing)
    return groups, targets


def build_model(plan: QuantPlan, device, dtype, options: RunOptions, tp_rank: int = 0, tp_size: int = 1):
    """The model with poisoned parameters: (model, linears, on-disk module -> Target, plain parameters)."""
    fam = family(plan.model)
    fam.check_tp(plan.model, tp_size)
    with torch.device(device):
        linears, targets = build_linears(plan, dtype, options, tp_rank, tp_size)
        model = fam.build(plan.model, linears, dtype, tp_size)
    linear_params = {id(p) for g in linears.values() for p in g.parameters()}
    plain = {n: p for n, p in model.named_parameters() if id(p) not in linear_params}
    return model, linears, targets, plain


def finish_loading(model: nn.Module, linears: dict, report: LoadReport, where) -> None:
    """Let every scheme unit finalize, then refuse any parameter that was not (fully) written."""
    for g in linears.values():
        if not hasattr(g, "parts"):  # a stack of experts
            report.notes += [f"{g.spec.name}: {n}" for n in g.finalize() or []]
            continue
        for part in g.parts:
            report.notes += [f"{part.spec.name}: {n}" for n in part.method.finalize(part) or []]
    poisoned = [n for n, p in model.named_parameters() if p.is_floating_point() and p.dtype.itemsize > 1
                and torch.isnan(p).any()]
    if poisoned:
        raise CheckpointError([f"{n}: not (fully) written by the checkpoint, or its data on disk holds NaN; "
                               f"re-download or re-export the checkpoint" for n in poisoned],
                              header=f"{where} does not load")


def load_model(ckpt: Checkpoint, plan: QuantPlan, device, dtype, options: RunOptions,
               tp_rank: int = 0, tp_size: int = 1, progress: bool = True):
    t0 = time.perf_counter()
    cfg = plan.model
    if plan.problems:  # what resolve() found (inspect shows the same list); with trust_tensors only what it cannot fix
        trust = any(p.trust_fixes for p in plan.problems)
        raise CheckpointError([str(p) for p in plan.problems],
                              header=f"{ckpt.path} does not load" + (" (where the config and the tensors disagree, "
                                     "trust_tensors=True / --trust-tensors resolves from the tensors)" if trust else ""))
    report = LoadReport(skipped=dict(plan.skipped), notes=list(plan.notes))
    model, linears, targets, plain = build_model(plan, device, dtype, options, tp_rank, tp_size)

    violations: list[str] = []
    written: set[tuple] = set()
    jobs: list[tuple[str, callable]] = []  # (on-disk name, writer)

    # projections: every role of every on-disk module, checked against the scheme's on-disk table
    for mod_name, target in targets.items():
        expected = target.expected()
        infos = {role: ckpt.tensors[name] for role, name in target.plan.tensors.items()}
        issues = mismatches(mod_name, expected, infos)
        violations += [f"{mod_name} ({target.label()}): {issue}" for issue in issues]
        if not issues:
            jobs += [(name, lambda t, tg=target, r=role: tg.write(r, t, cfg))
                     for role, name in target.plan.tensors.items()]

    for mod_name in plan.layers:
        if mod_name not in targets:
            violations.append(f"{mod_name}: stored both fused and split on disk; only one layout may be present")

    # embeddings, norms, q/k norms
    fam = family(cfg)
    shapes = fam.expected_params(cfg)
    for canon, tname in plan.params.items():
        p = plain.get(canon)
        info = ckpt.tensors[tname]
        if p is None:
            violations.append(f"{tname}: unexpected tensor (no parameter {canon} in {cfg.architecture})")
            continue
        written.add(canon)
        want_shape = shapes.get(canon, tuple(p.shape))  # the whole tensor; each rank keeps its part
        bad = check_tensor(TensorSpec("float", want_shape), info.dtype, info.shape)
        if bad:
            violations.append(f"{tname} ({canon}): {bad}")
            continue
        jobs.append((tname, lambda t, p=p, c=canon: write_param(fam, cfg, p, t, c, tp_rank, tp_size)))
    for canon in plain:
        if canon not in written:
            violations.append(f"{canon}: missing from the checkpoint (expected {list(plain[canon].shape)})")

    # FP8 KV-cache scales
    kv_fp8 = plan.kv_cache == "fp8" and options.kv_cache != "bf16"
    if plan.kv_cache == "fp8" and not kv_fp8:
        report.notes.append("FP8 KV cache in the checkpoint; kept in the compute dtype (kv_cache='bf16')")
    for idx, attn in model.attention_layers().items():
        for kind in ("k_scale", "v_scale"):
            key = f"model.layers.{idx}.self_attn.{kind}"
            tname = plan.kv_scales.get(key)
            if tname is None:
                if plan.kv_cache == "fp8":
                    violations.append(f"{key}: missing (the config declares an FP8 KV cache)")
                continue
            if not kv_fp8:
                report.skipped[tname] = "FP8 KV-cache scale unused: cache kept in the compute dtype"
                continue
            jobs.append((tname, lambda t, a=attn, k=kind: setattr(a, k, t.reshape(()).float().to(device))))

    if violations:
        raise CheckpointError(violations, header=f"{ckpt.path} does not load")

    total = sum(ckpt.tensors[n].nbytes for n, _ in jobs)
    bar = Bar(total, f"loading {ckpt.path.name}", scale_bytes=True, enabled=progress and total > 256 * 2**20)
    for tname, write in jobs:
        t = ckpt.read(tname)
        note = write(t)
        if note:
            report.notes.append(f"{tname}: {note}")
        report.tensors_read += 1
        report.bytes_read += ckpt.tensors[tname].nbytes
        bar.update(ckpt.tensors[tname].nbytes)
    bar.close()

    finish_loading(model, linears, report, ckpt.path)
    report.seconds = time.perf_counter() - t0
    return model, report


def write_param(fam, cfg, p: torch.Tensor, t: torch.Tensor, canon: str, tp_rank: int, tp_size: int):
    """Copy this rank's part (`Family.param_shard`) of the whole on-disk plain parameter t into p."""
    t = fam.param_shard(cfg, canon, t, tp_rank, tp_size)
    if tuple(t.shape) != tuple(p.shape):
        raise CheckpointError([f"{canon}: rank {tp_rank} of tp={tp_size} gets a slice of shape {list(t.shape)}, "
                               f"but the parameter has shape {list(p.shape)}"], header=f"{cfg.architecture}")
    p.data.copy_(t.to(p.dtype))
    return None
