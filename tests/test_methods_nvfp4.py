"""NVFP4 unit (ModelOpt NVFP4 / W4A16_NVFP4, compressed-tensors NVFP4 / NVFP4A16): fixture bytes
decoded by hand and by compressed-tensors, both global-scale conventions, the W4A4 activation
modes, and the activation scale of fused shards."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
from compressed_tensors.quantization import QuantizationScheme
from safetensors import safe_open

from conftest import fixture_dir
from lowbit.quant.methods.nvfp4 import WEIGHT_ONLY_NOTE
from lowbit.quant.numerics import fake_quant_nvfp4_activation
from test_methods_common import SCHEMES, assert_fp32_close, build, deq, load, make_disk

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def hand_decode(packed, block_scale, global_mul):
    """Element k of row n: nibble k%2 of byte k//2 (low first), times its E4M3 block scale k//16
    times the multiplying global scale. Written without lowbit's numerics."""
    n, half = packed.shape
    k = torch.arange(2 * half)
    nib = (packed[:, k // 2].int() >> (4 * (k % 2))) & 0xF
    return E2M1[nib.long()] * block_scale.float()[:, k // 16] * global_mul


def read_module(folder, module):
    out = {}
    with safe_open(str(fixture_dir(folder) / "model.safetensors"), "pt") as f:
        for name in f.keys():
            if name.startswith(module + "."):
                out[name[len(module) + 1:]] = f.get_tensor(name)
    return out


ATTN = "model.layers.0.self_attn"


@pytest.mark.parametrize("folder,scheme", [("modelopt-nvfp4", "modelopt-nvfp4"),
                                           ("modelopt-w4a16_nvfp4", "modelopt-w4a16-nvfp4")])
def test_modelopt_fixture_qkv_decodes_like_the_bytes(folder, scheme):
    shards = [read_module(folder, f"{ATTN}.{p}_proj") for p in "qkv"]
    sizes = tuple(s["weight"].shape[0] for s in shards)
    k = shards[0]["weight"].shape[1] * 2
    layer = build(SCHEMES[scheme], sizes, k)
    notes = load(layer, dict(enumerate(shards)))
    expected = torch.cat([hand_decode(s["weight"], s["weight_scale"], s["weight_scale_2"]) for s in shards])
    assert torch.equal(deq(layer), expected)
    assert notes == ([WEIGHT_ONLY_NOTE] if scheme == "modelopt-nvfp4" else [])


@pytest.mark.parametrize("folder,scheme", [("llmcompressor-nvfp4", "ct-nvfp4"), ("llmcompressor-nvfp4a16", "ct-nvfp4a16")])
def test_ct_fixture_qkv_matches_compressed_tensors_decompression(folder, scheme):
    cfg = json.loads((fixture_dir(folder) / "config.json").read_text())["quantization_config"]
    ct_scheme = QuantizationScheme(**cfg["config_groups"]["group_0"])
    shards = [read_module(folder, f"{ATTN}.{p}_proj") for p in "qkv"]
    sizes = tuple(s["weight_packed"].shape[0] for s in shards)
    layer = build(SCHEMES[scheme], sizes, shards[0]["weight_packed"].shape[1] * 2)
    load(layer, dict(enumerate(shards)))
    ref = torch.cat([NVFP4PackedCompressor.decompress(dict(s), ct_scheme)["weight"] for s in shards])
    assert ref.dtype == torch.bfloat16  # compressed-tensors decodes into bf16
    assert torch.equal(deq(layer).bfloat16(), ref)
    # in fp32, CT's scale/global division and lowbit's multiplication by 1/global differ by rounding
    hand = torch.cat([hand_decode(s["weight_packed"], s["weight_scale"], 1 / s["weight_global_scale"]) for s in shards])
    torch.testing.assert_close(deq(layer), hand, rtol=2e-7, atol=0)


def test_the_two_global_scale_conventions_decode_the_same_weight():
    """ModelOpt multiplies by weight_scale_2; compressed-tensors divides by weight_global_scale."""
    n, k = 40, 200  # K not a multiple of 128 (NVFP4 needs only whole bytes; the last block is partial)
    ct = make_disk(SCHEMES["ct-nvfp4a16"], n, k)
    mo = {"weight": ct["weight_packed"], "weight_scale": ct["weight_scale"],
          "weight_scale_2": (1 / ct["weight_global_scale"]).reshape(())}
    a, b = build(SCHEMES["ct-nvfp4a16"], (n,), k), build(SCHEMES["modelopt-w4a16-nvfp4"], (n,), k)
    load(a, {None: ct})
    load(b, {None: mo})
    assert torch.equal(deq(a), deq(b))
    assert torch.equal(deq(a), hand_decode(ct["weight_packed"], ct["weight_scale"], 1 / ct["weight_global_scale"]))
    wrong = hand_decode(ct["weight_packed"], ct["weight_scale"], ct["weight_global_scale"])  # mixed up
    assert (wrong.norm() / deq(a).norm()) > 1e6


@pytest.mark.parametrize("name", ["modelopt-nvfp4", "ct-nvfp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w4a4_activation_modes(name, dtype):
    scheme = SCHEMES[name]
    disk = make_disk(scheme, 48, 64)
    g = float(disk["input_scale"]) if "input_scale" in disk else 1 / float(disk["input_global_scale"])
    x = torch.randn(7, 64, dtype=dtype) * 200 * g  # activations on the scale the checkpoint was calibrated for
    outs = {}
    for mode in ("auto", "emulate", "weight-only"):
        layer = build(scheme, (48,), 64, dtype=dtype, activation_quant=mode)
        notes = load(layer, {None: disk})
        assert (WEIGHT_ONLY_NOTE in notes) == (mode == "auto")
        w = deq(layer).to(dtype)
        outs[mode] = layer(x)
        assert outs[mode].dtype == dtype
    w_only = F.linear(x, w)
    assert torch.equal(outs["auto"], w_only) and torch.equal(outs["weight-only"], w_only)
    assert torch.equal(outs["emulate"], F.linear(fake_quant_nvfp4_activation(x, torch.tensor(g)), w))
    assert not torch.equal(outs["emulate"], w_only)


def test_weight_only_scheme_ignores_a_stray_input_scale():
    scheme = SCHEMES["modelopt-w4a16-nvfp4"]
    disk = make_disk(scheme, 32, 64)
    disk["input_scale"] = torch.tensor(0.01)
    layer = build(scheme, (32,), 64, activation_quant="emulate")
    notes = load(layer, {None: disk})
    assert any("input_scale ignored" in n for n in notes)
    x = torch.randn(3, 64)
    assert torch.equal(layer(x), F.linear(x, deq(layer)))


@pytest.mark.parametrize("name,role", [("modelopt-nvfp4", "input_scale"), ("ct-nvfp4", "input_global_scale")])
def test_fused_shards_with_different_input_scales_share_the_largest(name, role):
    scheme = SCHEMES[name]
    disks = [make_disk(scheme, n, 64) for n in (32, 16, 16)]
    decode = [float(d[role]) if role == "input_scale" else 1 / float(d[role]) for d in disks]
    layer = build(scheme, (32, 16, 16), 64, activation_quant="emulate")
    notes = load(layer, dict(enumerate(disks)))
    assert any("different activation scales" in n for n in notes)
    assert float(layer.input_scale) == pytest.approx(max(decode), rel=1e-6)
    x = torch.randn(4, 64) * 300 * max(decode)
    assert_fp32_close(layer(x), F.linear(fake_quant_nvfp4_activation(x, layer.input_scale), deq(layer)))
