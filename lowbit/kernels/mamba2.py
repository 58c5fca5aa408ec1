"""Mamba2 (SSD) selective scan: plain-PyTorch references and Triton kernels.

The recurrence, per batch row, head h (group g = h // (H / G)) and time t, state S [P, N] in fp32:

    dt_t = clamp(softplus(dt_raw_t + dt_bias_h), lo, hi)        A_h = -exp(A_log_h)
    S_t  = exp(dt_t * A_h) * S_{t-1} + dt_t * x_t[:, None] * B_t,g[None, :]
    y_t  = S_t @ C_t,g + D_h * x_t

Shapes: x [B, T, H, P], dt_raw [B, T, H], B/C [B, T, G, N], A_log/D/dt_bias [H]; a per-slot state
cache is [S + 1, H, P, N] (row S is the CUDA-graph pad slot) in `mamba_ssm_cache_dtype`.

  ssd_scan(...)   prefill: the whole sequence; optionally reads the initial state from and writes the
                  final state to the cache rows `slots`. Triton: one program per (row, head, block of
                  P) walks the sequence chunk by chunk (CHUNK = 64) keeping its state slice in
                  registers; within a chunk the output is the masked "attention" form
                  (C B^T * decay * dt) @ x plus the carried state's contribution, then the state
                  advances over the whole chunk in one matmul (docs/kernels-mamba2.md).
  ssd_step(...)   decode: one token per row, the slot's state updated in place (no host sync: the
                  slot ids are read on the device, so a CUDA graph captures it).
  gated_rms_norm  the mixer's output norm: RMSNorm over groups of y * silu(z), times the weight.

References: `ssd_chunked_ref` (the chunked algorithm transformers' torch path runs, in fp32) and
`ssd_step_ref` (the recurrence itself; `ssd_recurrent_ref` loops it over a sequence and is the
ground truth the tests hold both the chunked reference and the kernel to).
CPU tensors take the references unless lowbit.kernels.decoder.interpret_on_cpu asks for the interpreted kernels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import decoder as _ops  # use_triton + interpret_on_cpu (the decoder kernels decide for all)

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
    triton = None

CHUNK = 64  # Triton scan: tokens per chunk (the math does not depend on it)


def _use_triton(x: torch.Tensor) -> bool:
    return _ops.use_triton(x)


# ------------------------------------------------------------------ references
def process_dt(dt: torch.Tensor, dt_bias: torch.Tensor, dt_limit: tuple[float, float]) -> torch.Tensor:
    """fp32 clamp(softplus(dt + dt_bias), *dt_limit) (torch's softplus: identity above 20)."""
    return F.softplus(dt.float() + dt_bias.float()).clamp(dt_limit[0], dt_limit[1])


def _by_head(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[..., G, N] -> [..., H, N] (each group serves H / G consecutive heads), fp32."""
    return t.float().repeat_interleave(heads // t.shape[-2], dim=-2)


def ssd_chunked_ref(x, dt, A_log, B, C, D, dt_bias, dt_limit, chunk_size: int = CHUNK, initial_state=None):
    """The chunked SSD algorithm in fp32. Returns (y [B, T, H, P] fp32, final state [B, H, P, N] fp32)."""
    b, t, h, p = x.shape
    n = B.shape[-1]
    L = chunk_size
    pad = (-t) % L
    nc = (t + pad) // L
    a = -torch.exp(A_log.float())
    dtp = F.pad(process_dt(dt, dt_bias, dt_limit), (0, 0, 0, pad)).view(b, nc, L, h)
    xf = F.pad(x.float(), (0, 0, 0, 0, 0, pad)).view(b, nc, L, h, p)
    Bf = F.pad(_by_head(B, h), (0, 0, 0, 0, 0, pad)).view(b, nc, L, h, n)
    Cf = F.pad(_by_head(C, h), (0, 0, 0, 0, 0, pad)).view(b, nc, L, h, n)
    cum = torch.cumsum(dtp * a, dim=2)  # [b, nc, L, h]: log-decay from the chunk start
    # within a chunk: y_l += sum_{s<=l} (C_l . B_s) exp(cum_l - cum_s) dt_s x_s
    causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
    seg = (cum[:, :, :, None, :] - cum[:, :, None, :, :]).masked_fill(~causal[:, :, None], float("-inf"))
    scores = torch.einsum("bclhn,bcshn->bclsh", Cf, Bf) * torch.exp(seg) * dtp[:, :, None, :, :]
    y = torch.einsum("bclsh,bcshp->bclhp", scores, xf)
    # what each chunk adds to the state at its end, then the state carried across chunks
    w = torch.exp(cum[:, :, -1:, :] - cum) * dtp
    chunk_states = torch.einsum("bclh,bclhp,bclhn->bchpn", w, xf, Bf)
    s = torch.zeros(b, h, p, n, device=x.device) if initial_state is None else initial_state.float().clone()
    starts = []
    for c in range(nc):
        starts.append(s)
        s = s * torch.exp(cum[:, c, -1, :])[:, :, None, None] + chunk_states[:, c]
    y = y + torch.einsum("bclhn,bchpn->bclhp", Cf, torch.stack(starts, 1)) * torch.exp(cum)[..., None]
    y = y + D.float()[:, None] * xf
    return y.reshape(b, nc * L, h, p)[:, :t], s


def ssd_step_ref(state, slots, x, dt, A_log, B, C, D, dt_bias, dt_limit):
    """One recurrent step. state [S, H, P, N] (rows `slots` updated in place, any float dtype);
    x [b, H, P], dt [b, H], B/C [b, G, N]. Returns y [b, H, P] fp32."""
    h = x.shape[1]
    dtp = process_dt(dt, dt_bias, dt_limit)[:, :, None, None]  # [b, H, 1, 1]
    a = -torch.exp(A_log.float())[None, :, None, None]
    s = state[slots].float()
    s = s * torch.exp(dtp * a) + dtp * x.float()[..., None] * _by_head(B, h)[:, :, None, :]
    state[slots] = s.to(state.dtype)
    return (s @ _by_head(C, h)[..., None])[..., 0] + D.float()[:, None] * x.float()


def ssd_recurrent_ref(x, dt, A_log, B, C, D, dt_bias, dt_limit, initial_state=None):
    """The recurrence token by token (fp32). Returns (y [B, T, H, P], final state [B, H, P, N])."""
    b, t, h, p = x.shape
    state = torch.zeros(b, h, p, B.shape[-1], device=x.device) if initial_state is None else initial_state.float().clone()
    rows = torch.arange(b, device=x.device)
    ys = [ssd_step_ref(state, rows, x[:, i], dt[:, i], A_log, B[:, i], C[:, i], D, dt_bias, dt_limit) for i in range(t)]
    return torch.stack(ys, 1), state


def gated_rms_norm_ref(y, z, weight, group_size: int, eps: float, out_dtype):
    """transformers' NemotronHRMSNormGated (norm_before_gate=False): RMSNorm over groups of
    y * silu(z), in fp32, times the weight; returned in out_dtype."""
    g = y.float() * F.silu(z.float())
    gg = g.view(*g.shape[:-1], -1, group_size)
    gg = gg * torch.rsqrt(gg.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.float() * gg.view(g.shape)).to(out_dtype)


# ------------------------------------------------------------------ public ops
def _check_shapes(x, B, **tensors):
    """Unit last strides (the kernels index the last dim densely) and heads in whole groups."""
    if x.shape[-2] % B.shape[-2]:
        raise ValueError(f"mamba2: {x.shape[-2]} heads are not a multiple of {B.shape[-2]} B/C groups")
    for name, t in dict(x=x, B=B, **tensors).items():
        if t.stride(-1) != 1:
            raise ValueError(f"mamba2: {name} must be contiguous in its last dim (stride {t.stride()})")


def ssd_scan(x, dt, A_log, B, C, D, dt_bias, dt_limit, state=None, slots=None, load_state: bool = False,
             out_dtype=None):
    """Prefill scan. x [b, T, H, P], dt [b, T, H] (raw), B/C [b, T, G, N] (views with unit last stride
    are fine). With `state` [S + 1, H, P, N] and `slots` [b]: the final state of row i is written to
    state[slots[i]] (and, with load_state, the scan starts from it instead of zero).
    Returns y [b, T, H, P] in out_dtype (default x.dtype)."""
    out_dtype = out_dtype or x.dtype
    if not _use_triton(x):
        init = state[slots] if (state is not None and load_state) else None
        y, final = ssd_chunked_ref(x, dt, A_log, B, C, D, dt_bias, dt_limit, initial_state=init)
        if state is not None:
            state[slots] = final.to(state.dtype)
        return y.to(out_dtype)
    b, t, h, p = x.shape
    g, n = B.shape[-2:]
    _check_shapes(x, B, dt=dt, C=C)
    y = torch.empty(b, t, h, p, dtype=out_dtype, device=x.device)
    has_state = state is not None
    st = state if has_state else y  # dummy pointer, never touched
    sl = slots.contiguous() if has_state else torch.zeros(b, dtype=torch.int64, device=x.device)  # read, never used
    bp = min(32, max(16, triton.next_power_of_2(p)))
    bn = max(16, triton.next_power_of_2(n))
    grid = (b, h, triton.cdiv(p, bp))
    _ssd_scan_kernel[grid](
        x, dt, B, C, y, A_log, D, dt_bias, st, sl,
        t, p, n, h // g, float(dt_limit[0]), float(dt_limit[1]),
        x.stride(0), x.stride(1), x.stride(2), dt.stride(0), dt.stride(1),
        B.stride(0), B.stride(1), B.stride(2), C.stride(0), C.stride(1), C.stride(2),
        y.stride(0), y.stride(1), y.stride(2),
        st.stride(0), st.stride(1), st.stride(2),
        L=CHUNK, BP=bp, BN=bn, LOAD_STATE=has_state and load_state, STORE_STATE=has_state,
        PREC="ieee" if x.dtype == torch.float32 else "tf32", num_warps=4)
    return y


def ssd_step(state, slots, x, dt, A_log, B, C, D, dt_bias, dt_limit, out_dtype=None):
    """Decode step: state [S + 1, H, P, N] rows `slots` [b] advanced in place by one token.
    x [b, H, P], dt [b, H] (raw), B/C [b, G, N]. Returns y [b, H, P] in out_dtype (default x.dtype)."""
    out_dtype = out_dtype or x.dtype
    if not _use_triton(x):
        return ssd_step_ref(state, slots, x, dt, A_log, B, C, D, dt_bias, dt_limit).to(out_dtype)
    b, h, p = x.shape
    g, n = B.shape[-2:]
    _check_shapes(x, B, dt=dt, C=C, state=state)
    y = torch.empty(b, h, p, dtype=out_dtype, device=x.device)
    slots = slots.contiguous()  # read at offset row (a stride-0 view would be read past its end)
    bn = triton.next_power_of_2(n)
    bp = max(1, min(triton.next_power_of_2(p), 4096 // bn))
    grid = (b, h, triton.cdiv(p, bp))
    _ssd_step_kernel[grid](
        x, dt, B, C, y, A_log, D, dt_bias, state, slots,
        p, n, h // g, float(dt_limit[0]), float(dt_limit[1]),
        x.stride(0), x.stride(1), dt.stride(0), B.stride(0), B.stride(1), C.stride(0), C.stride(1),
        y.stride(0), y.stride(1), state.stride(0), state.stride(1), state.stride(2),
        BP=bp, BN=bn, num_warps=4)
    return y


def gated_rms_norm(y, z, weight, group_size: int, eps: float, out_dtype=None):
    """RMSNorm over groups of y * silu(z) (y, z [..., I], unit last stride), times weight [I]."""
    out_dtype = out_dtype or y.dtype
    if not _use_triton(y):
        return gated_rms_norm_ref(y, z, weight, group_size, eps, out_dtype)
    i = y.shape[-1]
    y2, z2 = y.reshape(-1, i), z.reshape(-1, i)
    if y2.stride(-1) != 1 or z2.stride(-1) != 1 or i % group_size:
        raise ValueError(f"gated_rms_norm: need unit last strides and {i} a multiple of group size {group_size}")
    out = torch.empty(y2.shape, dtype=out_dtype, device=y.device)
    block = triton.next_power_of_2(group_size)
    rows = 1 if y.is_cuda else min(64, triton.next_power_of_2(y2.shape[0]))  # the interpreter pays per program
    _gated_rms_norm_kernel[(triton.cdiv(y2.shape[0], rows), i // group_size)](
        y2, z2, weight, out, y2.shape[0], y2.stride(0), z2.stride(0), out.stride(0), group_size, eps,
        ROWS=rows, BLOCK=block, num_warps=8 if block >= 2048 else 4)
    return out.view(*y.shape[:-1], i)


# ------------------------------------------------------------------ kernels
if triton is not None:

    @triton.jit
    def _softplus(x):
        """torch's softplus (identity above 20); log1p(u) = log(1+u) * u / ((1+u) - 1) keeps the
        relative accuracy for tiny u where log(1 + u) alone would round to 0."""
        u = tl.exp(tl.minimum(x, 20.0))
        v = 1.0 + u
        exact = v == 1.0
        lp = tl.where(exact, u, tl.log(v) * (u / tl.where(exact, 1.0, v - 1.0)))
        return tl.where(x > 20.0, x, lp)

    @triton.jit
    def _time_step(raw, bias, lo, hi):
        return tl.minimum(tl.maximum(_softplus(raw + bias), lo), hi)

    @triton.jit
    def _state_tile(state_ptr, slot_ptr, row, h, offs_p, offs_n, P, N, ss_s, ss_h, ss_p):
        """Pointers and mask of this program's [BP, BN] tile of state[slots[row], h] (slot read on the device)."""
        slot = tl.load(slot_ptr + row).to(tl.int64)
        ptrs = state_ptr + slot * ss_s + h * ss_h + offs_p[:, None] * ss_p + offs_n[None, :]
        return ptrs, (offs_p[:, None] < P) & (offs_n[None, :] < N)

    @triton.jit
    def _ssd_scan_kernel(
        x_ptr, dt_ptr, b_ptr, c_ptr, y_ptr, alog_ptr, d_ptr, dtb_ptr, state_ptr, slot_ptr,
        T, P, N, heads_per_group, dt_lo, dt_hi,
        sx_b, sx_t, sx_h, sdt_b, sdt_t, sb_b, sb_t, sb_g, sc_b, sc_t, sc_g, sy_b, sy_t, sy_h,
        ss_s, ss_h, ss_p,
        L: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
        LOAD_STATE: tl.constexpr, STORE_STATE: tl.constexpr, PREC: tl.constexpr,
    ):
        row = tl.program_id(0)
        h = tl.program_id(1)
        g = h // heads_per_group
        offs_l = tl.arange(0, L)
        offs_p = tl.program_id(2) * BP + tl.arange(0, BP)
        offs_n = tl.arange(0, BN)
        mp = offs_p < P
        mn = offs_n < N
        a = -tl.exp(tl.load(alog_ptr + h).to(tl.float32))
        d_skip = tl.load(d_ptr + h).to(tl.float32)
        bias = tl.load(dtb_ptr + h).to(tl.float32)
        s_ptrs, s_mask = _state_tile(state_ptr, slot_ptr, row, h, offs_p, offs_n, P, N, ss_s, ss_h, ss_p)
        if LOAD_STATE:
            state = tl.load(s_ptrs, mask=s_mask, other=0.0).to(tl.float32)
        else:
            state = tl.zeros((BP, BN), dtype=tl.float32)
        x_base = x_ptr + row * sx_b + h * sx_h
        b_base = b_ptr + row * sb_b + g * sb_g
        c_base = c_ptr + row * sc_b + g * sc_g
        y_base = y_ptr + row * sy_b + h * sy_h
        dt_base = dt_ptr + row * sdt_b + h
        causal = offs_l[:, None] >= offs_l[None, :]
        for c0 in range(0, T, L):
            t = c0 + offs_l
            mt = t < T
            dt = _time_step(tl.load(dt_base + t * sdt_t, mask=mt, other=0.0).to(tl.float32), bias, dt_lo, dt_hi)
            dt = tl.where(mt, dt, 0.0)  # padding rows: no decay, no input
            cum = tl.cumsum(dt * a, axis=0)  # log-decay from the chunk start (<= 0, decreasing)
            cum_last = tl.sum(tl.where(offs_l == L - 1, cum, 0.0), axis=0)
            xs = tl.load(x_base + t[:, None] * sx_t + offs_p[None, :], mask=mt[:, None] & mp[None, :],
                         other=0.0).to(tl.float32)
            bm = tl.load(b_base + t[:, None] * sb_t + offs_n[None, :], mask=mt[:, None] & mn[None, :],
                         other=0.0).to(tl.float32)
            cm = tl.load(c_base + t[:, None] * sc_t + offs_n[None, :], mask=mt[:, None] & mn[None, :],
                         other=0.0).to(tl.float32)
            # the state carried in from earlier chunks, decayed to each position
            y = tl.dot(cm, tl.trans(state), input_precision=PREC) * tl.exp(cum)[:, None]
            # this chunk's own tokens: masked (C B^T) * exp(cum_l - cum_s) * dt_s, applied to x
            cb = tl.dot(cm, tl.trans(bm), input_precision=PREC)
            seg = tl.exp(tl.minimum(cum[:, None] - cum[None, :], 0.0))
            w = tl.where(causal, cb * seg * dt[None, :], 0.0)
            y += tl.dot(w, xs, input_precision=PREC)
            y += d_skip * xs
            tl.store(y_base + t[:, None] * sy_t + offs_p[None, :], y.to(y_ptr.dtype.element_ty),
                     mask=mt[:, None] & mp[None, :])
            # advance the state over the whole chunk
            wl = tl.exp(cum_last - cum) * dt
            state = state * tl.exp(cum_last) + tl.dot(tl.trans(xs * wl[:, None]), bm, input_precision=PREC)
        if STORE_STATE:
            tl.store(s_ptrs, state.to(state_ptr.dtype.element_ty), mask=s_mask)

    @triton.jit
    def _ssd_step_kernel(
        x_ptr, dt_ptr, b_ptr, c_ptr, y_ptr, alog_ptr, d_ptr, dtb_ptr, state_ptr, slot_ptr,
        P, N, heads_per_group, dt_lo, dt_hi,
        sx_b, sx_h, sdt_b, sb_b, sb_g, sc_b, sc_g, sy_b, sy_h, ss_s, ss_h, ss_p,
        BP: tl.constexpr, BN: tl.constexpr,
    ):
        row = tl.program_id(0)
        h = tl.program_id(1)
        g = h // heads_per_group
        offs_p = tl.program_id(2) * BP + tl.arange(0, BP)
        offs_n = tl.arange(0, BN)
        mp = offs_p < P
        mn = offs_n < N
        a = -tl.exp(tl.load(alog_ptr + h).to(tl.float32))
        d_skip = tl.load(d_ptr + h).to(tl.float32)
        dt = _time_step(tl.load(dt_ptr + row * sdt_b + h).to(tl.float32), tl.load(dtb_ptr + h).to(tl.float32),
                        dt_lo, dt_hi)
        s_ptrs, s_mask = _state_tile(state_ptr, slot_ptr, row, h, offs_p, offs_n, P, N, ss_s, ss_h, ss_p)
        xs = tl.load(x_ptr + row * sx_b + h * sx_h + offs_p, mask=mp, other=0.0).to(tl.float32)
        bm = tl.load(b_ptr + row * sb_b + g * sb_g + offs_n, mask=mn, other=0.0).to(tl.float32)
        cm = tl.load(c_ptr + row * sc_b + g * sc_g + offs_n, mask=mn, other=0.0).to(tl.float32)
        s = tl.load(s_ptrs, mask=s_mask, other=0.0).to(tl.float32)
        s = s * tl.exp(dt * a) + (dt * xs)[:, None] * bm[None, :]
        tl.store(s_ptrs, s.to(state_ptr.dtype.element_ty), mask=s_mask)
        y = tl.sum(s * cm[None, :], axis=1) + d_skip * xs
        tl.store(y_ptr + row * sy_b + h * sy_h + offs_p, y.to(y_ptr.dtype.element_ty), mask=mp)

    @triton.jit
    def _gated_rms_norm_kernel(y_ptr, z_ptr, w_ptr, out_ptr, R, sy, sz, so, G, eps,
                               ROWS: tl.constexpr, BLOCK: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)[:, None]
        cols = tl.arange(0, BLOCK)[None, :]
        col = tl.program_id(1) * G + cols
        m = (rows < R) & (cols < G)
        y = tl.load(y_ptr + rows * sy + col, mask=m, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + rows * sz + col, mask=m, other=0.0).to(tl.float32)
        v = y * (z / (1.0 + tl.exp(-z)))
        r = tl.rsqrt(tl.sum(v * v, axis=1) / G + eps)
        w = tl.load(w_ptr + col, mask=cols < G, other=0.0).to(tl.float32)
        tl.store(out_ptr + rows * so + col, (w * (v * r[:, None])).to(out_ptr.dtype.element_ty), mask=m)
