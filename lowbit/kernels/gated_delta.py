"""The gated delta rule (Gated DeltaNet linear attention, Qwen3.5 / Qwen3-Next): prefill and decode.

Per value head, with a state S [d_k, d_v] (fp32) and, at each token t, q_t, k_t (l2-normalised, q
scaled by d_k^-0.5), v_t, a decay g_t <= 0 (log space) and a write strength beta_t in (0, 1):

    S   <- exp(g_t) * S
    S   <- S + k_t (beta_t (v_t - S^T k_t))^T        (the delta rule: write only what S mispredicts)
    o_t  = S^T q_t

Query/key heads are shared by H_v / H_k consecutive value heads (value head h reads key head
h // (H_v / H_k)), like grouped-query attention. The gates come from the layer's projections:
g = -exp(A_log) * softplus(a + dt_bias), beta = sigmoid(b) (`gates`).

  gated_delta_rule_ref(q, k, v, g, beta, scale=None, initial_state=None, use_qk_l2norm=True)
      -> (o [B, T, H_v, d_v] in q's dtype, final state [B, H_v, d_k, d_v] fp32)
      the recurrent form, token by token in fp32: what transformers' torch_recurrent_gated_delta_rule
      (and, up to fp32 rounding, its chunked twin) computes. q, k [B, T, H_k, d_k]; v [B, T, H_v, d_v];
      g, beta [B, T, H_v].
  chunk_gated_delta_rule(same) -> same
      prefill: the Triton chunked algorithm on CUDA (chunks of 64 tokens), the reference elsewhere.
  gated_delta_rule_decode(q [B, H_k, d_k], k, v [B, H_v, d_v], a [B, H_v], b [B, H_v], A_log [H_v],
                          dt_bias [H_v], state [S+1, H_v, d_k, d_v] fp32, slots [B], scale=None)
      -> o [B, H_v, d_v]; one token per row, the gates, the l2 norms and the state update fused in
      one kernel; row b reads and writes state[slots[b]] in place (no host sync: CUDA-graph safe).

Chunked prefill (chunk C = 64, after the WY representation of DeltaNet / Gated DeltaNet; the
flash-linear-attention design, written anew here):
  1. `_wy_kernel`, parallel over (chunk, batch x value head): in-chunk cumulative decay gc, the
     strictly lower matrix A[i, j] = beta_i (k_i . k_j) exp(gc_i - gc_j), its unit-lower inverse
     X = (I + A)^-1 (forward substitution inside 16 x 16 diagonal blocks, then a three-term block
     merge: no long power series, which would cancel catastrophically for correlated keys), and
     w = X (beta exp(gc) k), u = X (beta v), kept in fp32.
  2. `_chunk_kernel`, sequential over chunks, parallel over (d_v block, batch x value head): with the
     state S entering the chunk, v' = u - w S; o = (exp(gc) q) S + tril(q k^T exp(gc_i - gc_j)) v';
     S <- exp(gc_last) S + (exp(gc_last - gc) k)^T v'. The state never leaves registers between
     chunks; only the final state is written.
Padding rows of a partial last chunk load as zeros (g = 0, beta = 0, k = v = 0): they change nothing.

Precision: every intermediate is fp32. Dots take fp32 operands ("ieee") for fp32 inputs, TF32 for
bf16/fp16 inputs (bf16/fp16 values are exact in TF32; only intermediates such as X and S round to
TF32's 10-bit mantissa, below the output's own rounding). Bounds measured are in the tests.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import decoder
from ..errors import ConfigError

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
    triton = None

CHUNK = 64
L2_EPS = 1e-6  # transformers' (and FLA's) l2norm epsilon


# ------------------------------------------------------------------ references
def l2norm_ref(x: torch.Tensor, eps: float = L2_EPS) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def gates(a, b, A_log, dt_bias):
    """(g fp32, beta in b's dtype), as transformers' Qwen3.5 layer forms them."""
    beta = b.sigmoid()
    g = -A_log.float().exp() * F.softplus(a.float() + dt_bias)
    return g, beta


def _check(q, k, v, g, beta, what):
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:2] != q.shape[:2]:
        raise ConfigError(f"{what}: q, k must be [B, T, H_k, d_k] and v [B, T, H_v, d_v]; got "
                          f"{list(q.shape)}, {list(k.shape)}, {list(v.shape)}")
    hk, hv = q.shape[2], v.shape[2]
    if hv % hk:
        raise ConfigError(f"{what}: {hv} value heads are not a multiple of {hk} key heads")
    for name, t in (("g", g), ("beta", beta)):
        if tuple(t.shape) != tuple(v.shape[:3]):
            raise ConfigError(f"{what}: {name} must be [B, T, H_v] = {list(v.shape[:3])}, got {list(t.shape)}")


def gated_delta_rule_ref(q, k, v, g, beta, scale=None, initial_state=None, use_qk_l2norm=True):
    """The recurrent form in fp32 (see the module docstring)."""
    _check(q, k, v, g, beta, "gated_delta_rule")
    b, t, hk, dk = q.shape
    hv, dv = v.shape[2:]
    scale = dk ** -0.5 if scale is None else scale
    qf, kf = q.float(), k.float()
    if use_qk_l2norm:
        qf, kf = l2norm_ref(qf), l2norm_ref(kf)
    qf = qf.repeat_interleave(hv // hk, dim=2) * scale
    kf = kf.repeat_interleave(hv // hk, dim=2)
    vf, gf, bf = v.float(), g.float(), beta.float()
    state = (torch.zeros(b, hv, dk, dv, device=v.device) if initial_state is None
             else initial_state.float().clone())
    out = torch.empty(b, t, hv, dv, device=v.device)
    for i in range(t):
        state = state * gf[:, i].exp()[..., None, None]
        kt = kf[:, i]
        delta = (vf[:, i] - (state * kt[..., None]).sum(-2)) * bf[:, i, :, None]
        state = state + kt[..., :, None] * delta[..., None, :]
        out[:, i] = (state * qf[:, i, :, :, None]).sum(-2)
    return out.to(q.dtype), state


def gated_delta_rule_decode_ref(q, k, v, a, b, A_log, dt_bias, state, slots, scale=None):
    """One token per row through the reference; state[slots] updated in place."""
    g, beta = gates(a, b, A_log, dt_bias)
    o, new = gated_delta_rule_ref(q[:, None], k[:, None], v[:, None], g[:, None], beta[:, None], scale,
                                  state[slots], use_qk_l2norm=True)
    state[slots] = new
    return o[:, 0]


# ------------------------------------------------------------------ public functions
def _pow2(n: int, least: int = 16) -> int:
    return max(least, 1 << max(0, (n - 1).bit_length()))


# The chunk kernels' dots for bf16/fp16 inputs: tf32 (bf16 inputs are exact in it; the fp32
# intermediates, e.g. the state in `w @ s`, keep 10 mantissa bits; flash-linear-attention's kernels
# feed those dots bf16). "tf32x3" (about fp32) would need 237 KB of shared memory in _chunk_kernel at
# d_k = d_v = 128, over the H200's 227 KB (measured: OutOfResources). fp32 inputs use "ieee".
HALF_PRECISION = "tf32"


def _precision(x: torch.Tensor) -> str:
    return "ieee" if x.dtype == torch.float32 else HALF_PRECISION


def chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, use_qk_l2norm=True):
    """Prefill; same contract as `gated_delta_rule_ref` (Triton on CUDA, the reference elsewhere)."""
    if not decoder.use_triton(q):
        return gated_delta_rule_ref(q, k, v, g, beta, scale, initial_state, use_qk_l2norm)
    _check(q, k, v, g, beta, "chunk_gated_delta_rule")
    b, t, hk, dk = q.shape
    hv, dv = v.shape[2:]
    scale = dk ** -0.5 if scale is None else scale
    q, k, v = (x if x.stride(-1) == 1 and x.stride(-2) == x.shape[-1] else x.contiguous() for x in (q, k, v))
    g, beta = g.float().contiguous(), beta.contiguous()
    bk, bvf = _pow2(dk), _pow2(dv)
    w = torch.empty(b, t, hv, dk, dtype=torch.float32, device=q.device)
    u = torch.empty(b, t, hv, dv, dtype=torch.float32, device=q.device)
    nt = triton.cdiv(t, CHUNK)
    prec = _precision(q)
    warps = 8 if bk * bvf >= 128 * 64 else 4  # Qwen3.5's 128 x 128 heads: keep the [64, 128] fp32 tiles in registers
    _wy_kernel[(nt, b * hv)](k, v, g, beta, w, u, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                             t, hv, hv // hk, dk, dv, NORM=use_qk_l2norm, BT=CHUNK, BK=bk, BV=bvf, PREC=prec,
                             num_warps=warps)
    o = torch.empty(b, t, hv, dv, dtype=q.dtype, device=q.device)
    final = torch.empty(b, hv, dk, dv, dtype=torch.float32, device=q.device)
    h0 = initial_state.float().contiguous() if initial_state is not None else final
    bv = min(bvf, 32)
    _chunk_kernel[(triton.cdiv(dv, bv), b * hv)](
        q, k, w, u, g, o, h0, final, q.stride(0), q.stride(1), t, hv, hv // hk, dk, dv, scale,
        NORM=use_qk_l2norm, HAS_H0=initial_state is not None, BT=CHUNK, BK=bk, BV=bv, PREC=prec, num_warps=warps,
        num_stages=2)  # 3 stages would take 205 KB of shared memory at d_k = d_v = 128 (tf32), 295 KB in fp32
    return o, final


def gated_delta_rule_decode(q, k, v, a, b, A_log, dt_bias, state, slots, scale=None):
    """One decode step (see the module docstring); returns o [B, H_v, d_v], updates state in place."""
    if not decoder.use_triton(q):
        return gated_delta_rule_decode_ref(q, k, v, a, b, A_log, dt_bias, state, slots, scale)
    bsz, hk, dk = q.shape
    hv, dv = v.shape[1:]
    if (state.dtype != torch.float32 or tuple(state.shape[1:]) != (hv, dk, dv) or not state.is_contiguous()
            or k.shape != q.shape or hv % hk or a.shape != (bsz, hv) or b.shape != (bsz, hv)):
        raise ConfigError(f"gated_delta_rule_decode: want q, k [B, H_k, d_k], v [B, H_v, d_v], a, b [B, H_v] and a "
                          f"contiguous fp32 state [S, {hv}, {dk}, {dv}]; got q {list(q.shape)}, k {list(k.shape)}, "
                          f"v {list(v.shape)}, a {list(a.shape)}, b {list(b.shape)}, "
                          f"state {list(state.shape)} {state.dtype}")
    scale = dk ** -0.5 if scale is None else scale
    q, k, v = (x if x.stride(-1) == 1 and x.stride(-2) == x.shape[-1] else x.contiguous() for x in (q, k, v))
    a, b, slots = a.contiguous(), b.contiguous(), slots.contiguous()  # (read at offset row: see decode_attention)
    o = torch.empty(bsz, hv, dv, dtype=q.dtype, device=q.device)
    bk, bvf = _pow2(dk, 1), _pow2(dv, 1)
    bv = min(bvf, 32)
    _decode_kernel[(triton.cdiv(dv, bv), bsz * hv)](
        q, k, v, a, b, A_log, dt_bias, state, slots, o, q.stride(0), k.stride(0), v.stride(0),
        hv, hv // hk, dk, dv, scale, BK=bk, BV=bv, num_warps=4)
    return o


# ------------------------------------------------------------------ kernels
if triton is not None:

    @triton.jit
    def _load_qk(row_ptr, rmask, ck, DK: tl.constexpr, NORM: tl.constexpr):
        """[BT, BK] fp32 rows of q or k (row_ptr [BT, 1] points at each row's head), l2-normalised when NORM."""
        x = tl.load(row_ptr + ck[None, :], mask=rmask[:, None] & (ck < DK)[None, :], other=0.0)
        x = x.to(tl.float32)
        if NORM:
            x = x * tl.math.rsqrt(tl.sum(x * x, 1) + 1e-6)[:, None]
        return x

    @triton.jit
    def _unit_lower_inverse(a, BT: tl.constexpr, PREC: tl.constexpr):
        """(I + a)^-1 for a strictly lower [64, 64] a, blocked in 16 x 16: forward substitution inside
        the four diagonal blocks at once (row i of every block per step, one dot each), then
        (I + a)^-1 = (I + n)^-1 x with x = (I + d)^-1 and n = x (a - d) strictly block lower, so n^4 = 0
        and (I + n)^-1 = (I - n)(I + n^2)."""
        tl.static_assert(BT == 64)
        r = tl.arange(0, BT)
        blk = (r[:, None] // 16) == (r[None, :] // 16)
        d = tl.where(blk, a, 0.0)
        eye = (r[:, None] == r[None, :]).to(tl.float32)
        x = eye
        for i in range(1, 16):
            sel = (r % 16 == i)[:, None]
            x = tl.where(sel, x - tl.dot(tl.where(sel, d, 0.0), x, input_precision=PREC), x)
        n = tl.dot(x, a - d, input_precision=PREC)
        x = tl.dot(eye + tl.dot(n, n, input_precision=PREC), x, input_precision=PREC)
        return tl.dot(eye - n, x, input_precision=PREC)

    @triton.jit
    def _wy_kernel(k_ptr, v_ptr, g_ptr, beta_ptr, w_ptr, u_ptr, skb, skt, svb, svt, T, HV, G,
                   DK: tl.constexpr, DV: tl.constexpr, NORM: tl.constexpr, BT: tl.constexpr,
                   BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
        pn, pbh = tl.program_id(0), tl.program_id(1)
        bi, h = pbh // HV, pbh % HV
        r = tl.arange(0, BT)
        rows = pn * BT + r
        rmask = rows < T
        ck, cv = tl.arange(0, BK), tl.arange(0, BV)
        kk = _load_qk(k_ptr + bi.to(tl.int64) * skb + rows[:, None] * skt + (h // G) * DK, rmask, ck, DK, NORM)
        gh = bi.to(tl.int64) * T * HV + rows * HV + h  # g, beta [B, T, HV] contiguous
        gc = tl.cumsum(tl.load(g_ptr + gh, mask=rmask, other=0.0), 0)
        bt = tl.load(beta_ptr + gh, mask=rmask, other=0.0).to(tl.float32)
        low = r[:, None] > r[None, :]
        a = tl.dot(kk, tl.trans(kk), input_precision=PREC) * bt[:, None]
        a = tl.where(low, a * tl.exp(tl.where(low, gc[:, None] - gc[None, :], 0.0)), 0.0)
        x = _unit_lower_inverse(a, BT, PREC)
        w = tl.dot(x, kk * (bt * tl.exp(gc))[:, None], input_precision=PREC)
        vmask = rmask[:, None] & (cv < DV)[None, :]
        vv = tl.load(v_ptr + bi.to(tl.int64) * svb + rows[:, None] * svt + h * DV + cv[None, :], mask=vmask, other=0.0)
        u = tl.dot(x, vv.to(tl.float32) * bt[:, None], input_precision=PREC)
        base = (bi.to(tl.int64) * T + rows[:, None]) * HV + h
        tl.store(w_ptr + base * DK + ck[None, :], w, mask=rmask[:, None] & (ck < DK)[None, :])
        tl.store(u_ptr + base * DV + cv[None, :], u, mask=vmask)

    @triton.jit
    def _chunk_kernel(q_ptr, k_ptr, w_ptr, u_ptr, g_ptr, o_ptr, h0_ptr, ht_ptr, sqb, sqt, T, HV, G,
                      DK: tl.constexpr, DV: tl.constexpr, scale, NORM: tl.constexpr, HAS_H0: tl.constexpr,
                      BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
        pv, pbh = tl.program_id(0), tl.program_id(1)
        bi, h = pbh // HV, pbh % HV
        b64 = bi.to(tl.int64)
        r = tl.arange(0, BT)
        ck = tl.arange(0, BK)
        cv = pv * BV + tl.arange(0, BV)
        kmask, vmask = ck < DK, cv < DV
        hmask = kmask[:, None] & vmask[None, :]
        hoff = (b64 * HV + h) * DK * DV + ck[:, None] * DV + cv[None, :]
        if HAS_H0:
            s = tl.load(h0_ptr + hoff, mask=hmask, other=0.0)
        else:
            s = tl.zeros((BK, BV), dtype=tl.float32)
        causal = r[:, None] >= r[None, :]
        qk_base = b64 * sqb + (h // G) * DK
        for n in range(0, tl.cdiv(T, BT)):
            rows = n * BT + r
            rmask = rows < T
            q = _load_qk(q_ptr + qk_base + rows[:, None] * sqt, rmask, ck, DK, NORM) * scale
            kk = _load_qk(k_ptr + qk_base + rows[:, None] * sqt, rmask, ck, DK, NORM)
            gc = tl.cumsum(tl.load(g_ptr + (b64 * T + rows) * HV + h, mask=rmask, other=0.0), 0)
            g_last = tl.sum(tl.where(r == BT - 1, gc, 0.0), 0)
            base = (b64 * T + rows[:, None]) * HV + h
            w = tl.load(w_ptr + base * DK + ck[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
            u = tl.load(u_ptr + base * DV + cv[None, :], mask=rmask[:, None] & vmask[None, :], other=0.0)
            v_new = u - tl.dot(w, s, input_precision=PREC)
            att = tl.dot(q, tl.trans(kk), input_precision=PREC)
            att = tl.where(causal, att * tl.exp(tl.where(causal, gc[:, None] - gc[None, :], 0.0)), 0.0)
            o = tl.dot(q * tl.exp(gc)[:, None], s, input_precision=PREC) + tl.dot(att, v_new, input_precision=PREC)
            omask = rmask[:, None] & vmask[None, :]
            tl.store(o_ptr + base * DV + cv[None, :], o.to(o_ptr.dtype.element_ty), mask=omask)
            s = s * tl.exp(g_last) + tl.dot(tl.trans(kk * tl.exp(g_last - gc)[:, None]), v_new, input_precision=PREC)
        tl.store(ht_ptr + hoff, s, mask=hmask)

    @triton.jit
    def _decode_kernel(q_ptr, k_ptr, v_ptr, a_ptr, b_ptr, alog_ptr, dtb_ptr, s_ptr, slot_ptr, o_ptr,
                       sqb, skb, svb, HV, G, DK: tl.constexpr, DV: tl.constexpr, scale,
                       BK: tl.constexpr, BV: tl.constexpr):
        pv, pbh = tl.program_id(0), tl.program_id(1)
        bi, h = pbh // HV, pbh % HV
        hk = h // G
        ck = tl.arange(0, BK)
        cv = pv * BV + tl.arange(0, BV)
        kmask, vmask = ck < DK, cv < DV
        q = tl.load(q_ptr + bi * sqb + hk * DK + ck, mask=kmask, other=0.0).to(tl.float32)
        k = tl.load(k_ptr + bi * skb + hk * DK + ck, mask=kmask, other=0.0).to(tl.float32)
        q = q * tl.math.rsqrt(tl.sum(q * q, 0) + 1e-6) * scale
        k = k * tl.math.rsqrt(tl.sum(k * k, 0) + 1e-6)
        v = tl.load(v_ptr + bi * svb + h * DV + cv, mask=vmask, other=0.0).to(tl.float32)
        # gates as transformers forms them: beta = sigmoid(b) rounded to b's dtype; g in fp32
        braw = tl.load(b_ptr + bi * HV + h)
        beta = (1.0 / (1.0 + tl.exp(-braw.to(tl.float32)))).to(braw.dtype).to(tl.float32)
        x = tl.load(a_ptr + bi * HV + h).to(tl.float32) + tl.load(dtb_ptr + h).to(tl.float32)
        ex = tl.exp(tl.minimum(x, 20.0))
        e1 = 1.0 + ex
        softplus = tl.where(x > 20.0, x, tl.where(e1 == 1.0, ex, tl.log(e1) * (ex / (e1 - 1.0))))  # log1p(exp(x))
        g = -tl.exp(tl.load(alog_ptr + h).to(tl.float32)) * softplus
        slot = tl.load(slot_ptr + bi).to(tl.int64)
        soff = (slot * HV + h) * DK * DV + ck[:, None] * DV + cv[None, :]
        smask = kmask[:, None] & vmask[None, :]
        s = tl.load(s_ptr + soff, mask=smask, other=0.0) * tl.exp(g)
        delta = (v - tl.sum(s * k[:, None], 0)) * beta
        s = s + k[:, None] * delta[None, :]
        tl.store(s_ptr + soff, s, mask=smask)
        o = tl.sum(s * q[:, None], 0)
        tl.store(o_ptr + (bi * HV + h) * DV + cv, o.to(o_ptr.dtype.element_ty), mask=vmask)
