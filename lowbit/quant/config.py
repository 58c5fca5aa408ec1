"""Quantization-config parsing (spec section 1): every location and form -> one normalized QuantConfig.

Locations: config.json `quantization_config` (also under `text_config`), and `hf_quant_config.json`
(ModelOpt's nested form). Forms: ModelOpt nested, ModelOpt flat (`quant_method: modelopt`), and
compressed-tensors. The producer-to-Scheme mapping is docs/schemes.md; nothing here looks at tensors.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ConfigError
from ..names import to_canonical
from .scheme import Scheme

MODELOPT_ALGOS = ("FP8", "FP8_PER_CHANNEL_PER_TOKEN", "FP8_PB_WO", "NVFP4", "W4A16_NVFP4", "MXFP8", "MIXED_PRECISION")
MODELOPT_KV_ALGOS = ("FP8",)
CT_FORMATS = ("nvfp4-pack-quantized", "pack-quantized", "int-quantized", "float-quantized", "naive-quantized")
CT_SCHEMES = "NVFP4, NVFP4A16, W4A16/W8A16 (pack-quantized int), W8A8 int (int-quantized), FP8 (float-quantized)"


def modelopt_scheme(algo: str, group_size=None, where: str = "quant_algo") -> Scheme:
    """A ModelOpt quant_algo (any case) -> Scheme, per docs/schemes.md."""
    algo = str(algo).upper()
    nvfp4 = dict(weight="nvfp4", granularity="group", group_size=16, fmt="modelopt", algo=algo)
    if algo in ("NVFP4", "W4A16_NVFP4") and group_size not in (None, 16):
        raise ConfigError(f"{where}: {algo} with group_size {group_size}; NVFP4 blocks are 16 elements "
                          f"(the config is malformed or from an unsupported producer version)")
    schemes = {
        "FP8": Scheme(weight="fp8", granularity="tensor", activation="fp8", act_granularity="tensor",
                      fmt="modelopt", algo=algo),
        "FP8_PER_CHANNEL_PER_TOKEN": Scheme(weight="fp8", granularity="channel", activation="fp8", act_dynamic=True,
                                            act_granularity="token", fmt="modelopt", algo=algo),
        "FP8_PB_WO": Scheme(weight="fp8", granularity="block", block=(128, 128), fmt="modelopt", algo=algo),
        "NVFP4": Scheme(**nvfp4, activation="nvfp4", act_granularity="group"),
        "W4A16_NVFP4": Scheme(**nvfp4),
        # MXFP8: parsed and reported, but no scheme unit runs it yet (the loader refuses it)
        "MXFP8": Scheme(weight="mxfp8", granularity="group", group_size=32, activation="mxfp8", act_dynamic=True,
                        act_granularity="group", fmt="modelopt", algo=algo),
    }
    if algo not in schemes:
        raise ConfigError(f"{where}: unsupported quant_algo {algo}; supported: {', '.join(MODELOPT_ALGOS)}")
    return schemes[algo]


@dataclass
class QuantGroup:
    """One compressed-tensors config group: the first group whose targets match a module wins."""

    name: str
    targets: list[str]
    scheme: Scheme


@dataclass
class QuantConfig:
    producer: str  # 'modelopt' | 'compressed-tensors'
    version: str | None
    algo: str | None  # ModelOpt quant_algo (upper case; None = weights not quantized), CT global format
    source: str  # where it was read from, for messages
    default: Scheme | None = None  # ModelOpt single-algo: applies to every Linear not excluded
    groups: list[QuantGroup] = field(default_factory=list)  # compressed-tensors config_groups, in order
    ignore: list[str] = field(default_factory=list)  # ModelOpt exclude_modules (globs) / CT ignore (re:)
    quantized_layers: dict[str, Scheme] | None = None  # ModelOpt MIXED_PRECISION, canonical name -> Scheme
    quantized_layer_keys: dict[str, str] = field(default_factory=dict)  # canonical -> key as written
    kv_cache: str | None = None  # None | 'fp8'
    notes: list[str] = field(default_factory=list)

    @property
    def ignore_key(self) -> str:
        return "exclude_modules" if self.producer == "modelopt" else "ignore"

    def schemes(self) -> list[Scheme]:
        """Every scheme this config mentions, most specific first (used to read the tensors' intent)."""
        out = list((self.quantized_layers or {}).values()) + [g.scheme for g in self.groups]
        if self.default:
            out.append(self.default)
        return list(dict.fromkeys(out))


# -- locating the config -------------------------------------------------------------------------

def parse_quant_config(config: dict, hf_quant_config: dict | None, where: str = "") -> QuantConfig | None:
    """The checkpoint's quantization config, or None when it is not quantized.

    `config` is the whole config.json; `where` the checkpoint folder (for messages)."""
    prefix = f"{where}/" if where else ""
    inline, inline_src = config.get("quantization_config"), "config.json quantization_config"
    text = config.get("text_config")
    if inline is None and isinstance(text, dict) and text.get("quantization_config") is not None:
        inline, inline_src = text["quantization_config"], "config.json text_config.quantization_config"
    parsed = None
    if inline is not None:
        if not isinstance(inline, dict):
            raise ConfigError(f"{prefix}{inline_src}: expected an object, found {type(inline).__name__}")
        parsed = _parse_any(inline, f"{prefix}{inline_src}")
    if hf_quant_config is None:
        return parsed
    side = _parse_any(hf_quant_config, f"{prefix}hf_quant_config.json")
    if parsed is None:
        return side
    _check_agree(parsed, side)
    parsed.notes.append(f"{side.source} agrees with {parsed.source}")
    return parsed


def _parse_any(qc: dict, src: str) -> QuantConfig:
    if isinstance(qc.get("quantization"), dict):
        return _parse_modelopt_nested(qc, src)
    method = str(qc.get("quant_method", "")).lower()
    if method == "modelopt":
        return _parse_modelopt_flat(qc, src)
    if method == "compressed-tensors":
        return _parse_ct(qc, src)
    if "quant_algo" in qc:  # flat ModelOpt without quant_method (old exports)
        return _parse_modelopt_flat(qc, src)
    raise ConfigError(f"{src}: unsupported quant_method {qc.get('quant_method')!r}; supported: modelopt "
                      f"(NVIDIA ModelOpt), compressed-tensors (llm-compressor)")


def _check_agree(a: QuantConfig, b: QuantConfig) -> None:
    """Both config.json and hf_quant_config.json present: they must describe the same quantization."""
    diffs = []
    if a.producer != b.producer:
        diffs.append(f"producer: {a.producer} vs {b.producer}")
    if a.algo != b.algo:
        diffs.append(f"quant_algo: {a.algo} vs {b.algo}")
    if {to_canonical(x) for x in a.ignore} != {to_canonical(x) for x in b.ignore}:
        diffs.append(f"exclude list: {sorted(a.ignore)} vs {sorted(b.ignore)}")
    if a.quantized_layers != b.quantized_layers:
        only = sorted(set(a.quantized_layers or {}) ^ set(b.quantized_layers or {}))
        other = sorted(k for k in set(a.quantized_layers or {}) & set(b.quantized_layers or {})
                       if a.quantized_layers[k] != b.quantized_layers[k])
        diffs.append(f"quantized_layers differ ({len(only)} listed in one file only, e.g. {(only or other)[:3]}; "
                     f"{len(other)} with a different algorithm)")
    if a.kv_cache != b.kv_cache:
        diffs.append(f"KV cache: {a.kv_cache or 'none'} vs {b.kv_cache or 'none'}")
    if diffs:
        raise ConfigError(f"{a.source} and {b.source} disagree: {'; '.join(diffs)}. One of them is stale; "
                          f"make them agree (or delete the stale file) before loading")


# -- ModelOpt ------------------------------------------------------------------------------------

def _str_list(value, src: str, key: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{src}: {key} must be a list of module names/patterns, found {value!r}")
    return list(value)


def _modelopt(src: str, producer: dict | None, algo, group_size, exclude, layers, kv: str | None) -> QuantConfig:
    version = producer.get("version") if isinstance(producer, dict) else None
    algo = str(algo).upper() if algo not in (None, "") else None
    if algo == "NONE":
        algo = None
    qc = QuantConfig("modelopt", version, algo, src, ignore=_str_list(exclude, src, "exclude_modules"), kv_cache=kv)
    if algo == "MIXED_PRECISION":
        if not isinstance(layers, dict):
            raise ConfigError(f"{src}: quant_algo MIXED_PRECISION needs a 'quantized_layers' object "
                              f"({{name: {{'quant_algo': ...}}}}), found {layers!r}")
        qc.quantized_layers = {}
        for name, entry in layers.items():
            if not isinstance(entry, dict) or "quant_algo" not in entry:
                raise ConfigError(f"{src}: quantized_layers[{name!r}] must be {{'quant_algo': ...}}, found {entry!r}")
            canon = to_canonical(name)
            qc.quantized_layers[canon] = modelopt_scheme(entry["quant_algo"], entry.get("group_size"),
                                                         f"{src}: quantized_layers[{name!r}]")
            qc.quantized_layer_keys[canon] = name
    elif algo is not None:
        qc.default = modelopt_scheme(algo, group_size, src)
    return qc


def _modelopt_kv(algo, src: str) -> str | None:
    if algo in (None, "", "NONE", "none"):
        return None
    if str(algo).upper() not in MODELOPT_KV_ALGOS:
        raise ConfigError(f"{src}: unsupported kv_cache_quant_algo {algo}; supported: {', '.join(MODELOPT_KV_ALGOS)}")
    return "fp8"


def _parse_modelopt_nested(qc: dict, src: str) -> QuantConfig:
    q = qc["quantization"]
    return _modelopt(src, qc.get("producer"), q.get("quant_algo"), q.get("group_size"), q.get("exclude_modules"),
                     q.get("quantized_layers"), _modelopt_kv(q.get("kv_cache_quant_algo"), src))


def _parse_modelopt_flat(qc: dict, src: str) -> QuantConfig:
    kv = qc.get("kv_cache_scheme")
    if kv is None and "kv_cache_quant_algo" in qc:
        kv_fmt = _modelopt_kv(qc["kv_cache_quant_algo"], src)
    else:
        kv_fmt = _kv_from_args(kv, src)
    exclude = qc.get("ignore", qc.get("exclude_modules"))
    return _modelopt(src, qc.get("producer"), qc.get("quant_algo"), qc.get("group_size"), exclude,
                     qc.get("quantized_layers"), kv_fmt)


def _kv_from_args(kv, src: str) -> str | None:
    """kv_cache_scheme ARGS ({"type": "float", "num_bits": 8, ...}) -> 'fp8' | None."""
    if kv is None:
        return None
    if not isinstance(kv, dict):
        raise ConfigError(f"{src}: kv_cache_scheme must be an object, found {kv!r}")
    if kv.get("type", "float") == "float" and kv.get("num_bits") == 8:
        return "fp8"
    raise ConfigError(f"{src}: unsupported kv_cache_scheme {kv.get('type')} {kv.get('num_bits')}-bit; "
                      f"supported: FP8 (type float, num_bits 8)")


# -- compressed-tensors --------------------------------------------------------------------------

def _parse_ct(qc: dict, src: str) -> QuantConfig:
    status = qc.get("quantization_status", "compressed")
    if status != "compressed":
        raise ConfigError(f"{src}: quantization_status {status!r}: the weights were saved uncompressed "
                          f"(fake-quantized); re-save the model with llm-compressor's save_compressed=True")
    for key in ("sparsity_config", "transform_config"):
        if qc.get(key):
            raise ConfigError(f"{src}: {key} is set ({sorted(qc[key])[:4]}); sparse and transformed "
                              f"compressed-tensors checkpoints are not supported; supported: {CT_SCHEMES}")
    fmt = qc.get("format")
    groups_cfg = qc.get("config_groups")
    if not isinstance(groups_cfg, dict) or not groups_cfg:
        raise ConfigError(f"{src}: compressed-tensors config without config_groups")
    out = QuantConfig("compressed-tensors", qc.get("version"), fmt, src,
                      ignore=_str_list(qc.get("ignore"), src, "ignore"),
                      kv_cache=_kv_from_args(qc.get("kv_cache_scheme"), f"{src} kv_cache_scheme"))
    for gname, g in groups_cfg.items():
        where = f"{src} config_groups.{gname}"
        if not isinstance(g, dict):
            raise ConfigError(f"{where}: expected an object, found {g!r}")
        targets = _str_list(g.get("targets"), where, "targets")
        if not targets:
            raise ConfigError(f"{where}: no targets")
        out.groups.append(QuantGroup(gname, targets, ct_scheme(g, fmt, where)))
    return out


def _infer_ct_format(w: dict, a: dict | None) -> str:
    """What llm-compressor writes for a group without an explicit format (global 'mixed-precision')."""
    if w.get("type") == "float" and w.get("num_bits") == 4:
        return "nvfp4-pack-quantized"
    if w.get("type") == "int" and w.get("num_bits") in (4, 8) and a is None:
        return "pack-quantized"
    return "int-quantized" if w.get("type") == "int" else "float-quantized"


def ct_scheme(group: dict, global_fmt: str | None, where: str) -> Scheme:
    """One compressed-tensors config group -> Scheme, per docs/schemes.md."""
    w, a = group.get("weights"), group.get("input_activations")
    if not isinstance(w, dict):
        raise ConfigError(f"{where}: no weights quantization args; supported: {CT_SCHEMES}")
    if a is not None and not isinstance(a, dict):
        raise ConfigError(f"{where}: input_activations must be an object or null, found {a!r}")
    if group.get("output_activations"):
        raise ConfigError(f"{where}: output_activations quantization is not supported; supported: {CT_SCHEMES}")
    fmt = group.get("format") or global_fmt
    if fmt in (None, "mixed-precision"):
        fmt = _infer_ct_format(w, a)
    if fmt not in CT_FORMATS:
        raise ConfigError(f"{where}: unsupported compressed-tensors format {fmt!r}; supported: "
                          f"{', '.join(CT_FORMATS)} ({CT_SCHEMES})")
    wtype, bits, strategy = w.get("type", "int"), w.get("num_bits"), w.get("strategy")
    group_size = w.get("group_size")
    if w.get("actorder") == "group":
        raise ConfigError(f"{where}: actorder 'group' (weight_g_idx reordering) is not supported; "
                          f"re-quantize with actorder 'weight' or none")
    if w.get("dynamic") not in (False, None):
        raise ConfigError(f"{where}: dynamic weight quantization is not a stored format")

    def unsupported() -> ConfigError:
        return ConfigError(f"{where}: unsupported weights {wtype} {bits}-bit strategy {strategy} in format {fmt}; "
                           f"supported: {CT_SCHEMES}")

    common = dict(fmt="compressed-tensors", symmetric=bool(w.get("symmetric", True)))
    if fmt == "nvfp4-pack-quantized":
        if (wtype, bits, strategy, group_size) != ("float", 4, "tensor_group", 16):
            raise unsupported()
        act = _ct_activation(a, where, nvfp4=True)
        return Scheme(weight="nvfp4", granularity="group", group_size=16, **act, **common)
    gran = _ct_granularity(w, where)
    if wtype == "int" and bits in (4, 8) and fmt == "pack-quantized":
        if gran[0] not in ("group", "channel"):
            raise unsupported()
        if a is not None:
            raise ConfigError(f"{where}: pack-quantized int weights with quantized activations (W4A8) are not "
                              f"supported; supported: {CT_SCHEMES}")
        return Scheme(weight=f"int{bits}", granularity=gran[0], group_size=gran[1], packed=True, **common)
    if wtype == "int" and bits == 8 and fmt in ("int-quantized", "naive-quantized"):
        if gran[0] not in ("channel", "tensor"):
            raise unsupported()
        return Scheme(weight="int8", granularity=gran[0], **_ct_activation(a, where, act_type="int"), **common)
    if wtype == "float" and bits == 8 and fmt in ("float-quantized", "naive-quantized"):
        if gran[0] not in ("channel", "tensor", "block"):
            raise unsupported()
        return Scheme(weight="fp8", granularity=gran[0], block=gran[2], **_ct_activation(a, where, act_type="float"),
                      **common)
    raise unsupported()


def _ct_granularity(w: dict, where: str) -> tuple[str, int | None, tuple[int, int] | None]:
    strategy = w.get("strategy") or ("group" if w.get("group_size") else "tensor")
    if strategy == "group":
        g = w.get("group_size")
        if not isinstance(g, int) or g <= 0:
            raise ConfigError(f"{where}: strategy 'group' needs a positive integer group_size, found {g!r}")
        return "group", g, None
    if strategy == "block":
        b = w.get("block_structure")
        if not (isinstance(b, list) and len(b) == 2 and all(isinstance(x, int) and x > 0 for x in b)):
            raise ConfigError(f"{where}: strategy 'block' needs block_structure [rows, cols], found {b!r}")
        return "block", None, (b[0], b[1])
    if strategy in ("tensor", "channel"):
        return strategy, None, None
    raise ConfigError(f"{where}: unsupported weight strategy {strategy!r}; supported: tensor, channel, group, "
                      f"block, tensor_group (NVFP4)")


def _ct_activation(a: dict | None, where: str, act_type: str | None = None, nvfp4: bool = False) -> dict:
    """input_activations ARGS -> the activation fields of a Scheme."""
    if a is None:
        return {}
    atype, bits, strategy, dynamic = a.get("type", "int"), a.get("num_bits"), a.get("strategy"), a.get("dynamic")
    if nvfp4:
        if (atype, bits, strategy) != ("float", 4, "tensor_group") or a.get("group_size", 16) != 16:
            raise ConfigError(f"{where}: NVFP4 weights with {atype} {bits}-bit {strategy} activations are not "
                              f"supported; supported activations: NVFP4 (tensor_group, 16) or none")
        # static global scale from the checkpoint, 16-element block scales computed at run time
        return dict(activation="nvfp4", act_granularity="group")
    if atype != act_type or bits != 8:
        raise ConfigError(f"{where}: {atype} {bits}-bit activations with {act_type} weights are not supported; "
                          f"supported: {CT_SCHEMES}")
    if strategy not in ("token", "tensor", "group"):
        raise ConfigError(f"{where}: unsupported activation strategy {strategy!r}; supported: token, tensor, group")
    is_dynamic = dynamic is True or dynamic == "local"
    if strategy == "token" and not is_dynamic:
        raise ConfigError(f"{where}: static per-token activation scales cannot be stored; expected dynamic: true")
    return dict(activation="fp8" if act_type == "float" else "int8", act_dynamic=is_dynamic,
                act_granularity=strategy, act_symmetric=bool(a.get("symmetric", True)))
