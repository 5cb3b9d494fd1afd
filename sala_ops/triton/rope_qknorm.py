"""Fused per-head RMSNorm + RoPE of q and k (HyPE), forward and backward, in one launch each.

Math (reference/rope.py is the ground truth), per token n, head h, all in fp32:

    rstd   = 1 / sqrt(mean_d x^2 + eps)                      (only with a norm weight)
    u      = x * rstd * w                                    (u = x without a norm weight)
    angle  = pos[n] * inv_freq_i,  i < r/2                   (only on RoPE layers)
    y_i       = u_i cos - u_{i+r/2} sin
    y_{i+r/2} = u_{i+r/2} cos + u_i sin,    y_j = u_j for j >= r

Layout of one program: a block of BT tokens x (all heads of q, then all heads of k), so the cos/sin
of a token block are computed once and reused by every head of both tensors: q and k of different
head counts (GQA) share one launch. A head dim is split in three column groups loaded separately:
[0, r/2), [r/2, r), [r, D) (the pass-through tail), so rotate-half needs no register shuffles.

cos/sin come from the positions on the fly: the angle in turns, pos * inv_freq / (2 pi), in fp64 (fp32
would lose the angle's low bits past ~10^4 tokens), reduced to [-1/2, 1/2] turn in fp64, then
cos/sin in fp32. No per-layer table; one fp64 multiply per (token, frequency), shared by all heads.

Backward (dy -> dx, dw), recomputing rstd from x:
    g  = R(-angle) dy                                         (the inverse rotation)
    dw += sum_{n,h} g * x * rstd
    gh = g * w;  dx = rstd * (gh - xhat * mean_d(gh * xhat)),  xhat = x * rstd
The backward runs an ordinary grid: each program owns TPP consecutive tokens (TPP a power of two,
4..16, picked from the token count alone so the grid has >= ~2048 programs), walks them BT at a
time, and accumulates the dw products elementwise in [BT, heads, D] register tiles (no reduction
inside the loop, so no cross-warp barrier per step); it reduces them once at the end and writes one
row of a [2, programs, D] fp32 buffer, summed by one torch .sum(1): deterministic, no atomics, no
host work per call beyond the allocations and the launch. q and k run in separate programs (grid
axis 1), so a program holds the accumulators of one tensor only (registers: occupancy).

Offsets are int64 where they scale with tokens (T x H x D can pass 2^31). Under TRITON_INTERPRET=1
one config is pinned (the interpreter would run every autotune config).
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

if _INTERPRET:
    _FWD_CONFIGS = [triton.Config({"BT": 2}, num_warps=4)]
    # BHMAX 2 < the heads of most test shapes: the head loop and its masked tail block run too
    _BWD_CONFIGS = [triton.Config({"BT": 2, "BHMAX": 2}, num_warps=4)]
else:
    # few configs: every (head counts, norm flags) combination autotunes once, and compiles each
    _FWD_CONFIGS = [triton.Config({"BT": bt}, num_warps=w) for bt, w in ((1, 4), (2, 4), (4, 4), (4, 8), (8, 8))]
    # the backward keeps 2 dw accumulator tiles [BT, BH, D/2] live next to its 4 working tiles; registers
    # (ptxas sm_90, bf16, D=128, 32 heads): BT=1/BH=32/4 warps 128 (4 programs = 64 KB of loads in flight
    # per SM), BT=1/BH=16/4 warps 96, BT=2/BH=16/8 warps 128; BT=2/BH=32 needs 177+, BT=4 spills
    _BWD_CONFIGS = [triton.Config({"BT": bt, "BHMAX": bh}, num_warps=w)
                    for bt, bh, w in ((1, 32, 4), (1, 32, 8), (1, 16, 4), (1, 16, 8), (2, 16, 8))]

_TWO_PI = tl.constexpr(6.283185307179586)


@triton.jit
def _cos_sin(pos_ptr, spb, spt, turns_ptr, b, t, nmask, HAS_POS: tl.constexpr, HALF: tl.constexpr,
             HALF_P: tl.constexpr):
    """cos, sin [BT, 1, HALF_P] in fp32 for the tokens (b, t) of the block.

    turns_ptr holds inv_freq / (2 pi) in fp64, so pos * turns is the angle in turns: its fractional part
    (exact in fp64, folded to [-1/2, 1/2]) times 2 pi is the angle reduced to [-pi, pi], with no fp64
    constant needed in the kernel."""
    if HAS_POS:
        p = tl.load(pos_ptr + b * spb + t * spt, mask=nmask, other=0).to(tl.float64)
    else:
        p = t.to(tl.float64)
    i = tl.arange(0, HALF_P)
    f = tl.load(turns_ptr + i, mask=i < HALF, other=0.0)
    turns = p[:, None] * f[None, :]
    # |turns| >= 2**52 is an integer in fp64 (fraction 0) and past 2**63 its int64 conversion is undefined (NaN
    # outputs with theta 1e-40 at D 128, where the top frequencies are huge): those angles are taken as whole turns
    turns = tl.where(tl.abs(turns) >= 4503599627370496.0, 0.0, turns)
    frac = turns - turns.to(tl.int64).to(tl.float64)  # in (-1, 1)
    frac = tl.where(frac > 0.5, frac - 1.0, frac)
    frac = tl.where(frac < -0.5, frac + 1.0, frac)
    a = frac.to(tl.float32) * _TWO_PI
    return tl.cos(a)[:, None, :], tl.sin(a)[:, None, :]


@triton.jit
def _fwd_tensor(X, sxb, sxt, sxh, Y, W, eps, n, nmask, b, t, NH, cos, sin,
                D: tl.constexpr, HALF: tl.constexpr, HALF_P: tl.constexpr, REST: tl.constexpr,
                REST_P: tl.constexpr, BH: tl.constexpr, NORM: tl.constexpr, ROPE: tl.constexpr):
    d1 = tl.arange(0, HALF_P)[None, None, :]
    d3 = tl.arange(0, REST_P)[None, None, :]
    m1 = d1 < HALF
    m3 = d3 < REST
    if NORM:
        w1 = tl.load(W + d1, mask=m1, other=0.0).to(tl.float32)
        w2 = tl.load(W + HALF + d1, mask=m1, other=0.0).to(tl.float32)
        if REST > 0:
            w3 = tl.load(W + 2 * HALF + d3, mask=m3, other=0.0).to(tl.float32)
    in_tok = (b.to(tl.int64) * sxb + t.to(tl.int64) * sxt)[:, None, None]
    out_tok = (n.to(tl.int64) * (NH * D))[:, None, None]
    nm = nmask[:, None, None]
    for h0 in range(0, NH, BH):
        h = (h0 + tl.arange(0, BH))[None, :, None]
        m = nm & (h < NH)
        px = X + in_tok + h.to(tl.int64) * sxh
        py = Y + out_tok + h * D
        x1 = tl.load(px + d1, mask=m & m1, other=0.0).to(tl.float32)
        x2 = tl.load(px + HALF + d1, mask=m & m1, other=0.0).to(tl.float32)
        if REST > 0:
            x3 = tl.load(px + 2 * HALF + d3, mask=m & m3, other=0.0).to(tl.float32)
        if NORM:
            ss = tl.sum(x1 * x1, axis=2) + tl.sum(x2 * x2, axis=2)
            if REST > 0:
                ss += tl.sum(x3 * x3, axis=2)
            rstd = (1.0 / tl.sqrt(ss / D + eps))[:, :, None]
            x1 = x1 * rstd * w1
            x2 = x2 * rstd * w2
            if REST > 0:
                x3 = x3 * rstd * w3
        if ROPE:
            y1 = x1 * cos - x2 * sin
            y2 = x2 * cos + x1 * sin
        else:
            y1 = x1
            y2 = x2
        tl.store(py + d1, y1.to(Y.dtype.element_ty), mask=m & m1)
        tl.store(py + HALF + d1, y2.to(Y.dtype.element_ty), mask=m & m1)
        if REST > 0:
            tl.store(py + 2 * HALF + d3, x3.to(Y.dtype.element_ty), mask=m & m3)


@triton.autotune(configs=_FWD_CONFIGS, key=["HQ", "HK", "D", "HALF", "NORM_Q", "NORM_K", "ROPE", "DO_Q", "DO_K"])
@triton.jit
def _hype_fwd_kernel(Q, sqb, sqt, sqh, K, skb, skt, skh, YQ, YK, WQ, WK, POS, spb, spt, INV,
                     N, T, HQ, HK, eps,
                     D: tl.constexpr, HALF: tl.constexpr, HALF_P: tl.constexpr, REST: tl.constexpr,
                     REST_P: tl.constexpr, BHQ: tl.constexpr, BHK: tl.constexpr,
                     NORM_Q: tl.constexpr, NORM_K: tl.constexpr, ROPE: tl.constexpr, HAS_POS: tl.constexpr,
                     DO_Q: tl.constexpr, DO_K: tl.constexpr, BT: tl.constexpr):
    pid = tl.program_id(0)
    n = pid.to(tl.int64) * BT + tl.arange(0, BT)
    nmask = n < N
    b = n // T
    t = n - b * T
    if ROPE:
        cos, sin = _cos_sin(POS, spb, spt, INV, b, t, nmask, HAS_POS, HALF, HALF_P)
    else:
        cos = tl.zeros([BT, 1, HALF_P], dtype=tl.float32)
        sin = cos
    if DO_Q:
        _fwd_tensor(Q, sqb, sqt, sqh, YQ, WQ, eps, n, nmask, b, t, HQ, cos, sin,
                    D, HALF, HALF_P, REST, REST_P, BHQ, NORM_Q, ROPE)
    if DO_K:
        _fwd_tensor(K, skb, skt, skh, YK, WK, eps, n, nmask, b, t, HK, cos, sin,
                    D, HALF, HALF_P, REST, REST_P, BHK, NORM_K, ROPE)


@triton.jit
def _bwd_tensor(X, sxb, sxt, sxh, G, sgb, sgt, sgh, DX, W, eps, n, nmask, b, t, NH, cos, sin,
                dw1, dw2, dw3,
                D: tl.constexpr, HALF: tl.constexpr, HALF_P: tl.constexpr, REST: tl.constexpr,
                REST_P: tl.constexpr, BH: tl.constexpr, NORM: tl.constexpr, ROPE: tl.constexpr):
    d1 = tl.arange(0, HALF_P)[None, None, :]
    d3 = tl.arange(0, REST_P)[None, None, :]
    m1 = d1 < HALF
    m3 = d3 < REST
    if NORM:
        w1 = tl.load(W + d1, mask=m1, other=0.0).to(tl.float32)
        w2 = tl.load(W + HALF + d1, mask=m1, other=0.0).to(tl.float32)
        if REST > 0:
            w3 = tl.load(W + 2 * HALF + d3, mask=m3, other=0.0).to(tl.float32)
    b64 = b.to(tl.int64)
    t64 = t.to(tl.int64)
    x_tok = (b64 * sxb + t64 * sxt)[:, None, None]
    g_tok = (b64 * sgb + t64 * sgt)[:, None, None]
    out_tok = (n.to(tl.int64) * (NH * D))[:, None, None]
    nm = nmask[:, None, None]
    for h0 in range(0, NH, BH):
        h = (h0 + tl.arange(0, BH))[None, :, None]
        m = nm & (h < NH)
        pg = G + g_tok + h.to(tl.int64) * sgh
        pdx = DX + out_tok + h * D
        g1 = tl.load(pg + d1, mask=m & m1, other=0.0).to(tl.float32)
        g2 = tl.load(pg + HALF + d1, mask=m & m1, other=0.0).to(tl.float32)
        if REST > 0:
            g3 = tl.load(pg + 2 * HALF + d3, mask=m & m3, other=0.0).to(tl.float32)
        if ROPE:  # inverse rotation
            u1 = g1 * cos + g2 * sin
            u2 = g2 * cos - g1 * sin
            g1 = u1
            g2 = u2
        if NORM:
            px = X + x_tok + h.to(tl.int64) * sxh
            x1 = tl.load(px + d1, mask=m & m1, other=0.0).to(tl.float32)
            x2 = tl.load(px + HALF + d1, mask=m & m1, other=0.0).to(tl.float32)
            ss = tl.sum(x1 * x1, axis=2) + tl.sum(x2 * x2, axis=2)
            if REST > 0:
                x3 = tl.load(px + 2 * HALF + d3, mask=m & m3, other=0.0).to(tl.float32)
                ss += tl.sum(x3 * x3, axis=2)
            rstd = (1.0 / tl.sqrt(ss / D + eps))[:, :, None]
            x1 = x1 * rstd
            x2 = x2 * rstd
            dw1 += g1 * x1
            dw2 += g2 * x2
            g1 = g1 * w1
            g2 = g2 * w2
            c = tl.sum(g1 * x1, axis=2) + tl.sum(g2 * x2, axis=2)
            if REST > 0:
                x3 = x3 * rstd
                dw3 += g3 * x3
                g3 = g3 * w3
                c += tl.sum(g3 * x3, axis=2)
            c = (c / D)[:, :, None]
            g1 = rstd * (g1 - x1 * c)
            g2 = rstd * (g2 - x2 * c)
            if REST > 0:
                g3 = rstd * (g3 - x3 * c)
        tl.store(pdx + d1, g1.to(DX.dtype.element_ty), mask=m & m1)
        tl.store(pdx + HALF + d1, g2.to(DX.dtype.element_ty), mask=m & m1)
        if REST > 0:
            tl.store(pdx + 2 * HALF + d3, g3.to(DX.dtype.element_ty), mask=m & m3)
    return dw1, dw2, dw3


@triton.jit
def _store_dw(DW, dw1, dw2, dw3, HALF: tl.constexpr, HALF_P: tl.constexpr, REST: tl.constexpr,
              REST_P: tl.constexpr):
    """Reduce the [BT, BH, *] accumulator tiles over tokens and heads and store one row (D values)."""
    i = tl.arange(0, HALF_P)
    tl.store(DW + i, tl.sum(tl.sum(dw1, axis=1), axis=0), mask=i < HALF)
    tl.store(DW + HALF + i, tl.sum(tl.sum(dw2, axis=1), axis=0), mask=i < HALF)
    if REST > 0:
        j = tl.arange(0, REST_P)
        tl.store(DW + 2 * HALF + j, tl.sum(tl.sum(dw3, axis=1), axis=0), mask=j < REST)


@triton.jit
def _bwd_program(X, sxb, sxt, sxh, G, sgb, sgt, sgh, DX, W, DW, POS, spb, spt, INV, N, T, NH, eps, TPP, pid,
                 D: tl.constexpr, HALF: tl.constexpr, HALF_P: tl.constexpr, REST: tl.constexpr,
                 REST_P: tl.constexpr, BH: tl.constexpr, NORM: tl.constexpr, ROPE: tl.constexpr,
                 HAS_POS: tl.constexpr, BT: tl.constexpr):
    """One tensor (q or k) over tokens [pid * TPP, (pid + 1) * TPP), BT per step; with a norm weight,
    its dw partial sums over those tokens and all heads go to DW[pid, :D]."""
    dw1 = tl.zeros([BT, BH, HALF_P], dtype=tl.float32)
    dw2 = tl.zeros([BT, BH, HALF_P], dtype=tl.float32)
    dw3 = tl.zeros([BT, BH, REST_P], dtype=tl.float32)
    n0 = pid.to(tl.int64) * TPP
    for s in range(0, TPP, BT):
        n = tl.arange(0, BT).to(tl.int64) + (n0 + s)
        nmask = n < N
        b = n // T
        t = n - b * T
        if ROPE:
            cos, sin = _cos_sin(POS, spb, spt, INV, b, t, nmask, HAS_POS, HALF, HALF_P)
        else:
            cos = tl.zeros([BT, 1, HALF_P], dtype=tl.float32)
            sin = cos
        dw1, dw2, dw3 = _bwd_tensor(X, sxb, sxt, sxh, G, sgb, sgt, sgh, DX, W, eps, n, nmask, b, t,
                                    NH, cos, sin, dw1, dw2, dw3,
                                    D, HALF, HALF_P, REST, REST_P, BH, NORM, ROPE)
    if NORM:
        _store_dw(DW + pid.to(tl.int64) * D, dw1, dw2, dw3, HALF, HALF_P, REST, REST_P)


# TPP in the key: one tuning per tokens-per-program size class (4, 8, 16), i.e. per size range of N
@triton.autotune(configs=_BWD_CONFIGS,
                 key=["HQ", "HK", "D", "HALF", "NORM_Q", "NORM_K", "ROPE", "DO_Q", "DO_K", "TPP"])
@triton.jit
def _hype_bwd_kernel(Q, sqb, sqt, sqh, K, skb, skt, skh, GQ, sgqb, sgqt, sgqh, GK, sgkb, sgkt, sgkh,
                     DQ, DK, WQ, WK, DWQ, DWK, POS, spb, spt, INV, N, T, HQ, HK, eps, TPP,
                     D: tl.constexpr, HALF: tl.constexpr, HALF_P: tl.constexpr, REST: tl.constexpr,
                     REST_P: tl.constexpr, BHQ: tl.constexpr, BHK: tl.constexpr,
                     NORM_Q: tl.constexpr, NORM_K: tl.constexpr, ROPE: tl.constexpr, HAS_POS: tl.constexpr,
                     DO_Q: tl.constexpr, DO_K: tl.constexpr, BT: tl.constexpr, BHMAX: tl.constexpr):
    """Grid (programs, tensors): axis 1 picks q (0) or k (1; 0 when q is skipped), so a program keeps
    the dw accumulators of one tensor only; program (pid, .) handles tokens [pid * TPP, (pid + 1) * TPP)
    and writes row pid of DWQ / DWK [programs, D]."""
    pid = tl.program_id(0)
    BHQ_: tl.constexpr = BHQ if BHQ < BHMAX else BHMAX
    BHK_: tl.constexpr = BHK if BHK < BHMAX else BHMAX
    if DO_Q and DO_K:
        if tl.program_id(1) == 0:
            _bwd_program(Q, sqb, sqt, sqh, GQ, sgqb, sgqt, sgqh, DQ, WQ, DWQ, POS, spb, spt, INV, N, T, HQ, eps,
                         TPP, pid, D, HALF, HALF_P, REST, REST_P, BHQ_, NORM_Q, ROPE, HAS_POS, BT)
        else:
            _bwd_program(K, skb, skt, skh, GK, sgkb, sgkt, sgkh, DK, WK, DWK, POS, spb, spt, INV, N, T, HK, eps,
                         TPP, pid, D, HALF, HALF_P, REST, REST_P, BHK_, NORM_K, ROPE, HAS_POS, BT)
    elif DO_Q:
        _bwd_program(Q, sqb, sqt, sqh, GQ, sgqb, sgqt, sgqh, DQ, WQ, DWQ, POS, spb, spt, INV, N, T, HQ, eps,
                     TPP, pid, D, HALF, HALF_P, REST, REST_P, BHQ_, NORM_Q, ROPE, HAS_POS, BT)
    else:
        _bwd_program(K, skb, skt, skh, GK, sgkb, sgkt, sgkh, DK, WK, DWK, POS, spb, spt, INV, N, T, HK, eps,
                     TPP, pid, D, HALF, HALF_P, REST, REST_P, BHK_, NORM_K, ROPE, HAS_POS, BT)


# ----------------------------------------------------------------------------------------------------------------
# launchers (no policy: the public op and its checks live in sala_ops/hype.py)

_INV_FREQ_CACHE: dict = {}


def inv_freq_turns(theta: float, rotary_dim: int, device) -> torch.Tensor:
    """fp64 inverse frequencies theta^(-2i/r), i < r/2, as the reference computes them, divided by 2 pi
    (angles in turns, for the kernel's range reduction); cached per (theta, r, device)."""
    key = (float(theta), int(rotary_dim), str(device))
    f = _INV_FREQ_CACHE.get(key)
    if f is None:
        half = rotary_dim // 2
        f = 1.0 / (theta ** (torch.arange(half, dtype=torch.float64) * 2 / rotary_dim))
        f = (f / (2 * math.pi)).to(device)
        _INV_FREQ_CACHE[key] = f
    return f


def _rows(x):
    """(x with unit last-dim stride, its batch/token/head strides)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x, x.stride(0), x.stride(1), x.stride(2)


def _geometry(D, rotary_dim):
    half = rotary_dim // 2
    rest = D - 2 * half
    return dict(D=D, HALF=half, HALF_P=triton.next_power_of_2(max(half, 1)), REST=rest,
                REST_P=triton.next_power_of_2(max(rest, 1)))


def _head_block(h):
    return min(triton.next_power_of_2(max(h, 1)), 32)


def _pos_args(positions, dummy):
    if positions is None:
        return dummy, 0, 0, False
    return positions, positions.stride(0), positions.stride(1), True


def hype_fwd(q, k, positions, q_weight, k_weight, *, theta=10000.0, rotary_dim=None, rope=True, eps=1e-6,
             do_q=True, do_k=True, q_out=None, k_out=None):
    """Launch the forward. q [B,T,H,D], k [B,T,Hk,D] (any strides with unit last stride); positions
    int [B,T] (any strides) or None for 0..T-1. Returns (yq, yk), contiguous, in the input dtype
    (q_out / k_out: optional preallocated contiguous outputs). do_q / do_k = False skips a tensor
    (its output is then None)."""
    B, T, HQ, D = q.shape
    HK = k.shape[2]
    r = D if rotary_dim is None else rotary_dim
    norm_q, norm_k = q_weight is not None and do_q, k_weight is not None and do_k
    q, sqb, sqt, sqh = _rows(q)
    k, skb, skt, skh = _rows(k)
    yq = (q_out if q_out is not None else torch.empty(q.shape, dtype=q.dtype, device=q.device)) if do_q else None
    yk = (k_out if k_out is not None else torch.empty(k.shape, dtype=k.dtype, device=k.device)) if do_k else None
    N = B * T
    if N == 0 or not (do_q or do_k):
        return yq, yk
    for y in (yq, yk):
        assert y is None or y.is_contiguous()
    pos, spb, spt, has_pos = _pos_args(positions, q)
    inv = inv_freq_turns(theta, r, q.device) if rope else q
    geo = _geometry(D, r)
    _hype_fwd_kernel[lambda meta: (triton.cdiv(N, meta["BT"]),)](
        q, sqb, sqt, sqh, k, skb, skt, skh,
        yq if do_q else q, yk if do_k else k,
        q_weight if norm_q else q, k_weight if norm_k else k,
        pos, spb, spt, inv, N, T, HQ, HK, eps,
        BHQ=_head_block(HQ), BHK=_head_block(HK), NORM_Q=norm_q, NORM_K=norm_k,
        ROPE=rope, HAS_POS=has_pos, DO_Q=do_q, DO_K=do_k, **geo)
    return yq, yk


def _tokens_per_program(N):
    """Tokens per backward program: a power of two in [4, 16], the largest that still gives >= 2048
    programs (~16 per SM on an H200: enough to fill it and balance the tail), from N alone (no device
    query). A multiple of every BT in _BWD_CONFIGS (<= 4)."""
    tpp = 16
    while tpp > 4 and N < 2048 * tpp:
        tpp //= 2
    return tpp


def hype_bwd(q, k, gq, gk, positions, q_weight, k_weight, *, theta=10000.0, rotary_dim=None, rope=True,
             eps=1e-6, do_q=True, do_k=True, dq_out=None, dk_out=None, stacked_dw=False):
    """Launch the backward. Returns (dq, dk, dwq, dwk); dw* in fp32 (None without a norm weight);
    dq / dk None where do_q / do_k is False. stacked_dw=True returns (dq, dk, dw) instead, dw the fp32
    [2, D] sums (row 0 q's, row 1 k's; a row without its norm weight is undefined), or None without
    any norm weight."""
    B, T, HQ, D = q.shape
    HK = k.shape[2]
    r = D if rotary_dim is None else rotary_dim
    norm_q, norm_k = q_weight is not None and do_q, k_weight is not None and do_k
    N = B * T
    dq = (dq_out if dq_out is not None else torch.empty(q.shape, dtype=q.dtype, device=q.device)) if do_q else None
    dk = (dk_out if dk_out is not None else torch.empty(k.shape, dtype=k.dtype, device=k.device)) if do_k else None
    if N == 0 or not (do_q or do_k):
        dw = torch.zeros((2, D), dtype=torch.float32, device=q.device) if (norm_q or norm_k) else None
    else:
        q, sqb, sqt, sqh = _rows(q)
        k, skb, skt, skh = _rows(k)
        if do_q:
            gq, sgqb, sgqt, sgqh = _rows(gq)
        else:
            gq, sgqb, sgqt, sgqh = q, 0, 0, 0
        if do_k:
            gk, sgkb, sgkt, sgkh = _rows(gk)
        else:
            gk, sgkb, sgkt, sgkh = k, 0, 0, 0
        tpp = _tokens_per_program(N)
        G = triton.cdiv(N, tpp)
        part = None
        if norm_q or norm_k:
            # one [2, programs, D] buffer (q's rows, then k's), so one .sum(1) gives both weight grads;
            # every program writes its row; under the interpreter the buffer starts as NaN so a row
            # left unwritten fails the tests
            part = torch.full((2, G, D), float("nan"), device=q.device) if _INTERPRET else \
                torch.empty((2, G, D), dtype=torch.float32, device=q.device)
        pos, spb, spt, has_pos = _pos_args(positions, q)
        inv = inv_freq_turns(theta, r, q.device) if rope else q
        geo = _geometry(D, r)
        _hype_bwd_kernel[(G, int(do_q) + int(do_k))](
            q, sqb, sqt, sqh, k, skb, skt, skh, gq, sgqb, sgqt, sgqh, gk, sgkb, sgkt, sgkh,
            dq if do_q else q, dk if do_k else k,
            q_weight if norm_q else q, k_weight if norm_k else k,
            part[0] if norm_q else q, part[1] if norm_k else q,
            pos, spb, spt, inv, N, T, HQ, HK, eps, tpp,
            BHQ=_head_block(HQ), BHK=_head_block(HK), NORM_Q=norm_q, NORM_K=norm_k,
            ROPE=rope, HAS_POS=has_pos, DO_Q=do_q, DO_K=do_k, **geo)
        dw = part.sum(1) if part is not None else None
    if stacked_dw:
        return dq, dk, dw
    return dq, dk, (dw[0] if norm_q else None), (dw[1] if norm_k else None)
