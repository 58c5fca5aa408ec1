"""`lowbit quantize`: an unquantized checkpoint -> a ModelOpt or compressed-tensors checkpoint.

Works one decoder layer at a time: read the layer's tensors, calibrate the layer when the scheme
stores static activation scales, quantize its Linears (rtn.py), hand the results to the shard
writer, drop the layer. Peak memory is about one layer of source weights, the calibration hidden
states, and the output shard being filled; a model larger than RAM quantizes.
"""
from __future__ import annotations

import fnmatch
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import __version__
from ..checkpoint import ST_DTYPES, TORCH_TO_ST, Checkpoint
from ..config import ModelConfig, parse_model_config
from ..errors import CheckpointError, ConfigError, LowbitError
from ..models import family
from ..models.slots import LinearSlot
from ..names import is_vision, to_canonical
from ..quant.formats import check_tensor, expected_tensors
from ..quant.scheme import Scheme
from . import rtn
from .calibrate import LayerwiseCalibrator, calibration_tokens
from .configs import ct_config, modelopt_configs
from .recipes import Preset, Recipe, parse_recipe
from .writer import ShardedWriter, copy_side_files, parse_size, prepare_output, write_json

FLOAT_DTYPES = ("BF16", "F16", "F32")
LAYER = re.compile(r"^model\.layers\.(\d+)\.")


@dataclass
class Module:
    """One Linear as stored in the source: a split shard (q_proj) or a fused-on-disk tensor (qkv_proj)."""

    name: str  # on-disk module name
    canonical: str
    slot: LinearSlot
    preset: Preset | None = None  # None: left unquantized
    scheme: Scheme | None = None

    @property
    def layer(self) -> int | None:
        return _layer_of(self.canonical)

    @property
    def share_key(self) -> tuple[str, str]:
        """Shards of one fused projection with the same preset share per-tensor scales."""
        split = self.canonical in self.slot.shards and len(self.slot.shards) > 1
        return (self.slot.fused_name if split else self.canonical, self.preset.name if self.preset else "")


@dataclass
class Summary:
    out: Path
    recipe: str
    fmt: str
    quantized: list[str]
    unquantized: list[str]
    shards: list[str]
    bytes_in: int
    bytes_out: int
    seconds: float
    calibration_tokens: int = 0
    side_files: list[str] = field(default_factory=list)


def quantize(src, out, scheme: str, fmt: str, *, lm_head: bool = False, exclude=(), calib=None,
             calib_samples: int = 64, calib_seq_len: int = 512, max_shard_size="5GB", device=None,
             force: bool = False, progress: bool = False) -> Summary:
    """Quantize the checkpoint folder `src` into `out` (see docs/quantize.md)."""
    start = time.perf_counter()
    src, out = Path(src), Path(out)
    ckpt = Checkpoint(src)
    if ckpt.config.get("quantization_config") or ckpt.text_config.get("quantization_config") or ckpt.hf_quant_config:
        raise ConfigError(f"{src} is already quantized (it has a quantization config); lowbit quantize needs an "
                          f"unquantized bf16/fp16/fp32 checkpoint")
    cfg = parse_model_config(ckpt.config, where=str(src / "config.json"))
    recipe = parse_recipe(scheme, fmt)
    disk = {to_canonical(n): n for n in ckpt.tensors if not is_vision(n)}
    modules = plan_modules(ckpt, cfg, disk, recipe, lm_head, list(exclude))
    quantized = [m for m in modules if m.scheme]
    if not quantized:
        raise ConfigError("nothing to quantize: every Linear module is excluded (check --exclude)")
    max_shard = parse_size(max_shard_size)
    calibrating = any(rtn.has_static_inputs(m.scheme) for m in quantized)
    tokens = calibration_tokens(src, calib, calib_samples, calib_seq_len) if calibrating else None
    from ..model import resolve_device  # noqa: PLC0415 (lowbit.model imports the loader)

    device = resolve_device(device)

    prepare_output(out, src, force)
    # the configs name the producer whose format this is; the shards record who actually wrote them
    writer = ShardedWriter(out, max_shard, {"quantized_by": f"lowbit {__version__} quantize --scheme {recipe.name} "
                                                           f"--format {fmt}"})
    _run(ckpt, cfg, disk, modules, writer, tokens, device, progress)
    ckpt.close()
    shards = writer.finish()
    _write_configs(ckpt, out, recipe, modules, disk)
    side = copy_side_files(src, out)
    return Summary(out, recipe.name, fmt, [m.name for m in quantized], [m.name for m in modules if not m.scheme],
                   shards, ckpt.total_bytes(), writer.total_bytes, time.perf_counter() - start,
                   0 if tokens is None else tokens.numel(), side)


def plan_modules(ckpt: Checkpoint, cfg: ModelConfig, disk: dict[str, str], recipe: Recipe, lm_head: bool,
                 exclude: list[str]) -> list[Module]:
    """Every Linear of the source with the preset it gets (None when excluded or an unquantized head)."""
    if lm_head and cfg.tie_word_embeddings:
        raise ConfigError("--lm-head: this model ties lm_head to the input embeddings (tie_word_embeddings), "
                          "so there is no separate head to quantize; drop --lm-head")
    modules, problems = [], []
    for slot in family(cfg).linear_slots(cfg):
        fused_on_disk = len(slot.shards) > 1 and f"{slot.fused_name}.weight" in disk
        for canonical in (slot.fused_name,) if fused_on_disk else slot.shards:
            info = ckpt.tensors.get(disk.get(f"{canonical}.weight", ""))
            if info is None:
                problems.append(f"{canonical}: no weight tensor in the source (expected {canonical}.weight)")
            elif info.dtype not in FLOAT_DTYPES:
                problems.append(f"{info.name}: {info.dtype} is not an unquantized weight (expected BF16, F16 "
                                f"or F32); lowbit quantize needs an unquantized source")
            else:
                modules.append(Module(info.name[: -len(".weight")], canonical, slot))
    if problems:
        raise CheckpointError(problems, header=f"{ckpt.path} cannot be quantized")
    excluded = _match_excludes(modules, exclude)
    for m in modules:
        if (m.canonical == "lm_head" and not lm_head) or m.canonical in excluded:
            continue
        m.preset = recipe.preset_for(m.canonical)
        m.scheme = recipe.scheme_for(m.canonical)
    _check_divisible(modules, {m.name: ckpt.tensors[f"{m.name}.weight"].shape[1] for m in modules})
    return modules


def _match_excludes(modules: list[Module], patterns: list[str]) -> set[str]:
    """Canonical names matched by --exclude shell globs (on-disk, canonical or fused-slot name)."""
    excluded = set()
    for pattern in patterns:
        hits = {m.canonical for m in modules
                if any(fnmatch.fnmatchcase(n, pattern) for n in (m.name, m.canonical, m.slot.fused_name))}
        if not hits:
            examples = ", ".join(m.name for m in modules[:3])
            raise ConfigError(f"--exclude {pattern!r} matches no Linear module; names look like {examples} "
                              f"(shell globs: 'model.layers.0.*', '*.down_proj')")
        excluded |= hits
    return excluded


def _check_divisible(modules: list[Module], k_of: dict[str, int]) -> None:
    """Group quantization needs in_features to be a multiple of the group size."""
    bad: dict[tuple[int, int, str], list[str]] = {}
    for m in modules:
        group = m.scheme.group_size if m.scheme and m.scheme.granularity == "group" else None
        if group and k_of[m.name] % group:
            bad.setdefault((k_of[m.name], group, m.scheme.weight_label()), []).append(m.name)
    if bad:
        (k, group, label), names = next(iter(bad.items()))
        more = f" and {len(names) - 2} more" if len(names) > 2 else ""
        raise ConfigError(f"{', '.join(names[:2])}{more}: in_features {k} is not a multiple of the {label} group "
                          f"size {group}; exclude them (--exclude PAT) or choose a group size that divides {k}")


def _layer_of(canonical: str) -> int | None:
    m = LAYER.match(canonical)
    return int(m.group(1)) if m else None


def _run(ckpt: Checkpoint, cfg: ModelConfig, disk: dict[str, str], modules: list[Module], writer: ShardedWriter,
         tokens: torch.Tensor | None, device: torch.device, progress: bool) -> None:
    """Quantize layer by layer; every source tensor ends up in the output exactly once."""
    from ..progress import iterate

    by_layer: dict[int | None, list[str]] = {}
    for canonical in disk:
        by_layer.setdefault(_layer_of(canonical), []).append(canonical)
    calibrator = None
    if tokens is not None:
        dtype = ST_DTYPES[ckpt.tensors[disk["model.embed_tokens.weight"]].dtype]
        calibrator = LayerwiseCalibrator(ckpt.path, tokens, lambda c: ckpt.read(disk[c]), device, dtype)
    units = [*range(cfg.num_layers), None]  # None: embedding, final norm, lm_head
    for unit in iterate(units, "quantize", unit="layers", enabled=progress,
                        label=lambda u: "embedding, norm, lm_head" if u is None else f"layer {u}"):
        tensors = {c: ckpt.read(disk[c]) for c in by_layer.get(unit, [])}
        mods = [m for m in modules if m.layer == unit]
        amax: dict[str, torch.Tensor] = {}
        if calibrator is not None:
            if unit is not None:
                amax = calibrator.layer(unit, tensors.__getitem__)
            elif any(m.scheme and rtn.has_static_inputs(m.scheme) for m in mods):
                amax = {"lm_head": calibrator.head_input_amax(tensors.__getitem__)}
        _emit(tensors, mods, amax, disk, writer, device)
    # tensors outside the text model (a VLM's vision tower) travel unchanged
    for name in ckpt.tensors:
        if is_vision(name):
            writer.add(name, ckpt.read(name))


def _emit(tensors: dict[str, torch.Tensor], modules: list[Module], amax: dict[str, torch.Tensor],
          disk: dict[str, str], writer: ShardedWriter, device: torch.device) -> None:
    """Write one unit's tensors: quantized Linears as their on-disk tensors, everything else as read."""
    group_amax: dict[tuple[str, str], torch.Tensor] = {}
    done = set()
    for m in modules:
        if m.scheme is None:
            continue
        group = [g for g in modules if g.share_key == m.share_key]
        if m.share_key not in group_amax:
            group_amax[m.share_key] = rtn.shared_amax([tensors[f"{g.canonical}.weight"].to(device) for g in group])
        w = tensors[f"{m.canonical}.weight"]
        out = rtn.encode(m.scheme, w.to(device), group_amax[m.share_key])
        if rtn.has_static_inputs(m.scheme):
            out |= rtn.activation_tensors(m.scheme, torch.stack([amax[g.canonical] for g in group]).amax())
        _self_check(m, out, tuple(w.shape))
        for role, t in out.items():
            writer.add(f"{m.name}.{role}", t)
        done.add(f"{m.canonical}.weight")
    for canonical, t in tensors.items():
        if canonical not in done:
            writer.add(disk[canonical], t)


def _self_check(m: Module, out: dict[str, torch.Tensor], shape: tuple[int, int]) -> None:
    """What was encoded must be what lowbit's own format table expects (a bug otherwise)."""
    spec = expected_tensors(m.scheme, shape[0], shape[1], bias=False)
    wrong = [f"{role}: {why}" for role, t in out.items()
             if (why := "unexpected" if role not in spec else check_tensor(spec[role], TORCH_TO_ST[t.dtype], t.shape))]
    wrong += [f"{role}: missing" for role, s in spec.items() if role not in out and not s.optional]
    if wrong:
        raise RuntimeError(f"lowbit quantize bug: {m.name} ({m.scheme.label()}) encodes {'; '.join(wrong)}")


def _write_configs(ckpt: Checkpoint, out: Path, recipe: Recipe, modules: list[Module], disk: dict[str, str]) -> None:
    config = dict(ckpt.config)
    unquantized = [m.name for m in modules if not m.scheme]
    if recipe.fmt == "modelopt":
        # ModelOpt also lists the (never quantized) embedding among the excluded modules
        embed = disk.get("model.embed_tokens.weight", "")[: -len(".weight")]
        flat, nested = modelopt_configs({m.name: m.preset for m in modules if m.scheme},
                                        unquantized + ([embed] if embed else []))
        config["quantization_config"] = flat
        write_json(out / "config.json", config, indent=4)
        write_json(out / "hf_quant_config.json", nested, indent=4)
    else:
        head = any(m.scheme and m.canonical == "lm_head" for m in modules)
        preset = next(m.preset for m in modules if m.scheme)
        config["quantization_config"] = ct_config(preset, head, unquantized)
        write_json(out / "config.json", config, sort_keys=True)
