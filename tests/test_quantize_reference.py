"""rtn.py against an independent reference, on fresh random weights every run.

compressed-tensors is the producer library itself: its `calculate_qparams` / `generate_gparam`
(scales, with llm-compressor's min/max observer statistics taken in the weight dtype) and its
compressors (quantize + pack) are the reference for the compressed-tensors encodings, including
the variants no fixture covers (asymmetric int4, groups 32/64, per-channel, per-tensor FP8).
ModelOpt has no importable reference here; its encodings are checked byte for byte against the
ModelOpt fixtures (test_quantize_exact.py) and, below, for the properties its export guarantees.
"""
from __future__ import annotations

import pytest
import torch

from lowbit.quant.numerics import dequant_int, dequant_nvfp4, unpack_e2m1, unpack_int32
from lowbit.quantize import rtn

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors.naive_quantized.base import (  # noqa: E402
    FloatQuantizationCompressor,
    IntQuantizationCompressor,
)
from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor  # noqa: E402
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor  # noqa: E402
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme  # noqa: E402
from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam  # noqa: E402


def _weight(n=96, k=256, dtype=torch.bfloat16):
    """Llama-like weights with a few outliers, so scales differ between groups and rows."""
    w = torch.randn(n, k) * 0.02
    w[torch.rand(n, k) < 0.002] *= 8
    return w.to(dtype)


def _observe(w, group_size=None, per_tensor=False):
    """llm-compressor's min/max observer: statistics in the weight dtype."""
    if per_tensor:
        return w.amin(), w.amax()
    if group_size:
        g = w.unflatten(-1, (-1, group_size))
        return g.amin(-1), g.amax(-1)
    return w.amin(1, keepdim=True), w.amax(1, keepdim=True)


def _scheme(args):
    return QuantizationScheme(targets=["Linear"], weights=args)


def _ct_pack_quantized(w, bits, group, symmetric=True):
    """compressed-tensors' own pack-quantized tensors for w (group None: per channel)."""
    args = QuantizationArgs(num_bits=bits, type="int", strategy="group" if group else "channel",
                            group_size=group, symmetric=symmetric)
    scale, zp = calculate_qparams(*_observe(w, group), args)
    return PackedQuantizationCompressor.compress({"weight": w, "weight_scale": scale, "weight_zero_point": zp},
                                                 _scheme(args))


def _ct_nvfp4(w):
    """compressed-tensors' own NVFP4 tensors for w, with its own global scale."""
    args = QuantizationArgs(num_bits=4, type="float", strategy="tensor_group", group_size=16, symmetric=True,
                            scale_dtype=torch.float8_e4m3fn)
    global_scale = generate_gparam(w.amin(), w.amax())
    scale, _ = calculate_qparams(*_observe(w, 16), args, global_scale=global_scale)
    return NVFP4PackedCompressor.compress({"weight": w, "weight_scale": scale, "weight_global_scale": global_scale},
                                          _scheme(args))


def _assert_nvfp4_equal(ours, ref):
    assert torch.equal(ours["weight_global_scale"], ref["weight_global_scale"])
    assert torch.equal(ours["weight_scale"].view(torch.uint8), ref["weight_scale"].view(torch.uint8))
    assert torch.equal(unpack_e2m1(ours["weight_packed"]), unpack_e2m1(ref["weight_packed"]))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [32, 64, 128, None])
@pytest.mark.parametrize("symmetric", [True, False])
def test_ct_pack_quantized_matches_compressed_tensors(bits, group, symmetric):
    w = _weight()
    ref = _ct_pack_quantized(w, bits, group, symmetric)
    ours = rtn.ct_int(w, bits, group, symmetric)
    assert sorted(ours) == sorted(ref)
    for role in ours:
        assert ours[role].dtype == ref[role].dtype and ours[role].shape == ref[role].shape, role
        assert torch.equal(ours[role], ref[role]), role
    # and the codes mean what they should: they decode back to the weight at int4/int8 precision (the
    # outliers widen some groups; a wrong packing or scale convention gives errors near 1)
    q = unpack_int32(ours["weight_packed"], bits, w.shape[1])
    z = unpack_int32(ours["weight_zero_point"], bits, w.shape[0], dim=0) if not symmetric else None
    deq = dequant_int(q, ours["weight_scale"], z, group)
    assert (deq - w.float()).norm() / w.float().norm() < (0.3 if bits == 4 else 0.03)


def test_ct_int8_weights_match_compressed_tensors():
    w = _weight()
    args = QuantizationArgs(num_bits=8, type="int", strategy="channel", symmetric=True)
    scale, zp = calculate_qparams(*_observe(w), args)
    ref = IntQuantizationCompressor.compress({"weight": w, "weight_scale": scale, "weight_zero_point": zp},
                                             _scheme(args))
    ours = rtn.ct_int(w, 8, None, packed=False)
    assert torch.equal(ours["weight"], ref["weight"]) and torch.equal(ours["weight_scale"], ref["weight_scale"])


@pytest.mark.parametrize("strategy", ["channel", "tensor"])
def test_ct_fp8_matches_compressed_tensors(strategy):
    w = _weight()
    args = QuantizationArgs(num_bits=8, type="float", strategy=strategy, symmetric=True)
    scale, zp = calculate_qparams(*_observe(w, per_tensor=strategy == "tensor"), args)
    ref = FloatQuantizationCompressor.compress({"weight": w, "weight_scale": scale, "weight_zero_point": zp},
                                               _scheme(args))
    ours = rtn.ct_fp8(w, per_channel=strategy == "channel")
    assert torch.equal(ours["weight"].view(torch.uint8), ref["weight"].view(torch.uint8))
    assert torch.equal(ours["weight_scale"], ref["weight_scale"].reshape(ours["weight_scale"].shape))


def test_ct_nvfp4_matches_compressed_tensors():
    w = _weight(k=512)
    _assert_nvfp4_equal(rtn.ct_nvfp4(w, rtn.ct_global_scale(rtn.amax(w))), _ct_nvfp4(w))


def test_ct_fused_shards_share_the_smallest_global_scale():
    """llm-compressor gives q/k/v (gate/up) one global scale: the smallest of theirs, i.e. the one of
    the largest amax; quantizing a shard with it must still decode close to the weight."""
    q, k = _weight(), _weight() * 3
    shared = rtn.ct_global_scale(rtn.shared_amax([q, k]))
    assert torch.equal(shared, torch.minimum(rtn.ct_global_scale(rtn.amax(q)), rtn.ct_global_scale(rtn.amax(k))))
    out = rtn.ct_nvfp4(q, shared)
    deq = dequant_nvfp4(out["weight_packed"], out["weight_scale"], 1 / out["weight_global_scale"])
    assert (deq - q.float()).norm() / q.float().norm() < 0.15


def test_modelopt_nvfp4_properties():
    """ModelOpt NVFP4 export: weight_scale_2 = amax/(6*448) of the (shared) amax; every block's
    largest element maps to +-6 or just below; decoding recovers the weight to NVFP4 precision."""
    w = _weight(k=512)
    bigger = rtn.amax(w).float() * 2  # as if a fused sibling had twice the range
    out = rtn.modelopt_nvfp4(w, bigger)
    assert out["weight_scale_2"].shape == () and out["weight_scale_2"].dtype == torch.float32
    assert torch.equal(out["weight_scale_2"], bigger / 2688)
    deq = dequant_nvfp4(out["weight"], out["weight_scale"], out["weight_scale_2"])
    assert (deq - w.float()).norm() / w.float().norm() < 0.15
    codes = unpack_e2m1(out["weight"]).reshape(w.shape[0], -1, 16) & 7
    assert (codes.amax(-1) >= 6).all()  # block max encodes as 4 or 6 (E4M3 scale rounding)


def test_small_negative_values_keep_the_sign_bit():
    """Both producers store a negative value that rounds to zero as -0 (code 8), not +0."""
    scaled = torch.tensor([[-0.1, 0.1, -0.0, 0.0, -3.0, 3.0, -0.25, 0.25] * 2])
    codes = rtn._e2m1_codes(scaled)
    assert codes.tolist()[0][:8] == [8, 0, 0, 0, 13, 5, 8, 0]


@pytest.mark.parametrize("fmt,activation", [("modelopt", "fp8"), ("modelopt", "nvfp4"),
                                            ("compressed-tensors", "fp8"), ("compressed-tensors", "nvfp4")])
def test_activation_scales(fmt, activation):
    amax = (torch.rand(()) * 10 + 0.5).to(torch.bfloat16)
    if fmt == "modelopt":
        s = rtn.modelopt_input_scale(amax, activation)
        assert s.shape == () and s.dtype == torch.float32
        assert torch.isclose(s * (448 if activation == "fp8" else 2688), amax.float(), rtol=1e-6)
    else:
        (role, s), = rtn.ct_input_scale(amax, activation).items()
        assert s.shape == (1,)
        if activation == "fp8":
            assert role == "input_scale" and s.dtype == torch.bfloat16
            assert torch.isclose(s.float() * 448, amax.float(), rtol=1e-2)
        else:
            assert role == "input_global_scale" and s.dtype == torch.float32
            assert torch.equal(s, generate_gparam(-amax.reshape(1), amax.reshape(1)))


def test_all_zero_groups_match_compressed_tensors():
    """A zero block/group/row gets the producer's fallback scale (CT: the dtype's eps, E4M3: 0.125)."""
    w = _weight(k=256)
    w[3, :32] = 0  # zero NVFP4 blocks and int groups of 32
    w[5] = 0  # a zero row
    ours, ref = rtn.ct_int(w, 4, 32), _ct_pack_quantized(w, 4, 32)
    assert torch.equal(ours["weight_scale"], ref["weight_scale"])
    assert torch.equal(ours["weight_packed"], ref["weight_packed"])
    _assert_nvfp4_equal(rtn.ct_nvfp4(w, rtn.ct_global_scale(rtn.amax(w))), _ct_nvfp4(w))
    mo = rtn.modelopt_nvfp4(w, rtn.amax(w))  # ModelOpt sets a zero block's scale to 1.0 before E4M3
    assert (mo["weight_scale"][5].float() == 1.0).all()
