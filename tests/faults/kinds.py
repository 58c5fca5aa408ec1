"""The fault corpus: kinds of broken checkpoint, each a (fixture, damage) pair and what its error must name.

`GENERIC` kinds damage files, headers, configs, tokenizers and links without naming a tensor, so they
apply to any fixture: a new model family joins the corpus by adding its fixture to FAMILY_FIXTURES.
`SPECIFIC` kinds damage named tensors or config entries of one producer's fixture (both producers'
spellings: ModelOpt and compressed-tensors).

stage "load": `lowbit.load` raises a LowbitError, `inspect` reports it (exit 1 with the problem listed, or
exit 2 when the checkpoint cannot be read at all), `generate` exits 2. stage "generate": the checkpoint
loads and inspects clean, but `lowbit generate` (with `argv`) must exit 2 with the error.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from damage import (DELETE, MAIN, add, chain, config, copy_as, drop, entry, header, json_edit, json_set,
                    pickle_only, raw_bytes, remove, rename, reshape, retype, set_all, set_values, shard, symlink,
                    tokenizer_ids_shifted, write_text)

NAN, INF = float("nan"), float("inf")


@dataclass
class Kind:
    name: str
    fixture: str
    damage: callable
    expect: tuple[str, ...]  # substrings every report of it must contain (file, tensor, layer or field)
    stage: str = "load"
    argv: tuple[str, ...] = ()  # extra `lowbit generate` arguments
    stdin: str | None = None
    id: str = field(init=False)

    def __post_init__(self):
        self.id = f"{self.fixture}:{self.name}"


def _last_tensor(h: dict) -> str:
    return max((n for n in h if n != "__metadata__"), key=lambda n: h[n]["data_offsets"][1])


def _first_tensor(h: dict) -> str:
    return min((n for n in h if n != "__metadata__"), key=lambda n: h[n]["data_offsets"][0])


def _second_tensor(h: dict) -> str:
    return sorted((n for n in h if n != "__metadata__"), key=lambda n: h[n]["data_offsets"][0])[1]


def _shift_all(h):
    for n, e in h.items():
        if n != "__metadata__":
            e["data_offsets"] = [o + 8 for o in e["data_offsets"]]


def _overlap(h):
    b = _second_tensor(h)
    h[b]["data_offsets"] = [h[b]["data_offsets"][0] - 2, h[b]["data_offsets"][1] - 2]


def _past_end(h):
    n = _last_tensor(h)
    h[n]["data_offsets"] = [o + 4096 for o in h[n]["data_offsets"]]


def _wrong_size(h):
    n = _first_tensor(h)
    h[n]["shape"] = [d * 2 for d in h[n]["shape"]] or [2]


def _on_first(key, value):
    def fn(h):
        e = h[_first_tensor(h)]
        if value is DELETE:
            e.pop(key)
        else:
            e[key] = value
    return fn


def rope(damage):
    """A rope-scaling damage: only for families whose config has rope parameters (not Mamba-only ones)."""
    def wrapped(path: Path):
        cfg = json.loads((path / "config.json").read_text())
        text = cfg.get("text_config", cfg)
        if not any(k in text for k in ("rope_theta", "rope_parameters", "rope_scaling")):
            pytest.skip("this family has no rotary embedding: rope_scaling is not read")
        damage(path)
    return wrapped


def _outside(path: Path) -> Path:
    f = path.parent / f"{path.name}-outside.txt"
    f.write_text("not a safetensors file\n")
    return f


# (name, damage, expect, stage, argv, stdin): no tensor names, valid for every fixture
GENERIC = [
    # lying or truncated safetensors headers and data
    ("header-offsets-past-end", header(_past_end), (MAIN, "truncated")),
    ("header-overlapping-ranges", header(_overlap), (MAIN, "overlaps")),
    ("header-entry-without-dtype", header(_on_first("dtype", DELETE)), (MAIN, "no dtype")),
    ("header-entry-without-offsets", header(_on_first("data_offsets", DELETE)), (MAIN, "data_offsets")),
    ("header-entry-without-shape", header(_on_first("shape", DELETE)), (MAIN, "no shape")),
    ("header-is-a-list", header(lambda h: [h]), (MAIN, "not an object")),
    ("header-shape-not-a-list", header(_on_first("shape", "256x256")), (MAIN, "not a list")),
    ("header-negative-dim", header(_on_first("shape", [-1, 4])), (MAIN, "non-negative")),
    ("header-unknown-dtype", header(_on_first("dtype", "F7")), (MAIN, "unknown dtype 'F7'")),
    ("header-size-disagrees-with-shape", header(_wrong_size), (MAIN, "bytes")),
    ("header-entry-not-an-object", header(lambda h: h.__setitem__(_first_tensor(h), [1, 2])), (MAIN, "not an object")),
    ("header-offsets-reversed", header(lambda h: h[_first_tensor(h)].__setitem__("data_offsets", [8, 0])),
     (MAIN, "begin <= end")),
    ("header-metadata-not-strings", header(lambda h: h.__setitem__("__metadata__", {"format": 1})),
     (MAIN, "__metadata__")),
    ("header-gap-before-a-tensor", header(_shift_all), (MAIN, "belong to no tensor")),
    ("data-truncated", raw_bytes(lambda b: b[:-1000]), (MAIN, "truncated")),
    ("data-trailing-garbage", raw_bytes(lambda b: b + b"\0" * 64), (MAIN, "belong to no tensor")),
    ("file-truncated-inside-header", raw_bytes(lambda b: b[:40]), (MAIN, "truncated")),
    ("file-empty", raw_bytes(lambda b: b""), (MAIN, "not a safetensors file")),
    ("file-absurd-header-length", raw_bytes(lambda b: (2**40).to_bytes(8, "little") + b[8:]), (MAIN, "implausible")),
    ("file-header-not-json", raw_bytes(lambda b: b[:8] + b"{garbage" + b[16:]), (MAIN, "corrupt header")),
    # broken indexes and shards
    ("index-weight-map-non-string", chain(shard(), json_edit("model.safetensors.index.json",
                                                             lambda d: d["weight_map"].__setitem__(next(iter(d["weight_map"])), 1))),
     ("model.safetensors.index.json", "weight_map")),
    ("index-weight-map-a-list", chain(shard(), json_set("model.safetensors.index.json", "weight_map", ["a"])),
     ("model.safetensors.index.json", "weight_map")),
    ("index-shard-missing", chain(shard(), remove("model-00002-of-00002.safetensors")),
     ("model-00002-of-00002.safetensors", "do not exist")),
    ("index-lists-tensor-not-in-shard",
     shard(edit=lambda parts, wm: parts[1].pop(next(iter(parts[1])))), ("model-00002-of-00002.safetensors", "does not hold")),
    ("index-malformed-json", chain(shard(), write_text("model.safetensors.index.json", "{\"weight_map\": ")),
     ("model.safetensors.index.json", "malformed JSON")),
    ("index-path-escapes-folder", chain(shard(), json_edit("model.safetensors.index.json", lambda d: d["weight_map"].update(
        {k: "../" + v for k, v in d["weight_map"].items()}))), ("model.safetensors.index.json", "../")),
    ("index-tensor-not-listed", shard(edit=lambda parts, wm: wm.pop(next(iter(parts[0])))),
     ("model-00001-of-00002.safetensors", "does not list")),
    ("shards-duplicate-with-index", shard(edit=lambda parts, wm: parts[1].__setitem__(
        next(iter(parts[0])), parts[0][next(iter(parts[0]))].clone())), ("model-00002-of-00002.safetensors", "also in")),
    ("shards-duplicate-without-index", shard(index=False, edit=lambda parts, wm: parts[1].__setitem__(
        next(iter(parts[0])), parts[0][next(iter(parts[0]))].clone())), ("stored twice", "model-00002-of-00002")),
    # bad configs
    ("config-zero-heads", config("num_attention_heads", 0), ("config.json", "num_attention_heads")),
    ("config-negative-hidden", config("hidden_size", -256), ("config.json", "hidden_size")),
    ("config-layers-a-string", config("num_hidden_layers", "two"), ("config.json", "num_hidden_layers")),
    ("config-heads-not-multiple-of-kv", config("num_key_value_heads", 3), ("config.json", "num_key_value_heads")),
    ("config-no-hidden-size", config("hidden_size", DELETE), ("config.json", "hidden_size")),
    ("config-rope-llama3-missing-keys", rope(chain(config("rope_parameters", DELETE), config("rope_scaling", {
        "rope_type": "llama3", "factor": 8.0}))), ("config.json", "low_freq_factor")),
    ("config-rope-linear-no-factor", rope(chain(config("rope_parameters", DELETE), config("rope_scaling", {"type": "linear"}))),
     ("config.json", "factor")),
    ("config-rope-a-list", rope(chain(config("rope_parameters", DELETE), config("rope_scaling", [8.0]))),
     ("config.json", "rope_scaling")),
    ("config-rope-unknown-type", rope(chain(config("rope_parameters", DELETE), config("rope_scaling", {"rope_type": "spiral",
                                                                                                "factor": 2.0}))),
     ("config.json", "spiral")),
    ("config-rms-eps-negative", config("rms_norm_eps", -1e-6), ("config.json", "rms_norm_eps")),
    ("config-unknown-dtype", chain(config("dtype", "float7"), config("torch_dtype", DELETE)), ("float7",)),
    ("config-malformed-json", write_text("config.json", "{\"hidden_size\": 256,"), ("config.json", "malformed JSON")),
    ("config-a-list", write_text("config.json", "[1, 2]"), ("config.json", "JSON object")),
    ("config-missing", remove("config.json"), ("config.json",)),
    ("config-unsupported-architecture", chain(config("architectures", ["GPT2LMHeadModel"]), config("model_type", "gpt2")),
     ("GPT2LMHeadModel", "supported")),
    ("config-quantization-config-a-string", config("quantization_config", "fp8"), ("quantization_config",)),
    ("config-eos-a-string", config("eos_token_id", "</s>"), ("config.json", "eos_token_id")),
    # generation configs and tokenizers
    ("generation-config-malformed", write_text("generation_config.json", "{\"eos_token_id\": [2,"),
     ("generation_config.json", "malformed JSON")),
    ("generation-config-eos-a-string", json_set("generation_config.json", "eos_token_id", "</s>"),
     ("generation_config.json", "eos_token_id")),
    ("generation-config-a-list", write_text("generation_config.json", "[]"), ("generation_config.json", "JSON object")),
    ("tokenizer-ids-past-vocabulary", tokenizer_ids_shifted(5000), ("tokenizer", "vocab"), "generate"),
    ("tokenizer-missing", chain(remove("tokenizer.json"), remove("tokenizer_config.json")), ("tokenizer",), "generate"),
    ("tokenizer-malformed", write_text("tokenizer.json", "{\"model\": "), ("tokenizer",), "generate"),
    # symlinks
    ("symlink-weights-dangling", symlink(MAIN, lambda p: p.parent / "gone.safetensors"), (MAIN, "dangling")),
    ("symlink-weights-outside-not-safetensors", symlink(MAIN, _outside), (MAIN, "symlink to")),
    ("symlink-weights-to-a-directory", symlink(MAIN, lambda p: p.parent), (MAIN, "not a regular file")),
    ("symlink-config-dangling", symlink("config.json", lambda p: p.parent / "gone.json"), ("config.json", "dangling")),
    ("symlink-weights-loop", symlink(MAIN, lambda p: p / MAIN), (MAIN, "dangling")),
    # pickle-only folders
    ("pickle-only-bin", pickle_only("pytorch_model.bin"), ("pytorch_model.bin", "safetensors")),
    ("pickle-only-pt", pickle_only("model.pt"), ("model.pt", "safetensors")),
    # command-line input
    ("cli-device-tpu", lambda p: None, ("tpu",), "generate", ("--device", "tpu")),
    ("cli-empty-prompt", lambda p: None, ("empty",), "generate", ("--prompt", "")),
    ("cli-empty-stdin-prompt", lambda p: None, ("standard input",), "generate", ("--prompt", "-"), ""),
]
# The fixtures every generic kind runs on in CI; a new family adds its fixture here. LOWBIT_FAULT_FIXTURES
# (comma-separated fixture names) runs them on others, e.g. every family's: see tests/faults/README.md.
FAMILY_FIXTURES = [f for f in os.environ.get("LOWBIT_FAULT_FIXTURES", "").split(",") if f] or \
    ["modelopt-nvfp4", "llmcompressor-w4a16"]


def _generic() -> list[Kind]:
    out = []
    for fixture in FAMILY_FIXTURES:
        for name, damage, expect, *rest in GENERIC:
            stage = rest[0] if rest else "load"
            argv = rest[1] if len(rest) > 1 else ()
            stdin = rest[2] if len(rest) > 2 else None
            out.append(Kind(name, fixture, damage, expect, stage, argv, stdin))
    return out


L0, L1 = "model.layers.0", "model.layers.1"
MO, CT, KV = "modelopt-nvfp4", "llmcompressor-nvfp4", "modelopt-fp8-kvfp8"
W4, W8 = "llmcompressor-w4a16", "llmcompressor-w8a8"
HQ = "hf_quant_config.json"


def _modelopt_edit(key, value):
    """An edit of hf_quant_config.json, the only quantization config left (config.json's copy removed)."""
    return chain(json_set(HQ, f"quantization.{key}", value), config("quantization_config", DELETE))


SPECIFIC = [
    # missing / extra / duplicated tensors
    Kind("missing-projection-weight", MO, drop(f"{L1}.mlp.down_proj.weight"), (f"{L1}.mlp.down_proj", "missing")),
    Kind("missing-weight-scale", MO, drop(f"{L0}.mlp.up_proj.weight_scale"), (f"{L0}.mlp.up_proj.weight_scale",)),
    Kind("missing-weight-scale-2", MO, drop(f"{L0}.self_attn.o_proj.weight_scale_2"), (f"{L0}.self_attn.o_proj",)),
    Kind("missing-input-scale", MO, drop(f"{L1}.self_attn.v_proj.input_scale"), (f"{L1}.self_attn.v_proj",)),
    Kind("missing-global-scale-ct", CT, drop(f"{L0}.mlp.gate_proj.weight_global_scale"), (f"{L0}.mlp.gate_proj",)),
    Kind("missing-final-norm", MO, drop("model.norm.weight"), ("model.norm.weight",)),
    Kind("missing-embedding", CT, drop("model.embed_tokens.weight"), ("model.embed_tokens.weight",)),
    Kind("missing-lm-head", MO, drop("lm_head.weight"), ("lm_head", "tie_word_embeddings")),
    Kind("missing-bf16-projection", "base-llama-bf16", drop(f"{L0}.self_attn.o_proj.weight"), (f"{L0}.self_attn.o_proj",)),
    Kind("extra-unexplained-tensor", MO, add(f"{L0}.mystery.weight", lambda: torch.ones(4)), (f"{L0}.mystery.weight",)),
    Kind("extra-layer-tensors", CT, copy_as(f"{L0}.input_layernorm.weight", "model.layers.5.input_layernorm.weight"),
         ("model.layers.5.input_layernorm.weight",)),
    Kind("extra-role-on-a-projection", MO, add(f"{L0}.mlp.down_proj.weight_zero_point", lambda: torch.zeros(1, dtype=torch.int8)),
         (f"{L0}.mlp.down_proj.weight_zero_point",)),
    Kind("duplicate-vlm-and-canonical-spelling", "modelopt-nvfp4-vlm-new",
         copy_as("model.language_model.norm.weight", "model.norm.weight"), ("model.norm.weight", "stored twice")),
    Kind("duplicate-vlm-old-head", "llmcompressor-nvfp4-vlm-old", copy_as("language_model.lm_head.weight", "lm_head.weight"),
         ("lm_head.weight", "stored twice")),
    Kind("duplicate-kv-scale-spellings", KV, copy_as(f"{L0}.self_attn.k_proj.k_scale", f"{L0}.self_attn.k_scale"),
         (f"{L0}.self_attn.k_scale", "two KV-cache scale tensors")),
    Kind("fused-and-split-both-stored", "modelopt-nvfp4-phi3",
         chain(*(copy_as(f"{L0}.self_attn.o_proj.{r}", f"{L0}.self_attn.q_proj.{r}")
                 for r in ("weight", "weight_scale", "weight_scale_2", "input_scale"))),
         (f"{L0}.self_attn.qkv_proj", "fused")),
    Kind("kv-scale-missing", KV, drop(f"{L1}.self_attn.v_proj.v_scale"), (f"{L1}.self_attn.v_scale", "missing")),
    Kind("kv-scale-for-missing-layer", KV, copy_as(f"{L0}.self_attn.k_proj.k_scale", "model.layers.7.self_attn.k_proj.k_scale"),
         ("model.layers.7", "layer 7")),
    # wrong shapes and dtypes
    Kind("weight-wrong-shape", MO, reshape(f"{L0}.mlp.down_proj.weight", (256, 64)), (f"{L0}.mlp.down_proj.weight",)),
    Kind("block-scale-wrong-shape", MO, reshape(f"{L0}.mlp.down_proj.weight_scale", (256, 16)),
         (f"{L0}.mlp.down_proj.weight_scale",)),
    Kind("per-tensor-scale-shape-2", MO, reshape(f"{L1}.mlp.gate_proj.weight_scale_2", (2,)),
         (f"{L1}.mlp.gate_proj.weight_scale_2",)),
    Kind("weight-wrong-dtype", MO, retype(f"{L0}.self_attn.q_proj.weight", torch.int8), (f"{L0}.self_attn.q_proj.weight",)),
    Kind("block-scale-f32", MO, retype(f"{L0}.self_attn.q_proj.weight_scale", torch.float32),
         (f"{L0}.self_attn.q_proj.weight_scale",)),
    Kind("norm-wrong-shape", CT, reshape("model.norm.weight", (255,)), ("model.norm.weight", "255")),
    Kind("embedding-wrong-vocab", MO, reshape("model.embed_tokens.weight", (1000, 256)), ("model.embed_tokens.weight",)),
    Kind("input-scale-shape-4", KV, reshape(f"{L0}.mlp.up_proj.input_scale", (4,)), (f"{L0}.mlp.up_proj.input_scale",)),
    Kind("kv-scale-wrong-shape", KV, reshape(f"{L0}.self_attn.k_proj.k_scale", (8,)), (f"{L0}.self_attn.k_scale", "[8]")),
    Kind("kv-scale-per-head", KV, reshape(f"{L1}.self_attn.v_proj.v_scale", (2,)), (f"{L1}.self_attn.v_scale", "per-head")),
    Kind("kv-scale-int-dtype", KV, retype(f"{L0}.self_attn.v_proj.v_scale", torch.int32), (f"{L0}.self_attn.v_scale", "I32")),
    Kind("bf16-weight-as-f64", "base-llama-bf16", retype(f"{L0}.mlp.up_proj.weight", torch.float64),
         (f"{L0}.mlp.up_proj.weight", "F64")),
    Kind("packed-weight-i64", W4, retype(f"{L0}.mlp.up_proj.weight_packed", torch.int64), (f"{L0}.mlp.up_proj.weight_packed",)),
    Kind("weight-shape-wrong-length", W4, reshape(f"{L0}.mlp.up_proj.weight_shape", (3,)), (f"{L0}.mlp.up_proj.weight_shape",)),
    Kind("weight-shape-wrong-values", W4, set_values(f"{L1}.mlp.down_proj.weight_shape", 300, lambda t: (1,)),
         (f"{L1}.mlp.down_proj.weight_shape", "300")),
    Kind("channel-scale-flat", W8, reshape(f"{L0}.mlp.down_proj.weight_scale", (256,)), (f"{L0}.mlp.down_proj.weight_scale",)),
    Kind("fp8-weights-stored-bf16", "modelopt-fp8", retype(f"{L0}.mlp.down_proj.weight", torch.bfloat16),
         (f"{L0}.mlp.down_proj",)),
    # bad values in every scale role
    Kind("weight-scale-2-nan", MO, set_values(f"{L0}.self_attn.q_proj.weight_scale_2", NAN), (f"{L0}.self_attn.q_proj", "nan")),
    Kind("weight-scale-2-inf", MO, set_values(f"{L0}.mlp.up_proj.weight_scale_2", INF), (f"{L0}.mlp.up_proj", "inf")),
    Kind("weight-scale-2-zero", MO, set_values(f"{L1}.mlp.down_proj.weight_scale_2", 0.0), (f"{L1}.mlp.down_proj", "0.0")),
    Kind("weight-scale-2-negative", MO, set_values(f"{L1}.self_attn.o_proj.weight_scale_2", -0.5),
         (f"{L1}.self_attn.o_proj", "-0.5")),
    Kind("input-scale-nan-one-fused-shard", MO, set_values(f"{L0}.self_attn.k_proj.input_scale", NAN),
         (f"{L0}.self_attn.k_proj.input_scale",)),
    Kind("input-scale-zero", MO, set_values(f"{L1}.mlp.gate_proj.input_scale", 0.0), (f"{L1}.mlp.gate_proj.input_scale",)),
    Kind("block-scale-nan", MO, set_values(f"{L0}.mlp.down_proj.weight_scale", NAN, lambda t: (3, 4)),
         (f"{L0}.mlp.down_proj.weight_scale", "NaN")),
    Kind("block-scale-negative", MO, set_values(f"{L1}.self_attn.q_proj.weight_scale", -2.0, lambda t: (0, 1)),
         (f"{L1}.self_attn.q_proj.weight_scale", "negative")),
    Kind("lm-head-scale-2-nan", "modelopt-nvfp4-lmhead", set_values("lm_head.weight_scale_2", NAN), ("lm_head", "nan")),
    Kind("global-scale-nan-ct", CT, set_values(f"{L0}.mlp.gate_proj.weight_global_scale", NAN),
         (f"{L0}.mlp.gate_proj.weight_global_scale",)),
    Kind("global-scale-zero-ct", CT, set_values(f"{L1}.self_attn.q_proj.weight_global_scale", 0.0),
         (f"{L1}.self_attn.q_proj.weight_global_scale",)),
    Kind("input-global-scale-inf-ct", CT, set_values(f"{L0}.mlp.down_proj.input_global_scale", INF),
         (f"{L0}.mlp.down_proj.input_global_scale",)),
    Kind("input-global-scale-negative-ct", CT, set_values(f"{L1}.self_attn.v_proj.input_global_scale", -1.0),
         (f"{L1}.self_attn.v_proj.input_global_scale",)),
    Kind("fp8-weight-scale-nan", KV, set_values(f"{L0}.self_attn.o_proj.weight_scale", NAN), (f"{L0}.self_attn.o_proj.weight_scale",)),
    Kind("fp8-weight-scale-zero", KV, set_values(f"{L1}.mlp.up_proj.weight_scale", 0.0), (f"{L1}.mlp.up_proj.weight_scale",)),
    Kind("fp8-input-scale-negative", KV, set_values(f"{L0}.mlp.gate_proj.input_scale", -1.0), (f"{L0}.mlp.gate_proj.input_scale",)),
    Kind("kv-k-scale-nan", KV, set_values(f"{L0}.self_attn.k_proj.k_scale", NAN), (f"{L0}.self_attn.k_scale", "nan")),
    Kind("kv-v-scale-zero", KV, set_values(f"{L1}.self_attn.v_proj.v_scale", 0.0), (f"{L1}.self_attn.v_scale", "0.0")),
    Kind("kv-k-scale-inf", KV, set_values(f"{L1}.self_attn.k_proj.k_scale", INF), (f"{L1}.self_attn.k_scale", "inf")),
    Kind("group-scale-nan-int4", W4, set_values(f"{L0}.mlp.up_proj.weight_scale", NAN, lambda t: (5, 1)),
         (f"{L0}.mlp.up_proj.weight_scale",)),
    Kind("group-scale-negative-int4", W4, set_values(f"{L1}.self_attn.k_proj.weight_scale", -0.01, lambda t: (0, 0)),
         (f"{L1}.self_attn.k_proj.weight_scale",)),
    Kind("channel-scale-inf-int8", W8, set_values(f"{L0}.mlp.gate_proj.weight_scale", INF, lambda t: (7, 0)),
         (f"{L0}.mlp.gate_proj.weight_scale",)),
    Kind("channel-scale-nan-fp8-ct", "llmcompressor-fp8_dynamic", set_values(f"{L1}.mlp.down_proj.weight_scale", NAN),
         (f"{L1}.mlp.down_proj.weight_scale",)),
    Kind("scale-2-nan-every-layer-grouped", MO, set_all([f"model.layers.{i}.mlp.down_proj.weight_scale_2" for i in (0, 1)], NAN),
         ("model.layers.{0-1}.mlp.down_proj",)),
    # config x tensors, both producers' spellings
    Kind("modelopt-excludes-quantized-head", "modelopt-nvfp4-lmhead", _modelopt_edit("exclude_modules", ["lm_head"]),
         ("lm_head", "--trust-tensors")),
    Kind("modelopt-algo-fp8-for-nvfp4-tensors", MO, _modelopt_edit("quant_algo", "FP8"), ("FP8", "nvfp4")),
    Kind("modelopt-config-files-disagree", MO, json_set(HQ, "quantization.quant_algo", "FP8"),
         (HQ, "disagree")),
    Kind("modelopt-kv-declared-no-scales", MO, _modelopt_edit("kv_cache_quant_algo", "FP8"), ("k_scale", "missing")),
    Kind("modelopt-unsupported-algo", MO, _modelopt_edit("quant_algo", "W4A8_AWQ"), ("W4A8_AWQ", "supported")),
    Kind("ct-strategy-channel-vs-group-tensors", W4, chain(
        config("quantization_config.config_groups.group_0.weights.strategy", "channel"),
        config("quantization_config.config_groups.group_0.weights.group_size", None)), ("weight_scale", "--trust-tensors")),
    Kind("ct-group-size-64-vs-32-tensors", W4, config("quantization_config.config_groups.group_0.weights.group_size", 64),
         ("group",)),
    Kind("ct-num-bits-8-vs-int4-tensors", W4, config("quantization_config.config_groups.group_0.weights.num_bits", 8),
         ("weight_packed",)),
    Kind("ct-status-frozen", CT, config("quantization_config.quantization_status", "frozen"), ("frozen",)),
    Kind("config-hidden-size-disagrees", MO, config("hidden_size", 512), ("model.layers.{0-1}", "config.json")),
    Kind("config-fewer-layers", CT, config("num_hidden_layers", 1), ("model.layers.1",)),
    Kind("config-more-layers", W4, config("num_hidden_layers", 3), ("model.layers.2",)),
    Kind("config-kv-heads-disagree", MO, config("num_key_value_heads", 4), ("model.layers.{0-1}.self_attn.k_proj",)),
    Kind("config-intermediate-disagrees", W8, config("intermediate_size", 384), ("model.layers.{0-1}.mlp.gate_proj",)),
    Kind("config-vocab-disagrees", KV, config("vocab_size", 2048), ("model.embed_tokens.weight",)),
    Kind("config-tied-but-quantized-head", "modelopt-nvfp4-lmhead", config("tie_word_embeddings", True),
         ("lm_head", "tie_word_embeddings")),
    Kind("config-longrope-wrong-length", "modelopt-nvfp4-phi3", chain(config("rope_parameters", DELETE), config(
        "rope_scaling", {"rope_type": "longrope", "long_factor": [1.0] * 3, "short_factor": [1.0] * 3,
                         "original_max_position_embeddings": 256})), ("config.json", "long_factor")),
    Kind("renamed-scale-role", MO, rename(f"{L0}.mlp.up_proj.weight_scale_2", f"{L0}.mlp.up_proj.weight_scale2"),
         (f"{L0}.mlp.up_proj",)),
]

KINDS = _generic() + SPECIFIC
