"""The planar 4-bit path (lowbit/kernels/w4.py): the load-time repack is exact and reversible, and
the planar kernels (mma.sync decode-in-registers for small M, dequantize + cuBLAS for large M)
compute the plain-PyTorch reference on NVFP4 and int4 weights of every group layout. Triton runs in
TRITON_INTERPRET mode without a GPU."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the kernels' import

pytest.importorskip("triton")

from lowbit import kernels  # noqa: E402
from lowbit.kernels import w4  # noqa: E402
from lowbit.kernels.gemm import Tiles  # noqa: E402
from lowbit.quant import numerics as nm  # noqa: E402

from conftest import requires_cuda  # noqa: E402
from test_kernels_gemm import DEV, TOL, int_weight, nvfp4_weight, reference, rel_err, x_and_bias  # noqa: E402


@pytest.mark.parametrize("k", [96, 208, 256, 300])
def test_prepare_is_exact_and_reversible(k):
    packed, _, _ = nvfp4_weight(24, k - k % 16)
    planar = kernels.prepare_nvfp4(packed)
    assert planar.dtype == torch.int32 and planar.shape == (24, -(-(k - k % 16) // 128) * 16)
    assert torch.equal(kernels.unprepare_nvfp4(planar, k - k % 16), packed)
    words, _, _, _ = int_weight(24, k, 4, 32, False, torch.bfloat16)
    assert torch.equal(kernels.unprepare_int4(kernels.prepare_int4(words, k), k), words)


def test_planar_holds_k_blocks_in_nibbles():
    """Nibble j of word w of a chunk is element 16*j + w of that chunk."""
    codes = torch.randint(0, 16, (3, 256), dtype=torch.uint8)
    planar = kernels.prepare_nvfp4(nm.pack_e2m1(codes).to(DEV)).cpu()
    for c, j, w in [(0, 0, 0), (0, 7, 15), (1, 3, 5), (1, 5, 12)]:
        assert ((planar[:, 16 * c + w] >> (4 * j)) & 0xF).tolist() == codes[:, 128 * c + 16 * j + w].tolist()


@pytest.mark.parametrize("m,n,k,dtype", [(1, 72, 96, torch.bfloat16), (3, 80, 208, torch.float16),
                                         (33, 72, 256, torch.bfloat16)])
def test_nvfp4_planar_matches_reference(m, n, k, dtype):
    packed, bs, rs = nvfp4_weight(n, k)
    x, bias = x_and_bias(m, n, k, dtype, True)
    ref = reference(x, nm.dequant_nvfp4(packed, bs, rs), bias)
    planar = kernels.prepare_nvfp4(packed)
    y = kernels.nvfp4_linear(x, planar, bs, rs, bias)
    assert y.dtype == dtype and rel_err(y, ref) < TOL


@pytest.mark.parametrize("group,asym,m,k", [(16, True, 2, 200), (32, False, 1, 100), (64, True, 3, 200),
                                            (128, True, 17, 256), (256, False, 4, 512), (None, True, 5, 130)])
def test_int4_planar_matches_reference(group, asym, m, k):
    n, dtype = 72, torch.bfloat16
    words, scale, zp, w = int_weight(n, k, 4, group, asym, dtype)
    x, bias = x_and_bias(m, n, k, dtype, asym)
    y = kernels.int_linear(x, kernels.prepare_int4(words, k), scale, zp, 4, group, k, bias, planar=True)
    assert rel_err(y, reference(x, w, bias)) < TOL


@pytest.mark.parametrize("tiles", [Tiles(16, 64, 128, split=3, warps=2), Tiles(32, 32, 128, warps=1),
                                   Tiles(16, 64, 128, warps=4)])
def test_planar_tilings_split_k_and_dense_path_agree(tiles):
    m, n, k = 5, 72, 640
    x, bias = x_and_bias(m, n, k, torch.bfloat16, True)
    packed, bs, rs = nvfp4_weight(n, k)
    planar = kernels.prepare_nvfp4(packed)
    ref = reference(x, nm.dequant_nvfp4(packed, bs, rs), bias)
    assert rel_err(w4.w4_linear(x, planar, True, k, bs, row_scale=rs, bias=bias, tiles=tiles), ref) < TOL
    assert rel_err(w4.w4_linear(x, planar, True, k, bs, row_scale=rs, bias=bias, dense_min_m=1), ref) < TOL
    words, scale, zp, w = int_weight(n, k, 4, 64, True, torch.bfloat16)
    y = w4.w4_linear(x, kernels.prepare_int4(words, k), False, k, scale, zp, 64, bias=bias, tiles=tiles)
    assert rel_err(y, reference(x, w, bias)) < TOL


def test_planar_shape_mismatch_and_support_rules():
    packed, bs, rs = nvfp4_weight(8, 256)
    planar = kernels.prepare_nvfp4(packed)
    with pytest.raises(ValueError, match="planar weight holds 256"):
        kernels.nvfp4_linear(torch.randn(1, 384, dtype=torch.bfloat16, device=DEV), planar, bs, rs)
    assert kernels.int_supported(4, 64, planar=True) and kernels.int_supported(4, 384, planar=True)
    assert not kernels.int_supported(4, 96, planar=True) and not kernels.int_supported(8, 128, planar=True)


@requires_cuda
@pytest.mark.parametrize("m", [1, 16, 128, 512])  # planar and dense paths of both formats
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_planar_real_sizes(m, dtype):
    n, k = 4304, 4096
    x, bias = x_and_bias(m, n, k, dtype, True)
    packed, bs, rs = nvfp4_weight(n, k)
    ref = reference(x, nm.dequant_nvfp4(packed, bs, rs), bias)
    assert rel_err(kernels.nvfp4_linear(x, kernels.prepare_nvfp4(packed), bs, rs, bias), ref) < TOL
    words, scale, zp, w = int_weight(n, k, 4, 128, True, dtype)
    y = kernels.int_linear(x, kernels.prepare_int4(words, k), scale, zp, 4, 128, k, bias, planar=True)
    assert rel_err(y, reference(x, w, bias)) < TOL


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_planar_ptx_equals_triton_spelling(dtype):
    m, n, k = 16, 256, 1024
    x, _ = x_and_bias(m, n, k, dtype, False)
    packed, bs, rs = nvfp4_weight(n, k)
    planar = kernels.prepare_nvfp4(packed)
    args = dict(row_scale=rs, tiles=Tiles(16, 64, 128, warps=2))
    assert torch.equal(w4.w4_linear(x, planar, True, k, bs, use_asm=True, **args),
                       w4.w4_linear(x, planar, True, k, bs, use_asm=False, **args))
    words, scale, zp, _ = int_weight(n, k, 4, 32, True, dtype)
    pw = kernels.prepare_int4(words, k)
    assert torch.equal(w4.w4_linear(x, pw, False, k, scale, zp, 32, use_asm=True),
                       w4.w4_linear(x, pw, False, k, scale, zp, 32, use_asm=False))
