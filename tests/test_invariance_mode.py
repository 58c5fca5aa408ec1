"""The batch-invariant mode's switch and its unquantized GEMM (lowbit/kernels/invariance.py), on CPU.

The GEMM (gemm.py's kernel with FMT_FLOAT) runs in Triton's interpreter on small odd shapes against
torch in float32; with the mode on its rows are bitwise the same alone and in a batch, because the
tiles no longer depend on M. The plumbing: every pick_tiles ignores M in the mode, the M-dependent
paths are off, `lowbit.load`/`synthetic.build` turn the mode on, the commands take
`--batch-invariant`, and `lowbit bench --batch-invariant` reports both modes. The GPU side is
tests/test_batch_invariance_gpu.py.
"""
from __future__ import annotations

import json
import os
import re

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the kernels' import

pytest.importorskip("triton")

from lowbit import synthetic  # noqa: E402
from lowbit.cli import build_parser, main  # noqa: E402
from lowbit.kernels import gemm as gemm_mod, invariance, moe, w4  # noqa: E402
from lowbit.kernels.gemm import FMT_FLOAT, FMT_INT4, FMT_NVFP4, Tiles  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# the output dtype's rounding (bf16 2^-9, fp16 2^-11) over fp32 sums; fp32 only the summation order
TOL = {torch.bfloat16: 8e-3, torch.float16: 2e-3, torch.float32: 2e-6}


@pytest.fixture(autouse=True)
def _mode_off():
    invariance.set_enabled(False)
    yield
    invariance.set_enabled(False)


def rel_err(y, ref):
    assert torch.isfinite(y).all()
    return ((y.float() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("m,n,k,tiles", [(1, 70, 200, None), (37, 130, 300, None),
                                         (5, 64, 704, Tiles(16, 64, 64, split=3, warps=4, stages=2))])
def test_float_gemm_matches_torch(dtype, m, n, k, tiles):
    """Random x, weight, bias (fresh each run) vs torch in float32; a split-K tiling too."""
    x, w, b = (torch.randn(m, k), torch.randn(n, k) / k ** 0.5, torch.randn(n))
    ref = x @ w.T + b
    xd, wd, bd = (t.to(DEV, dtype) for t in (x, w, b))
    ref = xd.float() @ wd.float().T + bd.float()  # the operands as the kernel sees them
    y = invariance.gemm_linear(xd, wd, bd, tiles=tiles)
    assert y.dtype == dtype and y.shape == (m, n)
    assert rel_err(y, ref) < TOL[dtype]


def test_rows_alone_equal_rows_in_a_batch():
    """With the mode on the tiles are M = 1's at every M: each row of a batch of 37 equals the row
    computed alone, bit for bit (the interpreter runs the same tile shapes on the same data)."""
    x = torch.randn(37, 300).to(DEV, torch.float16)
    w = (torch.randn(70, 300) / 17).to(DEV, torch.float16)
    with invariance.scope():
        full = invariance.gemm_linear(x, w)
        for i in (0, 17, 36):
            assert torch.equal(invariance.gemm_linear(x[i:i + 1], w)[0], full[i]), i


def test_switch_fixes_every_tiling_and_path():
    dev = torch.device(DEV)
    with invariance.scope():
        assert invariance.enabled() and not invariance.m_dependent_paths()
        for m in (1, 7, 33, 100, 4096):
            assert gemm_mod.pick_tiles(m, 4096, 4096, FMT_INT4, 128, dev) == \
                gemm_mod.pick_tiles(1, 4096, 4096, FMT_INT4, 128, dev)
            assert gemm_mod.pick_tiles(m, 512, 1024, FMT_FLOAT, 0, dev) == \
                gemm_mod.pick_tiles(1, 512, 1024, FMT_FLOAT, 0, dev)
            for nvfp4 in (True, False):
                assert w4.pick_tiles(m, 6144, 4096, dev, nvfp4) == w4.pick_tiles(1, 6144, 4096, dev, nvfp4)
            assert moe.pick_block_m(m * 8, 64) == invariance.MOE_BLOCK_M
        with invariance.scope(False):
            assert not invariance.enabled() and invariance.m_dependent_paths()
            assert gemm_mod.pick_tiles(4096, 4096, 4096, FMT_NVFP4, 16, dev).bm == 128
            assert moe.pick_block_m(4096, 8) == 64
        assert invariance.enabled()
    assert not invariance.enabled()


def test_ordered_sum():
    t = torch.randn(5, 4, 33).to(torch.bfloat16)
    assert torch.equal(invariance.ordered_sum(t, 1), t.sum(dim=1))  # off: torch's
    with invariance.scope():
        want = (((t[:, 0].float() + t[:, 1]) + t[:, 2]) + t[:, 3]).to(torch.bfloat16)
        assert torch.equal(invariance.ordered_sum(t, 1), want)


def test_linear_is_torch_off_the_gpu_or_off_the_mode():
    x, w = torch.randn(3, 16), torch.randn(8, 16)
    with invariance.scope():
        assert torch.equal(invariance.linear(x, w), torch.nn.functional.linear(x, w))  # CPU tensors: torch


def test_load_options_turn_the_mode_on():
    synthetic.build("tiny", device="cpu", dtype=torch.float32)
    assert not invariance.enabled()
    model = synthetic.build("tiny", device="cpu", dtype=torch.float32, batch_invariant=True)
    assert model.options.batch_invariant and invariance.enabled()
    for argv in (["serve", "--synthetic", "tiny"], ["bench", "--synthetic", "tiny"], ["generate", "p", "--prompt", "hi"]):
        assert build_parser().parse_args(argv + ["--batch-invariant"]).batch_invariant, argv
        assert not build_parser().parse_args(argv).batch_invariant, argv


def test_bench_measures_both_modes(capsys):
    from lowbit.bench import format_table

    small = ["--prompt-lens", "8", "--batches", "1,2", "--new-tokens", "1", "--decode-prompt", "4", "--device", "cpu"]
    assert main(["bench", "--synthetic", "tiny", "--batch-invariant", "--json", *small]) == 0
    r = json.loads(capsys.readouterr().out)
    assert set(r["batch_invariant"]["decode"]) == {"1", "2"} and set(r["batch_invariant"]["prefill"]) == {"8"}
    assert all(v["tok_s"] > 0 for v in r["batch_invariant"]["decode"].values())
    assert not invariance.enabled()  # bench leaves the process as it found it
    table = format_table(r)
    assert "batch-invariant mode" in table and len(re.findall(r"decode b\d", table)) == 2


def test_what_the_mode_cannot_hold_is_refused():
    from types import SimpleNamespace

    from lowbit.errors import ConfigError
    from lowbit.quant.scheme import Scheme

    def plan(**scheme):
        return SimpleNamespace(layers={"model.layers.3.mlp.down_proj": SimpleNamespace(scheme=Scheme(**scheme))})

    invariance.check_model(plan(weight="fp8", activation="fp8", act_dynamic=True, act_granularity="token"), 1)
    with pytest.raises(ConfigError, match="model.layers.3.mlp.down_proj quantize activations with one dynamic scale"):
        invariance.check_model(plan(weight="fp8", activation="fp8", act_dynamic=True, act_granularity="tensor"), 1)
    with pytest.raises(ConfigError, match="not with tensor parallelism"):
        invariance.check_model(plan(weight="bf16"), 2)
