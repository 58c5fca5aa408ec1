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
from compressed_tensors.quantization.lifecycle.forward import forward_quantize
from compressed_tensors.quantization.quant_config import QuantizationStatus

from conftest import fixture_dir
from lowbit.errors import ConfigError
from lowbit.quant.numerics import fake_quant_int8_per_token, quantize_int8_per_token
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


def ct_forward_quantize(x: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' own fake quantization of a dynamic per-token int8 input (W8A8's)."""
    args = QuantizationArgs(num_bits=8, type="int", strategy="token", symmetric=True, dynamic=True)
    module = torch.nn.Linear(1, 1)
    module.quantization_status = QuantizationStatus.FROZEN
    return forward_quantize(module, x, "input", args)


def tie_rows(b, t, k, dtype):
    """[b, t, k] activations (compressed-tensors' per-token rule needs the batch dimension), rows of
    magnitudes 1e-3..1e3, and rows whose extreme lands exactly on the tie: amax 127.5 * 2^e gives the
    scale 2^e and x/s = +-127.5, which the rule clamps to 127 and rounds to -128."""
    x = torch.randn(b, t, k) * torch.logspace(-3, 3, t)[None, :, None]
    x[0, 0] = torch.randn(k).clamp(-1, 1)
    x[0, 0, 3] = 127.5  # scale 1
    x[0, 1] = torch.randn(k).clamp(-1, 1) * 16
    x[0, 1, 5] = -127.5 * 2 ** 5  # scale 32, negative extreme
    x[0, 2, :6] = torch.tensor([127.5, 2.5, 3.5, -2.5, -0.5, -0.0])  # ties inside a row, and -0
    x[0, 2, 6:] = x[0, 2, 6:].clamp(-100, 100)
    x[0, 3] = 0  # all-zero row: the scale becomes the dtype's eps
    x[0, 4] = torch.randn(k) * 1e-7  # fp16: the scale underflows to 0 -> eps
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_per_token_rule_is_compressed_tensors_forward_quantize_bit_for_bit(dtype):
    x = tie_rows(2, 40, 96, dtype)
    ref = ct_forward_quantize(x)
    ours = fake_quant_int8_per_token(x)
    assert ours.dtype == ref.dtype == dtype
    as_int = torch.int32 if dtype == torch.float32 else torch.int16
    assert torch.equal(ours.view(as_int), ref.view(as_int))  # every bit, the signs of zeros included
    q, s = quantize_int8_per_token(x)
    assert q[0, 0, 3] == 127 and q[0, 1, 5] == -128 and float(s[0, 1]) == 32.0
    assert q[0, 2, :6].tolist() == [127, 2, 4, -2, -0.0, 0] and float(s[0, 3]) == torch.finfo(dtype).eps
    assert torch.equal(q.to(dtype) * s.to(dtype), ours)  # the codes and scales the GEMM uses are these
    # vLLM's amax/127 rule, which lowbit used before, is a different function
    assert not torch.equal(torch.round(x.float() / (x.float().abs().amax(-1, keepdim=True) / 127)), q)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dynamic_per_token_forward_is_exact_integer_arithmetic(dtype):
    scheme = SCHEMES["ct-w8a8-dynamic"]
    k = 1024  # sums reach ~1.6e7: beyond what fp32 accumulates exactly
    layer = build(scheme, (48, 16), k, dtype=dtype)
    load(layer, dict(enumerate(make_disk(scheme, n, k) for n in (48, 16))))
    x = (torch.randn(2, 3, k) * torch.rand(2, 3, 1) * 5).to(dtype)
    ref = ct_forward_quantize(x)  # the producer's fake-quantized input: its codes and scales are ours
    s = (x.abs().amax(-1, keepdim=True) / torch.tensor(127.5, dtype=dtype)).float()
    xq = torch.round(ref.float() / s)
    assert torch.equal(xq.to(dtype) * s.to(dtype), ref)
    assert torch.equal(layer(x), int64_reference(xq, s, layer).to(dtype))


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
