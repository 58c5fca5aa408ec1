"""`--scheme` names -> what each Linear gets, in the producer's own config vocabulary.

A `Preset` is one way to quantize a Linear, spelled as ModelOpt writes it (`quant_algo`) and as
llm-compressor writes it (a compressed-tensors config group, every key as llm-compressor 0.14
serializes it). The `Scheme` of a module is *parsed back from that spelling* by lowbit's own config
parser, so what `lowbit quantize` writes and what lowbit reads cannot drift apart.

A `Recipe` assigns a preset to each role (attention projections, MLP projections, lm_head); only
ModelOpt MIXED_PRECISION gives the roles different presets.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import ConfigError
from ..quant.config import ct_scheme, modelopt_scheme
from ..quant.scheme import Scheme

FORMATS = ("modelopt", "compressed-tensors")
ROLES = ("attn", "mlp", "lm_head")
MIXED_DEFAULT = {"attn": "fp8", "mlp": "nvfp4"}
FP8_SCALE_DTYPE = "torch.float8_e4m3fn"


def _ct_args(num_bits: int, kind: str, strategy: str, *, group_size: int | None = None, symmetric: bool = True,
             dynamic: bool | str = False, observer: str | None = "memoryless_minmax",
             scale_dtype: str | None = None) -> dict:
    """compressed-tensors QuantizationArgs with every key llm-compressor serializes."""
    return {"actorder": None, "block_structure": None, "dynamic": dynamic, "group_size": group_size,
            "num_bits": num_bits, "observer": observer, "observer_kwargs": {}, "scale_dtype": scale_dtype,
            "strategy": strategy, "symmetric": symmetric, "type": kind, "zp_dtype": None}


@dataclass(frozen=True)
class Preset:
    name: str  # lowbit spelling, e.g. "w4a16-g64-asym"
    modelopt_algo: str | None  # None: ModelOpt has no such format
    ct_format: str | None  # compressed-tensors format; None: not expressible there
    ct_weights: dict | None = None
    ct_inputs: dict | None = None

    def ct_group(self, targets: list[str]) -> dict:
        return {"format": self.ct_format, "input_activations": self.ct_inputs, "output_activations": None,
                "targets": targets, "weights": self.ct_weights}

    def scheme(self, fmt: str) -> Scheme:
        if fmt == "modelopt":
            return modelopt_scheme(self.modelopt_algo)
        return ct_scheme(self.ct_group(["Linear"]), self.ct_format, where=f"preset {self.name}")

    def formats(self) -> list[str]:
        return [f for f, ok in (("modelopt", self.modelopt_algo), ("compressed-tensors", self.ct_format)) if ok]


_NVFP4_W = _ct_args(4, "float", "tensor_group", group_size=16, scale_dtype=FP8_SCALE_DTYPE)
FIXED_PRESETS = {
    # per-tensor static FP8 weights and activations (ModelOpt FP8, llm-compressor FP8)
    "fp8": Preset("fp8", "FP8", "float-quantized", _ct_args(8, "float", "tensor"),
                  _ct_args(8, "float", "tensor", observer="static_minmax")),
    # per-channel FP8 weights, dynamic per-token FP8 activations
    "fp8-dynamic": Preset("fp8-dynamic", "FP8_PER_CHANNEL_PER_TOKEN", "float-quantized",
                          _ct_args(8, "float", "channel"),
                          _ct_args(8, "float", "token", dynamic=True, observer=None)),
    "nvfp4": Preset("nvfp4", "NVFP4", "nvfp4-pack-quantized", _NVFP4_W,
                    _ct_args(4, "float", "tensor_group", group_size=16, dynamic="local", observer="static_minmax",
                             scale_dtype=FP8_SCALE_DTYPE)),
    "nvfp4a16": Preset("nvfp4a16", "W4A16_NVFP4", "nvfp4-pack-quantized", _NVFP4_W),
    # int8 per-channel weights, dynamic per-token int8 activations (llm-compressor W8A8)
    "w8a8": Preset("w8a8", None, "int-quantized", _ct_args(8, "int", "channel"),
                   _ct_args(8, "int", "token", dynamic=True, observer=None)),
}
# Producer preset spellings accepted as aliases (compared lower-case, '_' as '-').
ALIASES = {"fp8-per-channel-per-token": "fp8-dynamic", "w4a16-nvfp4": "nvfp4a16", "int8-w8a8": "w8a8",
           "mixed-precision": "mixed"}
INT_WEIGHT_ONLY = re.compile(r"^w(?P<bits>[48])a16(?:-(?:g(?P<group>\d+)|(?P<channel>channel)))?(?P<asym>-asym)?$")
SCHEME_HELP = ("fp8, fp8-dynamic, nvfp4, nvfp4a16, w4a16[-g32|-g64|-g128|-channel][-asym], "
               "w8a16[-g32|-g64|-g128|-channel][-asym], w8a8, mixed[:attn=P,mlp=P,lm_head=P]")


def _normalize(name: str) -> str:
    key = name.strip().lower().replace("_", "-")
    return ALIASES.get(key, key)


def preset(name: str) -> Preset:
    key = _normalize(name)
    if key in FIXED_PRESETS:
        return FIXED_PRESETS[key]
    m = INT_WEIGHT_ONLY.match(key)
    if not m:
        raise ConfigError(f"unknown --scheme {name!r}; known: {SCHEME_HELP}")
    bits = int(m["bits"])
    group = None if m["channel"] else int(m["group"] or 128)
    if group is not None and group <= 0:
        raise ConfigError(f"--scheme {name!r}: the group size must be positive")
    symmetric = not m["asym"]
    canonical = f"w{bits}a16" + ("-channel" if group is None else f"-g{group}") + ("" if symmetric else "-asym")
    weights = _ct_args(bits, "int", "channel" if group is None else "group", group_size=group, symmetric=symmetric)
    return Preset(canonical, None, "pack-quantized", weights)


@dataclass
class Recipe:
    name: str
    fmt: str
    presets: dict[str, Preset]  # role -> preset
    mixed: bool = False

    def preset_for(self, canonical: str) -> Preset:
        return self.presets[role_of(canonical)]

    def scheme_for(self, canonical: str) -> Scheme:
        return self.preset_for(canonical).scheme(self.fmt)


def role_of(canonical: str) -> str:
    if canonical == "lm_head":
        return "lm_head"
    return "attn" if ".self_attn." in canonical else "mlp"


def parse_recipe(scheme: str, fmt: str) -> Recipe:
    """`--scheme` + `--format` -> Recipe; every error names the accepted spellings."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown --format {fmt!r}; use one of: {', '.join(FORMATS)}")
    key = _normalize(scheme)
    if key == "mixed" or key.startswith("mixed:"):
        return _mixed(scheme, key, fmt)
    p = preset(scheme)
    if fmt not in p.formats():
        raise ConfigError(f"--scheme {p.name} cannot be written as {fmt}: it has no {fmt} spelling "
                          f"(use --format {p.formats()[0]})")
    return Recipe(p.name, fmt, {role: p for role in ROLES})


def _mixed(scheme: str, key: str, fmt: str) -> Recipe:
    """`mixed[:attn=P,mlp=P,lm_head=P]`: ModelOpt MIXED_PRECISION, default attention FP8 + MLP NVFP4;
    lm_head (with --lm-head) takes the MLP preset unless given."""
    if fmt != "modelopt":
        raise ConfigError(f"--scheme {scheme!r}: mixed precision is written as ModelOpt MIXED_PRECISION; "
                          f"use --format modelopt")
    chosen = dict(MIXED_DEFAULT)
    _, _, spec = key.partition(":")
    for item in filter(None, spec.split(",")):
        role, eq, value = item.partition("=")
        role = {"attention": "attn", "lm-head": "lm_head"}.get(role.strip(), role.strip())
        if not eq or role not in ROLES:
            raise ConfigError(f"--scheme {scheme!r}: expected mixed:attn=P,mlp=P[,lm_head=P], got {item!r}")
        chosen[role] = value.strip()
    chosen.setdefault("lm_head", chosen["mlp"])
    presets = {role: preset(name) for role, name in chosen.items()}
    for role, p in presets.items():
        if p.modelopt_algo not in ("FP8", "NVFP4", "W4A16_NVFP4"):
            raise ConfigError(f"--scheme {scheme!r}: {role}={p.name} is not available per layer in ModelOpt "
                              f"MIXED_PRECISION; use fp8, nvfp4 or nvfp4a16")
    name = "mixed:" + ",".join(f"{r}={presets[r].name}" for r in ROLES)
    return Recipe(name, fmt, presets, mixed=True)
