"""compressed-tensors pack-quantized int4/int8 unit: fixtures and compressed-tensors' own
compression (asymmetric, group and channel, K not a multiple of the pack width or of 128) decoded
against its own decompression; weight_shape is checked."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

from conftest import fixture_dir
from lowbit.errors import CheckpointError, ConfigError
from lowbit.quant.numerics import unpack_int32
from lowbit.quant.scheme import Scheme
from test_methods_common import SCHEMES, build, deq, load, make_disk
from test_methods_nvfp4 import ATTN, read_module


@pytest.mark.parametrize("folder,scheme", [("llmcompressor-w4a16", "int4"), ("llmcompressor-w8a16", "int8")])
def test_fixture_fused_qkv_matches_compressed_tensors_decompression(folder, scheme):
    cfg = json.loads((fixture_dir(folder) / "config.json").read_text())["quantization_config"]
    group = cfg["config_groups"]["group_0"]
    ct_scheme = QuantizationScheme(**group)
    g = group["weights"]["group_size"]
    ours = Scheme(weight=scheme, granularity="group" if g else "channel", group_size=g, packed=True,
                  fmt="compressed-tensors")
    shards = [read_module(folder, f"{ATTN}.{p}_proj") for p in "qkv"]
    layer = build(ours, tuple(int(s["weight_shape"][0]) for s in shards), 256, dtype=torch.bfloat16)
    load(layer, dict(enumerate(shards)))
    ref = torch.cat([PackedQuantizationCompressor.decompress(dict(s), ct_scheme)["weight"] for s in shards])
    assert ref.dtype == torch.bfloat16 and torch.equal(deq(layer).bfloat16(), ref)
    assert layer.weight_packed.dtype == torch.int32 and layer.weight_scale.dtype == torch.bfloat16


CASES = [  # (bits, strategy, group_size, symmetric, n, k)
    (4, "group", 32, False, 20, 96),  # N not a multiple of 8: the packed zero points end mid-word
    (4, "channel", None, False, 24, 100),  # K=100: the last int32 word is half padding
    (4, "group", 128, True, 16, 384),
    (8, "group", 32, False, 12, 160),
    (8, "channel", None, True, 16, 70),  # K=70: two padding bytes
]


@pytest.mark.parametrize("bits,strategy,group,sym,n,k", CASES)
def test_compressed_tensors_compression_round_trips(bits, strategy, group, sym, n, k):
    args = QuantizationArgs(num_bits=bits, type="int", strategy=strategy, group_size=group, symmetric=sym)
    ct_scheme = QuantizationScheme(targets=["Linear"], weights=args)
    cols = k // group if group else 1
    w = torch.randn(n, k, dtype=torch.bfloat16)
    state = {"weight": w, "weight_scale": (torch.rand(n, cols) * 0.05 + 0.01).bfloat16()}
    if not sym:
        state["weight_zero_point"] = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (n, cols), dtype=torch.int8)
    disk = PackedQuantizationCompressor.compress(state, ct_scheme)
    ref = PackedQuantizationCompressor.decompress(dict(disk), ct_scheme)["weight"]
    ours = Scheme(weight=f"int{bits}", granularity=strategy, group_size=group, symmetric=sym, packed=True,
                  fmt="compressed-tensors")
    layer = build(ours, (n,), k, dtype=torch.bfloat16)
    load(layer, {None: dict(disk)})
    assert torch.equal(deq(layer).bfloat16(), ref)  # CT decodes in the scale dtype (bf16)
    if not sym:
        assert torch.equal(layer.weight_zero_point, state["weight_zero_point"])
    x = torch.randn(3, k, dtype=torch.bfloat16)
    assert torch.equal(layer(x), F.linear(x, ref))  # what transformers' reload of the checkpoint computes


def test_weight_shape_that_disagrees_with_the_model_is_refused():
    scheme = SCHEMES["ct-w4a16-g32"]
    disk = make_disk(scheme, 32, 96)
    disk["weight_shape"] = torch.tensor([32, 95])
    layer = build(scheme, (32,), 96)
    with pytest.raises(CheckpointError, match=r"test_proj weight_shape: records the unpacked weight as \[32, 95\]"):
        load(layer, {None: disk})


def test_fused_zero_points_are_unpacked_per_shard():
    scheme = SCHEMES["ct-w4a16-g32-asym"]
    disks = [make_disk(scheme, n, 64) for n in (24, 12, 12)]  # 12 rows: zero points end mid-word
    layer = build(scheme, (24, 12, 12), 64)
    load(layer, dict(enumerate(disks)))
    expected = torch.cat([unpack_int32(d["weight_zero_point"], 4, d["weight_scale"].shape[0], dim=0) for d in disks])
    assert torch.equal(layer.weight_zero_point, expected)


def test_unsupported_layouts_are_config_errors():
    with pytest.raises(ConfigError, match="tensor scales is not supported"):
        build(Scheme(weight="int4", granularity="tensor", packed=True, fmt="compressed-tensors"), (8,), 64)
    with pytest.raises(ConfigError, match="in_features per rank is 48, not a multiple of 32"):
        build(SCHEMES["ct-w4a16-g32"], (8,), 96, parallel="row", tp_size=2)


def test_scales_rounded_to_a_narrower_model_dtype_are_reported():
    scheme = SCHEMES["ct-w4a16-g32"]
    disk = make_disk(scheme, 16, 64)
    disk["weight_scale"][0, 0] = 1e-6  # an fp16 subnormal: bf16 -> fp16 loses precision
    notes = load(build(scheme, (16,), 64, dtype=torch.float16), {None: disk})
    assert any("rounded to the model dtype torch.float16" in n for n in notes)
    assert not load(build(scheme, (16,), 64, dtype=torch.bfloat16), {None: disk})
