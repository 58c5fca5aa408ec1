"""`lowbit quantize` writes the same bytes on every device (issue 14: on CUDA 0.1-1.6% of the ModelOpt
codes differed from the fixtures, which ModelOpt wrote on CPU).

Two CUDA behaviours of torch moved the scales by an ulp: a tensor divided by a Python number (any
CPU scalar) is multiplied by the number's reciprocal, and a 0-d fp32 operand of a bf16 tensor is
rounded to bf16 before use (CPU uses its full value). The first test watches every aten op of every
encoder (a dispatch mode, so it catches the pattern on CPU, where the values happen to agree); the
second re-derives the ModelOpt encodings in float64 (each fp32 step is the correctly rounded fp64
quotient or product), on whatever device is present; the third compares CUDA with CPU byte for byte.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import requires_cuda
from lowbit.quant.numerics import float_to_e2m1, unpack_e2m1
from lowbit.quantize import rtn

DEV = "cuda" if torch.cuda.is_available() else "cpu"
ARITH = {torch.ops.aten.add, torch.ops.aten.sub, torch.ops.aten.mul, torch.ops.aten.div, torch.ops.aten.add_,
         torch.ops.aten.sub_, torch.ops.aten.mul_, torch.ops.aten.div_}


class DeviceDependentOps(TorchDispatchMode):
    """Records the arithmetic steps that CUDA torch rounds differently from CPU torch: a division by a
    Python number other than a power of two (CUDA: times its reciprocal), and a binary op on two float
    dtypes whose result keeps the narrower one (a 0-d operand: CUDA rounds it to that dtype first)."""

    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in ARITH and len(args) >= 2:
            a, b = args[0], args[1]
            name = func.overloadpacket.__name__
            if name.startswith("div") and isinstance(b, (int, float)) and not _power_of_two(b):
                self.found.append(f"{name}(tensor {a.dtype}, Python {b})")
            elif (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype != b.dtype
                  and a.is_floating_point() and b.is_floating_point()
                  and out.dtype != torch.promote_types(a.dtype, b.dtype)):
                self.found.append(f"{name}({a.dtype} {tuple(a.shape)}, {b.dtype} {tuple(b.shape)}) -> {out.dtype}")
        return out


def _power_of_two(v) -> bool:
    return v != 0 and abs(math.frexp(float(v))[0]) == 0.5


def _weight(n=32, k=256, dtype=torch.bfloat16, device="cpu"):
    w = torch.randn(n, k) * 0.02
    w[torch.rand(n, k) < 0.01] *= 8
    w[1, :16] = 0  # a zero NVFP4 block / int group
    return w.to(dtype).to(device)


def _encoders(w):
    """Every weight and activation encoder of rtn.py, by name."""
    a = rtn.amax(w)
    return {
        "modelopt fp8": lambda: rtn.modelopt_fp8(w),
        "modelopt fp8 channel": lambda: rtn.modelopt_fp8_per_channel(w),
        "modelopt nvfp4": lambda: rtn.modelopt_nvfp4(w, a),
        "modelopt input fp8": lambda: {"s": rtn.modelopt_input_scale(a, "fp8")},
        "modelopt input nvfp4": lambda: {"s": rtn.modelopt_input_scale(a, "nvfp4")},
        "ct nvfp4": lambda: rtn.ct_nvfp4(w, rtn.ct_global_scale(a)),
        "ct w4 g32": lambda: rtn.ct_int(w, 4, 32),
        "ct w4 g64 asym": lambda: rtn.ct_int(w, 4, 64, symmetric=False),
        "ct w8 channel": lambda: rtn.ct_int(w, 8, None),
        "ct w8a8": lambda: rtn.ct_int(w, 8, None, packed=False),
        "ct fp8 tensor": lambda: rtn.ct_fp8(w, per_channel=False),
        "ct fp8 channel": lambda: rtn.ct_fp8(w, per_channel=True),
        "ct input fp8": lambda: rtn.ct_input_scale(a, "fp8"),
        "ct input nvfp4": lambda: rtn.ct_input_scale(a, "nvfp4"),
    }


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_no_encoder_step_rounds_differently_on_cuda(dtype):
    for name, encode in _encoders(_weight(dtype=dtype)).items():
        with DeviceDependentOps() as mode:
            encode()
        assert not mode.found, f"{name}: device-dependent steps {mode.found}"


def test_the_op_watcher_sees_both_cuda_patterns():
    w = _weight()
    with DeviceDependentOps() as mode:
        s = w.abs().amax().float() / 448.0  # CUDA: times 1/448
        _ = w / s  # bf16 over a 0-d fp32: CUDA rounds s to bf16 first
        _ = w / 2.0  # exact either way
    assert len(mode.found) == 2 and "Python 448.0" in mode.found[0] and "-> torch.bfloat16" in mode.found[1]


def _f32(t64: torch.Tensor) -> torch.Tensor:
    return t64.float().double()  # one rounding to fp32, kept in fp64 for the next exact step


def test_modelopt_encodings_equal_the_ieee_derivation():
    """ModelOpt's export, re-derived in float64 on the CPU: scale = fp32(amax/448 or /2688); FP8
    codes e4m3(bf16(fp32(w/scale))); NVFP4 block scales e4m3(fp32(block_amax / fp32(6*scale_2)))
    (zero -> 1) and codes e2m1(fp32(w / fp32(block_scale*scale_2)))."""
    w = _weight(n=64, k=512)
    w64 = w.double()
    amax = w64.abs().amax()

    scale = _f32(amax / 448)
    ours = rtn.modelopt_fp8(w.to(DEV))
    assert ours["weight_scale"].item() == scale.item()
    ref = _f32(w64 / scale).to(torch.bfloat16).to(torch.float8_e4m3fn)
    assert torch.equal(ours["weight"].cpu().view(torch.uint8), ref.view(torch.uint8))

    row = _f32(w64.abs().amax(1) / 448)
    ours = rtn.modelopt_fp8_per_channel(w.to(DEV))
    assert torch.equal(ours["weight_scale"].cpu().double(), row)
    assert torch.equal(ours["weight"].cpu().view(torch.uint8),
                       _f32(w64 / row[:, None]).float().to(torch.float8_e4m3fn).view(torch.uint8))

    s2 = _f32(amax / 2688)
    ours = rtn.modelopt_nvfp4(w.to(DEV), rtn.amax(w).to(DEV))
    assert ours["weight_scale_2"].item() == s2.item()
    blocks = w64.reshape(64, -1, 16)
    bs = _f32(blocks.abs().amax(-1) / _f32(6 * s2))
    bs[bs == 0] = 1.0
    bs = bs.float().to(torch.float8_e4m3fn)
    assert torch.equal(ours["weight_scale"].cpu().view(torch.uint8), bs.view(torch.uint8))
    scaled = _f32(blocks / _f32(bs.double() * s2)[..., None]).float()
    codes = float_to_e2m1(scaled) | ((scaled < 0).to(torch.uint8) << 3)
    assert torch.equal(unpack_e2m1(ours["weight"].cpu()), codes.reshape(64, -1))


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_writes_the_bytes_cpu_writes(dtype):
    w = _weight(n=256, k=1024, dtype=dtype)
    on_cpu, on_gpu = _encoders(w), _encoders(w.cuda())
    for name in on_cpu:
        ref, ours = on_cpu[name](), on_gpu[name]()
        for role, t in ref.items():
            o = ours[role].cpu()
            assert o.dtype == t.dtype and o.shape == t.shape and torch.equal(_bytes(o), _bytes(t)), f"{name} {role}"


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).contiguous().view(torch.uint8)
