"""Quantization-config parsing (spec section 1, docs/schemes.md): every location and form, exact Scheme values,
the both-files-disagree check and the unsupported-config errors."""
from __future__ import annotations

import pytest

from lowbit.errors import ConfigError
from lowbit.quant.config import MODELOPT_ALGOS, parse_quant_config
from lowbit.quant.scheme import Scheme

CT = "compressed-tensors"
NVFP4_W4A4 = dict(weight="nvfp4", granularity="group", group_size=16, activation="nvfp4", act_granularity="group")
NVFP4_A16 = dict(weight="nvfp4", granularity="group", group_size=16)

# docs/schemes.md, written out
MODELOPT_TABLE = {
    "FP8": Scheme(weight="fp8", granularity="tensor", activation="fp8", act_granularity="tensor", fmt="modelopt",
                  algo="FP8"),
    "FP8_PER_CHANNEL_PER_TOKEN": Scheme(weight="fp8", granularity="channel", activation="fp8", act_dynamic=True,
                                        act_granularity="token", fmt="modelopt", algo="FP8_PER_CHANNEL_PER_TOKEN"),
    "FP8_PB_WO": Scheme(weight="fp8", granularity="block", block=(128, 128), fmt="modelopt", algo="FP8_PB_WO"),
    "NVFP4": Scheme(**NVFP4_W4A4, fmt="modelopt", algo="NVFP4"),
    "W4A16_NVFP4": Scheme(**NVFP4_A16, fmt="modelopt", algo="W4A16_NVFP4"),
    "MXFP8": Scheme(weight="mxfp8", granularity="group", group_size=32, activation="mxfp8", act_dynamic=True,
                    act_granularity="group", fmt="modelopt", algo="MXFP8"),
}


def nested(algo, **quant):
    return {"producer": {"name": "modelopt", "version": "0.47.0"}, "quantization": {"quant_algo": algo, **quant}}


def flat(algo, **kw):
    return {"quant_method": "modelopt", "quant_algo": algo, "producer": {"name": "modelopt", "version": "0.47.0"}, **kw}


def args(type_, bits, strategy, **kw):
    return {"num_bits": bits, "type": type_, "strategy": strategy, "symmetric": True, "dynamic": False, **kw}


def ct(weights, acts=None, fmt="float-quantized", targets=("Linear",), ignore=("lm_head",), **kw):
    return {"quant_method": CT, "format": fmt, "quantization_status": "compressed", "ignore": list(ignore),
            "config_groups": {"group_0": {"targets": list(targets), "weights": weights, "input_activations": acts}},
            "version": "0.19.0", **kw}


def parse(qc=None, hf=None, **top):
    config = dict(top)
    if qc is not None:
        config["quantization_config"] = qc
    return parse_quant_config(config, hf, "ckpt")


# -- locations and forms -------------------------------------------------------------------------------

def test_no_config_means_unquantized():
    assert parse() is None


@pytest.mark.parametrize("algo", sorted(MODELOPT_TABLE))
def test_modelopt_nested_form_maps_to_the_scheme_table(algo):
    qc = parse(hf=nested(algo, exclude_modules=["lm_head"]))
    assert qc.producer == "modelopt" and qc.version == "0.47.0" and qc.algo == algo
    assert qc.default == MODELOPT_TABLE[algo]
    assert qc.ignore == ["lm_head"] and qc.source == "ckpt/hf_quant_config.json"


@pytest.mark.parametrize("algo", sorted(MODELOPT_TABLE))
def test_modelopt_flat_form(algo):
    qc = parse(flat(algo, ignore=["lm_head", "model.embed_tokens"]))
    assert qc.default == MODELOPT_TABLE[algo] and qc.ignore == ["lm_head", "model.embed_tokens"]
    assert qc.source == "ckpt/config.json quantization_config"


def test_algorithm_names_are_upper_cased_before_comparing():
    assert parse(flat("nvfp4")).default == MODELOPT_TABLE["NVFP4"]
    assert parse(hf=nested("w4a16_nvfp4")).default == MODELOPT_TABLE["W4A16_NVFP4"]


@pytest.mark.parametrize("algo", ["W4A8_AWQ", "nvfp4_awq", "W4A16_AWQ", "W8A8_SQ", "INT8"])
def test_unsupported_modelopt_algo_lists_what_is_supported(algo):
    with pytest.raises(ConfigError) as e:
        parse(hf=nested(algo))
    msg = str(e.value)
    assert f"unsupported quant_algo {algo.upper()}" in msg
    assert all(a in msg for a in MODELOPT_ALGOS) and "hf_quant_config.json" in msg


def test_nvfp4_with_a_foreign_group_size_is_refused():
    with pytest.raises(ConfigError, match="group_size 32"):
        parse(hf=nested("NVFP4", group_size=32))


def test_vlm_config_under_text_config():
    qc = parse(text_config={"quantization_config": flat("FP8")})
    assert qc.default == MODELOPT_TABLE["FP8"] and "text_config.quantization_config" in qc.source


def test_modelopt_weights_unquantized_kv_only():
    qc = parse(hf=nested(None, kv_cache_quant_algo="FP8"))
    assert qc.default is None and qc.kv_cache == "fp8"


def test_mixed_precision_quantized_layers_per_layer_schemes_in_canonical_names():
    layers = {"model.language_model.layers.0.self_attn.q_proj": {"quant_algo": "FP8"},
              "language_model.model.layers.0.mlp.up_proj": {"quant_algo": "NVFP4", "group_size": 16},
              "language_model.lm_head": {"quant_algo": "w4a16_nvfp4"}}
    qc = parse(hf=nested("MIXED_PRECISION", quantized_layers=layers))
    assert qc.default is None
    assert qc.quantized_layers == {"model.layers.0.self_attn.q_proj": MODELOPT_TABLE["FP8"],
                                   "model.layers.0.mlp.up_proj": MODELOPT_TABLE["NVFP4"],
                                   "lm_head": MODELOPT_TABLE["W4A16_NVFP4"]}
    assert qc.quantized_layer_keys["lm_head"] == "language_model.lm_head"  # as written, for messages


def test_mixed_precision_errors_name_the_layer():
    with pytest.raises(ConfigError, match=r"quantized_layers\['model.layers.3.mlp.down_proj'\].*W4A8_AWQ"):
        parse(hf=nested("MIXED_PRECISION", quantized_layers={"model.layers.3.mlp.down_proj": {"quant_algo": "W4A8_AWQ"}}))
    with pytest.raises(ConfigError, match="needs a 'quantized_layers'"):
        parse(hf=nested("MIXED_PRECISION"))


@pytest.mark.parametrize("where", ["nested", "flat", "flat_algo", "ct"])
def test_fp8_kv_cache_in_every_spelling(where):
    kv = {"type": "float", "num_bits": 8, "dynamic": False, "strategy": "tensor"}
    qc = {"nested": lambda: parse(hf=nested("FP8", kv_cache_quant_algo="fp8")),
          "flat": lambda: parse(flat("FP8", kv_cache_scheme=kv)),
          "flat_algo": lambda: parse(flat("FP8", kv_cache_quant_algo="FP8")),
          "ct": lambda: parse(ct(args("float", 8, "channel"), kv_cache_scheme=kv))}[where]()
    assert qc.kv_cache == "fp8"


def test_unsupported_kv_cache_formats():
    with pytest.raises(ConfigError, match="unsupported kv_cache_quant_algo NVFP4; supported: FP8"):
        parse(hf=nested("FP8", kv_cache_quant_algo="NVFP4"))
    with pytest.raises(ConfigError, match="unsupported kv_cache_scheme int 8-bit"):
        parse(ct(args("float", 8, "channel"), kv_cache_scheme={"type": "int", "num_bits": 8}))


# -- both files ------------------------------------------------------------------------------------------

def test_both_files_agreeing_prefer_config_json():
    qc = parse(flat("NVFP4", ignore=["lm_head", "model.embed_tokens"]),
               nested("NVFP4", group_size=16, exclude_modules=["model.embed_tokens", "lm_head"]))
    assert qc.source.endswith("config.json quantization_config") and any("agrees" in n for n in qc.notes)


def test_both_files_agree_across_name_layouts():
    parse(flat("NVFP4", ignore=["language_model.lm_head"]), nested("NVFP4", exclude_modules=["lm_head"]))


@pytest.mark.parametrize("hf, what", [
    (nested("W4A16_NVFP4", exclude_modules=["lm_head"]), "quant_algo: NVFP4 vs W4A16_NVFP4"),
    (nested("NVFP4", exclude_modules=[]), "exclude list"),
    (nested("NVFP4", exclude_modules=["lm_head"], kv_cache_quant_algo="FP8"), "KV cache: none vs fp8"),
])
def test_both_files_disagreeing_say_so(hf, what):
    with pytest.raises(ConfigError) as e:
        parse(flat("NVFP4", ignore=["lm_head"]), hf)
    msg = str(e.value)
    assert "config.json quantization_config and ckpt/hf_quant_config.json disagree" in msg and what in msg


def test_both_files_mixed_layers_disagree():
    a = flat("MIXED_PRECISION", quantized_layers={"model.layers.0.mlp.up_proj": {"quant_algo": "FP8"}})
    b = nested("MIXED_PRECISION", quantized_layers={"model.layers.0.mlp.up_proj": {"quant_algo": "NVFP4"}})
    with pytest.raises(ConfigError, match="quantized_layers differ .*1 with a different algorithm"):
        parse(a, b)


def test_unknown_quant_method():
    with pytest.raises(ConfigError, match="unsupported quant_method 'gptq'; supported: modelopt.*compressed-tensors"):
        parse({"quant_method": "gptq", "bits": 4})


def test_malformed_lists():
    with pytest.raises(ConfigError, match="exclude_modules must be a list"):
        parse(hf=nested("FP8", exclude_modules="lm_head"))


# -- compressed-tensors ------------------------------------------------------------------------------------

CT_CASES = {
    "NVFP4": (ct(args("float", 4, "tensor_group", group_size=16),
                 args("float", 4, "tensor_group", group_size=16, dynamic="local"), fmt="nvfp4-pack-quantized"),
              Scheme(**NVFP4_W4A4, fmt=CT)),
    "NVFP4A16": (ct(args("float", 4, "tensor_group", group_size=16), fmt="nvfp4-pack-quantized"),
                 Scheme(**NVFP4_A16, fmt=CT)),
    "W4A16": (ct(args("int", 4, "group", group_size=128), fmt="pack-quantized"),
              Scheme(weight="int4", granularity="group", group_size=128, packed=True, fmt=CT)),
    "W4A16_ASYM": (ct(args("int", 4, "group", group_size=32, symmetric=False), fmt="pack-quantized"),
                   Scheme(weight="int4", granularity="group", group_size=32, symmetric=False, packed=True, fmt=CT)),
    "W8A16_CHANNEL": (ct(args("int", 8, "channel"), fmt="pack-quantized"),
                      Scheme(weight="int8", granularity="channel", packed=True, fmt=CT)),
    "W8A8_DYNAMIC": (ct(args("int", 8, "channel"), args("int", 8, "token", dynamic=True), fmt="int-quantized"),
                     Scheme(weight="int8", granularity="channel", activation="int8", act_dynamic=True,
                            act_granularity="token", fmt=CT)),
    "W8A8_STATIC_ASYM": (ct(args("int", 8, "tensor"), args("int", 8, "tensor", symmetric=False), fmt="int-quantized"),
                         Scheme(weight="int8", granularity="tensor", activation="int8", act_granularity="tensor",
                                act_symmetric=False, fmt=CT)),
    "FP8_DYNAMIC": (ct(args("float", 8, "channel"), args("float", 8, "token", dynamic=True)),
                    Scheme(weight="fp8", granularity="channel", activation="fp8", act_dynamic=True,
                           act_granularity="token", fmt=CT)),
    "FP8_STATIC": (ct(args("float", 8, "tensor"), args("float", 8, "tensor")),
                   Scheme(weight="fp8", granularity="tensor", activation="fp8", act_granularity="tensor", fmt=CT)),
    "FP8_BLOCK": (ct(args("float", 8, "block", block_structure=[128, 128]),
                     args("float", 8, "group", group_size=128, dynamic=True)),
                  Scheme(weight="fp8", granularity="block", block=(128, 128), activation="fp8", act_dynamic=True,
                         act_granularity="group", fmt=CT)),
    "FP8_W8A16": (ct(args("float", 8, "channel")), Scheme(weight="fp8", granularity="channel", fmt=CT)),
}


@pytest.mark.parametrize("name", sorted(CT_CASES))
def test_compressed_tensors_presets_map_to_the_scheme_table(name):
    raw, want = CT_CASES[name]
    qc = parse(raw)
    assert qc.producer == CT and qc.version == "0.19.0" and qc.default is None
    assert [(g.name, g.targets, g.scheme) for g in qc.groups] == [("group_0", ["Linear"], want)]
    assert qc.ignore == ["lm_head"]


def test_ct_groups_keep_order_targets_and_per_group_format():
    raw = {"quant_method": CT, "format": "mixed-precision", "ignore": ["re:.*vision.*"],
           "config_groups": {
               "W4A16": {"targets": ["re:.*mlp.down_proj$"], "format": "pack-quantized",
                         "weights": args("int", 4, "group", group_size=64)},
               "FP8_DYNAMIC": {"targets": ["Linear", "lm_head"],  # no per-group format: inferred
                               "weights": args("float", 8, "channel"),
                               "input_activations": args("float", 8, "token", dynamic=True)}}}
    qc = parse(raw)
    assert [g.name for g in qc.groups] == ["W4A16", "FP8_DYNAMIC"]
    assert qc.groups[0].scheme == Scheme(weight="int4", granularity="group", group_size=64, packed=True, fmt=CT)
    assert qc.groups[1].scheme == CT_CASES["FP8_DYNAMIC"][1] and qc.groups[1].targets == ["Linear", "lm_head"]
    assert qc.ignore == ["re:.*vision.*"]


@pytest.mark.parametrize("raw, match", [
    (ct(args("int", 4, "group", group_size=128), fmt="marlin-24"), "unsupported compressed-tensors format 'marlin-24'"),
    (ct(args("float", 4, "group", group_size=32), fmt="mxfp4-pack-quantized"), "mxfp4-pack-quantized"),
    (ct(args("int", 4, "group", group_size=128), fmt="pack-quantized", sparsity_config={"format": "sparse-24"}),
     "sparsity_config is set"),
    (ct(args("int", 4, "group", group_size=128), fmt="pack-quantized", quantization_status="frozen"),
     "save_compressed=True"),
    (ct(args("int", 4, "group", group_size=128, actorder="group"), fmt="pack-quantized"), "actorder 'group'"),
    (ct(args("int", 4, "group", group_size=128), args("int", 8, "token", dynamic=True), fmt="pack-quantized"),
     "W4A8"),
    (ct(args("float", 8, "channel"), args("int", 8, "token", dynamic=True)), "int 8-bit activations with float"),
    (ct(args("float", 8, "group", group_size=128)), "unsupported weights float 8-bit strategy group"),
    (ct(args("int", 4, "group", group_size=128), fmt="pack-quantized", kv_cache_scheme="fp8"), "must be an object"),
])
def test_unsupported_compressed_tensors_configs_say_what_is_supported(raw, match):
    with pytest.raises(ConfigError) as e:
        parse(raw)
    assert match in str(e.value) and "config.json quantization_config" in str(e.value)


def test_ct_errors_name_the_group():
    raw = ct(args("int", 3, "group", group_size=128), fmt="pack-quantized")
    with pytest.raises(ConfigError, match=r"config_groups.group_0: unsupported weights int 3-bit .*supported: NVFP4"):
        parse(raw)
