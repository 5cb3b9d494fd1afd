"""One-launch sparse decode step for short caches (sparse_decode_fast.FUSED: by default up to 32K tokens on a GPU).

Why: at 32K cached tokens the five launches of sparse_decode_fast take 23 us of kernel time, about 9 us of gaps
between dependent launches and a ramp-up per kernel, for very little work each (H200 run 4: 32.5 us per step
against 22.4 us for SDPA). Every dependency of the step stays inside one (sequence b, KV head g) row: the LSE
partials, the block scores, the selection and the split-K partials of row (b, g) are only read by programs of
the same row. So one launch of NP programs per row can run the whole step with three row barriers:

  phase 1  program p: LSE partials of the C2 keys [s * CH2, s * CH2 + CH2), s = NP - 1 - p (FUSED_LSE_LAST)
           and, when its score range is one sub-tile, the q.C1 products of it         (_range_dots, EARLY)
  -------- row barrier
  phase 2  program p: block scores of the blocks [p * CB, p * CB + CB)   (_range_scores, else score_range)
  -------- row barrier
  phase 3  every program computes the row's whole selection from the block scores (the same bits, the same
           search: the same result in each), keeps the slots [p * SPB, p * SPB + SPB) of it (writes them to
           sel, the op's index output) and attends to those blocks (_attend_tiles, else _attend_split)
  -------- row barrier
  phase 4  program p merges the split-K partials of merge tasks p, p + NP, ...: MC feature chunks of each query
           head of the group (combine_head_part)

Redundant selection instead of a fourth barrier: the programs would otherwise wait for one program to select;
each holds at most FUSED_MAX_BLOCKS int32 scores in registers. (H200 run 6 measured the alternative, each program
ranking its share of the blocks and a fourth barrier: 18.0 vs 16.8 us at 32K; two programs per SM: 19.1 vs 17.5.)
FUSED_LOCAL_EARLY, FUSED_TAGGED and FUSED_CARRY reshape phases 1-3 (see there).

The row barrier (_row_barrier) spins on an int64 counter that only ever grows (one barrier = the NP increments
from a multiple of NP to the next), so nothing resets it and CUDA-graph replays need no host work. A spin
barrier needs every program of a row resident at once: the plan caps the grid at one program per SM
(B * Hkv * NP <= SM count; a program needs far less than an SM) and uses the fused step only then.

The Triton interpreter runs programs one after the other, so it cannot run a spin barrier: there (and with
FUSED_PHASES) the same kernel runs as one launch per phase (PHASE = 1, 2, 3, 5), which tests everything but
the barrier itself (the GPU tests cover that: fused == the phase launches == the reference).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._launch import launch as _launch
from .sparse_decode_kernels import (_attend_split, combine_head_part, combined_lse, forced_blocks, group_heads,
                                    key_head_scores, lse_partial, online_softmax_step)
from . import sparse_decode_fast as FAST
from .sparse_decode_fast import _choose, _row_bits, choose_at, pool_subtile, score_range, search_steps, window_p

# query programs per (b, KV head) row; the plan lowers it to fit one program per SM
FUSED_PROGRAMS = int(os.environ.get("SALA_SPARSE_DECODE_FUSED_PROGRAMS", "64"))
# the largest padded block count of a cache the fused step takes (its selection holds the row's scores in
# registers: 4096 blocks = 256K tokens of 64 = 32 int32 per thread with 4 warps)
FUSED_MAX_BLOCKS = 4096
# The default (SALA_SPARSE_DECODE_FUSED=auto) takes the fused step for caches of up to AUTO_MAX_BLOCKS padded blocks
# when at least AUTO_MIN_PROGRAMS programs per row fit: H200 run 6 call 3 (CUDA graph, us per step), fused vs the
# multi-launch step, B = 1: 32K 22.8 vs 32.0, 64K 30.8 vs 35.3, 128K 40.3 vs 41.4 (run 5 call 6, before the
# int32 sort and the LSE / merge / local changes: 64K 44.2 vs 35.3); B = 8 at 32K (8 programs per row): 63.3 vs
# 55.6 (run 4 call 7)
AUTO_MAX_BLOCKS = 2048
AUTO_MIN_PROGRAMS = 32
# run the phases as separate launches even on a GPU (debugging, and the GPU test that compares both)
FUSED_PHASES = os.environ.get("SALA_SPARSE_DECODE_FUSED_PHASES", "0") == "1"
FUSED_WARPS = int(os.environ.get("SALA_SPARSE_DECODE_FUSED_WARPS", "4"))
# software-pipelining stages (num_stages): every loop of the step runs one or two iterations at 32K; call 5 at 32K:
# 18.8 us kernel with 1 stage, 19.8 with 2, 20.6 with 3
FUSED_STAGES = int(os.environ.get("SALA_SPARSE_DECODE_FUSED_STAGES", "1"))
# EARLY: phase 1 also computes the raw q.C1 products of the program's score range (they do not need the LSE), so
# the C1 loads and dots run before barrier 1 and phase 2 is only exp, pooling and the stores (when each program's
# range is one sub-tile: up to NP * 16 blocks, 64K tokens at 64 programs). H200 run 5 call 3 at 32K: the score
# phase took 5.0 us after barrier 1 (median of the active programs), the LSE phase 1.0.
FUSED_EARLY = os.environ.get("SALA_SPARSE_DECODE_FUSED_EARLY", "1") == "1"
# how each program finds the row's top-k: "bisect" (the threshold search of sparse_decode_fast, 14 block-wide
# reductions: 7.8 us at 32K in call 3) or "sort" (a bitonic sort of the int32 score bits, the n_sel-th as the
# threshold, ties at it resolved as in bisect); "auto": sort up to SORT_MAX_BLOCKS padded blocks, else bisect.
# H200 run 5: a sort of unique (bits, -block) int64 keys took 5.1 us at 32K (call 4) and 38 us at 128K, where
# bisect takes 14.7; the int32 sort replaced it (call 7 at 32K: kernel 17.8 us vs 18.75, graph step 24.1 vs 24.8)
FUSED_SELECT = os.environ.get("SALA_SPARSE_DECODE_FUSED_SELECT", "auto")
if FUSED_SELECT not in ("bisect", "sort", "auto"):
    raise ValueError(f"sparse_decode: SALA_SPARSE_DECODE_FUSED_SELECT must be bisect, sort or auto, got {FUSED_SELECT!r}")
# the LSE partials of phase 1 go to the programs counted from the last one: at 32K the C2 keys fill the first 32
# of 64 programs' LSE chunks and the score ranges the first 32 programs too, so without this half the programs
# do both phase-1 jobs one after the other and half do nothing (H200 run 5 call 6: phase 1 median 2.5 us, max 4.2)
FUSED_LSE_LAST = os.environ.get("SALA_SPARSE_DECODE_FUSED_LSE_LAST", "1") == "1"
SORT_MAX_BLOCKS = 1024
# merge chunks per query head (0: as many as the programs allow, NP // G, up to BD // 16): H200 run 6 call 1 at
# 32K, one head per program (16 of 64 programs): merge phase max 1.86 us
FUSED_MERGE_CHUNKS = int(os.environ.get("SALA_SPARSE_DECODE_FUSED_MERGE_CHUNKS", "0"))
# LOCAL: the local window's blocks are chosen in every step (forced, +inf scores; all forced blocks fit in n_sel
# when init_blocks < topk) and come last in ascending block order, so they need no selection: the programs
# without a score range attend to one of them each in phase 2 (otherwise idle), keep the online-softmax state
# in registers, and after the selection every program takes ~one of the remaining blocks (n_sel - E of them)
# instead of two. The phase launches (interpreter) run that block at the start of phase 3 instead.
FUSED_LOCAL_EARLY = os.environ.get("SALA_SPARSE_DECODE_FUSED_LOCAL_EARLY", "1") == "1"
# TAGGED: no barrier 2. The block scores go out as int64 words (score bits | step tag << 32, the tag = the
# row's barrier counter // its increments per step, the same in every program of the step) and the selection
# re-reads the row's words until every valid one carries this step's tag: a program's score stores need no
# release fence + counter atomic + polling round trip before the selection can load them (H200 run 6 call 4 at
# 32K: barrier 2 ~1.2 us, then the select's load of the scores). EARLY score ranges only.
FUSED_TAGGED = os.environ.get("SALA_SPARSE_DECODE_FUSED_TAGGED", "1") == "1"
# CARRY: with TAG, a score range's first block takes the max P of the E windows before it (the last windows of the
# range before) from the program of that range, as a tagged int64 word in bcarry that the selection folds in,
# instead of loading those windows again and running two more q.C1 dots for them (64 rows for E = 1 valid:
# H200 run 7 calls 6-7, same process, 32K: kernel 15.6-15.8 us with CARRY vs 16.5-16.6 without)
FUSED_CARRY = os.environ.get("SALA_SPARSE_DECODE_FUSED_CARRY", "1") == "1"
# _row_bits_tagged's bound on re-reads (~1 us each; a jit function reads only constexpr globals)
_TAG_SPIN = tl.constexpr(1 << 22)
# keys per attention step (FUSED_ATTEND_TILE // block_size blocks as one tile; 0, one block, or a block size that
# is not a power of two: _attend_split's loop)
FUSED_ATTEND_TILE = int(os.environ.get("SALA_SPARSE_DECODE_FUSED_ATTEND_TILE", "128"))


@triton.jit
def _row_barrier(cnt, NP):
    """Every one of the NP programs of a row arrives here before any leaves. The counter is int64 and only
    grows: this barrier is the NP increments from old - old % NP to the next multiple of NP. The program's
    global stores before it are visible to the row's loads after it that bypass L1 (.cg): bar.sync orders the
    program's threads around thread 0's release / acquire atomics (the cooperative-groups grid sync pattern)."""
    tl.debug_barrier()
    old = tl.atomic_add(cnt, 1, sem="acq_rel", scope="gpu")
    target = old - old % NP + NP
    cur = old + 1
    while cur < target:
        cur = tl.atomic_add(cnt, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _stamp(tbuf, i: tl.constexpr, TIMES: tl.constexpr):
    """TIMES (bench/diag_decode_fused.py): tbuf[i] = this SM's cycle counter (%clock64), or for i = 0 and 9
    %globaltimer (ns, to convert cycles to time)."""
    if TIMES:
        if (i == 0) | (i == 9):
            t = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,l", [tbuf.to(tl.int64, bitcast=True)],
                                          dtype=tl.int64, is_pure=False, pack=1)
        else:
            t = tl.inline_asm_elementwise("mov.u64 $0, %clock64;", "=l,l", [tbuf.to(tl.int64, bitcast=True)],
                                          dtype=tl.int64, is_pure=False, pack=1)
        tl.store(tbuf + i, t)


@triton.jit
def _fused_step_kernel(q, c1, c2, kc, vc, lens, m2, l2, bscore, bcarry, sel, o, o_part, m_part, l_part, cnt, tbuf,
                       s_qb, s_qh, s_1b, s_1t, s_1h, s_2b, s_2t, s_2h, s_cb, s_ct, s_ch, s_ob, s_oh,
                       scale, D, DENSE_LEN, NBMAX, CH2, NSLOT, SPB, NR,
                       G: tl.constexpr, KS: tl.constexpr, ST: tl.constexpr, BS: tl.constexpr,
                       KS2: tl.constexpr, ST2: tl.constexpr, INIT: tl.constexpr, WB: tl.constexpr,
                       R: tl.constexpr, E: tl.constexpr, SB: tl.constexpr, NSUB: tl.constexpr,
                       KSEL: tl.constexpr, KSP: tl.constexpr, NBP: tl.constexpr, NP: tl.constexpr, NSP: tl.constexpr,
                       BG: tl.constexpr, BD: tl.constexpr, BJ: tl.constexpr, BN: tl.constexpr,
                       PREC: tl.constexpr, KEYS_M: tl.constexpr, IEEE: tl.constexpr, K: tl.constexpr,
                       NIT: tl.constexpr, PHASE: tl.constexpr, EARLY: tl.constexpr, SORT: tl.constexpr, TB: tl.constexpr,
                       LSE_LAST: tl.constexpr, MC: tl.constexpr, LOCAL: tl.constexpr, CB: tl.constexpr,
                       TAG: tl.constexpr, NBAR: tl.constexpr, CARRY: tl.constexpr, TIMES: tl.constexpr = False):
    """Grid (B, Hkv, NP). PHASE 0: the whole step with row barriers; PHASE 1, 2, 3, 5: that phase only (3 = select
    and attend, 5 = merge). TIMES: stamps at the phase boundaries into tbuf [B * Hkv, NP, 16] (int64)."""
    b = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    p = tl.program_id(2)
    HKV = tl.num_programs(1)
    row = b * HKV + g
    tb = tbuf + (row * NP + p) * 16
    # LOCAL: the online-softmax state of the early local block, carried from phase 2 to the attention
    m_e = tl.full([BG], float("-inf"), tl.float32)
    l_e = tl.zeros([BG], dtype=tl.float32)
    acc_e = tl.zeros([BG, BD], dtype=tl.float32)
    gen = 0
    if TAG:  # this step's tag: every program reads the counter before the step's last barrier can complete
        gen = (tl.atomic_add(cnt + row, 0, sem="relaxed", scope="gpu") // (NBAR * NP)) & 0x7FFFFFFF
    _stamp(tb, 0, TIMES)
    _stamp(tb, 1, TIMES)
    if EARLY:  # in PHASE 0 before barrier 1; the PHASE 2 launch recomputes them
        if (PHASE == 0) | (PHASE == 2):
            scp, jpm, scc, jcm = _range_dots(q, c1, lens, b, g, p * SB, s_qb, s_qh, s_1b, s_1t, s_1h, scale, D,
                                             DENSE_LEN, G, KS, ST, BS, R, E, SB, BG, BD, PREC, KEYS_M, CARRY)
    if (PHASE == 0) | (PHASE == 1):
        lse_partial(q, c2, lens, m2, l2, b, g, NP - 1 - p if LSE_LAST else p, HKV, s_qb, s_qh, s_2b, s_2t, s_2h,
                    scale, D, DENSE_LEN, CH2, G, KS2, ST2, NP, BG, BD, BJ, PREC, KEYS_M)
    _stamp(tb, 2, TIMES)
    if PHASE == 0:
        _row_barrier(cnt + row, NP)
    _stamp(tb, 3, TIMES)
    if (PHASE == 0) | (PHASE == 2):
        if EARLY:
            _range_scores(scp, jpm, scc, jcm, lens, m2, l2, bscore, bcarry, NR, b, g, p * SB, HKV, D, DENSE_LEN,
                          NBMAX, G, BS, NP, NSP, R, E, SB, BG, BD, TAG, CARRY, gen)
        else:
            score_range(q, c1, lens, m2, l2, bscore, b, g, p, HKV, s_qb, s_qh, s_1b, s_1t, s_1h, scale, D, DENSE_LEN,
                        NBMAX, G, KS, ST, BS, NP, NSP, R, E, SB, NSUB, BG, BD, PREC, KEYS_M, True)
    if LOCAL & (PHASE == 0):
        m_e, l_e, acc_e = _attend_local_early(q, kc, vc, lens, b, g, p, s_qb, s_qh, s_cb, s_ct, s_ch, scale, D,
                                              DENSE_LEN, m_e, l_e, acc_e, G, BS, INIT, WB, KSEL, NP, CB, BG, BD, IEEE)
    _stamp(tb, 4, TIMES)
    if (PHASE == 0) & (not TAG):
        _row_barrier(cnt + row, NP)
    _stamp(tb, 5, TIMES)
    if LOCAL:
        if (PHASE == 0) | (PHASE == 3):
            if PHASE == 3:  # the phase launches: the early block here (its state cannot cross launches)
                m_e, l_e, acc_e = _attend_local_early(q, kc, vc, lens, b, g, p, s_qb, s_qh, s_cb, s_ct, s_ch, scale, D,
                                                      DENSE_LEN, m_e, l_e, acc_e, G, BS, INIT, WB, KSEL, NP, CB, BG,
                                                      BD, IEEE)
            _select_slots(bscore, bcarry, NR, lens, sel, b, row, p * SPB, SPB, DENSE_LEN, NBMAX, BS, INIT, WB, KSEL,
                          KSP, NBP, K, NIT, SORT, LOCAL, p, NP, CB, TAG, CARRY, SB, gen)
            _stamp(tb, 6, TIMES)
            tl.debug_barrier()  # this program's sel stores, then its own reads of them in _attend_list
            _attend_list(q, kc, vc, lens, sel, o_part, m_part, l_part, b, g, p, HKV, s_qb, s_qh, s_cb, s_ct, s_ch,
                         scale, D, DENSE_LEN, NSLOT, SPB, m_e, l_e, acc_e, G, BS, INIT, WB, KSEL, NP, CB, BG, BD, TB,
                         IEEE)
    elif (PHASE == 0) | (PHASE == 3):
        _select_slots(bscore, bcarry, NR, lens, sel, b, row, p * SPB, SPB, DENSE_LEN, NBMAX, BS, INIT, WB, KSEL, KSP,
                      NBP, K, NIT, SORT, False, p, NP, CB, TAG, CARRY, SB, gen)
        _stamp(tb, 6, TIMES)
        tl.debug_barrier()  # this program's sel stores, then its own reads of them in _attend_split
        if TB > 1:
            _attend_tiles(q, kc, vc, lens, sel, o_part, m_part, l_part, b, g, p, HKV, s_qb, s_qh, s_cb, s_ct, s_ch,
                          scale, D, DENSE_LEN, NSLOT, SPB, G, BS, KSEL, NP, BG, BD, TB, IEEE)
        else:
            _attend_split(q, kc, vc, lens, sel, o, o_part, m_part, l_part, s_qb, s_qh, s_cb, s_ct, s_ch, s_ob, s_oh,
                          scale, D, DENSE_LEN, NSLOT, SPB, G, BS, KSEL, NP, BG, BD, BN, IEEE)
    _stamp(tb, 7, TIMES)
    if PHASE == 0:
        _row_barrier(cnt + row, NP)
    _stamp(tb, 8, TIMES)
    if (PHASE == 0) | (PHASE == 5):
        for t in range(p, G * MC, NP):  # merge task t: query head t // MC, features (t % MC) * BD // MC ...
            combine_head_part(o, o_part, m_part, l_part, s_ob, s_oh, D, b, g * G + t // MC, G * HKV, (t % MC) * (BD // MC),
                              NP, NSP, BD // MC, True)
    if PHASE == 5:  # the phase launches advance the row's counter as the one launch's barriers do (TAG's step tags)
        if p == NP - 1:
            tl.atomic_add(cnt + row, NBAR * NP, sem="relaxed", scope="gpu")
    _stamp(tb, 10, TIMES)
    _stamp(tb, 9, TIMES)


@triton.jit
def _range_dots(q, c1, lens, b, g, b0, s_qb, s_qh, s_1b, s_1t, s_1h, scale, D, DENSE_LEN,
                G: tl.constexpr, KS: tl.constexpr, ST: tl.constexpr, BS: tl.constexpr, R: tl.constexpr,
                E: tl.constexpr, SB: tl.constexpr, BG: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr,
                KEYS_M: tl.constexpr, CARRY: tl.constexpr):
    """EARLY: the q.C1 * scale products of the one-sub-tile range starting at block b0, as score_range computes
    them (the same dots, the same layouts: bit-identical P): the E windows of block b0 - 1 (scp, valid jpm) and the
    SB * R windows starting in the range (scc, valid jcm). All masks are off for a dense row or a range past the
    query's block (nothing loaded). CARRY: no E windows (the range before computes them: _range_scores), scp is 0."""
    L = tl.load(lens + b)
    qb = (L - 1) // BS
    n1 = tl.where(L >= KS, tl.maximum(L - KS, 0) // ST + 1, 0)
    n1 = tl.where((L >= DENSE_LEN) & (b0 <= qb), n1, 0)  # no window of a dense row / a range past the query
    h, gm, d, dm = group_heads(g, D, G, BG, BD)
    qt = tl.load(q + b * s_qb + h[:, None] * s_qh + d[None, :], mask=gm[:, None] & dm[None, :],
                 other=0.0).to(tl.float32)
    base = c1 + b * s_1b + g * s_1h
    wi = tl.arange(0, SB * R)
    jp = (b0 - SB) * R + wi
    jpm = (jp >= b0 * R - E) & (jp >= 0) & (jp < n1)
    jc = b0 * R + wi
    jcm = jc < n1
    if CARRY:
        scp = tl.zeros([SB * R, BG], dtype=tl.float32)
        jpm = jpm & False
    else:
        kp = tl.load(base + jp.to(tl.int64)[:, None] * s_1t + d[None, :], mask=jpm[:, None] & dm[None, :], other=0.0)
        scp = key_head_scores(qt, kp, PREC, KEYS_M) * scale  # [SB * R, BG]
    kc = tl.load(base + jc.to(tl.int64)[:, None] * s_1t + d[None, :], mask=jcm[:, None] & dm[None, :], other=0.0)
    scc = key_head_scores(qt, kc, PREC, KEYS_M) * scale
    return scp, jpm, scc, jcm


@triton.jit
def _range_scores(scp, jpm, scc, jcm, lens, m_in, l_in, bscore, bcarry, NR, b, g, b0, HKV, D, DENSE_LEN, NBMAX,
                  G: tl.constexpr, BS: tl.constexpr, S2: tl.constexpr, S2P: tl.constexpr, R: tl.constexpr,
                  E: tl.constexpr, SB: tl.constexpr, BG: tl.constexpr, BD: tl.constexpr, TAG: tl.constexpr,
                  CARRY: tl.constexpr, gen):
    """EARLY: the block scores of the range from _range_dots' products and the combined LSE (score_range's
    arithmetic, split around barrier 1). TAG: as int64 words, score bits | gen << 32 (_row_bits_tagged). CARRY:
    the range's first block without the E windows before it; the max P of this range's last E windows goes to
    bcarry[row, range + 1] as a tagged word, for the next range's first block (max is exact in any order)."""
    L = tl.load(lens + b)
    qb = (L - 1) // BS
    if (L >= DENSE_LEN) & (b0 <= qb):
        h, gm, d, dm = group_heads(g, D, G, BG, BD)
        lse = combined_lse(m_in, l_in, b, h, gm, G, HKV, S2, S2P, True)
        if CARRY:
            carry = 0.0
        else:
            carry = tl.max(window_p(scp, lse, jpm, gm), axis=0)
        score, carry = pool_subtile(window_p(scc, lse, jcm, gm), carry, R, E, SB)
        bb = b0 + tl.arange(0, SB)
        if TAG:
            word = (score.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF) | (gen.to(tl.int64) << 32)
            tl.store(bscore + (b * HKV + g) * NBMAX + bb, word, mask=(bb <= qb) & (bb < NBMAX))
            if CARRY:
                if b0 + SB <= qb:  # the next range's first block exists (and so that program reads this word)
                    cword = (carry.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF) | (gen.to(tl.int64) << 32)
                    tl.store(bcarry + (b * HKV + g) * NR + b0 // SB + 1, cword)
        else:
            tl.store(bscore + (b * HKV + g) * NBMAX + bb, score, mask=(bb <= qb) & (bb < NBMAX))


@triton.jit
def _attend_tiles(q, kc, vc, lens, sel, o_part, m_part, l_part, b, g, s, HKV, s_qb, s_qh, s_cb, s_ct, s_ch,
                  scale, D, DENSE_LEN, NSLOT, SPB,
                  G: tl.constexpr, BS: tl.constexpr, KSEL: tl.constexpr, NSPLIT: tl.constexpr, BG: tl.constexpr,
                  BD: tl.constexpr, TB: tl.constexpr, IEEE: tl.constexpr):
    """_attend_split's partial over slots [s * SPB, s * SPB + SPB) (same slot rule, same outputs: the unnormalised
    acc, max and sum of split s), TB blocks per step as ONE tile of TB * BS keys: with 2 blocks per program (32K
    tokens, 64 programs) that is one dependent load-dot-softmax-dot chain instead of two."""
    L = tl.load(lens + b)
    _attend_share(q, kc, vc, sel, o_part, m_part, l_part, b, g, s, HKV, s_qb, s_qh, s_cb, s_ct, s_ch, scale, D,
                  DENSE_LEN, L, SPB, NSLOT, KSEL, 0, tl.full([BG], float("-inf"), tl.float32),
                  tl.zeros([BG], dtype=tl.float32), tl.zeros([BG, BD], dtype=tl.float32), G, BS, KSEL, NSPLIT, BG,
                  BD, TB, IEEE)


@triton.jit
def _attend_share(q, kc, vc, sel, o_part, m_part, l_part, b, g, s, HKV, s_qb, s_qh, s_cb, s_ct, s_ch, scale, D,
                  DENSE_LEN, L, spb, nlist, A, E, m_i, l_i, acc,
                  G: tl.constexpr, BS: tl.constexpr, KSEL: tl.constexpr, NSPLIT: tl.constexpr, BG: tl.constexpr,
                  BD: tl.constexpr, TB: tl.constexpr, IEEE: tl.constexpr):
    """The attention of _attend_tiles and _attend_list: split s takes the list indices [s * spb, s * spb + spb)
    (of nlist), TB blocks per step as one tile, from the state (m_i, l_i, acc); list index li is the block at
    sel position li, or li + E from A on (E early blocks skipped), or block li itself in a dense row. Stores the
    partial of split s."""
    qb = (L - 1) // BS
    h, gm, d, dm = group_heads(g, D, G, BG, BD)
    qt = tl.load(q + b * s_qb + h[:, None] * s_qh + d[None, :], mask=gm[:, None] & dm[None, :], other=0.0)
    n = tl.arange(0, TB * BS)
    kbase = kc + b * s_cb + g * s_ch
    vbase = vc + b * s_cb + g * s_ch
    for t0 in range(0, spb, TB):
        ti = t0 + n // BS                     # the key's offset within the split's share
        li = s * spb + ti                     # its list index
        Lv = li * 0 + L  # L as a tensor: the interpreter rejects masks built from a bool scalar & a bool tensor
        at = tl.where(li < A, li, li + E)     # its sel position
        sv = tl.load(sel + (b * HKV + g) * KSEL + tl.minimum(at, KSEL - 1), mask=(at < KSEL) & (Lv >= DENSE_LEN),
                     other=-1)
        blk = tl.where(Lv < DENSE_LEN, li, sv)
        live = (blk >= 0) & (blk <= qb) & (li < nlist) & (ti < spb) & (Lv > 0)
        pos = tl.where(live, blk, qb + 1).to(tl.int64) * BS + n % BS
        pm = live & (pos < L)
        k = tl.load(kbase + pos[:, None] * s_ct + d[None, :], mask=pm[:, None] & dm[None, :], other=0.0)
        v = tl.load(vbase + pos[:, None] * s_ct + d[None, :], mask=pm[:, None] & dm[None, :], other=0.0)
        m_i, l_i, acc = online_softmax_step(qt, k, v, pm, m_i, l_i, acc, scale, IEEE)
    r = (b * (G * HKV) + h) * NSPLIT + s
    tl.store(o_part + r[:, None] * D + d[None, :], acc, mask=gm[:, None] & dm[None, :])
    tl.store(m_part + r, m_i, mask=gm)
    tl.store(l_part + r, l_i, mask=gm)


@triton.jit
def _select_slots(bscore, bcarry, NR, lens, sel, b, row, s_lo, SPB, DENSE_LEN, NBMAX,
                  BS: tl.constexpr, INIT: tl.constexpr, WB: tl.constexpr, KSEL: tl.constexpr, KSP: tl.constexpr,
                  NBP: tl.constexpr, K: tl.constexpr, NIT: tl.constexpr, SORT: tl.constexpr,
                  LOCAL: tl.constexpr, p, NP: tl.constexpr, CB: tl.constexpr, TAG: tl.constexpr,
                  CARRY: tl.constexpr, SB: tl.constexpr, gen):
    """Slots [s_lo, s_lo + SPB) of row's selection into sel: the blocks ranked s_lo.. among the n_sel chosen
    (ascending block order, as the one-level select stores them), -1 past n_sel; -1 below dense_len (the
    attention then takes every block). The whole row's selection is computed to know those ranks. LOCAL: also
    the positions of program p's attention list (_local_split), which _attend_list reads back."""
    L = tl.load(lens + b)
    qb = tl.maximum(L - 1, 0) // BS
    ki = tl.arange(0, KSP)
    mine = (ki >= s_lo) & (ki < s_lo + SPB) & (ki < KSEL)
    if L >= DENSE_LEN:
        # LOCAL: a program past the output slots (s_lo >= KSEL) may still hold attention-list blocks, which it
        # reads back from its own sel stores (H200 run 6 call 3: skipping them read the previous step's sel)
        if (s_lo < KSEL) | LOCAL:
            n_sel = tl.minimum(qb + 1, KSEL)
            bb = tl.arange(0, NBP)
            if TAG:
                bits, valid = _row_bits_tagged(bscore, bcarry, NR, row, bb, qb, NBMAX, INIT, WB, CARRY, SB, gen)
            else:
                bits, valid = _row_bits(bscore, row, bb, qb, NBMAX, INIT, WB)
            if SORT:
                # the n_sel-th largest score bits by a sort of the int32 bits themselves (n_sel <= the valid count
                # qb + 1; invalid entries are -1), ties at it to the lowest blocks as the bisect path does
                chosen, pos = choose_at(bits, n_sel, tl.max(tl.where(bb == n_sel - 1, tl.sort(bits, descending=True),
                                                                     -1), axis=0))
            else:
                chosen, pos = _choose(bits, n_sel, K, NIT)
            keep = (pos >= s_lo) & (pos < s_lo + SPB)
            if LOCAL:
                _, E, A, spb, _ = _local_split(L, p, BS, INIT, WB, KSEL, NP, CB)
                li = tl.where(pos < A, pos, pos - E)  # list index of a chosen position; the early blocks: < 0 ..
                li = tl.where((pos >= A) & (pos < A + E), -1, li)
                keep = keep | ((li >= p * spb) & (li < p * spb + spb))
            tl.store(sel + row * KSEL + pos, bb, mask=chosen & keep)
            tl.store(sel + row * KSEL + ki, tl.full([KSP], -1, tl.int32), mask=mine & (ki >= n_sel))
    else:
        tl.store(sel + row * KSEL + ki, tl.full([KSP], -1, tl.int32), mask=mine)


@triton.jit
def _row_bits_tagged(bscore, bcarry, NR, row, bb, qb, NBMAX, INIT: tl.constexpr, WB: tl.constexpr,
                     CARRY: tl.constexpr, SB: tl.constexpr, gen):
    """_row_bits from TAG words: re-read (volatile loads: strong, served where other SMs' stores land) until
    every valid word carries tag gen, so the selection sees this step's scores, written by other programs
    without a barrier between. A bounded wait (_TAG_SPIN reads): never hang the GPU. CARRY: the first block of
    each score range but the first also waits for its carry word and takes the max of the two (P >= 0: the
    int32 bits order as the floats)."""
    valid = (bb <= qb) & (bb < NBMAX)
    ptr = bscore + row * NBMAX + bb
    cm = valid & (bb % SB == 0) & (bb > 0) & CARRY
    cptr = bcarry + row * NR + bb // SB
    w = tl.load(ptr, mask=valid, other=0, volatile=True)
    cw = tl.load(cptr, mask=cm, other=0, volatile=True)
    pending = tl.sum(tl.where((valid & ((w >> 32) != gen)) | (cm & ((cw >> 32) != gen)), 1, 0), axis=0)
    it = 0
    while (pending > 0) & (it < _TAG_SPIN):
        w = tl.load(ptr, mask=valid, other=0, volatile=True)
        cw = tl.load(cptr, mask=cm, other=0, volatile=True)
        pending = tl.sum(tl.where((valid & ((w >> 32) != gen)) | (cm & ((cw >> 32) != gen)), 1, 0), axis=0)
        it += 1
    sc = tl.maximum((w & 0xFFFFFFFF).to(tl.int32), tl.where(cm, (cw & 0xFFFFFFFF).to(tl.int32), 0))
    sc = tl.where(forced_blocks(bb, qb, INIT, WB), 0x7F800000, sc)  # +inf bits, as _row_bits
    return tl.where(valid, sc, -1), valid


@triton.jit
def _local_split(L, p, BS: tl.constexpr, INIT: tl.constexpr, WB: tl.constexpr, KSEL: tl.constexpr,
                 NP: tl.constexpr, CB: tl.constexpr):
    """LOCAL, a sparse row of L tokens: n_sel; E, the local-window blocks attended early (one per program
    without a score range: programs nsr .. nsr + E - 1 take blocks local_lo .. local_lo + E - 1); A, the sel
    position of the first local block (every chosen block below local_lo comes first); and the attention list
    of the other n_sel - E chosen blocks (sel positions [0, A) then [A + E, n_sel)), spb of them per program."""
    qb = tl.maximum(L - 1, 0) // BS
    n_sel = tl.minimum(qb + 1, KSEL)
    local_lo = tl.maximum(qb - WB, INIT)
    nl = tl.maximum(qb - local_lo + 1, 0)
    nsr = qb // CB + 1  # programs with a score range
    E = tl.maximum(tl.minimum(nl, NP - nsr), 0)
    A = n_sel - nl
    nlist = n_sel - E
    spb = (nlist + NP - 1) // NP
    return n_sel, E, A, spb, nlist


@triton.jit
def _attend_local_early(q, kc, vc, lens, b, g, p, s_qb, s_qh, s_cb, s_ct, s_ch, scale, D, DENSE_LEN, m_i, l_i, acc,
                        G: tl.constexpr, BS: tl.constexpr, INIT: tl.constexpr, WB: tl.constexpr, KSEL: tl.constexpr,
                        NP: tl.constexpr, CB: tl.constexpr, BG: tl.constexpr, BD: tl.constexpr, IEEE: tl.constexpr):
    """LOCAL: program p's early local-window block (if it has one, _local_split) folded into the state."""
    L = tl.load(lens + b)
    if L >= DENSE_LEN:
        qb = tl.maximum(L - 1, 0) // BS
        _, E, _, _, _ = _local_split(L, p, BS, INIT, WB, KSEL, NP, CB)
        j = p - (qb // CB + 1)
        if (j >= 0) & (j < E):
            h, gm, d, dm = group_heads(g, D, G, BG, BD)
            qt = tl.load(q + b * s_qb + h[:, None] * s_qh + d[None, :], mask=gm[:, None] & dm[None, :], other=0.0)
            pos = (tl.maximum(qb - WB, INIT) + j).to(tl.int64) * BS + tl.arange(0, BS)
            pm = pos < L
            base = b * s_cb + g * s_ch + pos[:, None] * s_ct + d[None, :]
            k = tl.load(kc + base, mask=pm[:, None] & dm[None, :], other=0.0)
            v = tl.load(vc + base, mask=pm[:, None] & dm[None, :], other=0.0)
            m_i, l_i, acc = online_softmax_step(qt, k, v, pm, m_i, l_i, acc, scale, IEEE)
    return m_i, l_i, acc


@triton.jit
def _attend_list(q, kc, vc, lens, sel, o_part, m_part, l_part, b, g, s, HKV, s_qb, s_qh, s_cb, s_ct, s_ch,
                 scale, D, DENSE_LEN, NSLOT, SPB, m_i, l_i, acc,
                 G: tl.constexpr, BS: tl.constexpr, INIT: tl.constexpr, WB: tl.constexpr, KSEL: tl.constexpr,
                 NSPLIT: tl.constexpr, CB: tl.constexpr, BG: tl.constexpr, BD: tl.constexpr, TB: tl.constexpr,
                 IEEE: tl.constexpr):
    """LOCAL: _attend_share over program s's share of the attention list (_local_split; a dense row: slots
    [s * SPB, s * SPB + SPB) of every block, as _attend_tiles), continuing the early block's state."""
    L = tl.load(lens + b)
    _, E, A, spb, nlist = _local_split(L, s, BS, INIT, WB, KSEL, NSPLIT, CB)
    dense = L < DENSE_LEN
    _attend_share(q, kc, vc, sel, o_part, m_part, l_part, b, g, s, HKV, s_qb, s_qh, s_cb, s_ct, s_ch, scale, D,
                  DENSE_LEN, L, tl.where(dense, SPB, spb), tl.where(dense, NSLOT, nlist), A, E, m_i, l_i, acc,
                  G, BS, KSEL, NSPLIT, BG, BD, TB, IEEE)


# ---------------------------------------------------------------------- host side
def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def plan(cache, H: int, auto: bool = False):
    """The fused step's workspace and launch constants for this cache and H query heads, or None when the
    fused step does not apply: more than FUSED_MAX_BLOCKS padded blocks or fewer than 2 programs per row fit one
    per SM; with auto (the default mode) more than AUTO_MAX_BLOCKS or fewer than AUTO_MIN_PROGRAMS. Built once
    per (cache, H, knobs), kept in cache._ws."""
    key = ("fused", H, auto, FUSED_PROGRAMS, FUSED_EARLY, FUSED_SELECT, FUSED_ATTEND_TILE, FUSED_WARPS,
           FUSED_STAGES, FUSED_LSE_LAST, FUSED_MERGE_CHUNKS, FUSED_LOCAL_EARLY, FUSED_TAGGED, FUSED_CARRY)
    if key in cache._ws:
        return cache._ws[key]
    cfg = cache.config
    B, Hkv, D = cache.batch_size, cache.num_kv_heads, cache.head_dim
    rows = B * Hkv
    bs, st = cfg.block_size, cfg.kernel_stride
    nb = FAST._cdiv(cache.max_len, bs)
    dev = torch.device(cache.device)
    np_ = FUSED_PROGRAMS
    if dev.type == "cuda" and not _interpreted():
        np_ = min(np_, torch.cuda.get_device_properties(dev).multi_processor_count // rows)
    max_blocks, min_programs = (AUTO_MAX_BLOCKS, AUTO_MIN_PROGRAMS) if auto else (FUSED_MAX_BLOCKS, 2)
    if FAST._pow2(nb) > max_blocks or np_ < min_programs or not FAST.supported(cfg):
        cache._ws[key] = None
        return None
    G = H // Hkv
    R = bs // st
    n2 = max(1, cache.n2_max)
    ch2_raw = FAST._cdiv(n2, np_)
    BJ = min(64, max(16, FAST._pow2(ch2_raw)))
    SB = FAST.sub_tile_blocks(R)
    CB = max(SB, FAST._pow2(FAST._cdiv(nb, np_)))
    nslot = max(cfg.num_selected, FAST._cdiv(cfg.dense_len, bs))
    nbp = FAST._pow2(nb)
    k = 4  # thresholds per bisect step: packed 16-bit counts, fine up to FUSED_MAX_BLOCKS (sparse_decode_fast)
    early = FUSED_EARLY and CB == SB
    pow2_bs = bs & (bs - 1) == 0
    sort = FUSED_SELECT == "sort" or (FUSED_SELECT == "auto" and nbp <= SORT_MAX_BLOCKS)
    spb = FAST._cdiv(nslot, np_)
    # LOCAL needs every forced block chosen (init_blocks + the window's blocks <= n_sel: init_blocks < topk), a
    # power-of-two block (its tiles) and programs without a score range at the cache's full length (else it only
    # costs: H200 run 6 call 5 at 128K, E = 0: 39.3 us per step with LOCAL, 37.9 without)
    e = max(0, min(cfg.window_size // bs + 1, np_ - FAST._cdiv(nb, CB)))
    local = FUSED_LOCAL_EARLY and pow2_bs and cfg.init_blocks < cfg.topk and e > 0
    spb_tile = spb
    if local:  # the attention list's share per program at the cache's full length
        spb_tile = FAST._cdiv(cfg.num_selected - e, np_)
    # _attend_tiles' tile is TB * bs keys: a power of two only when bs is one
    tb = max(1, min(spb_tile, FUSED_ATTEND_TILE // bs)) if pow2_bs else 1
    tag = FUSED_TAGGED and early
    carry = FUSED_CARRY and tag
    nbar = 2 if tag else 3
    nr = FAST._cdiv(nb, SB)  # CARRY words per row, one per score range (words 1.. are written: range r writes r + 1)
    cx = dict(CARRY=carry, EARLY=early, SORT=sort, TB=FAST._pow2(tb) if tb > 1 else 1, LOCAL=local, CB=CB, TAG=tag, NBAR=nbar,
              LSE_LAST=FUSED_LSE_LAST, MC=_merge_chunks(np_, G, max(16, FAST._pow2(D))), G=G, KS=cfg.kernel_size, ST=st, BS=bs,
              KS2=cfg.c2[0], ST2=cfg.c2[1], INIT=cfg.init_blocks,
              WB=cfg.window_size // bs, R=R, E=(cfg.kernel_size - 1) // st, SB=SB, NSUB=CB // SB,
              KSEL=cfg.num_selected, KSP=FAST._pow2(cfg.num_selected), NBP=nbp, NP=np_, NSP=FAST._pow2(np_),
              BG=max(16, FAST._pow2(G)), BD=max(16, FAST._pow2(D)), BJ=BJ, BN=max(16, FAST._pow2(bs)),
              K=k, NIT=search_steps(k), num_warps=FUSED_WARPS, num_stages=FUSED_STAGES)
    f32 = torch.float32
    ws = dict(cx=cx, grid=(B, Hkv, np_), nb=nb, ch2=BJ * FAST._cdiv(ch2_raw, BJ), nslot=nslot, spb=spb,
              m2=torch.empty(B, H, np_, dtype=f32, device=dev), l2=torch.empty(B, H, np_, dtype=f32, device=dev),
              # TAG: int64 words, tag -1 until the first step writes them (a step's tag is >= 0)
              bscore=(torch.full((B, Hkv, nb), -1, dtype=torch.int64, device=dev) if tag
                      else torch.empty(B, Hkv, nb, dtype=f32, device=dev)),
              # CARRY: the E-window carry into each score range's first block, tagged as bscore
              nr=nr, bcarry=torch.full((B, Hkv, nr if carry else 1), -1, dtype=torch.int64, device=dev),
              sel=torch.full((B, Hkv, cfg.num_selected), -1, dtype=torch.int32, device=dev),
              o_part=torch.empty(B, H, np_, D, dtype=f32, device=dev),
              m_part=torch.empty(B, H, np_, dtype=f32, device=dev), l_part=torch.empty(B, H, np_, dtype=f32, device=dev),
              cnt=torch.zeros(rows, dtype=torch.int64, device=dev), memo={}, barriers=nbar,
              tbuf=torch.zeros(rows, np_, 16, dtype=torch.int64, device=dev))
    cache._ws[key] = ws
    return ws


def _merge_chunks(np_: int, G: int, bd: int) -> int:
    """Feature chunks per query head in the merge phase: FUSED_MERGE_CHUNKS, or (0) the largest power of two
    <= NP // G, at most bd // 16 (chunks of 16 features at least)."""
    if FUSED_MERGE_CHUNKS:
        return max(1, min(FAST._pow2(FUSED_MERGE_CHUNKS), bd // 16))
    mc = 1
    while mc * 2 * G <= np_ and mc * 2 <= bd // 16:
        mc *= 2
    return mc


def decode(q, cache, scale, ws, times=False):
    """One decode step in one launch (four under the interpreter or FUSED_PHASES). q [B, H, D] contiguous;
    ws = plan(cache, H); times: stamp the phase boundaries into ws["tbuf"] (compiled GPU runs only). Returns
    (o, sel)."""
    B, H, D = q.shape
    o = torch.empty_like(q)
    c1, c2, kc, lens = cache.c1, cache.c2, cache.k, cache.lengths
    s1, s2, sk = c1.stride(), c2.stride(), kc.stride()
    prec = "tf32x3" if FAST.SCORE_DOT == "split2" and q.dtype == torch.float32 else FAST.SCORE_DOT
    ptrs = (q, c1, c2, kc, cache.v, lens, ws["m2"], ws["l2"], ws["bscore"], ws["bcarry"], ws["sel"], o, ws["o_part"],
            ws["m_part"], ws["l_part"], ws["cnt"], ws["tbuf"])
    scalars = (q.stride(0), q.stride(1), s1[0], s1[1], s1[2], s2[0], s2[1], s2[2], sk[0], sk[1], sk[2],
               o.stride(0), o.stride(1), scale, D, cache.config.dense_len, ws["nb"], ws["ch2"], ws["nslot"], ws["spb"],
               ws["nr"])
    phases = (1, 2, 3, 5) if (FUSED_PHASES or _interpreted() or q.device.type != "cuda") else (0,)
    for phase in phases:
        key = (prec, FAST.KEYS_M, q.dtype == torch.float32, phase, times)
        cx = ws["memo"].get(key)
        if cx is None:
            cx = ws["memo"][key] = dict(ws["cx"], PREC=prec, KEYS_M=FAST.KEYS_M, IEEE=q.dtype == torch.float32,
                                        PHASE=phase, TIMES=times)
        _launch(_fused_step_kernel, ws["grid"], ptrs, scalars, cx)
    return o, ws["sel"]
