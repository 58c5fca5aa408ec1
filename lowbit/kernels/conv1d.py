"""Depthwise causal conv1d (the Mamba2 mixer's short convolution over x/B/C).

PLACEHOLDER for the mamba branch: plain PyTorch with the agreed API, so that the Mamba2 mixer runs
and is tested. The conv1d helper's branch owns this file (Triton kernels + the same API); at merge
its version replaces this one.

  causal_conv1d(x [B, T, C], weight [C, K], bias [C] | None, activation "silu" | None, initial_state None)
      -> (y [B, T, C], final_state [B, C, K-1])   final_state: the last K-1 inputs (zeros before t = 0)
  causal_conv1d_update(x [B, C], conv_state [B, C, K-1] (updated in place), weight, bias, activation)
      -> y [B, C]
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _act(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    return F.silu(y) if activation == "silu" else y


def causal_conv1d(x, weight, bias=None, activation=None, initial_state=None):
    if initial_state is not None:
        raise NotImplementedError("causal_conv1d: initial_state is not supported")
    _, t, c = x.shape
    k = weight.shape[1]
    xt = F.pad(x.transpose(1, 2).float(), (k - 1, 0))  # [B, C, K-1+T]
    y = F.conv1d(xt, weight.float()[:, None, :], None if bias is None else bias.float(), groups=c)
    final_state = xt[:, :, -(k - 1):].to(x.dtype) if k > 1 else xt[:, :, :0].to(x.dtype)
    return _act(y, activation).transpose(1, 2).to(x.dtype).contiguous(), final_state


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None):
    window = torch.cat([conv_state.float(), x.float()[:, :, None]], dim=-1)  # [B, C, K]
    conv_state.copy_(window[:, :, 1:])
    y = (window * weight.float()).sum(-1)
    if bias is not None:
        y = y + bias.float()
    return _act(y, activation).to(x.dtype)
