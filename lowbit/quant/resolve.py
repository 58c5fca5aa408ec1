"""resolve(): decide every Linear-like module's scheme and assign every checkpoint tensor to its consumer.

One resolution serves `lowbit inspect` and the loader. It reads headers and JSON only. Steps:
  1. classify every tensor: a projection's, a model parameter, a KV-cache scale, vision, or unexplained;
  2. per on-disk module, the scheme the config gives it (match.decide), shard by shard for fused slots;
  3. cross-check against the tensors (formats.expected_tensors): every disagreement becomes a Problem,
     or, with trust_tensors, the scheme the tensors hold is used and the override is noted;
  4. config entries that name no module, KV-cache scales, missing parameters.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..checkpoint import Checkpoint, TensorInfo
from ..config import ModelConfig, parse_model_config
from ..models import family
from ..models.slots import ExpertSlot, LinearSlot
from ..names import is_vision, split_tensor_name
from .config import QuantConfig, parse_quant_config
from .base import TensorSpec
from .formats import FLOAT, check_tensor, expected_tensors, fmt_shape, mismatches
from .infer import infer_scheme
from .values import check_values
from .match import Decision, decide, is_exact, unmatched_entries
from .scheme import ST_FLOAT_NAMES, Scheme, unquantized


@dataclass
class LayerPlan:
    name: str  # canonical on-disk module name (a shard like ...q_proj, or ...qkv_proj stored fused)
    slot: str  # fused_name of the LinearSlot it belongs to
    shard: int | None  # index into slot.shards; None when stored fused on disk
    scheme: Scheme
    tensors: dict[str, str] = field(default_factory=dict)  # role -> on-disk tensor name
    notes: list[str] = field(default_factory=list)
    reason: str = ""  # which config entry (or override) gave it this scheme
    expert: int | None = None  # an expert of a stacked-experts slot (None: not an expert, or every expert)


@dataclass
class Problem:
    layer: str
    message: str
    trust_fixes: bool = False  # the config and the tensors disagree: trust_tensors resolves from the tensors

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
    producer: dict | None = None  # {"name", "version", "algo", "source"} of the quantization config
    quant_config: QuantConfig | None = None

    def slot_parts(self, slot: LinearSlot) -> list[list[LayerPlan]]:
        """How to build one slot: groups of on-disk modules that run as one QLinear each."""
        if slot.fused_name in self.layers and self.layers[slot.fused_name].shard is None:
            return [[self.layers[slot.fused_name]]]
        if isinstance(slot, ExpertSlot):  # one stack, whatever its experts hold (resolve refuses a mix)
            return [[lp for lp in self.layers.values() if lp.slot == slot.name]]
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
RULE_NAMES = {"exclude": "exclude/ignore list", "quantized_layers": "quantized_layers",
              "config_groups": "config_groups targets", "default": "quantization algorithm"}
# Spellings of KV-cache scales: self_attn.k_proj.k_scale (ModelOpt), self_attn.k_scale (compressed-tensors),
# self_attn.attn.k_scale (vLLM), self_attn.kv_scale (older exports: one scale for both); Nemotron-H's
# attention is its layer's `mixer`. Keys are `model.layers.N.self_attn.{k,v}_scale` whatever the spelling.
KV_MODULE = re.compile(r"^(model\.layers\.\d+)\.(?:self_attn|mixer)(?:\.k_proj|\.v_proj|\.attn)?$")


def module_index(slots: list[LinearSlot]) -> dict[str, tuple[LinearSlot, int | None]]:
    """canonical on-disk module name -> (slot, shard index or None for fused-on-disk)."""
    idx: dict[str, tuple[LinearSlot, int | None]] = {}
    for slot in slots:
        if isinstance(slot, ExpertSlot):
            continue
        if len(slot.shards) > 1:
            idx[slot.fused_name] = (slot, None)
        for i, s in enumerate(slot.shards):
            idx[s] = (slot, i if len(slot.shards) > 1 else None)
    return idx


def expected_params(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Canonical names and shapes of the model's non-linear parameters (as its family declares them)."""
    return family(cfg).expected_params(cfg)


def resolve(ckpt: Checkpoint, trust_tensors: bool = False, speculative: str | None = None) -> QuantPlan:
    """speculative='mtp': the family's MTP head is part of the model (its tensors resolved, not skipped)."""
    cfg = parse_model_config(ckpt.config, where=str(ckpt.path / "config.json"))
    if speculative is not None:
        enable_speculative(cfg, speculative, str(ckpt.path), ckpt.tensors)
    qc = parse_quant_config(ckpt.config, ckpt.hf_quant_config, str(ckpt.path))
    slots = family(cfg).linear_slots(cfg)
    plan = QuantPlan(model=cfg, slots=slots, layers={}, params={}, quant_config=qc)
    if qc is not None:
        plan.producer = {"name": qc.producer, "version": qc.version, "algo": qc.algo, "source": qc.source}
        plan.kv_cache = qc.kv_cache
        plan.notes += qc.notes
    r = _Resolver(ckpt, plan, qc, trust_tensors)
    on_disk = r.classify()
    for slot in slots:
        if isinstance(slot, ExpertSlot):
            r.resolve_experts(slot, on_disk)
        else:
            r.resolve_slot(slot, on_disk)
    r.check_kv_scales()
    r.check_params()
    r.check_config_names(on_disk)
    for layer, message in check_values(ckpt, plan):  # scale values: shared with the loader through plan.problems
        r.problem(layer, message)
    return plan


def enable_speculative(cfg: ModelConfig, method: str, where: str, tensors=None) -> None:
    """Turn on the drafting head `method` asks for (only 'mtp'), or refuse naming why."""
    from ..errors import LowbitError
    from ..speculative import Speculation

    Speculation(method)  # refuses an unknown method
    fam = family(cfg)
    fam.enable_mtp(cfg, where)
    if tensors is not None and not any(fam.sanitize(n).startswith("mtp.") for n in tensors):
        raise LowbitError(f"{where}: --speculative mtp: the config declares an MTP head but the checkpoint holds no "
                          f"mtp.* tensors (the exporter dropped them); run without --speculative, or use an export "
                          f"that keeps the MTP head")


def _label(scheme: Scheme) -> str:
    return scheme.label() if scheme.quantized else f"unquantized {scheme.weight}"


def _holding(infos: dict[str, TensorInfo]) -> str:
    return ", ".join(f"{role} {i.dtype} {fmt_shape(i.shape)}" for role, i in sorted(infos.items()))


class _Resolver:
    def __init__(self, ckpt: Checkpoint, plan: QuantPlan, qc: QuantConfig | None, trust: bool):
        self.ckpt, self.plan, self.qc, self.trust = ckpt, plan, qc, trust
        self.modules = module_index(plan.slots)
        self.family = family(plan.model)
        # stacked experts: per-expert on-disk module -> (slot, expert, shard); fused form by its tensor name
        self.experts: dict[str, tuple[ExpertSlot, int, int]] = {}
        self.fused_experts: dict[str, ExpertSlot] = {}
        for slot in plan.slots:
            if isinstance(slot, ExpertSlot):
                self.fused_experts[f"{slot.prefix}.{slot.fused}"] = slot
                for e in range(slot.num_experts):
                    for i, leaf in enumerate(slot.shards):
                        self.experts[f"{slot.prefix}.{e}.{leaf}"] = (slot, e, i)

    def problem(self, layer: str, message: str, trust_fixes: bool = False):
        self.plan.problems.append(Problem(layer, message, trust_fixes))

    # -- 1. classify every tensor ----------------------------------------------------------------
    def classify(self) -> dict[str, dict[str, TensorInfo]]:
        """Fill params/skipped/kv_scales; return the projections' tensors: module -> role -> info."""
        plan, cfg = self.plan, self.plan.model
        params = expected_params(cfg)
        on_disk: dict[str, dict[str, TensorInfo]] = {}
        tied_head: dict[str, TensorInfo] = {}
        for name, info in self.ckpt.tensors.items():
            if is_vision(name):
                plan.skipped[name] = "vision component (the text model does not use it)"
                continue
            why = self.family.skip(name, cfg)
            if why is not None:
                plan.skipped[name] = why
                continue
            canon = self.family.sanitize(name)
            leaf = next((lf for lf in SKIP_LEAVES if canon.endswith("." + lf)), None)
            if leaf:
                plan.skipped[name] = SKIP_LEAVES[leaf]
                continue
            module, role = split_tensor_name(canon)
            kv = KV_MODULE.match(module)
            if canon in self.fused_experts:  # transformers 5's fused experts: one tensor, every expert
                on_disk.setdefault(canon, {})["weight"] = info
            elif module in self.experts:
                on_disk.setdefault(module, {})[role] = info
            elif kv and role in KV_SCALE_LEAVES:
                self._kv_scale(kv.group(1), role, name)
            elif module in self.modules:
                on_disk.setdefault(module, {})[role] = info
            elif canon in params:
                plan.params[canon] = name
            elif module == "lm_head" and cfg.tie_word_embeddings:
                tied_head[role] = info
            else:
                self.problem(module or canon, f"unexplained tensor {name} ({info.dtype} {fmt_shape(info.shape)}): "
                             f"not a parameter of {cfg.architecture} ({cfg.num_layers} layers), not a scale of any "
                             f"projection, not a KV-cache scale, not a vision component. Likely cause: config.json "
                             f"describes a different model, or the exporter left it behind; remove it from the "
                             f"checkpoint or fix config.json")
        if tied_head:
            self._tied_head(tied_head)
        return on_disk

    def _kv_scale(self, layer: str, role: str, name: str):
        kinds = ("k_scale", "v_scale") if role == "kv_scale" else (role,)
        for kind in kinds:
            key = f"{layer}.self_attn.{kind}"
            if key in self.plan.kv_scales:
                self.problem(key, f"two KV-cache scale tensors: {self.plan.kv_scales[key]} and {name}; "
                                  f"remove one from the checkpoint")
            self.plan.kv_scales[key] = name

    def _tied_head(self, infos: dict[str, TensorInfo]):
        """A tied model uses the embedding as its head: a plain copy may be skipped, a quantized one contradicts."""
        w = infos.get("weight")
        if set(infos) == {"weight"} and w.dtype in ST_FLOAT_NAMES:
            self.plan.skipped[w.name] = ("duplicate of the tied embedding (tie_word_embeddings is true; the model "
                                         "uses model.embed_tokens.weight as its head)")
            return
        self.problem("lm_head", f"tie_word_embeddings is true but the file holds a quantized lm_head "
                                f"({_holding(infos)}): a contradictory checkpoint. If the head is a separate "
                                f"layer, set tie_word_embeddings to false in config.json; otherwise re-export "
                                f"without lm_head tensors")

    # -- 2 + 3. schemes and the cross-check --------------------------------------------------------
    def resolve_slot(self, slot: LinearSlot, on_disk: dict[str, dict[str, TensorInfo]]):
        fused, shards = slot.fused_name, slot.shards
        split = [s for s in shards if s in on_disk] if len(shards) > 1 else []
        if len(shards) > 1 and fused in on_disk:
            if split:
                self.problem(fused, f"stored both fused ({fused}.*) and split ({', '.join(split)}) on disk; "
                                    f"only one layout may be present: remove one set of tensors")
            self.module(fused, slot, None, on_disk[fused], self._fused_decision(slot))
            return
        missing = [s for s in shards if s not in on_disk]
        for s in missing:
            hint = ("; if the head shares the embedding, set tie_word_embeddings to true in config.json"
                    if s == "lm_head" else "")
            alt = f" (or {fused} stored fused)" if len(shards) > 1 else ""
            self.problem(s, f"no tensors for this projection{alt}; the checkpoint is incomplete: re-download or "
                                f"re-export it{hint}")
        for i, s in enumerate(shards):
            if s in on_disk:
                owner = fused if len(shards) > 1 else None
                self.module(s, slot, i if len(shards) > 1 else None, on_disk[s], decide(self.qc, s, owner))
        parts = self.plan.slot_parts(slot)
        if len(parts) > 1:
            desc = "; ".join(f"{'+'.join(p.name.rsplit('.', 1)[1] for p in g)}: {_label(g[0].scheme)}" for g in parts)
            self.plan.notes.append(f"{fused}: shards have different schemes ({desc}): runs unfused, "
                                   f"as {len(parts)} separate projections")

    def resolve_experts(self, slot: ExpertSlot, on_disk: dict[str, dict[str, TensorInfo]]):
        """Every expert of a stack, each on-disk module by its own name; all must share one scheme."""
        fused = f"{slot.prefix}.{slot.fused}"
        if fused in on_disk:
            info = on_disk[fused]["weight"]
            scheme = unquantized(ST_FLOAT_NAMES.get(info.dtype, "bf16"))
            want = (slot.num_experts, slot.out_features, slot.cols)
            bad = check_tensor(TensorSpec(FLOAT, want), info.dtype, info.shape)
            if bad:
                self.problem(fused, f"tensor {info.name}: {bad} (all {slot.num_experts} experts' {slot.fused} "
                                    f"stacked). Likely cause: config.json's expert count or sizes do not match")
            split = [m for m in on_disk if m.startswith(slot.prefix + ".") and m != fused
                     and self.experts.get(m, (None,))[0] is slot]
            if split:
                self.problem(fused, f"stored both fused ({info.name}) and per expert ({split[0]}, ...); remove one")
            self.plan.layers[fused] = LayerPlan(fused, slot.name, None, scheme, {"weight": info.name},
                                                reason="unquantized (transformers' fused experts)")
            return
        missing, plans = [], []
        for e in range(slot.num_experts):
            for i, leaf in enumerate(slot.shards):
                name = f"{slot.prefix}.{e}.{leaf}"
                if name not in on_disk:
                    missing.append(name)
                    continue
                d = decide(self.qc, name, f"{slot.prefix}.{e}.{slot.fused}" if len(slot.shards) > 1 else None)
                self.module(name, slot, i, on_disk[name], d, expert=e)
                plans.append(self.plan.layers[name])
        if missing:
            shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            self.problem(slot.name, f"no tensors for {len(missing)} expert projection(s) ({shown}) of "
                                    f"{slot.num_experts} experts; the checkpoint is incomplete, or num_experts in "
                                    f"config.json is wrong")
        schemes = {}
        for p in plans:
            schemes.setdefault(p.scheme, []).append(p.expert)
        if len(schemes) > 1:
            desc = "; ".join(f"{_label(s)}: experts {sorted(set(es))[:6]}" for s, es in schemes.items())
            self.problem(slot.name, f"the experts of this projection have different schemes ({desc}); a stacked "
                                    f"expert layer runs one scheme. Fix the config's exclude/targets so that every "
                                    f"expert of a layer gets the same scheme")

    def _fused_decision(self, slot: LinearSlot) -> Decision:
        """A module stored fused on disk: config entries may name it or its shards, but one tensor
        can only have one scheme."""
        whole = decide(self.qc, slot.fused_name)
        per_shard = [decide(self.qc, s, slot.fused_name) for s in slot.shards]
        schemes = {d.scheme for d in per_shard}
        if schemes == {whole.scheme}:
            return whole
        if len(schemes) == 1:
            return Decision(per_shard[0].scheme, f"{per_shard[0].reason}, which names the split projections "
                                                 f"of this fused-on-disk module", per_shard[0].rule)
        desc = "; ".join(f"{s.rsplit('.', 1)[1]}: {d.reason}" for s, d in zip(slot.shards, per_shard))
        self.problem(slot.fused_name, f"the config gives the split projections different schemes ({desc}), but "
                                      f"the file stores them fused as one tensor ({slot.fused_name}), which has a "
                                      f"single scheme. The config was written for a split layout (cf. vLLM #40252); "
                                      f"fix its entries to name {slot.fused_name}")
        return whole

    def module(self, name: str, slot: LinearSlot, shard: int | None, infos: dict[str, TensorInfo], d: Decision,
               expert: int | None = None):
        n = slot.shard_sizes[shard] if shard is not None else slot.out_features
        k = slot.in_features
        weight = infos.get("weight")
        scheme = d.scheme or unquantized(ST_FLOAT_NAMES.get(weight.dtype if weight else "", "bf16"))
        reason = d.reason
        expected = expected_tensors(scheme, n, k, slot.bias)
        issues = mismatches(name, expected, infos)
        if issues and d.alternative is not None:
            alt = expected_tensors(d.alternative, n, k, slot.bias)
            if not mismatches(name, alt, infos):
                self.plan.notes.append(f"{name}: {_label(d.alternative)} as the file holds it: "
                                       f"{d.alternative_reason}")
                scheme, reason, expected, issues = d.alternative, d.alternative_reason, alt, []
        if issues:
            found = infer_scheme(infos, n, k, slot.bias, self.qc.schemes() if self.qc else [])
            said = f"the config says {_label(scheme)} ({d.reason})"
            if found is not None and self.trust:
                self.plan.notes.append(f"{name}: override: {said}, the file holds {_label(found)}: using the tensors")
                scheme, reason = found, f"from the tensors (--trust-tensors; {d.reason})"
                expected, issues = expected_tensors(found, n, k, slot.bias), []
            elif found is not None:
                self.problem(name, f"{said}, but the file holds {_label(found)} ({_holding(infos)}). Likely cause: "
                                   f"the config's {RULE_NAMES[d.rule]} does not describe this export; fix the config, "
                                   f"or pass --trust-tensors to use what the file holds", trust_fixes=True)
            else:
                for msg in issues:
                    self.problem(name, f"{msg}; {said}. Likely cause: an incomplete or mixed-up export "
                                       f"(no known scheme fits these tensors: {_holding(infos)}): re-export the "
                                       f"checkpoint, or fix config.json if it describes another model")
        lp = LayerPlan(name, slot.fused_name, shard, scheme, reason=reason, expert=expert)
        for role, info in infos.items():
            spec = expected.get(role)
            if spec is not None and spec.optional:
                self.plan.skipped[info.name] = spec.note
                lp.notes.append(f"{info.name}: {spec.note}")
            elif spec is not None or issues:  # with problems, show every tensor (the loader refuses anyway)
                lp.tensors[role] = info.name
        if scheme.weight == "mxfp8":
            self.problem(name, "MXFP8 is recognized, but lowbit has no MXFP8 kernels yet; this checkpoint "
                               "cannot be loaded")
        self.plan.layers[name] = lp

    # -- 4. the rest ---------------------------------------------------------------------------------
    def check_kv_scales(self):
        plan = self.plan
        for key, name in sorted(plan.kv_scales.items()):
            layer = int(key.split(".")[2])
            if layer >= plan.model.num_layers:
                self.problem(key, f"KV-cache scale {name} is for layer {layer}, but the model has "
                                  f"{plan.model.num_layers} layers (num_hidden_layers in config.json): config.json "
                                  f"describes a different model, or the tensor does not belong; remove it or fix "
                                  f"the config")
        if plan.kv_cache == "fp8":
            for i in self.family.attention_layers(plan.model):
                for kind in ("k_scale", "v_scale"):
                    key = f"model.layers.{i}.self_attn.{kind}"
                    if key not in plan.kv_scales:
                        self.problem(key, f"missing: the config declares an FP8 KV cache but the file holds no "
                                          f"{kind} for layer {i} (looked for self_attn.{kind[0]}_proj.{kind}, "
                                          f"self_attn.{kind}, self_attn.kv_scale). Re-export with KV-cache "
                                          f"calibration, or drop kv_cache_quant_algo from the config")
        elif plan.kv_scales:
            plan.notes.append(f"{len(plan.kv_scales)} KV-cache scales on disk, but the config declares no quantized "
                              f"KV cache: they are not used")

    def check_params(self):
        """Embeddings and norms: present, floating point, the shape the model config implies."""
        arch = self.plan.model.architecture
        for canon, shape in expected_params(self.plan.model).items():
            name = self.plan.params.get(canon)
            if name is None:
                self.problem(canon.rsplit(".", 1)[0], f"missing tensor {canon} (a parameter of {arch}, expected "
                                                      f"{fmt_shape(shape)}); the checkpoint is incomplete: "
                                                      f"re-download or re-export it")
                continue
            info = self.ckpt.tensors[name]
            bad = check_tensor(TensorSpec(FLOAT, shape), info.dtype, info.shape)
            if bad:
                self.problem(canon.rsplit(".", 1)[0], f"tensor {name}: {bad} (a parameter of {arch}). Likely "
                                                      f"cause: config.json does not describe this checkpoint: "
                                                      f"fix it (or use the config of the model it was made from)")

    def check_config_names(self, on_disk: dict[str, dict[str, TensorInfo]]):
        """Config entries that name no module: the config was written for another naming (vLLM #54547)."""
        if self.qc is None:
            return
        known = set(self.modules) | {"lm_head"} | set(on_disk)
        known |= {p.rsplit(".", 1)[0] for p in expected_params(self.plan.model)}
        known |= {self.family.sanitize(split_tensor_name(n)[0]) for n in self.ckpt.tensors}
        for where, pattern in unmatched_entries(self.qc, known, self.family.sanitize):
            msg = (f"{where} entry {pattern!r} matches no module of this checkpoint; it was probably written for "
                   f"another module naming (e.g. a different VLM wrapper) and has no effect")
            if "\x00" in pattern:  # ModelOpt 0.47's Nemotron-H export leaves a name sentinel in (spec section 9)
                msg = (f"{where} entry {pattern!r} is corrupted (a NUL byte: ModelOpt 0.47 left its name sentinel "
                       f"in it) and matches no module of this checkpoint; it has no effect")
            if self.trust or not is_exact(pattern) or "\x00" in pattern:
                self.plan.notes.append(f"{self.qc.source}: {msg}")
            else:
                sample = next((t for lp in self.plan.layers.values() for t in lp.tensors.values()), "")
                self.problem(pattern, f"{msg}. Rewrite it with this checkpoint's names (for example "
                                      f"{split_tensor_name(sample)[0]}) or remove it")
