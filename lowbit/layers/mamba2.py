"""The Mamba2 mixer of Nemotron-H (transformers' NemotronHMamba2Mixer), cache kind "state".

    zxbcdt = in_proj(x)                  rows [z (I) | x (I) | B (G*N) | C (G*N) | dt (H)], I = H * P
    xBC    = silu(causal_conv1d(xBC))    depthwise over the I + 2*G*N channels [x | B | C], with bias
    y      = SSD scan (lowbit/kernels/mamba2.py) with dt = clamp(softplus(dt + dt_bias), time_step_limit),
             A = -exp(A_log), D skip, heads h using group h // (H / G) of B and C
    out    = out_proj(gated_rms_norm(y, z))   RMSNorm over n_groups groups of y * silu(z), eps
             layer_norm_epsilon, times norm.weight (transformers' norm_before_gate=False)

Per-slot cache (`cache_spec`): "conv" [C, K-1] the last K-1 conv inputs (compute dtype), "ssm"
[H, P, N] the SSM state (`mamba_ssm_cache_dtype`, float32 by default). A prefill starts every row
from zero state (a later chunk of a prompt, `ctx.fresh` False: from its slot's) and leaves both in
its slot; a decode step reads and updates them in place.

Tensor parallelism: heads are split across ranks in whole groups (n_groups % tp == 0), so every rank
keeps the B/C groups its heads read. Rank r of tp holds heads [r H/tp, (r+1) H/tp), which are
groups [r G/tp, (r+1) G/tp):
  in_proj   column-parallel with five shards (I, I, G*N, G*N, H) = `in_proj_shard_sizes`, each split
            evenly (LinearMethod.tp_slice does this for shard=None): rank r gets [z_r | x_r | B_r | C_r | dt_r]
  conv1d    weight/bias channels [x | B | C] split the same way (three pieces)
  A_log, D, dt_bias   the rank's heads;  norm.weight   the rank's part of I (whole groups)
  out_proj  row-parallel over I; the layer all-reduces its output when tp_size > 1.
`Mamba2Mixer.shard_param(cfg, name, tensor, rank, tp)` cuts an on-disk parameter to a rank's part
(the Nemotron-H family's `param_shard` calls it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .. import parallel
from ..config import parse_dtype
from ..errors import ConfigError
from ..kernels.conv1d import causal_conv1d, causal_conv1d_update
from ..kernels.mamba2 import gated_rms_norm, ssd_scan, ssd_step
from .context import CacheSpec, ForwardContext


# ------------------------------------------------------------------ config
def _parse_float(v, where: str) -> float:
    """A JSON number, a string ("inf", "Infinity", "-inf", "nan"), or transformers' serialised
    non-finite float {"__float__": "Infinity"}."""
    if isinstance(v, dict) and set(v) == {"__float__"}:
        v = v["__float__"]
    if isinstance(v, bool):
        raise ConfigError(f"{where}: expected a number, got {v!r}")
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v)  # accepts inf / Infinity / -Infinity / nan, any case
        except ValueError:
            pass
    raise ConfigError(f"{where}: expected a number, \"Infinity\" or {{\"__float__\": \"Infinity\"}}, got {v!r}")


def parse_time_step_limit(value, where: str = "config.json time_step_limit") -> tuple[float, float]:
    """config.json `time_step_limit` (or `mamba_dt_limit`) -> (lo, hi) for clamping dt after softplus.

    None means no limit, (0, inf). Accepts [0.0, Infinity] (Python's json reads the bare token),
    [0.0, "inf"] and transformers' [0.0, {"__float__": "Infinity"}]."""
    if value is None:
        return 0.0, math.inf
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ConfigError(f"{where}: expected a pair [min, max], got {value!r}")
    lo, hi = (_parse_float(v, where) for v in value)
    if math.isnan(lo) or math.isnan(hi) or lo < 0 or lo > hi:
        raise ConfigError(f"{where}: need 0 <= min <= max, got [{lo}, {hi}]")
    return lo, hi


@dataclass(frozen=True)
class Mamba2Config:
    """What the mixer needs from config.json (global sizes, before tensor parallelism)."""

    hidden_size: int
    num_heads: int  # mamba_num_heads (H)
    head_dim: int  # mamba_head_dim (P)
    n_groups: int  # G: B/C groups, also the gated norm's groups
    state_size: int  # ssm_state_size (N)
    conv_kernel: int = 4  # K
    use_conv_bias: bool = True
    norm_eps: float = 1e-5  # layer_norm_epsilon
    time_step_limit: tuple[float, float] = (0.0, math.inf)
    ssm_cache_dtype: torch.dtype = torch.float32  # mamba_ssm_cache_dtype

    @property
    def intermediate_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def conv_dim(self) -> int:
        return self.intermediate_size + 2 * self.n_groups * self.state_size

    @classmethod
    def from_hf(cls, cfg: dict, where: str = "config.json") -> "Mamba2Config":
        """Read a Nemotron-H config.json dict (current and older `mamba_*` key spellings; defaults as
        transformers' NemotronHConfig for the keys that have one)."""
        def get(*keys, default=None, required=False):
            for k in keys:
                if cfg.get(k) is not None:
                    return cfg[k]
            if required:
                raise ConfigError(f"{where}: missing required key {keys[0]!r} (Mamba2 layers need it)")
            return default

        act = get("mamba_hidden_act", default="silu")
        if act not in ("silu", "swish"):
            raise ConfigError(f"{where}: mamba_hidden_act {act!r} is not supported (only silu)")
        try:
            c = cls(
                hidden_size=int(get("hidden_size", required=True)),
                num_heads=int(get("mamba_num_heads", required=True)),
                head_dim=int(get("mamba_head_dim", required=True)),
                n_groups=int(get("n_groups", "mamba_n_groups", default=8)),
                state_size=int(get("ssm_state_size", required=True)),
                conv_kernel=int(get("conv_kernel", "mamba_d_conv", default=4)),
                use_conv_bias=bool(get("use_conv_bias", "mamba_conv_bias", default=True)),
                norm_eps=float(get("layer_norm_epsilon", default=1e-5)),
                time_step_limit=parse_time_step_limit(get("time_step_limit", "mamba_dt_limit"),
                                                      f"{where} time_step_limit"),
                ssm_cache_dtype=_ssm_dtype(get("mamba_ssm_cache_dtype", default="float32"), where),
            )
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where}: malformed Mamba2 value ({e})") from None
        c.validate(where)
        return c

    def validate(self, where: str = "config.json", tp_size: int = 1) -> None:
        for name in ("hidden_size", "num_heads", "head_dim", "n_groups", "state_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{where}: Mamba2 {name} must be positive, got {getattr(self, name)}")
        if self.conv_kernel < 2:
            raise ConfigError(f"{where}: conv_kernel must be >= 2, got {self.conv_kernel}")
        if self.num_heads % self.n_groups:
            raise ConfigError(f"{where}: mamba_num_heads {self.num_heads} is not a multiple of n_groups {self.n_groups}")
        if self.n_groups % tp_size:
            raise ConfigError(
                f"{where}: tensor parallelism splits Mamba2 heads in whole B/C groups, so n_groups "
                f"({self.n_groups}) must be divisible by the tensor-parallel size ({tp_size}); use a "
                f"tensor-parallel size that divides {self.n_groups}")


def _ssm_dtype(name, where: str) -> torch.dtype:
    if name == "auto":
        return torch.float32
    try:
        return parse_dtype(name)
    except ConfigError:
        raise ConfigError(f"{where}: mamba_ssm_cache_dtype {name!r} is not one of float32, bfloat16, float16") from None


def in_proj_shard_sizes(cfg: Mamba2Config) -> tuple[int, ...]:
    """in_proj's output rows as five column-parallel shards [z, x, B, C, dt] (global sizes)."""
    gn = cfg.n_groups * cfg.state_size
    return cfg.intermediate_size, cfg.intermediate_size, gn, gn, cfg.num_heads


# ------------------------------------------------------------------ the layer
def _poisoned(*shape, dtype) -> nn.Parameter:
    return nn.Parameter(torch.full(shape, float("nan"), dtype=dtype), requires_grad=False)


class _Params(nn.Module):
    """Holds `weight` (and `bias`) so that parameter names equal transformers' (conv1d.*, norm.*)."""

    def __init__(self, weight_shape, bias: int | None, dtype):
        super().__init__()
        self.weight = _poisoned(*weight_shape, dtype=dtype)
        self.bias = _poisoned(bias, dtype=dtype) if bias else None


class Mamba2Mixer(nn.Module):
    """Nemotron-H Mamba2 mixer. projections: {"in_proj", "out_proj"} callables [..., K] -> [..., N]
    already holding this rank's rows/columns. Parameters are created NaN (the loader fills them):
    conv1d.weight [C, 1, K], conv1d.bias [C], norm.weight [I] in `dtype`; A_log, D, dt_bias [H] in
    float32 (exact for bf16 and fp32 checkpoints)."""

    def __init__(self, cfg: Mamba2Config, layer_idx: int, projections: dict, dtype: torch.dtype, tp_size: int = 1):
        super().__init__()
        cfg.validate(f"Nemotron-H layer {layer_idx}", tp_size)
        self.cfg, self.layer_idx, self.tp_size = cfg, layer_idx, tp_size
        self.num_heads = cfg.num_heads // tp_size
        self.n_groups = cfg.n_groups // tp_size
        self.head_dim, self.state_size = cfg.head_dim, cfg.state_size
        self.intermediate_size = self.num_heads * self.head_dim
        self.conv_dim = self.intermediate_size + 2 * self.n_groups * self.state_size
        self.group_size = cfg.intermediate_size // cfg.n_groups
        self.in_proj, self.out_proj = projections["in_proj"], projections["out_proj"]
        self.conv1d = _Params((self.conv_dim, 1, cfg.conv_kernel), self.conv_dim if cfg.use_conv_bias else None, dtype)
        self.dt_bias = _poisoned(self.num_heads, dtype=torch.float32)
        self.A_log = _poisoned(self.num_heads, dtype=torch.float32)
        self.D = _poisoned(self.num_heads, dtype=torch.float32)
        self.norm = _Params((self.intermediate_size,), None, dtype)

    def cache_spec(self, dtype: torch.dtype) -> CacheSpec:
        """What this layer keeps per slot (DecoderModel.cache_specs collects it)."""
        return self.state_spec(self.cfg, dtype, self.tp_size)

    @staticmethod
    def state_spec(cfg: Mamba2Config, dtype: torch.dtype, tp_size: int = 1) -> CacheSpec:
        h, g = cfg.num_heads // tp_size, cfg.n_groups // tp_size
        conv_dim = h * cfg.head_dim + 2 * g * cfg.state_size
        return CacheSpec(kind="state", tensors={
            "conv": ((conv_dim, cfg.conv_kernel - 1), dtype),
            "ssm": ((h, cfg.head_dim, cfg.state_size), cfg.ssm_cache_dtype),
        })

    def tp_slice(self, name: str, tensor: torch.Tensor, rank: int) -> torch.Tensor:
        """This rank's part of the on-disk mixer parameter `name` (`shard_param` with this layer's tp)."""
        return self.shard_param(self.cfg, name, tensor, rank, self.tp_size)

    @staticmethod
    def shard_param(cfg: Mamba2Config, name: str, tensor: torch.Tensor, rank: int, tp_size: int) -> torch.Tensor:
        """The slice of the on-disk mixer parameter `name` (conv1d.weight, conv1d.bias, dt_bias, A_log,
        D, norm.weight) that rank keeps; see the module docstring for the layout."""
        n = tp_size
        if n == 1:
            return tensor
        if name in ("conv1d.weight", "conv1d.bias"):
            gn = cfg.n_groups * cfg.state_size
            parts, start = [], 0
            for size in (cfg.intermediate_size, gn, gn):
                per = size // n
                parts.append(tensor.narrow(0, start + rank * per, per))
                start += size
            return torch.cat(parts, 0)
        if name in ("dt_bias", "A_log", "D", "norm.weight"):
            per = tensor.shape[0] // n
            return tensor.narrow(0, rank * per, per)
        raise KeyError(f"Mamba2Mixer.shard_param: no parameter {name!r}")

    def forward(self, x: torch.Tensor, ctx: ForwardContext | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        h, p, g, n, i = self.num_heads, self.head_dim, self.n_groups, self.state_size, self.intermediate_size
        lim = self.cfg.time_step_limit
        zxbcdt = self.in_proj(x)
        z, xbc, dt = zxbcdt.split([i, self.conv_dim, h], dim=-1)
        w = self.conv1d.weight[:, 0]
        cache = ctx.cache(self.layer_idx) if ctx is not None else None
        if ctx is not None and ctx.decode:
            if t != 1:
                raise ValueError(f"Mamba2 layer {self.layer_idx}: a decode step takes one token per row, got {t}")
            conv_state = cache["conv"][ctx.slots]  # gathered copy; written back below (graph-safe)
            xbc = causal_conv1d_update(xbc[:, 0], conv_state, w, self.conv1d.bias, "silu")
            cache["conv"][ctx.slots] = conv_state
            xs, bm, cm = xbc.split([i, g * n, g * n], dim=-1)
            y = ssd_step(cache["ssm"], ctx.slots, xs.view(b, h, p), dt[:, 0], self.A_log, bm.view(b, g, n),
                         cm.view(b, g, n), self.D, self.dt_bias, lim, out_dtype=torch.float32)
        else:
            cont = cache is not None and not ctx.fresh  # a later chunk: continue from the slot's state
            xbc, conv_tail = causal_conv1d(xbc, w, self.conv1d.bias, "silu", cache["conv"][ctx.slots] if cont else None)
            xbc = xbc.contiguous()  # the scan reads x/B/C as views with unit last stride
            if cache is not None:
                cache["conv"][ctx.slots] = conv_tail.to(cache["conv"].dtype)
            xs, bm, cm = xbc.split([i, g * n, g * n], dim=-1)
            y = ssd_scan(xs.view(b, t, h, p), dt, self.A_log, bm.view(b, t, g, n), cm.view(b, t, g, n), self.D,
                         self.dt_bias, lim, state=None if cache is None else cache["ssm"],
                         slots=None if ctx is None else ctx.slots, load_state=cont, out_dtype=torch.float32)
        # y stays fp32 into the norm, as in transformers' chunked path
        y = gated_rms_norm(y.reshape(b, t, i), z, self.norm.weight, self.group_size, self.cfg.norm_eps, x.dtype)
        out = self.out_proj(y)
        return parallel.all_reduce(out) if self.tp_size > 1 else out
