"""Batch-invariant mode: a row's result does not depend on the other rows computed with it.

One process-wide switch (`enabled()`), turned on by `lowbit.load(..., batch_invariant=True)`,
`synthetic.build(..., batch_invariant=True)` or the commands' `--batch-invariant`, and scoped in
tests and `lowbit bench` with `scope(on)`. The kernels read it when they launch (a CUDA graph keeps
what was chosen at capture: capture with the mode as it will run). Off, every kernel picks its
fastest tiling and path by the token count M; on, these rules hold on the GPU:

1. Every GEMM reduces each output row over K in the same order whatever M is: its tile shape, K
   tile and K split are those it would pick at M = 1 (`tiles_m`), a function of N and K alone.
   Split-K partials are summed in a fixed order, so the split itself is harmless.
2. No path switches by M (`m_dependent_paths()` is False): no dequantize + cuBLAS for large M
   (w4.py DENSE_MIN_M), no cuBLASLt FP8 for large M (ops.SCALED_MM_MIN_M), no dot-free GEMV for
   small M. A dispatch that picks a path by M reads `m_dependent_paths()`.
3. Unquantized bf16/fp16/fp32 linears (projections, lm_head, tied embeddings, routers, the
   references of the quantized units) run `linear` below: the Triton GEMM of gemm.py (FMT_FLOAT)
   with fixed tiles, instead of cuBLAS, which picks its algorithm and split-K by M.
4. MoE: fixed blocks of `MOE_BLOCK_M` pairs (a token's result does not depend on how many tokens
   share its expert: its column of the block is computed alone over the same K tiles), and the
   sum over a token's k experts in a fixed order (`ordered_sum`).

Row-local already, on CPU and GPU: RMSNorm (one program per row), rotary + KV store, SiLU-and-mul,
decode attention (one program per row and KV head, over the row's own keys), the routing kernel,
per-token activation quantization, and sampling (each row from its own logits with its own
generator; lowbit/sampling.py). Prefill attention runs one sequence per engine call.
What the mode costs is measured by `lowbit bench --batch-invariant` (docs/benchmarks.md).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

MOE_BLOCK_M = 16  # pairs per grouped-GEMM block in the mode (the decode size)
_enabled = False


def enabled() -> bool:
    """Whether the batch-invariant mode is on (process-wide)."""
    return _enabled


def set_enabled(on: bool) -> None:
    global _enabled
    _enabled = bool(on)


@contextlib.contextmanager
def scope(on: bool = True):
    """The mode on (or off) inside the block, as it was after."""
    before = _enabled
    set_enabled(on)
    try:
        yield
    finally:
        set_enabled(before)


def check_model(plan, tp_size: int) -> None:
    """Refuse what the mode cannot make batch-invariant: activations quantized with one dynamic
    scale per tensor (its amax spans every row of the batch), and tensor parallelism (NCCL picks
    its all-reduce algorithm by message size, hence by M). plan: the model's QuantPlan."""
    from ..errors import ConfigError

    if tp_size > 1:
        raise ConfigError(f"batch-invariant mode: not with tensor parallelism (tp={tp_size}: the all-reduce's "
                          f"summation order depends on the batch size); run with one rank or without the mode")
    shared = sorted(n for n, lp in plan.layers.items()
                    if lp.scheme.act_dynamic and lp.scheme.act_granularity == "tensor")
    if shared:
        more = f" and {len(shared) - 1} more" if len(shared) > 1 else ""
        raise ConfigError(f"batch-invariant mode: {shared[0]}{more} quantize activations with one dynamic scale "
                          f"per tensor, computed over the whole batch, so no row is independent of the others; "
                          f"load without batch_invariant (--batch-invariant), or use per-token or static scales")


def tiles_m(m: int) -> int:
    """The token count a pick_tiles function sizes its tiles and K split for: m, or 1 in the mode."""
    return 1 if _enabled else m


def m_dependent_paths() -> bool:
    """Whether a dispatch may switch kernels by M (GEMV, dequantize + cuBLAS, cuBLASLt): not in the mode."""
    return not _enabled


def ordered_sum(t: torch.Tensor, dim: int) -> torch.Tensor:
    """t.sum(dim); in the mode an fp32 sum in index order (torch's reductions pick their order by shape)."""
    if not _enabled:
        return t.sum(dim=dim)
    parts = t.unbind(dim)
    acc = parts[0].float()
    for p in parts[1:]:
        acc = acc + p
    return acc.to(t.dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias); in the mode, on a GPU with x and weight of one float dtype, the
    Triton GEMM with tiles fixed by N and K (`gemm_linear`)."""
    if _enabled and x.is_cuda and x.dtype == weight.dtype and x.dtype in FLOAT_DTYPES:
        return gemm_linear(x, weight, bias)
    return F.linear(x, weight, bias)


FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def gemm_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                tiles=None) -> torch.Tensor:
    """x [..., K] @ weight[N, K].T (+ bias) through gemm.py's kernel (FMT_FLOAT), fp32 accumulation,
    the tiles of M = 1 (fp32: a shorter K tile, the operands take twice the shared memory) unless
    `tiles` are given. Any device where the kernels run (a GPU, or Triton's interpreter)."""
    import dataclasses

    from .gemm import FMT_FLOAT, gemm, pick_tiles

    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"linear: x has {x.shape[-1]} input features, the weight has {k}")
    if tiles is None:
        tiles = pick_tiles(tiles_m(x.numel() // max(k, 1)), n, k, FMT_FLOAT, 0, x.device)
        if x.dtype == torch.float32:
            tiles = dataclasses.replace(tiles, bk=min(tiles.bk, 64), stages=min(tiles.stages, 3))
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    return gemm(x, w, FMT_FLOAT, k, bias=bias, tiles=tiles, use_asm=False)
