"""FP8 unit (ModelOpt FP8 / FP8_PER_CHANNEL_PER_TOKEN / FP8_PB_WO, compressed-tensors
float-quantized): fixture bytes, compressed-tensors' own compression and decompression (odd block
shapes included), and the activation quantizers against compressed-tensors' fake quantization."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from compressed_tensors.compressors.naive_quantized.base import FloatQuantizationCompressor
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from compressed_tensors.quantization.lifecycle.forward import fake_quantize
from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp

from conftest import fixture_dir
from lowbit.errors import ConfigError
from lowbit.quant.scheme import Scheme
from test_methods_common import SCHEMES, assert_fp32_close, build, deq, load, make_disk
from test_methods_nvfp4 import ATTN, read_module


def test_modelopt_fixture_fused_qkv_keeps_each_shard_scale():
    shards = [read_module("modelopt-fp8", f"{ATTN}.{p}_proj") for p in "qkv"]
    assert len({float(s["weight_scale"]) for s in shards}) == 3  # the producer wrote three different scales
    layer = build(SCHEMES["modelopt-fp8"], tuple(s["weight"].shape[0] for s in shards), 256)
    load(layer, dict(enumerate(shards)))
    assert torch.equal(deq(layer), torch.cat([s["weight"].float() * s["weight_scale"] for s in shards]))
    assert float(layer.input_scale) == float(shards[0]["input_scale"])


def test_ct_fixture_matches_compressed_tensors_decompression():
    folder = "llmcompressor-fp8_dynamic"
    cfg = json.loads((fixture_dir(folder) / "config.json").read_text())["quantization_config"]
    ct_scheme = QuantizationScheme(**cfg["config_groups"]["group_0"])
    disk = read_module(folder, "model.layers.1.mlp.down_proj")
    layer = build(SCHEMES["ct-fp8-dynamic"], (256,), 512)
    load(layer, {None: disk})
    ref = FloatQuantizationCompressor.decompress(dict(disk), ct_scheme)["weight"]
    assert ref.dtype == torch.bfloat16 and torch.equal(deq(layer).bfloat16(), ref)
    assert torch.equal(deq(layer), disk["weight"].float() * disk["weight_scale"].float())


def test_modelopt_block_scales_with_partial_blocks_decode_by_hand():
    n, k = 200, 300  # neither a multiple of 128
    disk = make_disk(SCHEMES["modelopt-fp8-pb-wo"], n, k)
    assert tuple(disk["weight_scale"].shape) == (2, 1, 3, 1)
    layer = build(SCHEMES["modelopt-fp8-pb-wo"], (n,), k)
    load(layer, {None: disk})
    s = disk["weight_scale"][:, 0, :, 0]
    rows, cols = torch.arange(n) // 128, torch.arange(k) // 128
    assert torch.equal(deq(layer), disk["weight"].float() * s[rows][:, cols])


def test_ct_block_scheme_matches_compressed_tensors_compress_and_decompress():
    n, k = 200, 300
    args = QuantizationArgs(num_bits=8, type="float", strategy="block", block_structure=[128, 128], symmetric=True)
    ct_scheme = QuantizationScheme(targets=["Linear"], weights=args)
    w = torch.randn(n, k)
    scale = torch.rand(2, 3) * 0.01 + 0.001
    disk = FloatQuantizationCompressor.compress({"weight": w, "weight_scale": scale}, ct_scheme)
    ref = FloatQuantizationCompressor.decompress(dict(disk), ct_scheme)["weight"]
    layer = build(SCHEMES["ct-fp8-block"], (n,), k, activation_quant="weight-only")
    load(layer, {None: disk})
    assert torch.equal(deq(layer), ref)


def ct_fake_quant(x, **args):
    a = QuantizationArgs(num_bits=8, type="float", symmetric=True, dynamic=True, **args)
    scale, zp = compute_dynamic_scales_and_zp(x, a, None)
    return fake_quantize(x, scale, zp, a)


@pytest.mark.parametrize("name,ct_args", [("ct-fp8-dynamic", dict(strategy="token")),
                                          ("modelopt-fp8-channel-token", dict(strategy="token")),
                                          ("ct-fp8-block", dict(strategy="group", group_size=128))])
def test_dynamic_activations_match_compressed_tensors(name, ct_args):
    scheme = SCHEMES[name]
    k = 256
    layer = build(scheme, (64,), k)
    load(layer, {None: make_disk(scheme, 64, k)})
    x = torch.randn(2, 5, k) * torch.rand(2, 5, 1) * 10
    x[0, 0] = 0.0  # a padding row
    w = deq(layer)
    assert_fp32_close(layer(x), F.linear(ct_fake_quant(x, **ct_args), w))
    assert torch.equal(layer.method.fake_quant_input(layer, x), ct_fake_quant(x, **ct_args))


@pytest.mark.parametrize("name", ["modelopt-fp8", "ct-fp8-tensor-static"])
def test_static_activations_saturate_at_the_checkpoint_scale(name):
    scheme = SCHEMES[name]
    disk = make_disk(scheme, 32, 64)
    s = disk["input_scale"].float().reshape(())
    x = torch.randn(6, 64) * 448 * s
    x[0, :4] = 2000 * s  # beyond the calibrated range: clipped to 448 * s
    outs = {}
    for mode in ("auto", "emulate", "weight-only"):
        layer = build(scheme, (32,), 64, activation_quant=mode)
        load(layer, {None: disk})
        outs[mode] = layer(x)
    xq = (x / s).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s
    w = deq(layer)
    assert torch.equal(outs["auto"], F.linear(xq, w)) and torch.equal(outs["emulate"], outs["auto"])
    assert torch.equal(outs["weight-only"], F.linear(x, w))


def test_partial_activation_group_is_padded_not_refused():
    scheme = SCHEMES["ct-fp8-block"]
    layer = build(scheme, (128,), 200)
    load(layer, {None: make_disk(scheme, 128, 200)})
    x = torch.randn(3, 200)
    padded = ct_fake_quant(F.pad(x, (0, 56)), strategy="group", group_size=128)[:, :200]
    assert torch.equal(layer.method.fake_quant_input(layer, x), padded)


def test_dynamic_per_tensor_activations():
    scheme = Scheme(weight="fp8", granularity="channel", activation="fp8", act_dynamic=True, act_granularity="tensor",
                    fmt="compressed-tensors")
    layer = build(scheme, (16,), 32)
    load(layer, {None: make_disk(scheme, 16, 32)})
    x = torch.randn(4, 32)
    assert torch.equal(layer.method.fake_quant_input(layer, x), ct_fake_quant(x, strategy="tensor"))


def test_block_rows_may_not_straddle_fused_shards():
    with pytest.raises(ConfigError, match="not a multiple of 128"):
        build(SCHEMES["modelopt-fp8-pb-wo"], (192, 64), 256)
    with pytest.raises(ConfigError, match="tensor-parallel"):
        build(SCHEMES["modelopt-fp8-pb-wo"], (256,), 256, parallel="row", tp_size=4)


def test_bf16_forward_runs_in_bf16():
    scheme = SCHEMES["modelopt-fp8"]
    layer = build(scheme, (32,), 64, dtype=torch.bfloat16, bias=True)
    disk = make_disk(scheme, 32, 64)
    disk["bias"] = torch.randn(32, dtype=torch.bfloat16)
    load(layer, {None: disk})
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    y = layer(x)
    s = disk["input_scale"].float()
    xq = ((x.float() / s).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s).bfloat16()
    assert y.dtype == torch.bfloat16 and torch.equal(y, F.linear(xq, deq(layer).bfloat16(), disk["bias"]))
    assert layer.weight.dtype == torch.float8_e4m3fn  # stays FP8 in memory, as on disk
    assert torch.equal(layer.weight.view(torch.uint8), disk["weight"].view(torch.uint8))


@pytest.mark.parametrize("name,strategy", [("ct-fp8-tensor-static", "tensor"), ("ct-fp8-w8a16", "channel"),
                                           ("modelopt-fp8-channel-token", "channel")])
def test_tensor_and_channel_scales_decode_like_compressed_tensors(name, strategy):
    disk = make_disk(SCHEMES[name], 48, 96)
    layer = build(SCHEMES[name], (48,), 96)
    load(layer, {None: disk})
    scale = disk["weight_scale"].reshape(-1, 1) if strategy == "channel" else disk["weight_scale"].reshape(1)
    args = QuantizationArgs(num_bits=8, type="float", strategy=strategy, symmetric=True)
    ref = FloatQuantizationCompressor.decompress({"weight": disk["weight"], "weight_scale": scale.float()},
                                                 QuantizationScheme(targets=["Linear"], weights=args))["weight"]
    assert torch.equal(deq(layer), ref)
