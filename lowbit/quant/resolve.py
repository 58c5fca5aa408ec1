"""resolve(): decide every Linear-like module's scheme and assign every checkpoint tensor to its consumer.

One resolution serves `lowbit inspect` and the loader. It reads headers and JSON only.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..checkpoint import Checkpoint
from ..config import ModelConfig, parse_model_config
from ..models.layout import LinearSlot, linear_slots
from ..names import is_vision, split_tensor_name, to_canonical
from .scheme import ST_FLOAT_NAMES, Scheme, unquantized


@dataclass
class LayerPlan:
    name: str  # canonical on-disk module name (a shard like ...q_proj, or ...qkv_proj stored fused)
    slot: str  # fused_name of the LinearSlot it belongs to
    shard: int | None  # index into slot.shards; None when stored fused on disk
    scheme: Scheme
    tensors: dict[str, str] = field(default_factory=dict)  # role -> on-disk tensor name
    notes: list[str] = field(default_factory=list)


@dataclass
class Problem:
    layer: str
    message: str

    def __str__(self):
        return f"{self.layer}: {self.message}"


@dataclass
class QuantPlan:
    model: ModelConfig
    slots: list[LinearSlot]
    layers: dict[str, LayerPlan]  # canonical on-disk module name -> plan
    params: dict[str, str]  # canonical non-linear parameter name -> on-disk tensor name
    kv_cache: str | None = None  # None (model dtype) | 'fp8'
    kv_scales: dict[str, str] = field(default_factory=dict)  # 'model.layers.0.self_attn.k_scale' -> tensor
    skipped: dict[str, str] = field(default_factory=dict)  # on-disk tensor name -> reason
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    producer: dict | None = None

    def slot_parts(self, slot: LinearSlot) -> list[list[LayerPlan]]:
        """How to build one slot: groups of on-disk modules that run as one QLinear each."""
        if slot.fused_name in self.layers and self.layers[slot.fused_name].shard is None:
            return [[self.layers[slot.fused_name]]]
        plans = [self.layers[s] for s in slot.shards if s in self.layers]
        groups: list[list[LayerPlan]] = []
        for p in plans:
            if groups and groups[-1][-1].scheme == p.scheme:
                groups[-1].append(p)
            else:
                groups.append([p])
        return groups


SKIP_LEAVES = {"rotary_emb.inv_freq": "rotary frequencies are recomputed from the config"}
KV_SCALE_LEAVES = ("k_scale", "v_scale", "kv_scale")


def module_index(slots: list[LinearSlot]) -> dict[str, tuple[LinearSlot, int | None]]:
    """canonical on-disk module name -> (slot, shard index or None for fused-on-disk)."""
    idx: dict[str, tuple[LinearSlot, int | None]] = {}
    for slot in slots:
        if len(slot.shards) > 1:
            idx[slot.fused_name] = (slot, None)
        for i, s in enumerate(slot.shards):
            idx[s] = (slot, i if len(slot.shards) > 1 else None)
    return idx


def resolve(ckpt: Checkpoint, trust_tensors: bool = False) -> QuantPlan:
    cfg = parse_model_config(ckpt.config, where=str(ckpt.path / "config.json"))
    slots = linear_slots(cfg)
    modules = module_index(slots)
    plan = QuantPlan(model=cfg, slots=slots, layers={}, params={})
    qcfg = ckpt.config.get("quantization_config") or ckpt.text_config.get("quantization_config") or ckpt.hf_quant_config
    if qcfg:
        from ..errors import ConfigError

        raise ConfigError("quantized checkpoints are not supported yet")
    for name, info in ckpt.tensors.items():
        if is_vision(name):
            plan.skipped[name] = "vision component (the text model does not use it)"
            continue
        canon = to_canonical(name)
        if any(canon.endswith(leaf) for leaf in SKIP_LEAVES):
            plan.skipped[name] = next(r for leaf, r in SKIP_LEAVES.items() if canon.endswith(leaf))
            continue
        module, role = split_tensor_name(canon)
        if module in modules:
            slot, shard = modules[module]
            lp = plan.layers.get(module)
            if lp is None:
                scheme = unquantized(ST_FLOAT_NAMES.get(info.dtype, "bf16"))
                lp = plan.layers[module] = LayerPlan(module, slot.fused_name, shard, scheme)
            lp.tensors[role] = name
        else:
            plan.params[canon] = name
    return plan
