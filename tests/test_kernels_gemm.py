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
    # a reference beyond the output dtype's range makes the test ill-posed: inf would be the right answer
    top = ref.abs().max().item()
    assert top <= torch.finfo(y.dtype).max, f"the reference reaches {top:.4g}, beyond {y.dtype}: fix the test data"
    assert torch.isfinite(y).all(), "non-finite output (unwritten or overflowed elements)"
    return ((y.float() - ref).norm() / ref.norm()).item()


def nvfp4_weight(n, k):
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    # block scales over E4M3's range, subnormals (2^-9..2^-7) included
    bs = (2.0 ** torch.randint(-9, 8, (n, k // 16)) * (1 + torch.rand(n, k // 16))).to(torch.float8_e4m3fn)
    # per-row global scale (fused shards carry one each) of ModelOpt's magnitude, amax/(6*448) ~ 1e-4..1e-3.
    # (Values near 1 made weights up to ~3000 and outputs of ~5e4 at K=4096: past fp16's 65504 in the
    # tail, so test_gpu_real_sizes[float16-16/200] failed on random data, not on the kernel.)
    rs = (torch.rand(n) + 0.25) * 1e-3
    return nm.pack_e2m1(codes).to(DEV), bs.to(DEV), rs.to(DEV)


def producer_nvfp4(n, k, dtype=torch.bfloat16):
    """An NVFP4 weight as ModelOpt exports it (lowbit quantize's producer-exact encoder) from Llama-like
    bf16 weights with outliers: block scales up to 448, weight_scale_2 = amax/2688 ~ 1e-4."""
    from lowbit.quantize import rtn

    w = torch.randn(n, k) * 0.02
    w[torch.rand(n, k) < 0.002] *= 10
    out = rtn.modelopt_nvfp4(w.to(dtype), rtn.amax(w.to(dtype)))
    return out["weight"].to(DEV), out["weight_scale"].to(DEV), out["weight_scale_2"].to(DEV)


def fp16_activations(m, k):
    """fp16 activations of magnitude ~100s, with a few outlier channels (~1e3) as real models have."""
    x = torch.randn(m, k) * 100
    x[:, torch.randperm(k)[:4]] *= 10
    return x.to(torch.float16).to(DEV)


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


@pytest.mark.parametrize("m", [16, 40])  # the M of the GPU failure; a 64-token tile
def test_nvfp4_fp16_with_producer_scales(m):
    """fp16 activations in the 100s against ModelOpt-magnitude scales (weight_scale_2 ~ 1e-4, block
    scales up to 448) on every NVFP4 path: checkpoint layout, planar decode, planar dequantize+matmul.
    Scales are applied where fp16 cannot overflow (the E2M1 x E4M3 tile at 2^-14 <= 0.17, the global
    scale in the fp32 epilogue), so all outputs are finite and as close as bf16's."""
    from lowbit.kernels import w4

    n, k = 72, 384
    packed, bs, rs = producer_nvfp4(n, k)
    x = fp16_activations(m, k)
    ref = reference(x, nm.dequant_nvfp4(packed, bs, rs), None)
    assert rel_err(kernels.nvfp4_linear(x, packed, bs, rs), ref) < TOL
    planar = kernels.prepare_nvfp4(packed)
    assert rel_err(kernels.nvfp4_linear(x, planar, bs, rs), ref) < TOL
    assert rel_err(w4.w4_linear(x, planar, True, k, bs, row_scale=rs.reshape(1).expand(n).contiguous(),
                                dense_min_m=1), ref) < TOL


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
    if dtype == torch.float16:  # producer-magnitude scales, activations in the 100s
        packed, bs, rs = producer_nvfp4(n, k)
        x = fp16_activations(m, k)
        ref = reference(x, nm.dequant_nvfp4(packed, bs, rs), None)
        assert rel_err(kernels.nvfp4_linear(x, packed, bs, rs), ref) < TOL
        assert rel_err(kernels.nvfp4_linear(x, kernels.prepare_nvfp4(packed), bs, rs), ref) < TOL
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
