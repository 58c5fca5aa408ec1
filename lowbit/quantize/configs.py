"""The quantization config JSON a producer would write for the modules `lowbit quantize` quantized.

ModelOpt: `config.json["quantization_config"]` (flat form) plus `hf_quant_config.json` (nested
form), key for key as ModelOpt 0.47's `export_hf_checkpoint` writes them: one quant_algo and an
exclude list, or MIXED_PRECISION with `quantized_layers` when the modules use different algorithms.
compressed-tensors: the `quantization_config` llm-compressor 0.14 writes with `save_compressed=True`.

Names in these configs are the on-disk module names, exactly as in the tensors.
"""
from __future__ import annotations

from .recipes import Preset

# The producer releases whose output these configs (and the tensors, see rtn.py) reproduce.
MODELOPT_VERSION = "0.47.0"
CT_VERSION = "0.19.0"

# ModelOpt's own config_groups entries per algorithm (its convert_hf_quant_config_format).
_MO_FP8 = {"dynamic": False, "num_bits": 8, "type": "float"}
_MO_NVFP4 = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16}
MODELOPT_GROUPS = {
    "FP8": {"input_activations": _MO_FP8, "weights": _MO_FP8},
    "FP8_PER_CHANNEL_PER_TOKEN": {"input_activations": dict(_MO_FP8, dynamic=True), "weights": _MO_FP8},
    "NVFP4": {"input_activations": _MO_NVFP4, "weights": _MO_NVFP4},
    "W4A16_NVFP4": {"weights": _MO_NVFP4},
}
NVFP4_ALGOS = ("NVFP4", "W4A16_NVFP4")


def _layer_entry(algo: str) -> dict:
    return {"quant_algo": algo, "group_size": 16} if algo in NVFP4_ALGOS else {"quant_algo": algo}


def modelopt_configs(quantized: dict[str, Preset], excluded: list[str]) -> tuple[dict, dict]:
    """(config.json quantization_config, hf_quant_config.json) for ModelOpt.

    quantized: on-disk module name -> preset, in model order; excluded: modules ModelOpt lists
    as not quantized (unquantized Linears and the embedding)."""
    producer = {"name": "modelopt", "version": MODELOPT_VERSION}
    algos = list(dict.fromkeys(p.modelopt_algo for p in quantized.values()))
    if len(algos) == 1:
        algo = algos[0]
        groups = {"group_0": dict(MODELOPT_GROUPS[algo], targets=["Linear"])}
        flat = {"config_groups": groups, "ignore": sorted(excluded), "quant_algo": algo,
                "producer": producer, "quant_method": "modelopt"}
        nested = {"quant_algo": algo, "kv_cache_quant_algo": None}
        if algo in NVFP4_ALGOS:
            nested["group_size"] = 16
        nested["exclude_modules"] = sorted(excluded)
        return flat, {"producer": producer, "quantization": nested}
    layers = {name: _layer_entry(p.modelopt_algo) for name, p in quantized.items()}
    groups = {f"group_{i}": dict(MODELOPT_GROUPS[algo],
                                 targets=sorted(n for n, p in quantized.items() if p.modelopt_algo == algo))
              for i, algo in enumerate(algos)}
    # MIXED_PRECISION: a module absent from quantized_layers is unquantized, so nothing is excluded
    flat = {"config_groups": groups, "quantized_layers": layers, "ignore": [], "quant_algo": "MIXED_PRECISION",
            "producer": producer, "quant_method": "modelopt"}
    nested = {"quant_algo": "MIXED_PRECISION", "kv_cache_quant_algo": None, "quantized_layers": layers}
    return flat, {"producer": producer, "quantization": nested}


def ct_config(preset: Preset, lm_head_quantized: bool, ignore: list[str]) -> dict:
    """compressed-tensors quantization_config: one config group for every quantized Linear.

    The group targets the class "Linear" as llm-compressor does, plus an explicit "lm_head" when
    the head is quantized: lowbit (like vLLM) does not count the LM head as a "Linear" target, and
    transformers matches it either way."""
    targets = ["Linear"] + (["lm_head"] if lm_head_quantized else [])
    return {
        "config_groups": {"group_0": preset.ct_group(targets)},
        "format": preset.ct_format,
        "global_compression_ratio": None,
        "ignore": list(ignore),
        "kv_cache_scheme": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": CT_VERSION,
    }
