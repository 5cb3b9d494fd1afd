"""Triton kernels for InfLLM-V2 sparse decode (one query token per sequence) over a SparseLayerCache.

Kernels only, no policy: sala_ops/sparse_decode.py picks the tile sizes and launches them.

Cache layout (see SparseLayerCache): K/V [B, Lmax, Hkv, D] (model dtype), compressed keys C1
[B, N1max, Hkv, D] and C2 [B, N2max, Hkv, D] (fp32), lengths int32 [B] on the device. Every
kernel reads the lengths on the device and has a grid fixed by the cache's capacity (programs
past a sequence's length exit at once), so one decode step is CUDA-graph capturable.

A decode step (the query sits at position t = L - 1, L = lengths[b] after the caller appended its
token) runs:
  _append_token_kernel   (optional, the caller's append) K/V row, new C1/C2 keys, lengths += 1
  _lse_partial_kernel    split over C2 keys: per query head (max, sum exp) of q.C2 * scale
  _score_chunk_kernel    split over chunks of CB blocks: lse, P_j = sum_h exp(q_h.C1_j*scale - lse_h),
                         block score = max over intersecting windows, forced/future blocks,
                         local top-KP of the chunk (bitonic sort of (score, -index) int64 keys)
  _topk_merge_kernel     per (sequence, KV head): top-k of the chunk candidates, ascending, -1 padded
  _attend_kernel         split-K (flash-decoding) over the selected blocks (or every block below
                         dense_len), the G query heads of one KV group per program
  _combine_kernel        merges the split partials
All offsets that scale with the cache length are int64.
"""
from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

# 2147483647 = 2^31 - 1: low half of a selection key is 2^31 - 1 - block (ties -> lower block)


@triton.jit
def pdl_enter(PDL: tl.constexpr):
    """Programmatic dependent launch (the kernel launched with launch_pdl=True, sm_90+): wait until the previous
    kernel in the stream has completed and its writes are visible, then let the next PDL kernel start launching
    (its programs get resident and wait in their own pdl_enter), which hides the launch gap between the dependent
    launches of a decode step. Every global access of the kernel comes after this call. Off (a no-op) unless PDL:
    the interpreter cannot run the inline PTX."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def _cached_rows_sum(base, s_ct, Lnew, flag, r, d, dm, KS: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr):
    """fp32 sum over the cached rows [Lnew - KS, Lnew - 1) of one KV head (base), in BR-row steps; nothing
    loaded unless flag > 0 (a compressed key completes with this token)."""
    acc = tl.zeros([BD], dtype=tl.float32)
    for r0 in range(0, KS - 1, BR):
        rows = Lnew - KS + r0 + r
        m = (r0 + r < KS - 1) & (r * 0 + flag > 0)
        x = tl.load(base + rows[:, None] * s_ct + d[None, :], mask=m[:, None] & dm[None, :], other=0.0)
        acc += tl.sum(x.to(tl.float32), axis=0)
    return acc


@triton.jit
def _append_token_kernel(k_new, v_new, kc, vc, c1, c2, lens, overflow,
                         s_nb, s_nh,                  # k_new/v_new [B, Hkv, D] strides (batch, head), dim stride 1
                         s_cb, s_ct, s_ch,            # K/V cache strides (batch, token, head)
                         s_1b, s_1t, s_1h,            # C1 strides
                         s_2b, s_2t, s_2h,            # C2 strides
                         HKV, D, LMAX,
                         KS: tl.constexpr, ST: tl.constexpr, KS2: tl.constexpr, ST2: tl.constexpr,
                         BD: tl.constexpr, BR: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    pos = tl.load(lens + b).to(tl.int64)
    ok = pos < LMAX
    d = tl.arange(0, BD)
    dm = d < D
    Lnew = pos + 1
    do1 = ok & (Lnew >= KS) & ((Lnew - KS) % ST == 0)
    do2 = ok & (Lnew >= KS2) & ((Lnew - KS2) % ST2 == 0)
    j1 = tl.maximum(Lnew - KS, 0) // ST
    j2 = tl.maximum(Lnew - KS2, 0) // ST2
    r = tl.arange(0, BR)
    # vector masks only: the interpreter rejects a scalar bool broadcast into a mask
    okd = dm & ((d * 0 + tl.where(ok, 1, 0)) > 0)
    okd1 = dm & ((d * 0 + tl.where(do1, 1, 0)) > 0)
    okd2 = dm & ((d * 0 + tl.where(do2, 1, 0)) > 0)
    f1 = tl.where(do1, 1, 0)
    f2 = tl.where(do2, 1, 0)
    for g in range(HKV):
        kn = tl.load(k_new + b * s_nb + g * s_nh + d, mask=dm, other=0.0)
        vn = tl.load(v_new + b * s_nb + g * s_nh + d, mask=dm, other=0.0)
        base = kc + b * s_cb + g * s_ch
        tl.store(base + pos * s_ct + d, kn.to(kc.dtype.element_ty), mask=okd)
        tl.store(vc + b * s_cb + g * s_ch + pos * s_ct + d, vn.to(vc.dtype.element_ty), mask=okd)
        # the new row in its stored precision (the compressed keys are means of the stored keys)
        knf = kn.to(kc.dtype.element_ty).to(tl.float32)
        # C1 / C2: mean of rows [Lnew - KS, Lnew) = the KS - 1 cached rows before pos, plus the new row
        acc = _cached_rows_sum(base, s_ct, Lnew, f1, r, d, dm, KS, BD, BR)
        tl.store(c1 + b * s_1b + j1 * s_1t + g * s_1h + d, (acc + knf) / KS, mask=okd1)
        acc2 = _cached_rows_sum(base, s_ct, Lnew, f2, r, d, dm, KS2, BD, BR)
        tl.store(c2 + b * s_2b + j2 * s_2t + g * s_2h + d, (acc2 + knf) / KS2, mask=okd2)
    tl.store(lens + b, tl.where(ok, Lnew, pos).to(tl.int32))
    ov = tl.load(overflow + b)
    tl.store(overflow + b, tl.where(ok, ov, 1))


@triton.jit
def group_heads(g, D, G: tl.constexpr, BG: tl.constexpr, BD: tl.constexpr):
    """The tile indices every decode kernel works with: the G query heads h of KV head g (rows gm valid, of
    BG) and the head-dim lanes d (dm valid, of BD)."""
    rg = tl.arange(0, BG)
    gm = rg < G
    d = tl.arange(0, BD)
    dm = d < D
    h = g * G + rg
    return h, gm, d, dm


@triton.jit
def key_head_scores(qt, k, PREC: tl.constexpr, KEYS_M: tl.constexpr):
    """k [N, D] . qt [BG, D]^T as [N, BG] (keys x query heads). KEYS_M puts the keys in the MMA's M
    dimension (N = 64 keys: a Hopper wgmma tile) instead of the BG = 16 heads (mma.sync m16), same values."""
    if PREC == "split2":
        # q came from a 16-bit tensor, so it is exact in TF32: k = hi + lo (hi = k with its low 13 mantissa
        # bits cleared, exact in TF32; lo = k - hi exactly, truncated to TF32 in the product: an error below
        # 2^-21 |k|) needs two TF32 products instead of tf32x3's three (which also splits q)
        hi = (k.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
        lo = k - hi
        if KEYS_M:
            return (tl.dot(hi, tl.trans(qt), input_precision="tf32")
                    + tl.dot(lo, tl.trans(qt), input_precision="tf32"))
        else:
            return tl.trans(tl.dot(qt, tl.trans(hi), input_precision="tf32")
                            + tl.dot(qt, tl.trans(lo), input_precision="tf32"))
    elif KEYS_M:
        return tl.dot(k, tl.trans(qt), input_precision=PREC)
    else:
        return tl.trans(tl.dot(qt, tl.trans(k), input_precision=PREC))


@triton.jit
def _lse_partial_kernel(q, c2, lens, m_out, l_out,
                        s_qb, s_qh,                  # q [B, H, D]
                        s_2b, s_2t, s_2h,            # C2
                        scale, D, DENSE_LEN, CH2,
                        G: tl.constexpr, KS2: tl.constexpr, ST2: tl.constexpr, S2: tl.constexpr,
                        BG: tl.constexpr, BD: tl.constexpr, BJ: tl.constexpr, PREC: tl.constexpr,
                        KEYS_M: tl.constexpr = False, PDL: tl.constexpr = False):
    """(max, sum exp) of q_h.C2_j * scale over this program's C2 keys, per query head h of group g.
    m_out/l_out [B, H, S2] fp32."""
    pdl_enter(PDL)
    lse_partial(q, c2, lens, m_out, l_out, tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2),
                tl.num_programs(1), s_qb, s_qh, s_2b, s_2t, s_2h, scale, D, DENSE_LEN, CH2,
                G, KS2, ST2, S2, BG, BD, BJ, PREC, KEYS_M)


@triton.jit
def lse_partial(q, c2, lens, m_out, l_out, b, g, s, HKV, s_qb, s_qh, s_2b, s_2t, s_2h, scale, D, DENSE_LEN, CH2,
                G: tl.constexpr, KS2: tl.constexpr, ST2: tl.constexpr, S2: tl.constexpr,
                BG: tl.constexpr, BD: tl.constexpr, BJ: tl.constexpr, PREC: tl.constexpr, KEYS_M: tl.constexpr):
    """The body of _lse_partial_kernel for split s of (b, KV head g): C2 keys [s * CH2, s * CH2 + CH2)."""
    L = tl.load(lens + b)
    if L >= DENSE_LEN:
        n2 = tl.where(L >= KS2, (tl.maximum(L - KS2, 0)) // ST2 + 1, 0)
        h, gm, d, dm = group_heads(g, D, G, BG, BD)
        qt = tl.load(q + b * s_qb + h[:, None] * s_qh + d[None, :], mask=gm[:, None] & dm[None, :],
                     other=0.0).to(tl.float32)
        m_i = tl.full([BG], float("-inf"), tl.float32)
        l_i = tl.zeros([BG], dtype=tl.float32)
        start = s * CH2
        end = tl.minimum(start + CH2, n2)
        jj = tl.arange(0, BJ)
        base = c2 + b * s_2b + g * s_2h
        for j0 in range(start, end, BJ):
            j = j0 + jj
            jm = j < end
            c = tl.load(base + j.to(tl.int64)[:, None] * s_2t + d[None, :], mask=jm[:, None] & dm[None, :], other=0.0)
            sc = key_head_scores(qt, c, PREC, KEYS_M) * scale          # [BJ, BG]
            sc = tl.where(jm[:, None], sc, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, axis=0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(sc - m_safe[None, :]), axis=0)
            m_i = m_new
        o = (b * (G * HKV) + h) * S2 + s
        tl.store(m_out + o, m_i, mask=gm)
        tl.store(l_out + o, l_i, mask=gm)


@triton.jit
def load_l2(ptr, mask, other, L2_ONLY: tl.constexpr):
    """tl.load, past L1 (.cg) when L2_ONLY: for data that other programs of the same launch wrote."""
    if L2_ONLY:
        return tl.load(ptr, mask=mask, other=other, cache_modifier=".cg")
    else:
        return tl.load(ptr, mask=mask, other=other)


@triton.jit
def forced_blocks(bb, qb, INIT: tl.constexpr, WB: tl.constexpr):
    """The blocks every query of block qb attends to whatever their scores: the INIT first blocks and the local
    window, blocks qb - WB .. qb (their scores count as +inf in every selection)."""
    return (bb < INIT) | ((bb >= qb - WB) & (bb <= qb))


@triton.jit
def combined_lse(m_in, l_in, b, h, gm, G, HKV, S2: tl.constexpr, S2P: tl.constexpr, L2_ONLY: tl.constexpr):
    """Stage-1 LSE of query heads h (rows gm valid) of sequence b from the S2 partial (max, sum) pairs
    that _lse_partial_kernel wrote per (b, head) (natural log; 0 when no C2 key is complete yet). L2_ONLY: load
    them past L1 (load_l2). (A bool, not the modifier string: triton 3.6 cannot compile a str constexpr default
    of a called @triton.jit function.)"""
    sp = tl.arange(0, S2P)
    po = (b * (G * HKV) + h)[:, None] * S2 + sp[None, :]
    pm = gm[:, None] & (sp[None, :] < S2)
    mp = load_l2(m_in + po, pm, float("-inf"), L2_ONLY)
    lp = load_l2(l_in + po, pm, 0.0, L2_ONLY)
    M = tl.max(mp, axis=1)
    Ms = tl.where(M == float("-inf"), 0.0, M)
    tot = tl.sum(lp * tl.exp(mp - Ms[:, None]), axis=1)
    # the clamp is a normal fp32 number: Triton types a float literal below 2^-126 (e.g. 1e-38) as fp64, which
    # made this LSE and every score computed from it fp64 (found by the sm_90 compile of the TAG store, 2026-12-01)
    return tl.where(tot > 0, Ms + tl.log(tl.maximum(tot, 1e-30)), 0.0)


@triton.jit
def _score_chunk_kernel(q, c1, lens, m_in, l_in, pbuf, cand,
                        s_qb, s_qh, s_1b, s_1t, s_1h,
                        scale, D, DENSE_LEN, PW,
                        G: tl.constexpr, KS: tl.constexpr, ST: tl.constexpr, BS: tl.constexpr,
                        INIT: tl.constexpr, WB: tl.constexpr, S2: tl.constexpr, S2P: tl.constexpr,
                        CB: tl.constexpr, KP: tl.constexpr, W: tl.constexpr,
                        BG: tl.constexpr, BD: tl.constexpr, BJ: tl.constexpr, IEEE: tl.constexpr):
    """Blocks [c*CB, c*CB + CB) of sequence b, KV head g: block scores and the chunk's top-KP as
    int64 keys (score bits << 32 | (2^31 - 1 - block)), descending, into cand [B, Hkv, NCH, KP].
    pbuf [B, Hkv, NCH, PW] fp32 holds the chunk's window scores P between the two phases."""
    b = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    c = tl.program_id(2)
    HKV = tl.num_programs(1)
    NCH = tl.num_programs(2)
    L = tl.load(lens + b)
    t = L - 1
    qb = t // BS
    b0 = c * CB
    if (L >= DENSE_LEN) & (b0 <= qb):
        n1 = tl.where(L >= KS, tl.maximum(L - KS, 0) // ST + 1, 0)
        h, gm, d, dm = group_heads(g, D, G, BG, BD)
        lse = combined_lse(m_in, l_in, b, h, gm, G, HKV, S2, S2P, False)
        qt = tl.load(q + b * s_qb + h[:, None] * s_qh + d[None, :], mask=gm[:, None] & dm[None, :],
                     other=0.0).to(tl.float32)
        # phase 1: P over the windows that touch the chunk's blocks
        num0 = b0 * BS - KS
        j_first = tl.where(num0 >= 0, tl.maximum(num0, 0) // ST + 1, 0)
        j_last = tl.minimum(((b0 + CB) * BS - 1) // ST, n1 - 1)
        pb = pbuf + ((b * HKV + g) * NCH + c) * PW
        jj = tl.arange(0, BJ)
        base = c1 + b * s_1b + g * s_1h
        for j0 in range(j_first, j_last + 1, BJ):
            j = j0 + jj
            jm = j <= j_last
            k1 = tl.load(base + j.to(tl.int64)[:, None] * s_1t + d[None, :], mask=jm[:, None] & dm[None, :],
                         other=0.0)
            if IEEE:
                sc = tl.dot(qt, tl.trans(k1), input_precision="ieee") * scale
            else:
                sc = tl.dot(qt, tl.trans(k1)) * scale
            p = tl.where(gm[:, None], tl.exp(sc - lse[:, None]), 0.0)
            tl.store(pb + (j - j_first), tl.sum(p, axis=0), mask=jm)
        tl.debug_barrier()
        # phase 2: block score = max over the intersecting visible windows (0 if none)
        bb = b0 + tl.arange(0, CB)
        num = bb * BS - KS
        jlo = tl.where(num >= 0, tl.maximum(num, 0) // ST + 1, 0)
        jhi = tl.minimum((bb * BS + BS - 1) // ST, n1 - 1)
        score = tl.zeros([CB], dtype=tl.float32)
        for w in tl.static_range(W):
            j = jlo + w
            v = tl.load(pb + (j - j_first), mask=j <= jhi, other=0.0)
            score = tl.maximum(score, v)
        score = tl.where(forced_blocks(bb, qb, INIT, WB), float("inf"), score)
        score = tl.where(bb > qb, float("-inf"), score)
        key = (score.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (2147483647 - bb).to(tl.int64)
        key = tl.sort(key, descending=True)
        first = tl.sum(tl.where(tl.arange(0, CB // KP)[:, None] == 0, tl.reshape(key, [CB // KP, KP]), 0), axis=0)
        tl.store(cand + ((b * HKV + g) * NCH + c) * KP + tl.arange(0, KP), first)


@triton.jit
def _topk_merge_kernel(cand, lens, sel, DENSE_LEN, NCH,
                       BS: tl.constexpr, CB: tl.constexpr, KP: tl.constexpr, NCHP: tl.constexpr,
                       KSEL: tl.constexpr):
    """Top-KSEL of the chunk candidates of (b, g): block indices ascending, -1 padded, into
    sel [B, Hkv, KSEL] int32."""
    b = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    HKV = tl.num_programs(1)
    L = tl.load(lens + b)
    if L >= DENSE_LEN:
        qb = (L - 1) // BS
        n_sel = tl.minimum(qb + 1, KSEL)
        ci = tl.arange(0, NCHP)
        ki = tl.arange(0, KP)
        cm = (ci <= qb // CB) & (ci < NCH)
        o = ((b * HKV + g) * NCH + ci)[:, None] * KP + ki[None, :]
        key = tl.load(cand + o, mask=cm[:, None], other=-(2 ** 62))
        key = tl.sort(tl.reshape(key, [NCHP * KP]), descending=True)
        top = tl.sum(tl.where(tl.arange(0, NCHP)[:, None] == 0, tl.reshape(key, [NCHP, KP]), 0), axis=0)
        idx = (2147483647 - (top & 2147483647)).to(tl.int32)
        ok = (ki < n_sel) & (top >= 0)
        idx = tl.where(ok, idx, 2147483647)
        idx = tl.sort(idx)
        tl.store(sel + (b * HKV + g) * KSEL + ki, tl.where(idx == 2147483647, -1, idx), mask=ki < KSEL)
    else:
        ki = tl.arange(0, KP)
        tl.store(sel + (b * HKV + g) * KSEL + ki, tl.full([KP], -1, tl.int32), mask=ki < KSEL)


@triton.jit
def online_softmax_step(qt, k, v, pm, m_i, l_i, acc, scale, IEEE: tl.constexpr):
    """One flash-decoding step of the query rows qt over the keys k / values v (rows pm valid): the running max
    m_i, sum l_i and unnormalised output acc, updated."""
    if IEEE:
        sc = tl.dot(qt, tl.trans(k), input_precision="ieee") * scale
    else:
        sc = tl.dot(qt, tl.trans(k)) * scale
    sc = tl.where(pm[None, :], sc, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(sc, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(sc - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if IEEE:
        pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc * alpha[:, None] + pv


@triton.jit
def _attend_split(q, kc, vc, lens, sel, o, o_part, m_part, l_part,
                  s_qb, s_qh, s_cb, s_ct, s_ch, s_ob, s_oh,
                  scale, D, DENSE_LEN, NSLOT, SPB,
                  G: tl.constexpr, BS: tl.constexpr, KSEL: tl.constexpr, NSPLIT: tl.constexpr,
                  BG: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr):
    """Softmax attention of the G query heads of (b, g) over slots [s*SPB, s*SPB + SPB): slot i is
    block i below dense_len, else the i-th selected block. NSPLIT == 1 writes o; else the partial
    (unnormalised acc, max, sum) into o_part [B, H, NSPLIT, D], m_part/l_part [B, H, NSPLIT].
    Shared by _attend_kernel and the fast path's _attend_combine_kernel."""
    b = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    s = tl.program_id(2)
    HKV = tl.num_programs(1)
    L = tl.load(lens + b)
    qb = (L - 1) // BS
    dense = L < DENSE_LEN
    h, gm, d, dm = group_heads(g, D, G, BG, BD)
    qt = tl.load(q + b * s_qb + h[:, None] * s_qh + d[None, :], mask=gm[:, None] & dm[None, :], other=0.0)
    m_i = tl.full([BG], float("-inf"), tl.float32)
    l_i = tl.zeros([BG], dtype=tl.float32)
    acc = tl.zeros([BG, BD], dtype=tl.float32)
    n = tl.arange(0, BN)
    kbase = kc + b * s_cb + g * s_ch
    vbase = vc + b * s_cb + g * s_ch
    # No branch on `live`: a dead slot loads nothing (masked) and leaves m/l/acc unchanged (its scores are
    # -inf; for L = 0 every row is masked too), so the loop has no data-dependent control flow and the
    # pipeliner can prefetch slot i + 1's index and K/V rows while slot i computes.
    for i in range(SPB):
        slot = s * SPB + i
        sv = tl.load(sel + (b * HKV + g) * KSEL + tl.minimum(slot, KSEL - 1))
        sv = tl.where((slot < KSEL) & (L >= DENSE_LEN), sv, -1)
        blk = tl.where(dense, slot, sv)
        live = (blk >= 0) & (blk <= qb) & (slot < NSLOT) & (L > 0)
        # a dead slot points at block qb + 1, whose rows all lie at or past L: fully masked
        pos = tl.where(live, blk, qb + 1).to(tl.int64) * BS + n
        pm = (n < BS) & (pos < L)
        k = tl.load(kbase + pos[:, None] * s_ct + d[None, :], mask=pm[:, None] & dm[None, :], other=0.0)
        v = tl.load(vbase + pos[:, None] * s_ct + d[None, :], mask=pm[:, None] & dm[None, :], other=0.0)
        m_i, l_i, acc = online_softmax_step(qt, k, v, pm, m_i, l_i, acc, scale, IEEE)
    if NSPLIT == 1:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(o + b * s_ob + h[:, None] * s_oh + d[None, :], out.to(o.dtype.element_ty),
                 mask=gm[:, None] & dm[None, :])
    else:
        r = (b * (G * HKV) + h) * NSPLIT + s
        tl.store(o_part + r[:, None] * D + d[None, :], acc, mask=gm[:, None] & dm[None, :])
        tl.store(m_part + r, m_i, mask=gm)
        tl.store(l_part + r, l_i, mask=gm)


@triton.jit
def _attend_kernel(q, kc, vc, lens, sel, o, o_part, m_part, l_part,
                   s_qb, s_qh, s_cb, s_ct, s_ch, s_ob, s_oh,
                   scale, D, DENSE_LEN, NSLOT, SPB,
                   G: tl.constexpr, BS: tl.constexpr, KSEL: tl.constexpr, NSPLIT: tl.constexpr,
                   BG: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr = False):
    """Split-K attention over the selected blocks (see _attend_split); _combine_kernel merges."""
    pdl_enter(PDL)
    _attend_split(q, kc, vc, lens, sel, o, o_part, m_part, l_part, s_qb, s_qh, s_cb, s_ct, s_ch, s_ob, s_oh,
                  scale, D, DENSE_LEN, NSLOT, SPB, G, BS, KSEL, NSPLIT, BG, BD, BN, IEEE)


@triton.jit
def _combine_kernel(o, o_part, m_part, l_part, s_ob, s_oh, D,
                    NSPLIT: tl.constexpr, NSP: tl.constexpr, BD: tl.constexpr, PDL: tl.constexpr = False):
    pdl_enter(PDL)
    combine_head(o, o_part, m_part, l_part, s_ob, s_oh, D, tl.program_id(0).to(tl.int64), tl.program_id(1),
                 tl.num_programs(1), NSPLIT, NSP, BD, False)


@triton.jit
def combine_head(o, o_part, m_part, l_part, s_ob, s_oh, D, b, h, H,
                 NSPLIT: tl.constexpr, NSP: tl.constexpr, BD: tl.constexpr, L2_ONLY: tl.constexpr):
    """o[b, h] = the merge of the NSPLIT split-K partials of query head h (L2_ONLY as in combined_lse)."""
    combine_head_part(o, o_part, m_part, l_part, s_ob, s_oh, D, b, h, H, 0, NSPLIT, NSP, BD, L2_ONLY)


@triton.jit
def combine_head_part(o, o_part, m_part, l_part, s_ob, s_oh, D, b, h, H, d0,
                      NSPLIT: tl.constexpr, NSP: tl.constexpr, BD: tl.constexpr, L2_ONLY: tl.constexpr):
    """combine_head for the features [d0, d0 + BD) only (the fused step spreads a head over programs)."""
    sp = tl.arange(0, NSP)
    spm = sp < NSPLIT
    d = d0 + tl.arange(0, BD)
    dm = d < D
    r = (b * H + h) * NSPLIT + sp
    m = load_l2(m_part + r, spm, float("-inf"), L2_ONLY)
    l = load_l2(l_part + r, spm, 0.0, L2_ONLY)
    a = load_l2(o_part + r[:, None] * D + d[None, :], spm[:, None] & dm[None, :], 0.0, L2_ONLY)
    M = tl.max(m, axis=0)
    Ms = tl.where(M == float("-inf"), 0.0, M)
    w = tl.exp(m - Ms)
    den = tl.sum(l * w, axis=0)
    out = tl.sum(a * w[:, None], axis=0) / tl.where(den > 0, den, 1.0)
    tl.store(o + b * s_ob + h * s_oh + d, out.to(o.dtype.element_ty), mask=dm)
