"""compressed-tensors W8A8 int8 unit: fixture weights against compressed-tensors' decompression,
and the exact integer forward (dynamic per-token and static asymmetric activations) against an
int64 reference."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from compressed_tensors.compressors.naive_quantized.base import IntQuantizationCompressor
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

from conftest import fixture_dir
from lowbit.errors import ConfigError
from lowbit.quant.methods.int8 import quantize_int8_per_token
from lowbit.quant.scheme import Scheme
from test_methods_common import SCHEMES, build, deq, load, make_disk
from test_methods_nvfp4 import ATTN, read_module


def test_fixture_fused_qkv_matches_compressed_tensors_decompression():
    folder = "llmcompressor-w8a8"
    cfg = json.loads((fixture_dir(folder) / "config.json").read_text())["quantization_config"]
    ct_scheme = QuantizationScheme(**cfg["config_groups"]["group_0"])
    shards = [read_module(folder, f"{ATTN}.{p}_proj") for p in "qkv"]
    layer = build(SCHEMES["ct-w8a8-dynamic"], tuple(s["weight"].shape[0] for s in shards), 256)
    load(layer, dict(enumerate(shards)))
    ref = torch.cat([IntQuantizationCompressor.decompress(dict(s), ct_scheme)["weight"] for s in shards])
    assert ref.dtype == torch.bfloat16 and torch.equal(deq(layer).bfloat16(), ref)
    assert layer.weight.dtype == torch.int8 and layer.weight_scale.dtype == torch.float32


def int64_reference(xq: torch.Tensor, x_scale, layer) -> torch.Tensor:
    """The int8 GEMM: exact integer products summed in int64, then scaled in float32."""
    acc = xq.long() @ layer.weight.long().t()
    return acc.float() * x_scale * layer.weight_scale


def test_per_token_quantization_rounds_half_to_even():
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -2.5, 3.49, 0.0]])  # amax 127: scale exactly 1
    q, s = quantize_int8_per_token(x)
    assert float(s) == 1.0 and q.tolist() == [[127, 0, 2, 2, -0, -2, 3, 0]]
    q0, s0 = quantize_int8_per_token(torch.zeros(2, 4))  # padding rows: no NaN
    assert torch.equal(q0, torch.zeros(2, 4)) and torch.isfinite(s0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dynamic_per_token_forward_is_exact_integer_arithmetic(dtype):
    scheme = SCHEMES["ct-w8a8-dynamic"]
    k = 1024  # sums reach ~1.6e7: beyond what fp32 accumulates exactly
    layer = build(scheme, (48, 16), k, dtype=dtype)
    load(layer, dict(enumerate(make_disk(scheme, n, k) for n in (48, 16))))
    x = (torch.randn(2, 3, k) * torch.rand(2, 3, 1) * 5).to(dtype)
    xf = x.float()
    amax = xf.abs().amax(-1, keepdim=True)
    xq = torch.round(xf / (amax / 127))
    assert torch.equal(layer(x), int64_reference(xq, amax / 127, layer).to(dtype))
    assert torch.equal(xq.abs().amax(-1), torch.full((2, 3), 127.0))  # each row's max maps onto 127


def test_static_asymmetric_activations_with_zero_point():
    scheme = SCHEMES["ct-w8a8-static-asym"]
    disk = make_disk(scheme, 32, 64)
    layer = build(scheme, (32,), 64, bias=True)
    disk["bias"] = torch.randn(32)
    load(layer, {None: disk})
    s, zp = disk["input_scale"].float(), disk["input_zero_point"].float()
    x = torch.randn(5, 64) * 100 * s
    x[0, 0] = 1000 * s  # saturates at 127
    xq = (torch.round(x / s) + zp).clamp(-128, 127)
    assert xq[0, 0] == 127
    assert torch.equal(layer(x), int64_reference(xq - zp, s, layer) + disk["bias"])


def test_weight_only_mode_runs_the_dequantized_weight():
    scheme = SCHEMES["ct-w8a8-dynamic"]
    layer = build(scheme, (16,), 64, activation_quant="weight-only")
    load(layer, {None: make_disk(scheme, 16, 64)})
    x = torch.randn(3, 64)
    assert torch.equal(layer(x), F.linear(x, deq(layer)))


def test_unsupported_int8_layouts_are_config_errors():
    ct = "compressed-tensors"
    with pytest.raises(ConfigError, match="asymmetric"):
        build(Scheme(weight="int8", granularity="channel", symmetric=False, activation="int8", act_dynamic=True,
                     act_granularity="token", fmt=ct), (8,), 64)
    with pytest.raises(ConfigError, match="dynamic int8 activations per group"):
        build(Scheme(weight="int8", granularity="channel", activation="int8", act_dynamic=True,
                     act_granularity="group", fmt=ct), (8,), 64)


def test_per_tensor_weight_scale_decodes_like_compressed_tensors():
    disk = make_disk(SCHEMES["ct-w8a8-static-asym"], 40, 64)
    layer = build(SCHEMES["ct-w8a8-static-asym"], (40,), 64)
    load(layer, {None: disk})
    args = QuantizationArgs(num_bits=8, type="int", strategy="tensor", symmetric=True)
    ref = IntQuantizationCompressor.decompress({"weight": disk["weight"], "weight_scale": disk["weight_scale"].float()},
                                               QuantizationScheme(targets=["Linear"], weights=args))["weight"]
    assert torch.equal(deq(layer), ref)
