"""The bit-exact format helpers (lowbit/quant/numerics.py) against the producers' own code
(compressed-tensors, importable here), literal re-implementations of spec section 2, and the
bytes of the fixtures."""
from __future__ import annotations

import pytest
import torch
from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8, unpack_fp4_from_uint8
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import dequantize, fake_quantize
from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp
from safetensors import safe_open

from conftest import fixture_dir
from lowbit.quant import numerics as nm

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def e2m1_round_literal(v: float) -> float:
    """Nearest E2M1 magnitude, ties to the code with an even mantissa bit, clamp at 6."""
    a = min(abs(v), 6.0)
    best = min(range(8), key=lambda c: (abs(E2M1[c] - a), c % 2))
    return E2M1[best] if v >= 0 else -E2M1[best]


def test_e2m1_rounding_ties_go_to_the_even_mantissa():
    ties = {0.25: 0.0, 0.75: 1.0, 1.25: 1.0, 1.75: 2.0, 2.5: 2.0, 3.5: 4.0, 5.0: 4.0, 6.5: 6.0, 1e9: 6.0}
    x = torch.tensor(list(ties) + [-v for v in ties])
    got = nm.e2m1_to_float(nm.float_to_e2m1(x))
    assert got.tolist() == list(ties.values()) + [-v for v in ties.values()]


def test_e2m1_rounding_matches_a_literal_nearest_search():
    x = torch.randn(4000) * 3
    x[:800] = torch.randint(-24, 25, (800,)) / 4  # quarter steps hit every tie
    got = nm.e2m1_to_float(nm.float_to_e2m1(x))
    assert got.tolist() == [e2m1_round_literal(v) for v in x.tolist()]


def test_e2m1_packing_matches_compressed_tensors_both_ways():
    codes = torch.randint(0, 16, (33, 64), dtype=torch.uint8)
    values = nm.e2m1_to_float(codes)
    packed = nm.pack_e2m1(codes)
    assert torch.equal(packed, pack_fp4_to_uint8(values))
    assert torch.equal(unpack_fp4_from_uint8(packed, 33, 64), nm.e2m1_to_float(nm.unpack_e2m1(packed)))


@pytest.mark.parametrize("folder,tensor", [("modelopt-nvfp4", "model.layers.0.self_attn.q_proj.weight"),
                                           ("llmcompressor-nvfp4", "model.layers.0.self_attn.q_proj.weight_packed")])
def test_e2m1_nibble_order_on_fixture_bytes(folder, tensor):
    with safe_open(str(fixture_dir(folder) / "model.safetensors"), "pt") as f:
        packed = f.get_tensor(tensor)
    codes = nm.unpack_e2m1(packed)
    row = packed[3].tolist()
    by_hand = [c for b in row for c in (b & 0xF, b >> 4)]  # element 2j: low nibble
    assert codes[3].tolist() == by_hand
    assert torch.equal(nm.e2m1_to_float(codes), unpack_fp4_from_uint8(packed, *packed.shape[:1], packed.shape[1] * 2))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape,dim", [((16, 100), 1), ((7, 37), 1), ((20, 6), 0), ((3, 64), 0)])
def test_int32_packing_matches_compressed_tensors(bits, shape, dim):
    q = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), shape, dtype=torch.int8)
    packed = nm.pack_int32(q, bits, dim=dim)
    assert torch.equal(packed, pack_to_int32(q, bits, packed_dim=dim))
    assert torch.equal(nm.unpack_int32(packed, bits, shape[dim], dim=dim), q)
    assert torch.equal(unpack_from_int32(packed, bits, torch.Size(shape), packed_dim=dim), q)


def test_int4_bit_positions_on_fixture_bytes():
    """Element i of a row sits in bits [4i, 4i+4) of the row's int32 stream, stored + 8."""
    with safe_open(str(fixture_dir("llmcompressor-w4a16") / "model.safetensors"), "pt") as f:
        packed = f.get_tensor("model.layers.0.mlp.down_proj.weight_packed")
    words = [w & 0xFFFFFFFF for w in packed[5].tolist()]
    by_hand = [((words[i // 8] >> (4 * (i % 8))) & 0xF) - 8 for i in range(8 * len(words))]
    assert nm.unpack_int32(packed, 4, 8 * packed.shape[1])[5].tolist() == by_hand


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("strategy,group", [("group", 32), ("channel", None)])
def test_dequant_int_matches_compressed_tensors(bits, strategy, group):
    n, k = 24, 96
    q = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (n, k), dtype=torch.int8)
    cols = k // group if group else 1
    scale = (torch.rand(n, cols) + 0.1).float()
    zp = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (n, cols), dtype=torch.int8)
    args = QuantizationArgs(num_bits=bits, type="int", strategy=strategy, group_size=group, symmetric=False)
    ref = dequantize(q, scale, zp, args, dtype=torch.float32)
    torch.testing.assert_close(nm.dequant_int(q, scale, zp, group), ref, rtol=0, atol=0)


def fake_quant_nvfp4_literal(x: torch.Tensor, g: float) -> torch.Tensor:
    """Spec section 2, element by element in Python floats (fp32 steps where the spec rounds)."""
    f32 = lambda v: torch.tensor(v, dtype=torch.float32).item()  # noqa: E731
    g = f32(g)  # the global scale is an fp32 tensor; each operation below rounds once to fp32
    out = []
    for row in x.float().tolist():
        res = []
        for s in range(0, len(row), 16):
            blk = row[s:s + 16]
            amax = max(abs(v) for v in blk)
            raw = min(max(f32(amax / f32(6 * g)), 2.0 ** -9), 448.0)
            bs = torch.tensor(raw).to(torch.float8_e4m3fn).float().item()
            denom = f32(bs * g)
            res += [f32(f32(e2m1_round_literal(f32(v / denom)) * bs) * g) for v in blk]
        out.append(res)
    return torch.tensor(out).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nvfp4_activation_fake_quant_is_spec_section_2(dtype):
    x = (torch.randn(6, 64) * torch.rand(6, 1) * 4).to(dtype)
    x[0, :16] = 0.0  # an all-zero block: the 2^-9 clamp keeps it finite and zero
    g = float(x.float().abs().amax()) / (6 * 448) * (0.5 + torch.rand(()).item())
    got = nm.fake_quant_nvfp4_activation(x, g)
    assert got.dtype == dtype and torch.equal(got, fake_quant_nvfp4_literal(x, g))


def test_nvfp4_activation_partial_block_is_padded():
    x = torch.randn(3, 40)
    g = float(x.abs().amax()) / (6 * 448)
    padded = nm.fake_quant_nvfp4_activation(torch.nn.functional.pad(x, (0, 8)), g)
    assert torch.equal(nm.fake_quant_nvfp4_activation(x, g), padded[:, :40])


def test_nvfp4_activation_matches_compressed_tensors_in_fp32():
    """In fp32, compressed-tensors' own W4A4 activation fake-quant agrees with lowbit's to fp32
    rounding (it divides by block_scale/global_scale where the spec multiplies by 1/global; in
    bf16 it also rounds amax/6 to bf16 first, which moves ~2% of elements by one E2M1 step)."""
    args = QuantizationArgs(num_bits=4, type="float", strategy="tensor_group", group_size=16, dynamic="local",
                            symmetric=True, scale_dtype=torch.float8_e4m3fn)
    x = torch.randn(32, 256) * torch.rand(32, 1) * 3
    gs = (448 * 6 / x.abs().amax()).bfloat16().float().reshape(1)  # input_global_scale as stored
    scale, zp = compute_dynamic_scales_and_zp(x, args, None, global_scale=gs)
    ref = fake_quantize(x, scale, zp, args, global_scale=gs)
    torch.testing.assert_close(nm.fake_quant_nvfp4_activation(x, 1 / gs), ref, rtol=2e-6, atol=0)


def test_dequant_nvfp4_row_scale_scalar_or_per_row():
    packed = torch.randint(0, 256, (8, 24), dtype=torch.uint8)
    bs = (torch.rand(8, 3) * 100 + 0.1).to(torch.float8_e4m3fn)
    rs = torch.rand(8) + 0.5
    per_row = nm.dequant_nvfp4(packed, bs, rs)
    assert torch.equal(per_row[2], nm.dequant_nvfp4(packed[2:3], bs[2:3], float(rs[2]))[0])


def test_fp8_activation_quant_static_and_dynamic():
    x = torch.randn(5, 48) * 10
    x[2] = 0.0  # a zero row (e.g. a padding token) must stay zero, not NaN
    x[3] = 0.0
    x[3, 0] = 1e-30  # a tiny but non-zero row keeps its own scale
    s = torch.tensor(0.01)
    static = nm.fake_quant_fp8_activation(x, s)
    assert torch.equal(static, (x / s).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s)  # saturates
    dyn = nm.fake_quant_fp8_activation(x, None)
    amax = x.abs().amax(-1, keepdim=True)
    ref = (x / (amax / 448)).to(torch.float8_e4m3fn).float() * (amax / 448)
    assert torch.equal(dyn[[0, 1, 3, 4]], ref[[0, 1, 3, 4]]) and torch.equal(dyn[2], x[2])
    torch.testing.assert_close(dyn[3], x[3], rtol=1e-6, atol=0)  # amax maps onto 448 exactly
