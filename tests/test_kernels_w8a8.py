"""W8A8 kernels: the fused per-token activation quantizer (bit-exact against the references) and the
FP8 / int8 GEMMs on quantized activations. Triton runs in TRITON_INTERPRET mode without a GPU;
torch._scaled_mm (large-M FP8) only runs on one."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the kernels' import

pytest.importorskip("triton")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from lowbit import kernels  # noqa: E402
from lowbit.kernels import ops  # noqa: E402
from lowbit.kernels.act_quant import _round_bf16, quant_rows  # noqa: E402
from lowbit.quant import numerics as nm  # noqa: E402

from conftest import requires_cuda  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 8e-3  # exact products, fp32 sums, one bf16 rounding of the output


def on_cpu(x):
    """References run on the CPU: CUDA torch divides by a Python scalar through its reciprocal,
    one ulp away from the IEEE quotient that lowbit's numerics (and the kernels) use."""
    return x.cpu().float()


def rel_err(y, ref):
    assert torch.isfinite(y).all()
    return ((y.float() - ref).norm() / ref.norm()).item()


def activations(m, k, dtype=torch.bfloat16):
    # rows of very different magnitudes, so per-token scales matter
    return (torch.randn(m, k) * torch.logspace(-2, 2, m)[:, None]).to(dtype).to(DEV)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp8_dynamic_quant_is_bit_exact(dtype):
    x = activations(5, 300, dtype)
    x[2] = 0  # an all-zero row keeps a finite scale and zero codes
    q, s = quant_rows(x, torch.float8_e4m3fn)
    s_ref = (on_cpu(x).abs().amax(-1) / nm.FP8_MAX).clamp(min=1e-12)
    assert torch.equal(s.cpu(), s_ref)
    assert torch.equal(q.cpu().view(torch.uint8), nm.quantize_fp8(on_cpu(x), s_ref[:, None]).view(torch.uint8))


def test_fp8_rounding_ties_and_saturation():
    """Controlled values: E4M3 ties go to the even mantissa, across binades and in the subnormals."""
    vals = [448.0, 17.0, 19.0, 240.0, 232.0, 2.0 ** -10 * 3, 2.0 ** -10, 0.0, -17.0, 500.0, -1000.0, 1.0625]
    x = torch.tensor([vals], dtype=torch.float32).to(DEV)
    q, _ = quant_rows(x.to(torch.bfloat16), torch.float8_e4m3fn, torch.tensor(1.0, device=DEV))
    expect = torch.tensor([vals]).clamp(-448, 448).to(torch.float8_e4m3fn)  # torch rounds to nearest even
    assert torch.equal(q.cpu().view(torch.uint8), expect.view(torch.uint8))
    assert q.float()[0, 1] == 16.0 and q.float()[0, 2] == 20.0  # 17 -> 16, 19 -> 20 (even mantissas)


def int8_rows(m, k, dtype):
    """Rows for the dynamic int8 rule: magnitudes from 1e-2 to 1e2, an extreme exactly on the tie
    (amax 127.5 * 2^e: scale 2^e, x/s = +-127.5 -> 127 / -128), controlled ties inside a row, an
    all-zero row, and (fp16) a row so small that its scale underflows to 0 and becomes eps."""
    x = activations(m, k, dtype)
    x[0, :6] = torch.tensor([127.5, 2.5, 3.5, -2.5, -0.5, 1.5])  # scale exactly 1: exact ties
    x[0, 6:] = x[0, 6:].clamp(-100, 100)
    x[1] = x[1].clamp(-2, 2)
    x[1, 7] = -127.5 * 4  # negative extreme on the tie, scale 4
    x[2] = 0
    x[3] = 1e-7 * torch.randn(k, device=DEV)
    return x


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int8_dynamic_quant_is_compressed_tensors_rule_bit_exact(dtype):
    x = int8_rows(6, 200, dtype)
    q, s = quant_rows(x, torch.int8)
    q_ref, s_ref = nm.quantize_int8_per_token(x.cpu())
    assert torch.equal(s.cpu(), s_ref[:, 0])
    assert torch.equal(q.cpu(), q_ref.to(torch.int8))
    assert q[0, :6].tolist() == [127, 2, 4, -2, 0, 2] and q[1, 7] == -128 and float(s[1]) == 4.0
    assert (q[2] == 0).all() and float(s[2]) == torch.finfo(dtype).eps


@triton.jit
def _round_bf16_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, _round_bf16(tl.load(x_ptr + offs)))


def test_bf16_rounding_is_round_to_nearest_even():
    """_round_bf16 (integer spelling) against torch's fp32 -> bf16 cast, ties and carries included."""
    ties = torch.tensor([1 + 2.0 ** -8, 1 + 3 * 2.0 ** -8, -(1 + 2.0 ** -8), 255.5, 2.0 ** -130, 3.3e38, 0.0, -0.0])
    x = torch.cat([ties, torch.randn(248) * 10.0 ** torch.randint(-30, 30, (248,))]).to(DEV)
    y = torch.empty_like(x)
    _round_bf16_kernel[(1,)](x, y, BLOCK=256)
    assert torch.equal(y.cpu().view(torch.int32), x.cpu().bfloat16().float().view(torch.int32))


def test_static_scale_quant():
    x = activations(3, 64)
    scale = torch.tensor([0.05], device=DEV)
    q, s = quant_rows(x, torch.int8, scale)
    assert torch.equal(s, torch.full((3,), 0.05, device=DEV))
    xf = on_cpu(x)
    assert torch.equal(q.cpu(), torch.round(xf / 0.05).clamp(-128, 127).to(torch.int8))
    q8, _ = quant_rows(x, torch.float8_e4m3fn, scale)
    assert torch.equal(q8.cpu().view(torch.uint8), nm.quantize_fp8(xf, 0.05).view(torch.uint8))


def k_halves(x):
    """A row-parallel cut of x's K (odd) into two uneven slices, and each row's amax over all of K."""
    h = x.shape[1] // 2
    return (x[:, :h], x[:, h:]), x.abs().amax(-1).float()


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.int8])
def test_given_amax_quantizes_a_slice_as_the_whole_row(dtype):
    """A row-parallel rank holds a slice of K and is given the row's amax over all of it: its codes
    and scales are those of the unsplit row, bit for bit."""
    x = activations(7, 301)
    x[:, 150:] *= 3  # most rows' amax in the second slice: the first slice's own would differ
    q, s = quant_rows(x, dtype)
    if dtype == torch.int8:
        assert torch.equal(s.cpu(), nm.quantize_int8_per_token(x.cpu())[1][:, 0])
    else:
        assert torch.equal(s.cpu(), (on_cpu(x).abs().amax(-1) / nm.FP8_MAX).clamp(min=1e-12))
    slices, amax = k_halves(x)
    parts = [quant_rows(part, dtype, amax=amax) for part in slices]
    for qp, sp in parts:
        assert torch.equal(sp, s)
    assert torch.equal(torch.cat([qp for qp, _ in parts], 1).view(torch.uint8), q.view(torch.uint8))


def test_given_amax_must_be_one_per_row_and_dynamic():
    x = activations(4, 64)
    with pytest.raises(ValueError, match=r"one value per row \(4\); got 3 values"):
        quant_rows(x, torch.int8, amax=torch.rand(3, device=DEV))
    with pytest.raises(ValueError, match="and a static input_scale"):
        quant_rows(x, torch.int8, torch.tensor(0.05, device=DEV), amax=torch.rand(4, device=DEV))


def fp8_weight(n, k):
    w = (torch.randn(n, k) * 100).clamp(-448, 448).to(torch.float8_e4m3fn).to(DEV)
    return w, (torch.rand(n) * 0.01 + 1e-3).to(DEV)


@pytest.mark.parametrize("m,n,k,static", [(1, 72, 96, False), (3, 80, 160, True), (33, 72, 256, False)])
def test_fp8_w8a8_matches_reference(m, n, k, static):
    w, ws = fp8_weight(n, k)
    x = activations(m, k)
    bias = torch.randn(n, dtype=torch.bfloat16, device=DEV)
    scale = torch.tensor(x.float().abs().max().item() / 448, device=DEV) if static else None
    y = kernels.fp8_linear(x, w, ws, scale, bias)
    xq = nm.fake_quant_fp8_activation(on_cpu(x), scale.cpu() if static else None)
    ref = xq @ (on_cpu(w) * on_cpu(ws)[:, None]).T + on_cpu(bias)
    assert y.dtype == torch.bfloat16 and rel_err(y.cpu(), ref) < TOL


@pytest.mark.parametrize("m,static,dtype", [(1, False, torch.bfloat16), (5, True, torch.float16),
                                            (33, False, torch.bfloat16)])
def test_int8_w8a8_matches_reference(m, static, dtype):
    n, k = 72, 208
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=DEV)
    ws = (torch.rand(n) * 0.01 + 1e-3).to(DEV)
    x = activations(m, k, dtype)
    scale = torch.tensor(0.03, device=DEV) if static else None
    y = kernels.int8_linear(x, w, ws, scale)
    xf = on_cpu(x)
    if static:
        xs = torch.full((m, 1), 0.03)
        q = torch.round(xf / xs).clamp(-128, 127)
    else:
        q, xs = nm.quantize_int8_per_token(x.cpu())
    ref = (q.double() @ w.cpu().double().T).float() * xs * on_cpu(ws)  # exact integer sums
    assert y.dtype == dtype and rel_err(y.cpu(), ref) < TOL


def test_int8_weight_only():
    n, k = 72, 130
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=DEV)
    ws = (torch.rand(n) * 0.01 + 1e-3).to(DEV)
    x = activations(3, k)
    y = kernels.int8_linear(x, w, ws, quantize_input=False)
    assert rel_err(y, x.float() @ (w.float() * ws[:, None]).T) < TOL


@requires_cuda
@pytest.mark.parametrize("m", [1, ops.SCALED_MM_MIN_M, 300])
def test_gpu_fp8_w8a8_both_paths(m):
    """Below SCALED_MM_MIN_M the Triton kernel runs, from it on torch._scaled_mm: same function."""
    n, k = 4304, 4096
    w, ws = fp8_weight(n, k)
    x = activations(m, k)
    bias = torch.randn(n, dtype=torch.bfloat16, device=DEV)
    ref = nm.fake_quant_fp8_activation(on_cpu(x), None) @ (on_cpu(w) * on_cpu(ws)[:, None]).T + on_cpu(bias)
    assert rel_err(kernels.fp8_linear(x, w, ws, None, bias).cpu(), ref) < TOL


@pytest.mark.parametrize("fp8", [True, False])
def test_w8a8_linear_on_a_slice_of_k_with_the_rows_amax(fp8):
    """What a row-parallel rank computes: its slice of x (odd K) quantized with the whole row's
    scale, times its columns of the weight: the unsplit layer's products over those columns."""
    n, k = 72, 301
    x = activations(5, k)
    x[:, 150:] *= 3
    (part, _), amax = k_halves(x)
    h = part.shape[1]
    if fp8:
        w, ws = fp8_weight(n, k)
        y = kernels.fp8_linear(part, w[:, :h].contiguous(), ws, amax=amax)
        xq = nm.fake_quant_fp8_activation(on_cpu(x), None)
    else:
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=DEV)
        ws = (torch.rand(n) * 0.01 + 1e-3).to(DEV)
        y = kernels.int8_linear(part, w[:, :h].contiguous(), ws, amax=amax)
        q, xs = nm.quantize_int8_per_token(x.cpu())
        xq = q * xs
    ref = xq[:, :h] @ (on_cpu(w[:, :h]) * on_cpu(ws)[:, None]).T
    assert rel_err(y.cpu(), ref) < TOL
