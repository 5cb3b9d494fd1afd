"""The chunk-output pass (pass 3 of lightning_chunk.py: o for every token from its chunk's start state), the
default since H200 run 8 (2026-12-03): same schedule as lightning_chunk._chunk_out_kernel (now selected with
SALA_LIGHTNING_OUT=v0, read at every call), less work per 64-token block. It serves every caller of
`chunk_outputs` (forward outputs, dq, dk, dv).

From the sm_90 SASS of the v0 loop (bench/NOTES_lightning.md, run 8: 845 -> 586 instructions per block at
BV 64 / 4 warps): head dims as constexprs (no head-dim masks at D = 128), an unmasked loop over full blocks
and one peeled masked tail block (first in reverse, last forward), decay vectors hoisted, int32 tile
offsets on a scalar int64 block base, out_scale and kv_mult folded into the intra-block mask, `q S`
chained into the `A v` accumulator, the state update accumulating into `lam^BT S`. (Measured and dropped:
the update weights on k^T instead of v, which gives v a second shared buffer but costs more than it saves.)
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import lightning_chunk as LC

# v1: this file (default); v1mma / v1mma1: this file with the update weights applied by products (WMMA 2 / 1,
# see _block; 16-bit inputs only, fp32 inputs keep register scaling); v0: lightning_chunk._chunk_out_kernel
VARIANTS = ("v1", "v1mma", "v1mma1", "v0")
_WMMA = {"v1": 0, "v1mma": 2, "v1mma1": 1}


def variant() -> str:
    name = os.environ.get("SALA_LIGHTNING_OUT", "v1") or "v1"
    if name not in VARIANTS:
        raise ValueError(f"SALA_LIGHTNING_OUT must be one of {VARIANTS}, got {name!r}")
    return name


@triton.jit
def _ld(ptr, mrow, mcol, MROW: tl.constexpr, MCOL: tl.constexpr):
    # masks only where a constexpr says they can be false (full blocks at D = 128 load unmasked)
    if MROW:
        if MCOL:
            x = tl.load(ptr, mask=mrow[:, None] & mcol[None, :], other=0.0)
        else:
            x = tl.load(ptr, mask=mrow[:, None], other=0.0)
    else:
        if MCOL:
            x = tl.load(ptr, mask=mcol[None, :], other=0.0)
        else:
            x = tl.load(ptr)
    return x


@triton.jit
def _st(ptr, x, mrow, mcol, MROW: tl.constexpr, MCOL: tl.constexpr):
    if MROW:
        if MCOL:
            tl.store(ptr, x, mask=mrow[:, None] & mcol[None, :])
        else:
            tl.store(ptr, x, mask=mrow[:, None])
    else:
        if MCOL:
            tl.store(ptr, x, mask=mcol[None, :])
        else:
            tl.store(ptr, x)


@triton.jit
def _diag(w, BT: tl.constexpr, dtype):
    """diag(w) as two [BT, BT] matrices of `dtype` whose sum is w to ~16 mantissa bits (hi, lo split): a
    product with both, accumulated in fp32, weights rows as exactly as scaling in fp32 registers would."""
    eye = tl.arange(0, BT)[:, None] == tl.arange(0, BT)[None, :]
    hi = w.to(dtype)
    lo = (w - hi.to(tl.float32)).to(dtype)
    return tl.where(eye, hi[:, None], 0.0).to(dtype), tl.where(eye, lo[:, None], 0.0).to(dtype)


@triton.jit
def _block(qb, kb, vb, ob, offq, offk, offv, offo, S, dmask, wq, wk, whi, wlo, lam_ln, mt, mk, mv,
           MT: tl.constexpr, MK: tl.constexpr, MV: tl.constexpr, PREC: tl.constexpr, WMMA: tl.constexpr):
    """One block: o = diag(wq) q S + (q k^T * dmask) v; returns lam_ln S + k^T diag(wk) v.

    WMMA = 0: diag(wk) v scaled in registers. WMMA = 2: as the products diag(hi) v + diag(lo) v (whi, wlo from
    _diag), so the loaded v tile is only ever a tensor-core operand read from shared memory (no register use);
    WMMA = 1: the hi product only (wk rounded to the input dtype first)."""
    qt = _ld(qb + offq, mt, mk, MT, MK)
    kt = _ld(kb + offk, mt, mk, MT, MK)
    vt = _ld(vb + offv, mt, mv, MT, MV)
    A = tl.dot(qt, tl.trans(kt), input_precision=PREC) * dmask
    o = tl.dot(qt, S.to(qt.dtype), input_precision=PREC) * wq[:, None]
    o = tl.dot(A.to(vt.dtype), vt, o, input_precision=PREC)
    _st(ob + offo, o.to(ob.dtype.element_ty), mt, mv, MT, MV)
    if WMMA == 0:
        vw = (vt.to(tl.float32) * wk[:, None]).to(vt.dtype)
    else:
        vw = tl.dot(whi, vt, input_precision=PREC)
        if WMMA == 2:
            vw = tl.dot(wlo, vt, vw, input_precision=PREC)
        vw = vw.to(vt.dtype)
    return tl.dot(tl.trans(kt), vw, S * lam_ln, input_precision=PREC)


# No BV=32 configs: bf16 BV=32 / 4 warps / 2 stages hit an illegal memory access on the H200 in the reverse
# (dk) call of the T=3000 GQA test (cause not found; BV=32 never won for the default either).
@triton.autotune(configs=LC._configs([64], [4, 8], [2, 3]) + ([] if LC._PINNED else LC._configs([128], [8], [2, 3]))
                 + LC._f32_configs(LC._F32_OUT),
                 key=["DK", "DV", "BT", "REVERSE", "WMMA"],
                 prune_configs_by={"early_config_prune": LC._by_dtype(LC._F32_OUT)})
@triton.jit
def _chunk_out_v1_kernel(q_ptr, k_ptr, v_ptr, o_ptr, st_ptr, decay_ptr, chunk_start_ptr, chunk_end_ptr,
                        T, NSS, L, H, GQ, GK, GV, stride_q, stride_k, stride_v, stride_o,
                        st_sk, st_sv, out_scale, kv_mult, DK: tl.constexpr, DV: tl.constexpr,
                        BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr, REVERSE: tl.constexpr,
                        IS_VARLEN: tl.constexpr, PREC: tl.constexpr, WMMA: tl.constexpr):
    i_v, h, c, a, b, s2 = LC._program_chunk(DV, BV, H, decay_ptr, chunk_start_ptr, chunk_end_ptr, T, NSS, L,
                                             IS_VARLEN)
    MK: tl.constexpr = DK < BK
    MV: tl.constexpr = DV % BV != 0
    offs_k = tl.arange(0, BK)
    offs_t = tl.arange(0, BT)
    offs_v = i_v * BV + tl.arange(0, BV)
    mk = offs_k < DK
    mv = offs_v < DV
    st_base = (c.to(tl.int64) * H + h) * DK * DV
    S = tl.load(st_ptr + st_base + offs_k[:, None] * st_sk + offs_v[None, :] * st_sv,
                mask=mk[:, None] & mv[None, :], other=0.0)
    if REVERSE:
        dif = offs_t[None, :] - offs_t[:, None]
        eq = BT - 1 - offs_t
        ek = offs_t + 1
    else:
        dif = offs_t[:, None] - offs_t[None, :]
        eq = offs_t + 1
        ek = BT - 1 - offs_t
    # both scales on the mask: the A v product then needs no rescale, and o accumulates q S and A v in place
    dmask = tl.where(dif >= 0, tl.exp2(-s2 * tl.maximum(dif, 0).to(tl.float32)), 0.0) * (kv_mult * out_scale)
    # LC.block_weights for a full block, without its row mask (so the loop's PTX stays the measured one)
    wq = tl.exp2(-s2 * eq.to(tl.float32)) * out_scale
    wk = tl.exp2(-s2 * ek.to(tl.float32)) * kv_mult
    lam_bt = tl.exp2(-s2 * BT)
    whi, wlo = _diag(wk, BT, q_ptr.dtype.element_ty)
    # int32 in-tile offsets (loop invariant) on a scalar int64 block base: one 64-bit add per address
    offq = offs_t[:, None] * stride_q + offs_k[None, :]
    offk = offs_t[:, None] * stride_k + offs_k[None, :]
    offv = offs_t[:, None] * stride_v + offs_v[None, :]
    offo = offs_t[:, None] * stride_o + offs_v[None, :]
    qh = q_ptr + (h // GQ) * DK
    kh = k_ptr + (h // GK) * DK
    vh = v_ptr + (h // GV) * DV
    oh = o_ptr + h * DV
    n = b - a
    nfull = (n // BT).to(tl.int32)
    rem = (n - nfull * BT).to(tl.int32)
    mfull = offs_t < BT
    # the partial block (if any) is the chunk's last in memory: processed first in reverse, last forward
    if REVERSE:
        if rem > 0:
            S = _tail(qh, kh, vh, oh, a + nfull * BT, stride_q, stride_k, stride_v, stride_o, offq, offk, offv,
                      offo, S, dmask, s2, rem, offs_t, out_scale, kv_mult, mk, mv, BT, MK, MV, REVERSE, PREC, WMMA)
    for m in range(0, nfull):
        if REVERSE:
            p = a + (nfull - 1 - m) * BT
        else:
            p = a + m * BT
        S = _block(qh + p * stride_q, kh + p * stride_k, vh + p * stride_v, oh + p * stride_o,
                   offq, offk, offv, offo, S, dmask, wq, wk, whi, wlo, lam_bt, mfull, mk, mv, False, MK, MV, PREC,
                   WMMA)
    if not REVERSE:
        if rem > 0:
            S = _tail(qh, kh, vh, oh, a + nfull * BT, stride_q, stride_k, stride_v, stride_o, offq, offk, offv,
                      offo, S, dmask, s2, rem, offs_t, out_scale, kv_mult, mk, mv, BT, MK, MV, REVERSE, PREC, WMMA)


@triton.jit
def _tail(qh, kh, vh, oh, p, stride_q, stride_k, stride_v, stride_o, offq, offk, offv, offo, S, dmask, s2, ln,
          offs_t, out_scale, kv_mult, mk, mv, BT: tl.constexpr, MK: tl.constexpr, MV: tl.constexpr,
          REVERSE: tl.constexpr, PREC: tl.constexpr, WMMA: tl.constexpr):
    mt = offs_t < ln
    wq, wk = LC.block_weights(offs_t, ln, mt, s2, out_scale, kv_mult, REVERSE)
    whi, wlo = _diag(wk, BT, qh.dtype.element_ty)
    return _block(qh + p * stride_q, kh + p * stride_k, vh + p * stride_v, oh + p * stride_o,
                  offq, offk, offv, offo, S, dmask, wq, wk, whi, wlo, tl.exp2(-s2 * ln.to(tl.float32)), mt, mk,
                  mv, True, MK, MV, PREC, WMMA)


def chunk_outputs(qq, kk, vv, GQ, GK, GV, H, out, states, transposed, decay, out_scale, kv_mult, reverse,
                  ch):
    """LC.chunk_outputs with this kernel (same arguments and result)."""
    DK, DV = kk.shape[-1], vv.shape[-1]
    st_sk, st_sv = (1, DK) if transposed else (DV, 1)
    grid = lambda META: (triton.cdiv(DV, META["BV"]) * H * ch.NS,)  # noqa: E731  (flat: see the default kernel)
    _chunk_out_v1_kernel[grid](qq, kk, vv, out, states, decay, *ch.args(), H, GQ, GK, GV,
                              qq.shape[-2] * DK, kk.shape[-2] * DK, vv.shape[-2] * DV, out.shape[-2] * DV,
                              st_sk, st_sv, float(out_scale), float(kv_mult), DK=DK, DV=DV,
                              BK=LC._pad(DK), BT=ch.BT, REVERSE=reverse, IS_VARLEN=ch.varlen,
                              PREC=LC._dot_precision(qq.dtype),
                              WMMA=0 if qq.dtype == torch.float32 else _WMMA[variant()])
    return out


__all__ = ["variant", "VARIANTS", "chunk_outputs"]
