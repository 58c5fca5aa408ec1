"""MoE kernels: routing, sorting tokens by expert, and one grouped GEMM launch per projection.

  route(logits, routing)            softmax (or sigmoid + correction bias) over E, top-k, optional
                                    renormalisation and routed scaling, one kernel -> (weights fp32
                                    [T, k], ids int32 [T, k]).
  align(topk_ids, E, block_m)       the (token, slot) pairs p = t*k + j sorted by expert into
                                    segments padded to block_m rows, in one single-program kernel:
                                    sorted_ids [max_padded] (pair ids; P = T*k marks padding),
                                    block_expert [max_blocks] (-1: unused block), num_padded [1].
                                    Fixed-size outputs from the shapes alone, no host sync: a CUDA
                                    graph captures it.
  grouped_gemm(x, ops, ...)         out[p] = x[p // top_k] @ W[e(p)].T for every sorted pair, all
                                    experts of one projection in one launch; a program takes one
                                    block of block_m pairs (one expert) and one tile of output
                                    rows, so only the active experts' weights are read. The routed
                                    weight may be multiplied in the epilogue (the down projection).
  fused_experts(...)                align -> gate_up -> act(gate) * up -> down (x routed weight) ->
                                    sum over each token's k experts.
  experts_forward(experts, ...)     the stacked-experts unit's hook (lowbit/quant/experts.py): None
                                    when no kernel covers the case (the unit runs its reference).

Weights stay in the scheme units' layouts, stacked along a leading expert dimension (see
`StackOperands`): the GEMM reuses gemm.py's tile decoders (`_weight_tile`: NVFP4, int4/int8
pack-quantized, FP8, int8) and adds unquantized bf16/fp16 stacks. W8A8 activations are quantized
per token before the launch (dynamic, with act_quant.quant_rows: x is shared by all of a token's
experts) or inside the kernel with each expert's own static scale (the scales are not collapsed).
Plain-PyTorch references (lowbit/kernels/moe_ref.py, no Triton): `route_ref`, `align_ref`,
`grouped_gemm_ref`; the whole MLP's is the stacked-experts unit's `Experts.reference`.
docs/kernels-moe.md describes the layouts and what limits the speed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import dequant as dq
from . import invariance
from .act_quant import _round_e4m3, quant_rows
from .moe_ref import Routing, align_ref, grouped_gemm_ref, max_blocks, route_ref  # noqa: F401 (re-exported)
from .gemm import (FMT_FLOAT, FMT_FP8, FMT_I8, FMT_INT4, FMT_INT8, FMT_NVFP4, Tiles, _dot, interpreting,
                   scaled_weight_tile)

SCALE_ELEMENT, SCALE_TILE, SCALE_NONE, SCALE_BLOCK = 0, 1, 2, 3
XQ_NONE, XQ_GIVEN, XQ_STATIC = 0, 1, 2  # activations: as they are / quantized before / in the kernel
ACT_CODES = {"silu": 0, "gelu_tanh": 1, "gelu_pytorch_tanh": 1, "relu2": 2}

interpret_on_cpu = False  # tests only: run the kernels on CPU tensors (needs TRITON_INTERPRET=1)


def usable(x: torch.Tensor) -> bool:
    """Whether the kernels run on x's device (a GPU, or the CPU interpreter when asked)."""
    if x.is_cuda:
        return True
    return interpret_on_cpu and interpreting()


# ---------------------------------------------------------------- routing
@triton.jit
def _route_kernel(l_ptr, b_ptr, w_ptr, id_ptr, T, E, stride_l, scaling,
                  TOP_K: tl.constexpr, KP: tl.constexpr, SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr,
                  RENORM: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr):
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    cols = tl.arange(0, BE)
    r_ok, c_ok = rows < T, cols < E
    ok = r_ok[:, None] & c_ok[None, :]
    lg = tl.load(l_ptr + rows[:, None].to(tl.int64) * stride_l + cols[None, :], mask=ok, other=float("-inf"))
    lg = tl.where(r_ok[:, None], lg.to(tl.float32), 0.0)  # rows past T: finite, never stored
    if SIGMOID:
        p = 1.0 / (1.0 + tl.exp(-lg))
        choice = p
        if HAS_BIAS:
            choice = p + tl.load(b_ptr + cols, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    else:
        ex = tl.exp(lg - tl.max(lg, axis=1)[:, None])
        p = ex / tl.sum(ex, axis=1)[:, None]
        choice = p
    choice = tl.where(c_ok[None, :], choice, float("-inf"))
    kc = tl.arange(0, KP)
    vals = tl.zeros((BT, KP), dtype=tl.float32)
    ids = tl.zeros((BT, KP), dtype=tl.int32)
    for j in tl.static_range(TOP_K):  # k rounds of argmax (ties: the lowest expert index)
        best = tl.max(choice, axis=1)
        idx = tl.min(tl.where(choice == best[:, None], cols[None, :], BE), axis=1)
        hit = cols[None, :] == idx[:, None]
        val = tl.sum(tl.where(hit, p, 0.0), axis=1)
        vals = tl.where(kc[None, :] == j, val[:, None], vals)
        ids = tl.where(kc[None, :] == j, idx[:, None], ids)
        choice = tl.where(hit, float("-inf"), choice)
    if RENORM:
        den = tl.sum(vals, axis=1)
        if SIGMOID:
            den += 1e-20
        vals = vals / den[:, None]
    vals = vals * scaling
    out = rows[:, None] * TOP_K + kc[None, :]
    k_ok = r_ok[:, None] & (kc[None, :] < TOP_K)
    tl.store(w_ptr + out, vals, mask=k_ok)
    tl.store(id_ptr + out, ids, mask=k_ok)


def route(logits: torch.Tensor, routing: Routing, bias: torch.Tensor | None = None):
    """logits [T, E] -> (weights fp32 [T, k], ids int32 [T, k]) in one kernel; the reference
    where the kernel does not apply (group-limited choice, CPU without the interpreter)."""
    t, e = logits.shape
    if routing.n_group > 1 or not usable(logits) or routing.top_k > e:
        return route_ref(logits, routing, bias)
    k = routing.top_k
    w = torch.empty((t, k), dtype=torch.float32, device=logits.device)
    ids = torch.empty((t, k), dtype=torch.int32, device=logits.device)
    if t == 0:
        return w, ids
    be = triton.next_power_of_2(e)
    bt = max(1, min(16, 4096 // be))
    lg = logits if logits.stride(-1) == 1 else logits.contiguous()
    _route_kernel[(triton.cdiv(t, bt),)](
        lg, bias if bias is not None else lg, w, ids, t, e, lg.stride(0), float(routing.scaling),
        TOP_K=k, KP=triton.next_power_of_2(k), SIGMOID=routing.scoring == "sigmoid", HAS_BIAS=bias is not None,
        RENORM=routing.renormalize, BT=bt, BE=be, num_warps=4)
    return w, ids


# ---------------------------------------------------------------- sorting pairs by expert
@triton.jit
def _align_kernel(id_ptr, sorted_ptr, bexp_ptr, npad_ptr, P, MAX_PADDED, NB,
                  BM: tl.constexpr, BP: tl.constexpr, BE: tl.constexpr):
    cols = tl.arange(0, BE)
    offs = tl.arange(0, BP)
    counts = tl.zeros((BE,), dtype=tl.int32)
    for p0 in range(0, P, BP):  # pass 1: pairs per expert (one-hot sums)
        e = tl.load(id_ptr + p0 + offs, mask=p0 + offs < P, other=-1)
        counts += tl.sum((e[:, None] == cols[None, :]).to(tl.int32), axis=0)
    padded = (counts + BM - 1) // BM * BM
    ends = tl.cumsum(padded, axis=0)
    starts = ends - padded
    total = tl.sum(padded, axis=0)
    for q0 in range(0, MAX_PADDED, BP):  # padding rows hold P
        tl.store(sorted_ptr + q0 + offs, tl.full((BP,), 0, tl.int32) + P, mask=q0 + offs < MAX_PADDED)
    for b0 in range(0, NB, BP):  # block -> the expert whose segment holds it (-1 past the end)
        first = (b0 + offs) * BM
        ex = tl.sum((ends[None, :] <= first[:, None]).to(tl.int32), axis=1)
        tl.store(bexp_ptr + b0 + offs, tl.where(first < total, ex, -1), mask=b0 + offs < NB)
    tl.debug_barrier()  # the padding fill lands before the scatter below
    seen = tl.zeros((BE,), dtype=tl.int32)
    for p0 in range(0, P, BP):  # pass 2: stable scatter, pair order kept within each expert
        ok = p0 + offs < P
        e = tl.load(id_ptr + p0 + offs, mask=ok, other=-1)
        oh = (e[:, None] == cols[None, :]).to(tl.int32)
        before = tl.cumsum(oh, axis=0) - oh
        dest = tl.sum(oh * (before + (starts + seen)[None, :]), axis=1)
        tl.store(sorted_ptr + dest, p0 + offs, mask=ok)
        seen += tl.sum(oh, axis=0)
    tl.store(npad_ptr, total)


def align(topk_ids: torch.Tensor, num_experts: int, block_m: int):
    """Sort the (token, slot) pairs by expert, segments padded to block_m rows.

    Returns sorted_ids int32 [max_blocks*block_m] (pair ids p = t*k + j in pair order within an
    expert; padding holds P = T*k), block_expert int32 [max_blocks] (the expert of each block of
    block_m rows, -1 for blocks past the end) and num_padded int32 [1]."""
    if not usable(topk_ids):
        return align_ref(topk_ids, num_experts, block_m)
    ids = topk_ids.reshape(-1).to(torch.int32).contiguous()
    p = ids.numel()
    nb = max_blocks(p, num_experts, block_m)
    sorted_ids = torch.empty(nb * block_m, dtype=torch.int32, device=ids.device)
    block_expert = torch.empty(nb, dtype=torch.int32, device=ids.device)
    num_padded = torch.empty(1, dtype=torch.int32, device=ids.device)
    be = triton.next_power_of_2(num_experts)
    _align_kernel[(1,)](ids, sorted_ids, block_expert, num_padded, p, nb * block_m, nb,
                        BM=block_m, BP=max(16, min(256, 8192 // be)), BE=be, num_warps=8)
    return sorted_ids, block_expert, num_padded


# ---------------------------------------------------------------- the grouped GEMM
@dataclass
class StackOperands:
    """One stacked projection as the grouped GEMM reads it (the scheme units' layouts, stacked).

    units  [E, N, KU]: fmt FMT_FLOAT (bf16/fp16 [E, N, K]), FMT_NVFP4 (uint8 [E, N, K/2] read as
           int32 words), FMT_INT4/FMT_INT8 (int32 words), FMT_FP8 (float8_e4m3fn [E, N, K]),
           FMT_I8 (int8 [E, N, K]);
    scale  group scales [E, N, G] (E4M3 NVFP4 blocks, int groups), or FP8 block scales
           [E, ceil(N/br), ceil(K/bc)] with `block` = (br, bc); zero: int zero points [E, N, G];
    row_scale fp32 (or model dtype) [E, N]: per-output-row scales, in the epilogue;
    act    "none" | "dynamic" (per token) | "dynamic_group" (per token and bc columns) | "static"
           (input_scale [E], each expert's own) - the W8A8 activation quantization;
    amax_spec: the 2-D LinearSpec whose whole-K amax a row-parallel rank must all-reduce."""

    fmt: int
    units: torch.Tensor
    k: int
    scale: torch.Tensor | None = None
    zero: torch.Tensor | None = None
    group: int = 0
    block: tuple[int, int] | None = None
    row_scale: torch.Tensor | None = None
    act: str = "none"
    input_scale: torch.Tensor | None = None
    amax_spec: object = None


def pick_block_m(pairs: int, num_experts: int) -> int:
    """Rows per block from the expected pairs per active expert (decode: 16, the MMA's minimum)."""
    if invariance.enabled():  # a token's block size may not depend on how many share its expert
        return invariance.MOE_BLOCK_M
    per_expert = pairs / max(1, min(pairs, num_experts))
    return 16 if per_expert <= 16 else 32 if per_expert <= 32 else 64


def pick_tiles(bm: int, ops: StackOperands) -> Tiles:
    """Decode-sized blocks: 64 weight rows x 128 K per step, many programs; larger blocks: 128 x 64.
    No split-K (docs/kernels-moe.md)."""
    t = Tiles(bm, 64, 128, warps=4, stages=4) if bm <= 32 else Tiles(bm, 128, 64, warps=4, stages=3)
    bk = t.bk
    if ops.block is not None:
        bk = min(bk, ops.block[1])
    elif ops.fmt in (FMT_INT4, FMT_INT8) and 0 < ops.group < ops.k and ops.group % 64 == 0 and bk > ops.group:
        bk = ops.group  # one group per K-tile: its scale multiplies the tile's product
    return Tiles(t.bm, t.bn, bk, warps=t.warps, stages=t.stages)


@triton.jit
def _moe_gemm_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, rs_ptr, xs_ptr, ins_ptr, rw_ptr, out_ptr, sorted_ptr, bexp_ptr, npad_ptr,
    N, K, KU, G, P, NB,
    stride_xm, stride_we, stride_wn, stride_se, stride_sn, stride_ze, stride_zn, stride_rse, stride_xs, stride_om,
    TOP_K: tl.constexpr, FMT: tl.constexpr, GROUP: tl.constexpr, BLOCK_R: tl.constexpr, SCALE_MODE: tl.constexpr,
    HAS_ZP: tl.constexpr, HAS_ROW_SCALE: tl.constexpr, XQ: tl.constexpr, X_GROUPED: tl.constexpr,
    HAS_RW: tl.constexpr, EPI_EXP: tl.constexpr, USE_ASM: tl.constexpr, UPCAST: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    EPU: tl.constexpr = 8 if FMT <= 1 else 4 if FMT == 2 else 1  # K elements per stored unit
    BKU: tl.constexpr = BK // EPU
    # the dot's operand dtype: x's, or the 8-bit type x is quantized to
    DT: tl.constexpr = x_ptr.dtype.element_ty if XQ == 0 else (tl.float8e4nv if FMT == 3 else tl.int8)
    ACC: tl.constexpr = tl.int32 if DT == tl.int8 else tl.float32

    pid = tl.program_id(0)
    blk = pid % NB  # blocks vary fastest: the blocks of one expert share each weight tile in L2
    pid_n = pid // NB
    npad = tl.load(npad_ptr)  # blocks past the padded end do nothing (the grid is fixed)
    rows = blk * BM + tl.arange(0, BM)
    e = tl.maximum(tl.load(bexp_ptr + blk), 0).to(tl.int64)
    pair = tl.load(sorted_ptr + rows)
    m_ok = (pair < P) & (rows < npad)
    k_end = tl.where(blk * BM < npad, K, 0)
    xrow = tl.where(m_ok, pair // TOP_K, 0)
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_ok = offs_n < N
    w_rows = w_ptr + e * stride_we + offs_n[:, None].to(tl.int64) * stride_wn
    x_rows = x_ptr + xrow[None, :].to(tl.int64) * stride_xm
    s_e = s_ptr + e * stride_se
    z_e = z_ptr + e * stride_ze
    if XQ == 2:
        x_static = tl.load(ins_ptr + e).to(tl.float32)

    acc = tl.zeros((BN, BM), dtype=ACC)
    for k0 in range(0, k_end, BK):
        offs_u = tl.multiple_of(k0 // EPU, BKU) + tl.arange(0, BKU)
        units = tl.load(w_rows + offs_u[None, :], mask=n_ok[:, None] & (offs_u < KU)[None, :], other=0)
        offs_k = k0 + tl.arange(0, BK)
        xt = tl.load(x_rows + offs_k[:, None], mask=m_ok[None, :] & (offs_k[:, None] < K), other=0)
        if XQ == 1:
            xt = xt.to(DT, bitcast=True)
        elif XQ == 2:  # each expert's static scale, rounded as lowbit.quant.numerics does
            v = tl.math.div_rn(xt.to(tl.float32), x_static)
            if FMT == 3:
                xt = _round_e4m3(tl.clamp(v, -448.0, 448.0)).to(tl.float8e4nv)
            else:
                xt = tl.clamp((v + 12582912.0) - 12582912.0, -128.0, 127.0).to(tl.int8)
        if FMT == 5:
            w = units.to(DT)
        else:
            w = scaled_weight_tile(units, s_e, z_e, offs_n, n_ok, stride_sn, stride_zn, k0, G, DT, FMT, GROUP,
                                   SCALE_MODE, HAS_ZP, USE_ASM, BK)
        if SCALE_MODE == 1:
            s = tl.load(s_e + offs_n * stride_sn + k0 // GROUP, mask=n_ok, other=0.0).to(tl.float32)
            acc += _dot(w, xt, tl.zeros((BN, BM), dtype=tl.float32), UPCAST) * s[:, None]
        elif SCALE_MODE == 3:  # FP8 blocks: one scale per (row block, K-tile), x's group scale too
            s = tl.load(s_e + (offs_n // BLOCK_R) * stride_sn + k0 // GROUP, mask=n_ok, other=0.0).to(tl.float32)
            part = _dot(w, xt, tl.zeros((BN, BM), dtype=tl.float32), UPCAST) * s[:, None]
            if X_GROUPED:
                part *= tl.load(xs_ptr + xrow * stride_xs + k0 // GROUP, mask=m_ok, other=0.0)[None, :]
            acc += part
        else:
            acc = _dot(w, xt, acc, UPCAST)

    acc = acc.to(tl.float32)
    if HAS_ROW_SCALE:
        acc *= tl.load(rs_ptr + e * stride_rse + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    if XQ == 1 and not X_GROUPED:
        acc *= tl.load(xs_ptr + xrow * stride_xs, mask=m_ok, other=0.0)[None, :]
    if XQ == 2:
        acc *= x_static
    if EPI_EXP != 0:
        acc *= 2.0 ** EPI_EXP  # NVFP4 tiles come out scaled by 2^-EPI_EXP (dequant.py)
    if HAS_RW:
        acc *= tl.load(rw_ptr + pair, mask=m_ok, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + pair[None, :].to(tl.int64) * stride_om + offs_n[:, None]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=n_ok[:, None] & m_ok[None, :])


def grouped_gemm(x: torch.Tensor, ops: StackOperands, sorted_ids: torch.Tensor, block_expert: torch.Tensor,
                 num_padded: torch.Tensor, top_k: int, pairs: int, block_m: int,
                 routed_weights: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
                 use_asm: bool = True) -> torch.Tensor:
    """out [pairs, N]: row p = x[p // top_k] @ W[expert of p].T (x routed_weights[p]), for every
    pair in sorted_ids. x [rows, K] bf16/fp16."""
    k = ops.k
    if x.shape[-1] != k:
        raise ValueError(f"grouped_gemm: x has {x.shape[-1]} features, the expert weights {k}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    n = ops.units.shape[1]
    out_dtype = out_dtype or x.dtype
    out = torch.empty((pairs, n), dtype=out_dtype, device=x.device)
    if pairs == 0:
        return out
    t = pick_tiles(block_m, ops)
    xq, xs, xq_mode, grouped = x, None, XQ_NONE, False
    if ops.act in ("dynamic", "dynamic_group"):
        qdt = torch.float8_e4m3fn if ops.fmt == FMT_FP8 else torch.int8
        if ops.act == "dynamic_group":  # per token and per block column group: quantize [rows*K/bc, bc]
            bc = ops.block[1]
            q, s = quant_rows(x.reshape(-1, bc), qdt)
            xq, xs, grouped = q.reshape(x.shape), s.reshape(x.shape[0], -1), True
        else:
            from ..parallel import whole_k_amax

            amax = whole_k_amax(x, ops.amax_spec) if ops.amax_spec is not None else None
            xq, xs = quant_rows(x, qdt, None, amax)
            xs = xs[:, None]
        xq_mode = XQ_GIVEN
    elif ops.act == "static":
        xq_mode = XQ_STATIC

    scale, zero, row_scale, group = ops.scale, ops.zero, ops.row_scale, max(ops.group, 1)
    block_r = 1
    if ops.block is not None:
        mode, block_r, group = SCALE_BLOCK, ops.block[0], ops.block[1]
    elif scale is None:
        mode = SCALE_NONE
    elif scale.shape[2] == 1 and ops.fmt != FMT_NVFP4:  # per-channel ints: a row scale
        mode, row_scale, scale = SCALE_NONE, scale[:, :, 0], None
    elif group % t.bk == 0:
        mode = SCALE_TILE
    else:
        mode = SCALE_ELEMENT
    epi = 0
    if ops.fmt == FMT_NVFP4:
        epi = dq.NVFP4_EXP_BF16 if x.dtype == torch.bfloat16 else dq.NVFP4_EXP_FP16
    as_bytes = {torch.float8_e4m3fn: torch.uint8}
    units = ops.units
    if ops.fmt == FMT_NVFP4:
        units = units.view(torch.int32)  # 8 codes a word, element i at bits 4i
    units = units.view(as_bytes.get(units.dtype, units.dtype))
    xq = xq.view(as_bytes.get(xq.dtype, xq.dtype))
    if scale is not None:
        scale = scale.view(as_bytes.get(scale.dtype, scale.dtype))
    if row_scale is not None and row_scale.stride(-1) != 1:
        row_scale = row_scale.contiguous()
    nb = block_expert.numel()
    unused = units
    dot_dt = x.dtype if xq_mode == XQ_NONE else (torch.float8_e4m3fn if ops.fmt == FMT_FP8 else torch.int8)
    grid = (nb * triton.cdiv(n, t.bn),)
    _moe_gemm_kernel[grid](
        xq, units, _or(scale, unused), _or(zero, unused), _or(row_scale, unused), _or(xs, unused),
        _or(ops.input_scale, unused), _or(routed_weights, unused), out, sorted_ids, block_expert, num_padded,
        n, k, units.shape[2], scale.shape[2] if scale is not None else 1, pairs, nb,
        xq.stride(0), units.stride(0), units.stride(1), _stride(scale, 0), _stride(scale, 1), _stride(zero, 0),
        _stride(zero, 1), _stride(row_scale, 0), _stride(xs, 0), out.stride(0),
        TOP_K=top_k, FMT=ops.fmt, GROUP=group, BLOCK_R=block_r, SCALE_MODE=mode, HAS_ZP=zero is not None,
        HAS_ROW_SCALE=row_scale is not None, XQ=xq_mode, X_GROUPED=grouped, HAS_RW=routed_weights is not None,
        EPI_EXP=epi, USE_ASM=use_asm and x.is_cuda and torch.cuda.get_device_capability(x.device) >= (9, 0)
        and not interpreting(), UPCAST=interpreting() and dot_dt in (torch.bfloat16, torch.float8_e4m3fn),
        BM=t.bm, BN=t.bn, BK=t.bk, num_warps=t.warps, num_stages=t.stages)
    return out


def _or(t, default):
    return t if t is not None else default


def _stride(t, dim):
    return t.stride(dim) if t is not None else 0


# ---------------------------------------------------------------- activation between the projections
@triton.jit
def _act_kernel(h_ptr, out_ptr, I, stride_h, stride_o, ACT: tl.constexpr, GATED: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < I
    g = tl.load(h_ptr + row * stride_h + offs, mask=ok, other=0.0).to(tl.float32)
    if ACT == 0:  # silu
        a = g / (1.0 + tl.exp(-g))
    elif ACT == 1:  # gelu, tanh approximation: x * sigmoid(2 * sqrt(2/pi) * (x + 0.044715 x^3))
        a = g / (1.0 + tl.exp(-1.5957691216057308 * (g + 0.044715 * g * g * g)))
    else:  # relu^2
        r = tl.maximum(g, 0.0)
        a = r * r
    if GATED:
        a = a * tl.load(h_ptr + row * stride_h + I + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, a.to(out_ptr.dtype.element_ty), mask=ok)


def act_and_mul(h: torch.Tensor, activation: str, gated: bool) -> torch.Tensor:
    """[P, 2I] -> act(h[:, :I]) * h[:, I:] (gated) or [P, I] -> act(h), fp32 inside, one rounding."""
    p, width = h.shape
    i = width // 2 if gated else width
    out = torch.empty((p, i), dtype=h.dtype, device=h.device)
    if p:
        block = min(1024, triton.next_power_of_2(i))
        _act_kernel[(p, triton.cdiv(i, block))](h, out, i, h.stride(0), out.stride(0), ACT=ACT_CODES[activation],
                                                GATED=gated, BLOCK=block, num_warps=4)
    return out


# ---------------------------------------------------------------- the whole expert MLP
def fused_experts(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, first: StackOperands,
                  down: StackOperands, activation: str = "silu", gated: bool = True) -> torch.Tensor:
    """x [T, H] -> [T, H]: sum over j of topk_weights[t, j] * down(act(first(x[t]))) for expert
    topk_ids[t, j]. Four launches (align, first, act, down) plus the k-way sum."""
    t, k = topk_ids.shape
    e = first.units.shape[0]
    pairs = t * k
    bm = pick_block_m(pairs, e)
    sorted_ids, block_expert, num_padded = align(topk_ids, e, bm)
    h = grouped_gemm(x, first, sorted_ids, block_expert, num_padded, k, pairs, bm)
    a = act_and_mul(h, activation, gated)
    y = grouped_gemm(a, down, sorted_ids, block_expert, num_padded, 1, pairs, bm,
                     routed_weights=topk_weights.reshape(-1).float().contiguous())
    return invariance.ordered_sum(y.view(t, k, y.shape[1]), dim=1)


# ---------------------------------------------------------------- the stacked-experts unit's hook
def stack_operands(stack) -> StackOperands | None:
    """An ExpertLinear (lowbit/quant/experts.py) as the grouped GEMM's operands, read by the scheme
    units' parameter names; None when no kernel covers its scheme or run options."""
    s, method = stack.scheme, stack.method
    k = method.spec.local_in_features
    if not s.quantized:
        return StackOperands(FMT_FLOAT, stack.weight, k)
    quant_x = method.quantize_activations()
    if s.weight == "nvfp4":
        if quant_x or k % 8:  # W4A4 emulation stays on the reference; int32 words need K % 8 == 0
            return None
        return StackOperands(FMT_NVFP4, stack.weight_packed, k, scale=stack.weight_scale, group=16,
                             row_scale=stack.row_scale)
    if s.weight in ("int4", "int8") and s.packed:
        group = method.group or 0
        if group and (group < 16 or group & (group - 1)):
            return None
        return StackOperands(FMT_INT4 if s.weight == "int4" else FMT_INT8, stack.weight_packed, k,
                             scale=stack.weight_scale, zero=getattr(stack, "weight_zero_point", None), group=group)
    if s.weight in ("fp8", "int8"):
        fmt = FMT_FP8 if s.weight == "fp8" else FMT_I8
        ops = StackOperands(fmt, stack.weight, k)
        if s.granularity == "block":
            br, bc = s.block
            if bc % 16 or bc & (bc - 1) or k % bc:
                return None
            ops.scale, ops.block = stack.weight_scale, (br, bc)
        else:
            ops.row_scale = stack.weight_scale
        if not quant_x:
            if fmt == FMT_I8:
                return None  # int8 weight-only: no unit runs it (int8 W8A8 always quantizes x)
            return ops
        if not s.act_dynamic and s.act_symmetric and s.act_granularity in (None, "tensor"):
            ops.act, ops.input_scale = "static", stack.input_scale
        elif s.act_dynamic and s.act_granularity == "token":
            ops.act = "dynamic"
            ops.amax_spec = method.spec if method.spec.parallel == "row" and method.spec.tp_size > 1 else None
        elif s.act_dynamic and s.act_granularity == "group" and ops.block is not None:
            ops.act = "dynamic_group"
        else:
            return None  # per-tensor dynamic or asymmetric activations: reference
        if fmt == FMT_I8 and ops.block is not None:
            return None
        return ops
    return None


def experts_forward(experts, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor):
    """lowbit.quant.experts.Experts.forward on the kernels, or None (then the unit's reference)."""
    if x.dtype not in (torch.bfloat16, torch.float16) or not usable(x) or experts.activation not in ACT_CODES:
        return None
    first, down = stack_operands(experts.first), stack_operands(experts.down)
    if first is None or down is None or any(o.fmt == FMT_FLOAT and o.units.dtype != x.dtype for o in (first, down)):
        return None
    lead = x.shape[:-1]
    y = fused_experts(x.reshape(-1, x.shape[-1]), topk_ids.reshape(-1, topk_ids.shape[-1]),
                      topk_weights.reshape(-1, topk_weights.shape[-1]), first, down, experts.activation,
                      experts.gated)
    return y.reshape(*lead, y.shape[-1])
