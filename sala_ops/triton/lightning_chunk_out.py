"""The chunk-output pass (pass 3 of lightning_chunk.py: o for every token from its chunk's start state). It serves
every caller of `chunk_outputs` (forward outputs, dq, dk, dv). Kernels, picked by SALA_LIGHTNING_OUT (read at
every call):
- `tma` (default since H200 session 12, 2026-12-05): v1 with the full blocks' tiles moved by TMA descriptors;
  bf16 forward 1.55x fla at 32K and 128K where v1 gave 1.47x / 1.49x (bench/NOTES_lightning.md). Inputs TMA
  cannot address (fp32, head dims that are not whole tiles, devices before sm_90) run v1.
- `v1` (default from run 8, 2026-12-03 to session 12): same schedule as lightning_chunk._chunk_out_kernel (`v0`),
  less work per 64-token block.

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

# tma: _chunk_out_tma_kernel (default since H200 session 12: 16-bit inputs whose tiles TMA can address, on sm_90+
# or the interpreter; anything else runs v1); v1: _chunk_out_v1_kernel; v0: lightning_chunk._chunk_out_kernel
VARIANTS = ("tma", "v1", "v0")


def variant() -> str:
    name = os.environ.get("SALA_LIGHTNING_OUT", "tma") or "tma"
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
def _block(qb, kb, vb, ob, offq, offk, offv, offo, S, dmask, wq, wk, lam_ln, mt, mk, mv, kv_mult, out_scale,
           MT: tl.constexpr, MK: tl.constexpr, MV: tl.constexpr, PREC: tl.constexpr, DK: tl.constexpr):
    """One block: o = diag(wq) q S + (q k^T * dmask) v; returns lam_ln S + k^T diag(wk) v."""
    qt = _ld(qb + offq, mt, mk, MT, MK)
    kt = _ld(kb + offk, mt, mk, MT, MK)
    vt = _ld(vb + offv, mt, mv, MT, MV)
    if PREC == "f16s":  # fp32 inputs, every product on scaled fp16 tiles (LC.f16_scaled), 2^-s factors after
        qm = LC.amax(qt)
        km = LC.amax(kt)
        vm = LC.amax(vt)
        qh, iq = LC.f16_scaled(qt, qm)
        kh, ik = LC.f16_scaled(kt, km)
        vh, iv = LC.f16_scaled(vt, vm)
        Sh, iS = LC.f16_scaled(S, LC.amax(S))
        o = tl.dot(qh, Sh) * iq * iS * wq[:, None]
        # bounds instead of reductions: |A| <= DK max|q| max|k| max(dmask), |diag(wk) v| <= max|v| max(wk)
        Ah, iA = LC.f16_scaled(tl.dot(qh, tl.trans(kh)) * iq * ik * dmask,
                               qm * km * tl.abs(kv_mult * out_scale) * DK)
        o += tl.dot(Ah, vh) * iA * iv
        _st(ob + offo, o.to(ob.dtype.element_ty), mt, mv, MT, MV)
        wh, iw = LC.f16_scaled(vt * wk[:, None], vm * tl.abs(kv_mult))
        S = S * lam_ln + tl.dot(tl.trans(kh), wh) * ik * iw
    else:  # (one return for both: triton 3.6 compiles the code after a return inside a constexpr if)
        o = _outputs(qt, kt, vt, S, dmask, wq, PREC)
        _st(ob + offo, o.to(ob.dtype.element_ty), mt, mv, MT, MV)
        S = _update(kt, vt, S, wk, lam_ln, PREC)
    return S


@triton.jit
def _outputs(qt, kt, vt, S, dmask, wq, PREC: tl.constexpr):
    """A block's outputs from loaded 16-bit (or TF32) tiles: diag(wq) q S + (q k^T * dmask) v."""
    if PREC == "split":  # S and the score tile as hi + lo 16-bit pairs (LC.split_hi_lo)
        A_hi, A_lo = LC.split_hi_lo(tl.dot(qt, tl.trans(kt)) * dmask, vt.dtype)
        S_hi, S_lo = LC.split_hi_lo(S, qt.dtype)
        o = tl.dot(qt, S_lo, tl.dot(qt, S_hi)) * wq[:, None]
        o = tl.dot(A_lo, vt, tl.dot(A_hi, vt, o))
    else:
        A = tl.dot(qt, tl.trans(kt), input_precision=PREC) * dmask
        o = tl.dot(qt, S.to(qt.dtype), input_precision=PREC) * wq[:, None]
        o = tl.dot(A.to(vt.dtype), vt, o, input_precision=PREC)
    return o


@triton.jit
def _update(kt, vt, S, wk, lam, PREC: tl.constexpr):
    """The state after the block: lam S + k^T diag(wk) v."""
    if PREC == "split":
        S = LC.add_kT_weighted_v_split(S * lam, kt, vt, wk)
    else:
        vw = (vt.to(tl.float32) * wk[:, None]).to(vt.dtype)
        S = tl.dot(tl.trans(kt), vw, S * lam, input_precision=PREC)
    return S


@triton.jit
def _prologue(st_ptr, c, h, i_v, s2, H, st_sk, st_sv, out_scale, kv_mult, DK: tl.constexpr, DV: tl.constexpr,
              BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr, REVERSE: tl.constexpr):
    """The loop invariants of one (chunk, head, V-block) program: tile index vectors and masks, the chunk's
    start state S, the intra-block decay mask and the full-block weights."""
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
    return offs_k, offs_t, offs_v, mk, mv, S, dmask, wq, wk, lam_bt


# No BV=32 configs: bf16 BV=32 / 4 warps / 2 stages hit an illegal memory access on the H200 in the reverse
# (dk) call of the T=3000 GQA test (cause not found; BV=32 never won for the default either).
@triton.autotune(configs=LC._configs([64], [4, 8], [2, 3]) + ([] if LC._PINNED else LC._configs([128], [8], [2, 3]))
                 + LC._f32_configs(LC._F32_OUT),
                 key=["DK", "DV", "BT", "REVERSE", "PREC"],
                 prune_configs_by={"early_config_prune": LC._by_dtype(LC._F32_OUT)})
@triton.jit
def _chunk_out_v1_kernel(q_ptr, k_ptr, v_ptr, o_ptr, st_ptr, decay_ptr, chunk_start_ptr, chunk_end_ptr,
                        T, NSS, L, H, GQ, GK, GV, stride_q, stride_k, stride_v, stride_o,
                        st_sk, st_sv, out_scale, kv_mult, DK: tl.constexpr, DV: tl.constexpr,
                        BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr, REVERSE: tl.constexpr,
                        IS_VARLEN: tl.constexpr, PREC: tl.constexpr):
    i_v, h, c, a, b, s2 = LC._program_chunk(DV, BV, H, decay_ptr, chunk_start_ptr, chunk_end_ptr, T, NSS, L,
                                             IS_VARLEN)
    MK: tl.constexpr = DK < BK
    MV: tl.constexpr = DV % BV != 0
    offs_k, offs_t, offs_v, mk, mv, S, dmask, wq, wk, lam_bt = _prologue(
        st_ptr, c, h, i_v, s2, H, st_sk, st_sv, out_scale, kv_mult, DK, DV, BK, BV, BT, REVERSE)
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
                      offo, S, dmask, s2, rem, offs_t, out_scale, kv_mult, mk, mv, MK, MV, REVERSE, PREC, DK)
    for m in range(0, nfull):
        if REVERSE:
            p = a + (nfull - 1 - m) * BT
        else:
            p = a + m * BT
        S = _block(qh + p * stride_q, kh + p * stride_k, vh + p * stride_v, oh + p * stride_o,
                   offq, offk, offv, offo, S, dmask, wq, wk, lam_bt, mfull, mk, mv, kv_mult, out_scale, False, MK,
                   MV, PREC, DK)
    if not REVERSE:
        if rem > 0:
            S = _tail(qh, kh, vh, oh, a + nfull * BT, stride_q, stride_k, stride_v, stride_o, offq, offk, offv,
                      offo, S, dmask, s2, rem, offs_t, out_scale, kv_mult, mk, mv, MK, MV, REVERSE, PREC, DK)


@triton.jit
def _block_tma(q_desc, k_desc, v_desc, o_desc, p, cq, ck, cv, co, S, dmask, wq, wk, lam_bt, PREC: tl.constexpr):
    """_block for a full block, its tiles moved by TMA (rows p.., columns from cq / ck / cv / co)."""
    qt = q_desc.load([p, cq])
    kt = k_desc.load([p, ck])
    vt = v_desc.load([p, cv])
    o_desc.store([p, co], _outputs(qt, kt, vt, S, dmask, wq, PREC).to(o_desc.dtype))
    return _update(kt, vt, S, wk, lam_bt, PREC)


def _tma_block_shapes(nargs):
    """Autotune pre-hook: the descriptors' tiles follow the config's BV (and the call's BT, BK)."""
    BT, BK, BV = nargs["BT"], nargs["BK"], nargs["BV"]
    nargs["q_desc"].block_shape = [BT, BK]
    nargs["k_desc"].block_shape = [BT, BK]
    nargs["v_desc"].block_shape = [BT, BV]
    nargs["o_desc"].block_shape = [BT, BV]


def _tma_configs():
    if LC._PINNED:
        cfgs = [(bv, 4, 1) for bv in (64, 32, 16)]
    else:
        cfgs = [(64, 4, 2), (64, 4, 3), (64, 8, 2), (64, 8, 3), (128, 8, 2), (128, 8, 3)]
    return [triton.Config({"BV": bv}, num_warps=w, num_stages=st, pre_hook=_tma_block_shapes) for bv, w, st in cfgs]


def _tma_prune(configs, nargs, **kw):
    """BV must divide DV (a TMA tile cannot be masked per head); pinned (interpreter): the largest such BV."""
    DV = nargs["DV"] if "DV" in nargs else kw["DV"]
    ok = [c for c in configs if DV % c.kwargs["BV"] == 0]
    return ok[:1] if LC._PINNED else ok


@triton.autotune(configs=_tma_configs(), key=["DK", "DV", "BT", "REVERSE"],
                 prune_configs_by={"early_config_prune": _tma_prune})
@triton.jit
def _chunk_out_tma_kernel(q_desc, k_desc, v_desc, o_desc, q_ptr, k_ptr, v_ptr, o_ptr, st_ptr, decay_ptr,
                          chunk_start_ptr, chunk_end_ptr, T, NSS, L, H, GQ, GK, GV, stride_q, stride_k, stride_v,
                          stride_o, st_sk, st_sv, out_scale, kv_mult, DK: tl.constexpr, DV: tl.constexpr,
                          BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr, REVERSE: tl.constexpr,
                          IS_VARLEN: tl.constexpr, PREC: tl.constexpr):
    """_chunk_out_v1_kernel with the full blocks' q, k, v tiles loaded and o stored by TMA (one copy instruction
    per tile instead of per-thread cp.async with their address arithmetic). Needs DK == BK and BV | DV: a TMA
    tile spans whole head dims. The partial tail block keeps the masked pointer path (a TMA tile past the
    sequence end would read and write the next sequence's rows)."""
    i_v, h, c, a, b, s2 = LC._program_chunk(DV, BV, H, decay_ptr, chunk_start_ptr, chunk_end_ptr, T, NSS, L,
                                             IS_VARLEN)
    offs_k, offs_t, offs_v, mk, mv, S, dmask, wq, wk, lam_bt = _prologue(
        st_ptr, c, h, i_v, s2, H, st_sk, st_sv, out_scale, kv_mult, DK, DV, BK, BV, BT, REVERSE)
    cq = (h // GQ) * DK
    ck = (h // GK) * DK
    cv = (h // GV) * DV + i_v * BV
    co = h * DV + i_v * BV
    n = b - a
    nfull = (n // BT).to(tl.int32)
    rem = (n - nfull * BT).to(tl.int32)
    a32 = a.to(tl.int32)  # TMA coordinates are int32 (the wrapper checks B * T < 2^31)
    # the tail block's pointer offsets, as in v1
    offq = offs_t[:, None] * stride_q + offs_k[None, :]
    offk = offs_t[:, None] * stride_k + offs_k[None, :]
    offv = offs_t[:, None] * stride_v + offs_v[None, :]
    offo = offs_t[:, None] * stride_o + offs_v[None, :]
    if REVERSE:
        if rem > 0:
            S = _tail(q_ptr + cq, k_ptr + ck, v_ptr + (h // GV) * DV, o_ptr + h * DV, a + nfull * BT, stride_q,
                      stride_k, stride_v, stride_o, offq, offk, offv, offo, S, dmask, s2, rem, offs_t, out_scale,
                      kv_mult, mk, mv, False, False, REVERSE, PREC, DK)
    for m in range(0, nfull):
        if REVERSE:
            p = a32 + (nfull - 1 - m) * BT
        else:
            p = a32 + m * BT
        S = _block_tma(q_desc, k_desc, v_desc, o_desc, p, cq, ck, cv, co, S, dmask, wq, wk, lam_bt, PREC)
    if not REVERSE:
        if rem > 0:
            S = _tail(q_ptr + cq, k_ptr + ck, v_ptr + (h // GV) * DV, o_ptr + h * DV, a + nfull * BT, stride_q,
                      stride_k, stride_v, stride_o, offq, offk, offv, offo, S, dmask, s2, rem, offs_t, out_scale,
                      kv_mult, mk, mv, False, False, REVERSE, PREC, DK)


@triton.jit
def _tail(qh, kh, vh, oh, p, stride_q, stride_k, stride_v, stride_o, offq, offk, offv, offo, S, dmask, s2, ln,
          offs_t, out_scale, kv_mult, mk, mv, MK: tl.constexpr, MV: tl.constexpr, REVERSE: tl.constexpr,
          PREC: tl.constexpr, DK: tl.constexpr):
    mt = offs_t < ln
    wq, wk = LC.block_weights(offs_t, ln, mt, s2, out_scale, kv_mult, REVERSE)
    return _block(qh + p * stride_q, kh + p * stride_k, vh + p * stride_v, oh + p * stride_o,
                  offq, offk, offv, offo, S, dmask, wq, wk, tl.exp2(-s2 * ln.to(tl.float32)), mt, mk, mv,
                  kv_mult, out_scale, True, MK, MV, PREC, DK)


def _has_tma(device) -> bool:
    """TMA copies exist from sm_90 (Hopper) on; the interpreter emulates the descriptors on the CPU."""
    if LC.INTERPRET:
        return True
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def _tma_ok(qq, kk, vv, out, BT):
    """Whether the TMA kernel can take these tensors: a device with TMA, 16-bit inputs, power-of-two head dims of at
    least 16 bytes per row (so a tile is whole head dims), 16-byte aligned bases and row strides (TMA's rules),
    int32 row coordinates."""
    DK, DV = kk.shape[-1], vv.shape[-1]
    ts = (qq, kk, vv, out)
    # out may be fp32: dk, dv of GQA heads, summed over the group afterwards
    return (_has_tma(qq.device) and qq.dtype in (torch.float16, torch.bfloat16) and kk.dtype == vv.dtype == qq.dtype
            and out.dtype in (qq.dtype, torch.float32)
            and DK == LC._pad(DK) and DK >= 8 and DV >= 8 and DV & (DV - 1) == 0
            and all(t.data_ptr() % 16 == 0 and (t.shape[-2] * t.shape[-1]) % 8 == 0 for t in ts)
            and qq.numel() // (qq.shape[-2] * DK) + BT < 2 ** 31)


def _desc(t, BT):
    """A 2D TensorDescriptor over [tokens, heads * D] (the block shape is set per config by _tma_block_shapes)."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    w = t.shape[-2] * t.shape[-1]
    return TensorDescriptor(t, [t.numel() // w, w], [w, 1], [BT, t.shape[-1]])


def chunk_outputs(qq, kk, vv, GQ, GK, GV, H, out, states, transposed, decay, out_scale, kv_mult, reverse,
                  ch):
    """LC.chunk_outputs with this file's kernels (same arguments and result)."""
    DK, DV = kk.shape[-1], vv.shape[-1]
    st_sk, st_sv = (1, DK) if transposed else (DV, 1)
    grid = lambda META: (triton.cdiv(DV, META["BV"]) * H * ch.NS,)  # noqa: E731  (flat: see the default kernel)
    args = (qq, kk, vv, out, states, decay, *ch.args(), H, GQ, GK, GV,
            qq.shape[-2] * DK, kk.shape[-2] * DK, vv.shape[-2] * DV, out.shape[-2] * DV,
            st_sk, st_sv, float(out_scale), float(kv_mult))
    meta = dict(DK=DK, DV=DV, BK=LC._pad(DK), BT=ch.BT, REVERSE=reverse, IS_VARLEN=ch.varlen,
                PREC=LC._dot_precision(qq.dtype))
    if variant() == "tma" and _tma_ok(qq, kk, vv, out, ch.BT):
        _chunk_out_tma_kernel[grid](*(_desc(t, ch.BT) for t in (qq, kk, vv, out)), *args, **meta)
    else:
        _chunk_out_v1_kernel[grid](*args, **meta)
    return out


__all__ = ["variant", "VARIANTS", "chunk_outputs"]
