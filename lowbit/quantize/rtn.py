"""Round-to-nearest weight quantizers that reproduce the producers' bytes.

Each function takes one bf16/fp16 weight [N, K] as read from the source checkpoint and returns the
module's on-disk tensors by role (the leaf names of spec section 2). The arithmetic follows the
producers step by step *including the dtype of every intermediate*, because that decides which
side of a rounding boundary a value lands on:

- ModelOpt 0.47 export (`export/quant_utils.py::to_quantized_weight`, `NVFP4QTensor.quantize`):
  FP8 per-tensor divides the bf16 weight by a 0-d fp32 scale, which torch evaluates in bf16;
  per-channel FP8 and NVFP4 divide by dimensioned fp32 tensors, i.e. in fp32.
- compressed-tensors 0.19 (`calculate_qparams`, `generate_gparam`, `forward._quantize`) with
  llm-compressor's min/max observer: scales are computed in the weight dtype (bf16), the weight is
  divided by them in bf16; NVFP4 block scales are `global * bf16(amax/6)` in fp32, rounded to E4M3.

Device independence: the producers ran on CPU, where torch divides a tensor by a Python number (or
any 0-d CPU tensor) exactly, and a bf16 tensor by a 0-d fp32 tensor in fp32 before one rounding to
bf16. CUDA torch does neither: it multiplies by the reciprocal of a CPU-scalar divisor, and rounds a
0-d fp32 operand to bf16 before using it. Either moves a scale by an ulp and 0.1-1.6% of the codes
across a rounding boundary, so every constant divisor here is a 0-d tensor on the weight's device
(`_quotient`) and every mixed-dtype step is spelled out in fp32 (tests/test_quantize_reference.py
pins this op by op).

Per-tensor parameters that fused shards must share (ModelOpt NVFP4 `weight_scale_2` over q/k/v and
gate/up, compressed-tensors NVFP4 `weight_global_scale`) are passed in by the caller, which knows
the shards; see `shared_amax`.
"""
from __future__ import annotations

import torch

from ..quant.numerics import E2M1_MAX, FP8_MAX, NVFP4_BLOCK, float_to_e2m1, pack_e2m1, pack_int32
from ..quant.scheme import Scheme

FP8_EPS = 0.125  # compressed-tensors replaces a zero E4M3 scale with this (its `_get_dtype_eps`)
NVFP4_GLOBAL = E2M1_MAX * FP8_MAX  # 6 * 448: maps a tensor's amax onto the E4M3 x E2M1 range


def _quotient(a: torch.Tensor, b: float) -> torch.Tensor:
    """a / b, IEEE-rounded on every device: the constant goes in as a 0-d tensor of a's dtype on a's
    device (CUDA torch would multiply by 1/b for a Python number)."""
    return a / a.new_tensor(b)


def amax(w: torch.Tensor) -> torch.Tensor:
    """Per-tensor amax in the weight's own dtype (exact: max does not round)."""
    return w.abs().amax()


def shared_amax(weights: list[torch.Tensor]) -> torch.Tensor:
    """One amax for shards that the producers treat as one tensor (q/k/v, gate/up)."""
    return torch.stack([amax(w) for w in weights]).amax()


def _blocks(w: torch.Tensor, size: int) -> torch.Tensor:
    n, k = w.shape
    if k % size:
        raise ValueError(f"in_features {k} is not a multiple of the block size {size}")
    return w.reshape(n, k // size, size)


def _e2m1_codes(scaled: torch.Tensor) -> torch.Tensor:
    """E2M1 codes with the producers' sign convention: every negative input keeps the sign bit,
    so a small negative value that rounds to zero is stored as -0 (code 8), as both ModelOpt
    (`sign_bit = x < 0`) and compressed-tensors (`signbit(sign(x) * 0)`) do."""
    return float_to_e2m1(scaled) | ((scaled < 0).to(torch.uint8) << 3)


# ---------------------------------------------------------------- ModelOpt
def modelopt_fp8(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """FP8 per-tensor: weight_scale = amax/448 (0-d F32). ModelOpt's `weight / weight_scale` (a bf16
    tensor over a 0-d fp32 one) gives a bf16 tensor; on CPU its value is the fp32 quotient rounded
    once to bf16, then cast to E4M3. Spelled out here, as CUDA would round the divisor to bf16."""
    scale = _quotient(amax(w).float(), FP8_MAX)
    return {"weight": (w.float() / scale).to(w.dtype).to(torch.float8_e4m3fn), "weight_scale": scale}


def modelopt_fp8_per_channel(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """FP8_PER_CHANNEL_PER_TOKEN: weight_scale [N] F32 = row amax/448; division in fp32."""
    scale = _quotient(w.abs().amax(dim=1).float(), FP8_MAX)
    return {"weight": (w.float() / scale.unsqueeze(-1)).to(torch.float8_e4m3fn), "weight_scale": scale}


def modelopt_nvfp4(w: torch.Tensor, tensor_amax: torch.Tensor) -> dict[str, torch.Tensor]:
    """NVFP4 / W4A16_NVFP4 weight: weight_scale_2 = amax/(6*448) (0-d F32, `tensor_amax` may be the
    max over fused shards), E4M3 block scales = block_amax/(6*weight_scale_2), zero blocks -> 1."""
    scale_2 = _quotient(tensor_amax.float(), NVFP4_GLOBAL)
    blocks = _blocks(w, NVFP4_BLOCK)
    block_scale = blocks.abs().amax(dim=-1).float() / (E2M1_MAX * scale_2)
    block_scale[block_scale == 0] = 1.0
    block_scale = block_scale.to(torch.float8_e4m3fn)
    scaled = blocks.float() / (block_scale.float() * scale_2).unsqueeze(-1)
    return {
        "weight": pack_e2m1(_e2m1_codes(scaled).reshape(w.shape)),
        "weight_scale": block_scale,
        "weight_scale_2": scale_2,
    }


def modelopt_input_scale(input_amax: torch.Tensor, activation: str) -> torch.Tensor:
    """Static activation scale, 0-d F32: amax/448 (FP8) or amax/(6*448) (NVFP4 global scale)."""
    bound = FP8_MAX if activation == "fp8" else NVFP4_GLOBAL
    return _quotient(input_amax.float(), bound)


# ---------------------------------------------------------------- compressed-tensors
def ct_global_scale(tensor_amax: torch.Tensor) -> torch.Tensor:
    """NVFP4 global scale, F32 [1]: 6*448/amax evaluated in the amax dtype (bf16), hence rounded
    to bf16 precision. Zero amax -> the smallest normal, non-finite results -> 1 (as CT does)."""
    a = tensor_amax.clamp(min=torch.finfo(tensor_amax.dtype).tiny)
    g = torch.nan_to_num(NVFP4_GLOBAL / a, nan=1.0, posinf=1.0, neginf=1.0)
    return g.float().reshape(1)


def ct_nvfp4(w: torch.Tensor, global_scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """NVFP4 / NVFP4A16 weight (nvfp4-pack-quantized). `global_scale` is `ct_global_scale` of the
    tensor or, for fused shards, the smallest of theirs (llm-compressor fuses q/k/v, gate/up)."""
    blocks = _blocks(w, NVFP4_BLOCK)
    local = blocks.abs().amax(dim=-1) / w.new_tensor(E2M1_MAX)  # in the weight dtype
    scale = (global_scale * local).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
    scale = torch.where(scale == 0, FP8_EPS, scale)
    scaled = (blocks / (scale / global_scale).unsqueeze(-1)).clamp(-E2M1_MAX, E2M1_MAX)
    return {
        "weight_packed": pack_e2m1(_e2m1_codes(scaled).reshape(w.shape)),
        "weight_scale": scale.to(torch.float8_e4m3fn),
        "weight_global_scale": global_scale,
    }


def _ct_minmax(w: torch.Tensor, group_size: int | None, reduce_all: bool = False):
    """Observer statistics in the weight dtype, widened to include 0 (CT's calculate_qparams)."""
    if reduce_all:
        lo, hi = w.amin().reshape(1), w.amax().reshape(1)
    elif group_size:
        g = _blocks(w, group_size)
        lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    else:  # per output channel
        lo, hi = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
    zero = w.new_zeros(())
    return torch.minimum(lo, zero), torch.maximum(hi, zero)


def _expand(t: torch.Tensor, w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """A per-group [N, K/g] tensor broadcast over [N, K]."""
    return t.repeat_interleave(group_size, dim=1) if group_size else t


def ct_int(w: torch.Tensor, bits: int, group_size: int | None, symmetric: bool = True,
           packed: bool = True) -> dict[str, torch.Tensor]:
    """Integer weights: pack-quantized (W4A16/W8A16, `packed`) or int-quantized (W8A8 int8 [N, K]).

    Symmetric: scale = amax / ((qmax - qmin)/2) (so int4 divides by 7.5, int8 by 127.5).
    Asymmetric: scale = (max - min)/(qmax - qmin), zero point = round(qmin - min/scale).
    group_size None = per output channel. Scales are bf16 (the weight dtype).
    """
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    span = w.new_tensor(float(qmax - qmin))
    lo, hi = _ct_minmax(w, group_size)
    zp = None
    if symmetric:
        scale = torch.maximum(lo.abs(), hi) / (span / 2)
    else:
        scale = (hi - lo) / span
        # an all-zero group has scale 0; CT would divide 0/0 here, its zero point is then 0
        zp = torch.where(scale == 0, torch.zeros_like(lo), qmin - lo / scale).clamp(qmin, qmax)
        zp = torch.round(zp).to(torch.int8)
    scale = torch.where(scale == 0, torch.finfo(w.dtype).eps, scale)
    x = w / _expand(scale, w, group_size)  # in the weight dtype, as CT divides
    if zp is not None:
        x = x + _expand(zp, w, group_size).to(w.dtype)
    q = torch.round(x.clamp(qmin, qmax)).to(torch.int8)
    if not packed:
        out = {"weight": q, "weight_scale": scale}
        if zp is not None:
            out["weight_zero_point"] = zp
        return out
    out = {"weight_packed": pack_int32(q, bits), "weight_scale": scale,
           "weight_shape": torch.tensor(list(w.shape), dtype=torch.int64)}
    if zp is not None:
        out["weight_zero_point"] = pack_int32(zp, bits, dim=0)
    return out


def ct_fp8(w: torch.Tensor, per_channel: bool) -> dict[str, torch.Tensor]:
    """FP8 weights (float-quantized): scale = amax/448 in bf16, [N, 1] per channel or [1] per
    tensor; weight/scale in bf16, then cast to E4M3."""
    lo, hi = _ct_minmax(w, None, reduce_all=not per_channel)
    scale = torch.maximum(lo.abs(), hi) / w.new_tensor(FP8_MAX)
    scale = torch.where(scale == 0, torch.finfo(w.dtype).eps, scale)
    q = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return {"weight": q, "weight_scale": scale}


def ct_input_scale(input_amax: torch.Tensor, activation: str) -> dict[str, torch.Tensor]:
    """Static activation parameters: FP8 `input_scale` [1] = amax/448 in the activation dtype,
    NVFP4 `input_global_scale` F32 [1] = 6*448/amax (bf16-rounded, like the weight's)."""
    if activation == "fp8":
        return {"input_scale": (input_amax / input_amax.new_tensor(FP8_MAX)).reshape(1)}
    return {"input_global_scale": ct_global_scale(input_amax)}


# ---------------------------------------------------------------- dispatch on a Scheme
def has_static_inputs(scheme: Scheme) -> bool:
    """Whether the module stores calibrated activation scales (FP8 static, NVFP4 W4A4)."""
    return scheme.activation in ("fp8", "nvfp4") and not scheme.act_dynamic


def encode(scheme: Scheme, w: torch.Tensor, group_amax: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """On-disk weight tensors of one module. group_amax: the per-tensor amax shared by the fused
    shards this module belongs to (NVFP4 only; default: the module's own)."""
    if scheme.weight == "nvfp4":
        a = amax(w) if group_amax is None else group_amax
        return modelopt_nvfp4(w, a) if scheme.fmt == "modelopt" else ct_nvfp4(w, ct_global_scale(a))
    if scheme.fmt == "modelopt" and scheme.weight == "fp8":
        return modelopt_fp8(w) if scheme.granularity == "tensor" else modelopt_fp8_per_channel(w)
    if scheme.fmt == "compressed-tensors":
        if scheme.weight == "fp8":
            return ct_fp8(w, per_channel=scheme.granularity == "channel")
        if scheme.weight in ("int4", "int8"):
            group = scheme.group_size if scheme.granularity == "group" else None
            return ct_int(w, scheme.bits, group, scheme.symmetric, packed=scheme.packed)
    raise ValueError(f"lowbit quantize cannot write {scheme.label()} as {scheme.fmt}")


def activation_tensors(scheme: Scheme, input_amax: torch.Tensor) -> dict[str, torch.Tensor]:
    """Calibrated activation tensors of one module (empty for weight-only and dynamic schemes)."""
    if not has_static_inputs(scheme):
        return {}
    if scheme.fmt == "modelopt":
        return {"input_scale": modelopt_input_scale(input_amax, scheme.activation)}
    return ct_input_scale(input_amax, scheme.activation)
