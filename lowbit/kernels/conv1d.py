"""Depthwise causal conv1d: the short convolution in front of Gated DeltaNet and Mamba2 mixers.

Each channel c has its own K taps: y[t, c] = act(bias[c] + sum_j weight[c, j] * x[t - (K-1) + j, c]),
with x before position 0 read as zero (prefill) or from the slot's conv state (decode). The state of
a sequence is its last K-1 inputs, oldest first: state[c, j] = x[T - (K-1) + j, c].

  causal_conv1d(x [B, T, C], weight [C, K], bias [C] | None, activation "silu" | None,
                initial_state=None) -> (y [B, T, C], final_state [B, C, K-1])
      a prefill from an empty (zero) history, or from `initial_state` [B, C, K-1] (a later chunk of
      a prompt: the inputs are then the state's K-1 columns followed by x, whose first K-1 outputs
      are dropped); final_state is in x's dtype, ready to be written to the cache rows of the batch's slots.
  causal_conv1d_update(x [B, C], conv_state, weight, bias, activation, slots=None) -> y [B, C]
      one decode step. conv_state is the layer's whole state cache [S+1, C, K-1] and row b reads and
      updates conv_state[slots[b]] IN PLACE (no gather, no host sync: CUDA-graph safe). With
      slots=None, conv_state is [B, C, K-1] and row b owns conv_state[b] (updated in place as well).

`*_ref` are the plain-PyTorch references (transformers' `causal_conv1d_fn` / `causal_conv1d_update`:
F.conv1d in the weight's dtype, the activation, cast to x's dtype). The Triton kernels accumulate in
fp32, round the convolution to x's dtype and apply SiLU in fp32 rounded once, like eager PyTorch.
They run on CUDA tensors, and on CPU tensors in Triton's interpreter when `lowbit.kernels.decoder.interpret_on_cpu`
is set with TRITON_INTERPRET=1 (tests).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import decoder as ops
from ..errors import ConfigError

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
    triton = None

ACTIVATIONS = (None, "silu")


def _check(x, weight, bias, activation, channels_dim: int, what: str) -> None:
    if activation not in ACTIVATIONS:
        raise ConfigError(f"{what}: activation {activation!r} is not supported (use 'silu' or None)")
    if weight.dim() != 2:
        raise ConfigError(f"{what}: weight must be [C, K], got {list(weight.shape)} "
                          "(pass conv1d.weight.view(C, K) for the on-disk [C, 1, K])")
    c = x.shape[channels_dim]
    if weight.shape[1] < 2:
        raise ConfigError(f"{what}: kernel size {weight.shape[1]} leaves no state; need K >= 2")
    if weight.shape[0] != c:
        raise ConfigError(f"{what}: x has {c} channels, weight {list(weight.shape)} has {weight.shape[0]}")
    if bias is not None and tuple(bias.shape) != (c,):
        raise ConfigError(f"{what}: bias must be [{c}], got {list(bias.shape)}")


def _act(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    return F.silu(y) if activation == "silu" else y


# ------------------------------------------------------------------ references
def _depthwise(xp: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
    """Valid depthwise conv of xp [B, C, L] with weight [C, K] -> [B, C, L-K+1]. F.conv1d, except in
    float64, where PyTorch's CPU depthwise conv1d takes a slow path (0.2 s for 2 x 512 x 14, 500x
    float32's) and the K products summed in tap order give the same values to float64 rounding."""
    if xp.dtype != torch.float64:
        return F.conv1d(xp, weight.unsqueeze(1), bias, groups=xp.shape[1])
    k, n = weight.shape[1], xp.shape[-1] - weight.shape[1] + 1
    y = sum(xp[..., j:j + n] * weight[:, j, None] for j in range(k))
    return y if bias is None else y + bias[:, None]


def causal_conv1d_ref(x, weight, bias=None, activation=None, initial_state=None):
    """transformers' causal_conv1d_fn on [B, T, C], plus the final state (the last K-1 inputs)."""
    _check(x, weight, bias, activation, -1, "causal_conv1d")
    if initial_state is not None:
        return _continued(causal_conv1d_ref, x, weight, bias, activation, initial_state)
    b, t, c = x.shape
    k = weight.shape[1]
    xt = x.transpose(1, 2)
    y = _depthwise(F.pad(xt.to(weight.dtype), (k - 1, 0)), weight, bias)
    y = _act(y, activation).to(x.dtype).transpose(1, 2)
    state = F.pad(xt, (k - 1, 0))[..., t:]  # [B, C, K-1]: the last K-1 inputs, zeros before position 0
    return y, state.contiguous()


def causal_conv1d_update_ref(x, conv_state, weight, bias=None, activation=None, slots=None):
    """transformers' causal_conv1d_update for one token per row; updates conv_state[slots] in place."""
    _check(x, weight, bias, activation, -1, "causal_conv1d_update")
    rows = torch.arange(x.shape[0], device=x.device) if slots is None else slots
    window = torch.cat([conv_state[rows], x[:, :, None].to(conv_state.dtype)], dim=-1)  # [B, C, K]
    conv_state[rows] = window[..., 1:]
    y = _depthwise(window.to(weight.dtype), weight, bias)[..., 0]
    return _act(y, activation).to(x.dtype)


def _continued(conv, x, weight, bias, activation, initial_state):
    """A conv continuing from `initial_state` [B, C, K-1]: the same conv over [state | x] from an
    empty history, without the outputs of the state's columns."""
    k = weight.shape[1]
    if tuple(initial_state.shape) != (x.shape[0], x.shape[2], k - 1):
        raise ConfigError(f"causal_conv1d: initial_state must be [{x.shape[0]}, {x.shape[2]}, {k - 1}], "
                          f"got {list(initial_state.shape)}")
    y, final = conv(torch.cat([initial_state.transpose(1, 2).to(x.dtype), x], dim=1), weight, bias, activation)
    return y[:, k - 1:], final


# ------------------------------------------------------------------ public functions
def causal_conv1d(x, weight, bias=None, activation=None, initial_state=None):
    """[B, T, C] -> (y [B, T, C], final_state [B, C, K-1]); see the module docstring."""
    if not ops.use_triton(x):
        return causal_conv1d_ref(x, weight, bias, activation, initial_state)
    _check(x, weight, bias, activation, -1, "causal_conv1d")
    if initial_state is not None:
        return _continued(causal_conv1d, x, weight, bias, activation, initial_state)
    b, t, c = x.shape
    k = weight.shape[1]
    x = x if x.stride(-1) == 1 else x.contiguous()
    weight = weight.contiguous()
    y = torch.empty(b, t, c, dtype=x.dtype, device=x.device)
    state = torch.empty(b, c, k - 1, dtype=x.dtype, device=x.device)
    bt, bc = 32, 128
    grid = (b, triton.cdiv(t, bt), triton.cdiv(c, bc))
    _conv_fwd_kernel[grid](x, weight, bias if bias is not None else weight, y, state,
                           x.stride(0), x.stride(1), y.stride(0), y.stride(1), t, c,
                           K=k, HAS_BIAS=bias is not None, SILU=activation == "silu", BT=bt, BC=bc, num_warps=4)
    return y, state


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None, slots=None):
    """x [B, C] -> y [B, C]; conv_state [S+1, C, K-1] read and written at rows slots (or [B, C, K-1]
    at rows 0..B-1 when slots is None), in place. No host syncs."""
    if not ops.use_triton(x):
        return causal_conv1d_update_ref(x, conv_state, weight, bias, activation, slots)
    _check(x, weight, bias, activation, -1, "causal_conv1d_update")
    b, c = x.shape
    k = weight.shape[1]
    if tuple(conv_state.shape[1:]) != (c, k - 1) or conv_state.stride(-1) != 1 or conv_state.stride(-2) != k - 1:
        raise ConfigError(f"causal_conv1d_update: conv_state must be a contiguous [S, {c}, {k - 1}] cache, "
                          f"got {list(conv_state.shape)} with strides {conv_state.stride()}")
    x = x if x.stride(-1) == 1 else x.contiguous()
    weight = weight.contiguous()
    slots = slots.contiguous() if slots is not None else None  # (read at offset row: see decode_attention)
    y = torch.empty(b, c, dtype=x.dtype, device=x.device)
    bc = 256
    _conv_update_kernel[(b, triton.cdiv(c, bc))](
        x, conv_state, slots if slots is not None else x, weight, bias if bias is not None else weight, y,
        x.stride(0), conv_state.stride(0), c, K=k, HAS_SLOTS=slots is not None, HAS_BIAS=bias is not None,
        SILU=activation == "silu", BC=bc, num_warps=4)
    return y


# ------------------------------------------------------------------ kernels
if triton is not None:

    @triton.jit
    def _conv_out(acc, b_ptr, cols, cmask, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, dtype: tl.constexpr):
        """bias, round to the activation dtype (eager's conv output), SiLU in fp32 rounded once."""
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        y = acc.to(dtype).to(tl.float32)
        if SILU:
            y = y / (1.0 + tl.exp(-y))
        return y.to(dtype)

    @triton.jit
    def _conv_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, s_ptr, sxb, sxt, syb, syt, T, C,
                         K: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                         BT: tl.constexpr, BC: tl.constexpr):
        pb, pt, pc = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rows = pt * BT + tl.arange(0, BT)
        cols = pc * BC + tl.arange(0, BC)
        cmask = cols < C
        acc = tl.zeros((BT, BC), dtype=tl.float32)
        xb = x_ptr + pb * sxb
        for j in tl.static_range(K):
            src = rows - (K - 1) + j
            m = ((src >= 0) & (src < T))[:, None] & cmask[None, :]
            xv = tl.load(xb + src[:, None] * sxt + cols[None, :], mask=m, other=0.0).to(tl.float32)
            wv = tl.load(w_ptr + cols * K + j, mask=cmask, other=0.0).to(tl.float32)
            acc += xv * wv[None, :]
        y = _conv_out(acc, b_ptr, cols[None, :], cmask[None, :], HAS_BIAS, SILU, y_ptr.dtype.element_ty)
        tl.store(y_ptr + pb * syb + rows[:, None] * syt + cols[None, :], y, mask=(rows < T)[:, None] & cmask[None, :])
        if pt == tl.cdiv(T, BT) - 1:  # the last time block writes the final state (the last K-1 inputs)
            for j in tl.static_range(K - 1):
                t_in = T - (K - 1) + j + tl.zeros((BC,), dtype=tl.int32)
                tail = tl.load(xb + t_in * sxt + cols, mask=cmask & (t_in >= 0), other=0.0)
                tl.store(s_ptr + pb * C * (K - 1) + cols * (K - 1) + j, tail, mask=cmask)

    @triton.jit
    def _conv_update_kernel(x_ptr, s_ptr, slot_ptr, w_ptr, b_ptr, y_ptr, sxb, ssb, C,
                            K: tl.constexpr, HAS_SLOTS: tl.constexpr, HAS_BIAS: tl.constexpr,
                            SILU: tl.constexpr, BC: tl.constexpr):
        pb, pc = tl.program_id(0), tl.program_id(1)
        cols = pc * BC + tl.arange(0, BC)
        cmask = cols < C
        if HAS_SLOTS:
            row = tl.load(slot_ptr + pb).to(tl.int64)
        else:
            row = pb.to(tl.int64)
        sp = s_ptr + row * ssb + cols * (K - 1)
        xv = tl.load(x_ptr + pb * sxb + cols, mask=cmask, other=0.0)
        acc = xv.to(tl.float32) * tl.load(w_ptr + cols * K + (K - 1), mask=cmask, other=0.0).to(tl.float32)
        prev = xv.to(s_ptr.dtype.element_ty)  # shifts down through the state: newest last
        for i in tl.static_range(K - 1):
            j = K - 2 - i  # newest tap first, so each state entry is read before it is overwritten
            sv = tl.load(sp + j, mask=cmask, other=0.0)
            acc += sv.to(tl.float32) * tl.load(w_ptr + cols * K + j, mask=cmask, other=0.0).to(tl.float32)
            tl.store(sp + j, prev, mask=cmask)
            prev = sv
        y = _conv_out(acc, b_ptr, cols, cmask, HAS_BIAS, SILU, y_ptr.dtype.element_ty)
        tl.store(y_ptr + pb * C + cols, y, mask=cmask)
