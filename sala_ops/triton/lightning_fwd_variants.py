"""Experimental forward variants of the chunked lightning attention (lightning_chunk.py), selected with
SALA_LIGHTNING_FWD=<name> (read at every call; unset or "default" = the three-pass forward of
lightning_chunk.py). The backward is unchanged: every variant writes the same per-chunk start states
(chunks of ch.L tokens) that lightning_chunk_bwd reads.

  walk2  three passes like the default, but pass 3 is `_walk2_kernel`: one program per (chunk, head) with
         BV = DV (q and k read once per head instead of DV/BV times, q k^T computed once), head dims as
         constexprs (no masks on the head dim when D is a power of two), an unmasked main loop over full
         64-token blocks with the decay vectors hoisted out of the loop and pointers advanced in place, a
         peeled masked tail block, `q S` chained into the `A v` accumulator, and deeper load pipelining
         (num_stages 3/4 in the autotune list).
  fused  one launch: pass 1 + scan + pass 3 fused with a chained look-back across sub-chunks of LF tokens
         (LF = SALA_LIGHTNING_FUSED_L, default 512, at most ch.L). Each program (sub-chunk, head, V-tile)
           1. reduces its sub-chunk's local state dS from zero (reads k, v),
           2. waits for its predecessor's published inclusive state P (flag with an epoch, acquire),
           3. publishes P' = lam^len P + dS (ring buffer of R slots per (head, V-tile), release),
           4. walks its sub-chunk from P (reads q, k, v; k, v were just read in step 1, so they should come
              from L2: LF = 512 keeps ~132 x 256 KB = 34 MB of k, v in flight, under the 50 MB L2).
         Programs take logical ids from an atomic ticket counter in the order they start, so a program only
         ever waits for one that started before it (no deadlock whatever order the hardware schedules
         the grid in); under the interpreter programs run one after another in order and never spin.
         The chain is global per (head, V-tile) across sequences (a sequence's first sub-chunk waits for the
         previous sequence's last one but ignores its value), which makes the ring buffer safe: slot
         c % R is rewritten by sub-chunk c + R only after c + 1 has consumed it.

Byte / FLOP counts and predictions: bench/NOTES_lightning.md ("Forward variants").
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import lightning_chunk as LC
from .._segments import segment_of

INTERPRET = LC.INTERPRET
VARIANTS = ("default", "walk2", "fused")
FUSED_L: int | None = None  # sub-chunk length override (tests); None = SALA_LIGHTNING_FUSED_L or 512
RING = 8  # ring slots per (head, V-tile); >= 2 is enough for correctness (see the module docstring)


def variant() -> str:
    name = os.environ.get("SALA_LIGHTNING_FWD", "default") or "default"
    if name not in VARIANTS:
        raise ValueError(f"SALA_LIGHTNING_FWD must be one of {VARIANTS}, got {name!r}")
    return name


def _cfgs(warps, stages, meta=None):
    if LC._PINNED:
        return [triton.Config(dict(meta or {}), num_warps=4, num_stages=1)]
    return [triton.Config(dict(meta or {}), num_warps=w, num_stages=s) for w in warps for s in stages]


# walk2 configs (sm_90 / triton 3.6 AOT, D=128 bf16; bench/NOTES_lightning.md): BV=128 needs 8 warps (4 warps
# spill > 1 KB); BV=64 (two V-tiles, q/k re-read through L2) keeps the old kernel's 2-CTA/SM shape.
_WALK2_CFGS = (_cfgs([8], [2, 3, 4], {"BV": 128}) if not LC._PINNED else _cfgs([4], [1], {"BV": 64})) + \
    ([] if LC._PINNED else _cfgs([4], [2, 3], {"BV": 64}) + _cfgs([8], [3], {"BV": 64}))


# ----------------------------------------------------------------------------------------------
# shared device code


@triton.jit
def _local_state_loop(k_ptr, v_ptr, a, b, s2, hk, hv, offs_v, stride_k, stride_v,
                      DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                      BT: tl.constexpr, PREC: tl.constexpr):
    """sum_{a <= s < b} lam^(b-1-s) k_s^T v_s as fp32 [BK, BV] (full blocks unmasked, then one masked tail)."""
    offs_k = tl.arange(0, BK)
    offs_t = tl.arange(0, BT)
    mk = offs_k < DK
    mv = offs_v < DV
    acc = tl.zeros([BK, BV], dtype=tl.float32)
    n = b - a
    nfull = (n // BT).to(tl.int32)
    # block m covers [a + m BT, a + (m+1) BT); its token j gets lam^(b-1-(a+m BT+j)) = lam^(n-1-m BT-j)
    kp = k_ptr + (a + offs_t)[:, None] * stride_k + hk * DK + offs_k[None, :]
    vp = v_ptr + (a + offs_t)[:, None] * stride_v + hv * DV + offs_v[None, :]
    for m in range(0, nfull):
        kt = tl.load(kp, mask=mk[None, :], other=0.0)
        vt = tl.load(vp, mask=mv[None, :], other=0.0)
        e = (n - 1 - m * BT - offs_t).to(tl.float32)
        w = tl.exp2(-s2 * e)
        kw = (kt.to(tl.float32) * w[:, None]).to(kt.dtype)
        acc = tl.dot(tl.trans(kw), vt, acc, input_precision=PREC)
        kp += BT * stride_k
        vp += BT * stride_v
    rem = (n - nfull * BT).to(tl.int32)
    if rem > 0:
        mt = offs_t < rem
        kt = tl.load(kp, mask=mt[:, None] & mk[None, :], other=0.0)
        vt = tl.load(vp, mask=mt[:, None] & mv[None, :], other=0.0)
        w = tl.where(mt, tl.exp2(-s2 * (rem - 1 - offs_t).to(tl.float32)), 0.0)
        kw = (kt.to(tl.float32) * w[:, None]).to(kt.dtype)
        acc = tl.dot(tl.trans(kw), vt, acc, input_precision=PREC)
    return acc


@triton.jit
def _walk_block(qp, kp, vp, op, S, dmask, wq, wk, lam_ln, mt, mk, mv, out_scale, PREC: tl.constexpr):
    qt = tl.load(qp, mask=mt[:, None] & mk[None, :], other=0.0)
    kt = tl.load(kp, mask=mt[:, None] & mk[None, :], other=0.0)
    vt = tl.load(vp, mask=mt[:, None] & mv[None, :], other=0.0)
    A = tl.dot(qt, tl.trans(kt), input_precision=PREC) * dmask
    o = tl.dot(qt, S.to(qt.dtype), input_precision=PREC) * wq[:, None]
    o = tl.dot(A.to(vt.dtype), vt, o, input_precision=PREC)
    tl.store(op, o.to(op.dtype.element_ty), mask=mt[:, None] & mv[None, :])
    kw = (kt.to(tl.float32) * wk[:, None]).to(kt.dtype)
    S = tl.dot(tl.trans(kw), vt, S * lam_ln, input_precision=PREC)
    return S


@triton.jit
def _walk(q_ptr, k_ptr, v_ptr, o_ptr, S, a, b, s2, hq, hk, hv, h, offs_v, stride_q, stride_k, stride_v, stride_o,
          out_scale, DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr,
          PREC: tl.constexpr):
    """Outputs of tokens [a, b) from the state S entering token a (forward time, kv_mult 1); returns the
    state after token b - 1."""
    offs_k = tl.arange(0, BK)
    offs_t = tl.arange(0, BT)
    mk = offs_k < DK
    mv = offs_v < DV
    dif = offs_t[:, None] - offs_t[None, :]
    # out_scale folded into the intra-block mask
    dmask = tl.where(dif >= 0, tl.exp2(-s2 * tl.maximum(dif, 0).to(tl.float32)), 0.0) * out_scale
    wq = tl.exp2(-s2 * (offs_t + 1).to(tl.float32)) * out_scale
    wk = tl.exp2(-s2 * (BT - 1 - offs_t).to(tl.float32))
    lam_bt = tl.exp2(-s2 * BT)
    n = b - a
    nfull = (n // BT).to(tl.int32)
    qp = q_ptr + (a + offs_t)[:, None] * stride_q + hq * DK + offs_k[None, :]
    kp = k_ptr + (a + offs_t)[:, None] * stride_k + hk * DK + offs_k[None, :]
    vp = v_ptr + (a + offs_t)[:, None] * stride_v + hv * DV + offs_v[None, :]
    op = o_ptr + (a + offs_t)[:, None] * stride_o + h * DV + offs_v[None, :]
    mt_full = offs_t < BT
    for m in range(0, nfull):
        S = _walk_block(qp, kp, vp, op, S, dmask, wq, wk, lam_bt, mt_full, mk, mv, out_scale, PREC)
        qp += BT * stride_q
        kp += BT * stride_k
        vp += BT * stride_v
        op += BT * stride_o
    rem = (n - nfull * BT).to(tl.int32)
    if rem > 0:
        mt = offs_t < rem
        wk_t = tl.where(mt, tl.exp2(-s2 * (rem - 1 - offs_t).to(tl.float32)), 0.0)
        S = _walk_block(qp, kp, vp, op, S, dmask, wq, wk_t, tl.exp2(-s2 * rem.to(tl.float32)), mt, mk, mv,
                        out_scale, PREC)
    return S


# ----------------------------------------------------------------------------------------------
# walk2: pass 3 only


@triton.autotune(configs=_WALK2_CFGS, key=["DK", "DV", "BT"])
@triton.jit
def _walk2_kernel(q_ptr, k_ptr, v_ptr, o_ptr, st_ptr, decay_ptr, chunk_start_ptr, chunk_end_ptr,
                  T, NSS, L, H, GQ, GK, GV, stride_q, stride_k, stride_v, stride_o, out_scale,
                  DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr,
                  IS_VARLEN: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)  # flat (V-block fastest, head, chunk): grid axes 1/2 are capped at 65535
    nvb: tl.constexpr = (DV + BV - 1) // BV
    i_v = pid % nvb
    hc = pid // nvb
    h = hc % H
    c = hc // H
    a, b = LC._chunk_bounds(c, chunk_start_ptr, chunk_end_ptr, T, NSS, L, IS_VARLEN)
    s2 = tl.load(decay_ptr + h).to(tl.float32) * 1.4426950408889634
    offs_k = tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    st_base = (c.to(tl.int64) * H + h) * DK * DV
    S = tl.load(st_ptr + st_base + offs_k[:, None] * DV + offs_v[None, :],
                mask=(offs_k[:, None] < DK) & (offs_v[None, :] < DV), other=0.0)
    _walk(q_ptr, k_ptr, v_ptr, o_ptr, S, a, b, s2, h // GQ, h // GK, h // GV, h, offs_v,
          stride_q, stride_k, stride_v, stride_o, out_scale, DK, DV, BK, BV, BT, PREC)


# ----------------------------------------------------------------------------------------------
# fused: one launch with a chained look-back


@triton.autotune(configs=_cfgs([8], [2, 3]), key=["DK", "DV", "BT", "LF"],
                 reset_to_zero=["flag_ptr", "ticket_ptr"])
@triton.jit
def _fused_kernel(q_ptr, k_ptr, v_ptr, o_ptr, st_ptr, init_ptr, final_ptr, ring_ptr, flag_ptr, ticket_ptr, decay_ptr,
                  sub_start_ptr, sub_end_ptr, sub_seq_ptr, sub_big_ptr, sub_flags_ptr,
                  T, NSUB, LF, L, NSS, H, GK, GV, stride_q, stride_k, stride_v, stride_o, out_scale, spin_cap,
                  DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr,
                  R: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_INIT: tl.constexpr, STORE_FINAL: tl.constexpr,
                  PREC: tl.constexpr):
    nvb: tl.constexpr = (DV + BV - 1) // BV
    # logical id in start order (the hardware may launch the grid in any order; a program only waits on
    # programs with smaller logical ids, which have started and so will finish)
    lid = tl.atomic_add(ticket_ptr, 1)
    i_v = lid % nvb
    hc = lid // nvb
    h = hc % H
    c = hc // H  # global sub-chunk index
    if IS_VARLEN:
        a = tl.load(sub_start_ptr + c)
        b = tl.load(sub_end_ptr + c)
        n = tl.load(sub_seq_ptr + c)
        big = tl.load(sub_big_ptr + c)
        fl = tl.load(sub_flags_ptr + c)  # bit 0: first sub-chunk of its sequence, bit 1: last
        first = (fl & 1) != 0
        last = (fl & 2) != 0
    else:
        n64 = (c // NSUB).to(tl.int64)
        j = c % NSUB
        a = n64 * T + j.to(tl.int64) * LF
        b = tl.minimum(a + LF, n64 * T + T)
        n = n64
        first = j == 0
        last = j == NSUB - 1
        jl = j.to(tl.int64) * LF
        big = tl.where(jl % L == 0, n64 * NSS + jl // L, -1)
    s2 = tl.load(decay_ptr + h).to(tl.float32) * 1.4426950408889634
    hk = h // GK
    hv = h // GV
    offs_k = tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    msk = (offs_k[:, None] < DK) & (offs_v[None, :] < DV)
    tile = offs_k[:, None] * DV + offs_v[None, :]
    # 1. local state of the sub-chunk (independent of every other program)
    dS = _local_state_loop(k_ptr, v_ptr, a, b, s2, hk, hv, offs_v, stride_k, stride_v, DK, DV, BK, BV, BT, PREC)
    # 2. look back: wait for sub-chunk c - 1 (same head and V-tile) to publish its inclusive state
    lane = h * nvb + i_v
    if c > 0:
        fidx = ((c - 1) % R) * (H * nvb) + lane
        f = tl.atomic_add(flag_ptr + fidx, 0, sem="acquire")
        it = 0
        while (f < c) & (it < spin_cap):
            f = tl.atomic_add(flag_ptr + fidx, 0, sem="acquire")
            it += 1
        tl.debug_barrier()
    ring_prev = ring_ptr + (((c - 1 + R) % R) * (H * nvb) + lane).to(tl.int64) * (BK * BV)
    rt = offs_k[:, None] * BV + tl.arange(0, BV)[None, :]
    if first:
        if HAS_INIT:
            S0 = tl.load(init_ptr + (n.to(tl.int64) * H + h) * DK * DV + tile, mask=msk, other=0.0)
        else:
            S0 = tl.zeros([BK, BV], dtype=tl.float32)
    else:
        S0 = tl.load(ring_prev + rt, cache_modifier=".cg")
    # 3. publish the inclusive state for sub-chunk c + 1
    P = tl.exp2(-s2 * (b - a).to(tl.float32)) * S0 + dS
    ring_cur = ring_ptr + ((c % R) * (H * nvb) + lane).to(tl.int64) * (BK * BV)
    tl.store(ring_cur + rt, P, cache_modifier=".cg")
    tl.debug_barrier()
    tl.atomic_xchg(flag_ptr + (c % R) * (H * nvb) + lane, c + 1, sem="release")
    if big >= 0:
        tl.store(st_ptr + (big.to(tl.int64) * H + h) * DK * DV + tile, S0, mask=msk)
    if STORE_FINAL:
        if last:
            tl.store(final_ptr + (n.to(tl.int64) * H + h) * DK * DV + tile, P, mask=msk)
    # 4. outputs of the sub-chunk
    _walk(q_ptr, k_ptr, v_ptr, o_ptr, S0, a, b, s2, h, hk, hv, h, offs_v,
          stride_q, stride_k, stride_v, stride_o, out_scale, DK, DV, BK, BV, BT, PREC)


# ----------------------------------------------------------------------------------------------
# host side


def walk2_outputs(q, k, v, G, H, out, states, decay, scale, ch: LC.Chunks):
    LC._refuse_special_dots(q.dtype, "SALA_LIGHTNING_FWD=walk2")
    DK, DV = k.shape[-1], v.shape[-1]
    # BV from the autotune list (128: one V-tile per head for D=128); under the interpreter BV covers DV
    grid = lambda META: (triton.cdiv(DV, META["BV"]) * H * ch.NS,)  # noqa: E731  (flat: see the kernel)
    _walk2_kernel[grid](q, k, v, out, states, decay, *ch.args(), H, 1, G, G,
                        q.shape[-2] * DK, k.shape[-2] * DK, v.shape[-2] * DV, out.shape[-2] * DV, float(scale),
                        DK=DK, DV=DV, BK=LC._pad(DK), BT=ch.BT, IS_VARLEN=ch.varlen,
                        PREC=LC._dot_precision(q.dtype))
    return out


def _fused_len(L: int) -> int:
    lf = FUSED_L if FUSED_L is not None else int(os.environ.get("SALA_LIGHTNING_FUSED_L", "512"))
    lf = min(triton.next_power_of_2(max(lf, 1)), L)
    return lf


def fused_fwd(q, k, v, decay, scale, initial_state, output_final_state, cu_seqlens, ch: LC.Chunks):
    LC._refuse_special_dots(q.dtype, "SALA_LIGHTNING_FWD=fused")
    B, T, H, DK = q.shape
    Hkv, DV = k.shape[2], v.shape[-1]
    G = H // Hkv
    dev = q.device
    L, BT = ch.L, ch.BT
    LF = max(_fused_len(L), BT) if L >= BT else L
    if L % LF:
        LF = L
    BK, BV = LC._pad(DK), LC._pad(DV)
    nvb = triton.cdiv(DV, BV)
    states = torch.empty(ch.NS, H, DK, DV, device=dev, dtype=torch.float32)
    final = torch.empty(ch.N, H, DK, DV, device=dev, dtype=torch.float32) if output_final_state else states
    dummy = torch.empty(1, dtype=torch.int64, device=dev)
    if cu_seqlens is None:
        NSUB = triton.cdiv(T, LF)
        NS_sub = B * NSUB
        sub = (dummy,) * 5
    else:
        N = ch.N
        NSUB = 1
        NS_sub = T // LF + N
        cu = cu_seqlens.to(device=dev, dtype=torch.int64)
        lens = cu[1:] - cu[:-1]
        nch = (lens + LF - 1) // LF
        ccum = torch.zeros(N + 1, dtype=torch.int64, device=dev)
        ccum[1:] = torch.cumsum(nch, 0)
        idx = torch.arange(NS_sub, device=dev, dtype=torch.int64)
        seq = segment_of(ccum, idx).clamp_(max=N - 1)
        j = idx - ccum[seq]
        a = cu[seq] + j * LF
        b = torch.minimum(a + LF, cu[seq + 1])
        valid = idx < ccum[N]
        zero = torch.zeros((), dtype=torch.int64, device=dev)
        # big chunk (ch.L) index: ch's chunk table for sequence seq starts at ch.seq_chunk[seq]
        jl = j * LF
        big = torch.where(valid & (jl % L == 0), ch.seq_chunk[seq] + jl // L, torch.full_like(idx, -1))
        fl = (j == 0).to(torch.int64) + 2 * (j == nch[seq] - 1).to(torch.int64)
        # padding slots: empty range, not first (they read the ring but write nothing that is used)
        sub = (torch.where(valid, a, zero).contiguous(), torch.where(valid, b, zero).contiguous(),
               seq.contiguous(), big.contiguous(), torch.where(valid, fl, zero).contiguous())
    ring = torch.empty(RING * H * nvb * BK * BV, device=dev, dtype=torch.float32)
    flags = torch.zeros(RING * H * nvb + 1, device=dev, dtype=torch.int32)
    ticket = flags[-1:]
    o = torch.empty(B, T, H, DV, device=dev, dtype=q.dtype)
    init = initial_state if initial_state is not None else states
    spin_cap = 1 if INTERPRET else 2**31 - 1
    grid = (nvb * H * NS_sub,)
    _fused_kernel[grid](q, k, v, o, states, init, final, ring, flags[:-1], ticket, decay, *sub,
                        T, NSUB, LF, L, ch.NSS, H, G, G, q.shape[-2] * DK, k.shape[-2] * DK, v.shape[-2] * DV,
                        o.shape[-2] * DV, float(scale), spin_cap,
                        DK=DK, DV=DV, BK=BK, BV=BV, BT=BT, R=RING, IS_VARLEN=cu_seqlens is not None,
                        HAS_INIT=initial_state is not None, STORE_FINAL=output_final_state,
                        PREC=LC._dot_precision(q.dtype))
    return o, (final if output_final_state else None), states


__all__ = ["variant", "VARIANTS", "walk2_outputs", "fused_fwd"]
