"""Weight-only GEMM kernels (NVFP4, compressed-tensors int4/int8, FP8) against the plain-PyTorch
dequantize-then-matmul reference. Without a GPU the Triton kernels run in TRITON_INTERPRET mode on
small odd shapes; with one, the same tests run compiled, plus real sizes and the PTX decoders."""
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the kernels' import

pytest.importorskip("triton")

from lowbit import kernels  # noqa: E402
from lowbit.kernels.gemm import FMT_INT4, FMT_NVFP4, Tiles, gemm  # noqa: E402
from lowbit.quant import numerics as nm  # noqa: E402

from conftest import requires_cuda  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# bf16 weights are exact here (E2M1*E4M3 and small ints fit), so the error is the fp32 sums and
# the bf16/fp16 output rounding: ~2^-9 relative
TOL = 8e-3


def rel_err(y, ref):
    assert torch.isfinite(y).all(), "non-finite output (unwritten or overflowed elements)"
    return ((y.float() - ref).norm() / ref.norm()).item()


def nvfp4_weight(n, k):
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    # block scales over E4M3's range, subnormals (2^-9..2^-7) included
    bs = (2.0 ** torch.randint(-9, 8, (n, k // 16)) * (1 + torch.rand(n, k // 16))).to(torch.float8_e4m3fn)
    rs = torch.rand(n) + 0.25  # per-row global scale, as fused shards carry
    return nm.pack_e2m1(codes).to(DEV), bs.to(DEV), rs.to(DEV)


def int_weight(n, k, bits, group, asym, dtype):
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1)
    q = torch.randint(lo, hi, (n, k))
    g = -(-k // group) if group else 1
    scale = ((torch.rand(n, g) + 0.5) / hi).to(dtype)
    zp = torch.randint(lo // 2, hi // 2, (n, g), dtype=torch.int8) if asym else None
    ref = nm.dequant_int(q, scale, zp, group or None)
    return nm.pack_int32(q, bits).to(DEV), scale.to(DEV), (zp.to(DEV) if asym else None), ref.to(DEV)


def x_and_bias(m, n, k, dtype, with_bias):
    x = torch.randn(m, k, dtype=dtype, device=DEV)
    bias = torch.randn(n, dtype=dtype, device=DEV) if with_bias else None
    return x, bias


def reference(x, w, bias):
    y = x.float() @ w.float().T
    return y + bias.float() if bias is not None else y


@pytest.mark.parametrize("m,n,k,dtype,with_bias", [
    (1, 72, 96, torch.bfloat16, False),
    (3, 80, 208, torch.bfloat16, True),  # K not a multiple of the 64/128/256 K-tiles
    (33, 72, 256, torch.float16, True),
])
def test_nvfp4_matches_reference(m, n, k, dtype, with_bias):
    packed, bs, rs = nvfp4_weight(n, k)
    x, bias = x_and_bias(m, n, k, dtype, with_bias)
    y = kernels.nvfp4_linear(x, packed, bs, rs, bias)
    assert y.dtype == dtype and y.shape == (m, n)
    assert rel_err(y, reference(x, nm.dequant_nvfp4(packed, bs, rs), bias)) < TOL


@pytest.mark.parametrize("bits,group,asym,m,k", [
    (4, 32, False, 1, 100),  # K not a multiple of the group nor of 8 codes a word
    (4, 64, True, 3, 200),
    (4, 128, True, 17, 256),
    (4, None, True, 5, 130),  # per channel
    (8, 32, True, 2, 130),
    (8, None, False, 3, 96),
])
def test_int_matches_reference(bits, group, asym, m, k):
    n, dtype = 72, torch.bfloat16
    packed, scale, zp, w = int_weight(n, k, bits, group, asym, dtype)
    x, bias = x_and_bias(m, n, k, dtype, with_bias=asym)
    y = kernels.int_linear(x, packed, scale, zp, bits, group, k, bias)
    assert y.dtype == dtype and y.shape == (m, n)
    assert rel_err(y, reference(x, w, bias)) < TOL


def test_fp8_weight_only_matches_reference():
    m, n, k = 3, 80, 160
    w = (torch.randn(n, k) * 50).clamp(-448, 448).to(torch.float8_e4m3fn).to(DEV)
    ws = (torch.rand(n) + 0.1).to(DEV)
    x, bias = x_and_bias(m, n, k, torch.bfloat16, True)
    y = kernels.fp8_linear(x, w, ws, bias=bias, quantize_input=False)
    assert rel_err(y, reference(x, w.float() * ws[:, None], bias)) < TOL


@pytest.mark.parametrize("tiles", [Tiles(16, 64, 64, split=3), Tiles(32, 32, 128), Tiles(16, 64, 128, split=2)])
def test_tilings_and_split_k_agree(tiles):
    """Every tiling (split-K partial sums, a group scale per element or per K-tile) is the same function."""
    m, n, k = 5, 72, 384
    x, bias = x_and_bias(m, n, k, torch.bfloat16, True)
    packed, bs, rs = nvfp4_weight(n, k)
    ref = reference(x, nm.dequant_nvfp4(packed, bs, rs), bias)
    y = gemm(x, packed.view(torch.int32), FMT_NVFP4, k, scale=bs, group=16, row_scale=rs, bias=bias, tiles=tiles)
    assert rel_err(y, ref) < TOL
    words, scale, zp, w = int_weight(n, k, 4, 128, True, torch.bfloat16)
    y = gemm(x, words, FMT_INT4, k, scale=scale, zero=zp, group=128, bias=bias, tiles=tiles)
    assert rel_err(y, reference(x, w, bias)) < TOL


def test_leading_dims_and_empty_batch():
    n, k = 72, 64
    packed, bs, rs = nvfp4_weight(n, k)
    x = torch.randn(2, 3, k, dtype=torch.bfloat16, device=DEV)
    y = kernels.nvfp4_linear(x, packed, bs, rs)
    assert y.shape == (2, 3, n)
    assert rel_err(y.reshape(6, n), reference(x.reshape(6, k), nm.dequant_nvfp4(packed, bs, rs), None)) < TOL
    assert kernels.nvfp4_linear(x[:0], packed, bs, rs).shape == (0, 3, n)


def test_unsupported_inputs_are_refused():
    packed, bs, rs = nvfp4_weight(8, 32)
    with pytest.raises(ValueError, match="bf16 or fp16"):
        kernels.nvfp4_linear(torch.randn(1, 32, device=DEV), packed, bs, rs)
    with pytest.raises(ValueError, match="input features"):
        kernels.nvfp4_linear(torch.randn(1, 48, dtype=torch.bfloat16, device=DEV), packed, bs, rs)
    assert not kernels.nvfp4_supported(36) and kernels.nvfp4_supported(4096)
    assert not kernels.int_supported(4, 96) and not kernels.int_supported(3, 128)
    assert kernels.int_supported(8, None) and kernels.int_supported(4, 32)
    words, scale, _, _ = int_weight(8, 96, 4, 32, False, torch.bfloat16)
    with pytest.raises(ValueError, match="group size 48"):
        kernels.int_linear(torch.randn(1, 96, dtype=torch.bfloat16, device=DEV), words, scale, None, 4, 48, 96)


def test_importing_kernels_does_not_import_triton():
    code = "import sys, lowbit.kernels as k; assert 'triton' not in sys.modules; print(k.available('cpu'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------- GPU: real sizes, PTX decoders
@requires_cuda
@pytest.mark.parametrize("m", [1, 16, 200])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_real_sizes(m, dtype):
    n, k = 4304, 4096
    x, bias = x_and_bias(m, n, k, dtype, True)
    packed, bs, rs = nvfp4_weight(n, k)
    assert rel_err(kernels.nvfp4_linear(x, packed, bs, rs, bias), reference(x, nm.dequant_nvfp4(packed, bs, rs), bias)) < TOL
    words, scale, zp, w = int_weight(n, k, 4, 128, True, dtype)
    assert rel_err(kernels.int_linear(x, words, scale, zp, 4, 128, k, bias), reference(x, w, bias)) < TOL


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_ptx_decoders_equal_triton_spelling(dtype):
    """The inline-PTX decoders compute bit for bit what the plain Triton spelling computes."""
    m, n, k = 16, 256, 1024
    x, _ = x_and_bias(m, n, k, dtype, False)
    packed, bs, rs = nvfp4_weight(n, k)
    args = dict(scale=bs, group=16, row_scale=rs, tiles=Tiles(16, 64, 256))
    words = packed.view(torch.int32)
    assert torch.equal(gemm(x, words, FMT_NVFP4, k, use_asm=True, **args), gemm(x, words, FMT_NVFP4, k, use_asm=False, **args))
    for group, tiles in ((32, Tiles(16, 64, 256)), (128, Tiles(16, 64, 128))):  # per element, per tile
        words, scale, zp, _ = int_weight(n, k, 4, group, True, dtype)
        args = dict(scale=scale, zero=zp, group=group, tiles=tiles)
        assert torch.equal(gemm(x, words, FMT_INT4, k, use_asm=True, **args), gemm(x, words, FMT_INT4, k, use_asm=False, **args))
