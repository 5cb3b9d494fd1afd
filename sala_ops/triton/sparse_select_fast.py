"""Fast InfLLM-V2 block selection for prefill (SALA_SPARSE_SELECT=fast): contiguous C1 tiles, a
reshape max-pool instead of window gathers, and an exact top-k by binary search instead of sorts.

Drop-in for sparse_select.select (same arguments, same output: int32 [Tq, Hkv, width], ascending,
-1 padded, queries below dense_len get every causal block); identical to the reference in fp32,
ties to the lower block index. bench/NOTES_sparse.md ("Fast selection") has the design reasoning.

One persistent kernel, grid = a few programs per SM. Work item = (tile of TQ consecutive query
tokens of one sequence, KV head g), taken round-robin from a list sorted by decreasing key length
(heaviest first, built on the device: no host sync). Per item:
  1. the TQ x G query rows (G heads of the group as MMA rows, padded to GP = pow2(G));
  2. LSE over the visible C2 keys, online (log2 domain), exactly as sparse_select (0 if none);
  3. walk blocks 0 .. qb_last - WB - 1 (later blocks are forced or future for every token of the
     tile) in sub-tiles of SB blocks: ONE contiguous [SB*R, D] C1 tile (the windows that start in
     the sub-tile, R = block_size / kernel_stride), one tl.dot with the windows as MMA rows and the
     (token, head) pairs as columns (the head sum is then mostly in-thread), exp2(s - lse) masked by
     one int32 compare per score (window j visible iff j < the row's count of complete windows),
     summed over the G heads (reshape), reshape [SB, R, TQ] + max for the R windows starting in each
     block. Stored to this program's scratch SCR[pid, 0, TQ, NBP] (fp32, L2-resident;
     n_programs x 2 x TQ x NBP, never T x T/bs), and the max of each block's last E =
     (kernel_size - 1) // kernel_stride windows to SCR[pid, 1]: those windows also intersect the next
     block, and _score_bits folds them in when it reads the scores (no shift across the sub-tile);
  4. barrier, then per TSEL rows: load [TSEL, NBP] scores (own, max the previous block's tail),
     forced = +inf, future = -1 bits, a 31-step binary search for the n_sel-th largest int32 bit
     pattern (scores are >= 0, so int order = float order), choose bits > S plus the lowest-index
     bits == S (cumsum rank), compact ascending with a cumsum, store; -1 padding. No sort anywhere.
Tiles whose last query has qb + 1 <= k_sel select every causal block and skip steps 1-3.

Limits (else sparse_select.select runs): block_size % kernel_stride == 0, R a power of two,
E <= R, and NBP = pow2(ceil(Tk_total / block_size)) <= FAST_CFG["nbp_max"] (4096 by default: 256K keys at
block 64; up to 65536 with SALA_SPARSE_SELECT_MAX_BLOCKS once the chunked search is measured).
Rows of up to nbp_reg = 4096 blocks are searched in registers ([TSEL, NBP], TSEL = sel_elems // NBP rows
at a time; sm_90 with triton 3.6 spills at NBP 8192 with 8 warps); longer rows re-read the scratch in
chunks of nbp_reg blocks at each bisection step.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import sparse_select as S

# tq: query tokens per item (raised to 16 // GP so the MMA has >= 16 rows); sb: blocks per C1 sub-tile
# (raised so SB * R >= 16); sel_elems: [TSEL, NBP] elements the top-k holds at once; nbp_max: above it
# the default kernel runs; programs_per_sm: persistent grid = that x number of SMs.
# nbp_max stays 4096 (256K keys at block 64; longer sequences take the online kernel) until the chunked
# search below has run on a GPU; SALA_SPARSE_SELECT_MAX_BLOCKS=65536 (read at import) lets it take them.
# H200 sweep 2026-12-03 at 128K (bench_sparse.py --select-only --sweep): 4 warps / 3 stages 28.2 ms (255 registers,
# two programs per SM), 8 warps / 2 stages 52.0 (one per SM), 8 warps / 3 stages 44.7, tq 8 + 8 warps + 3 stages 34.1.
FAST_CFG = dict(tq=4, sb=16, sel_elems=8192, nbp_max=int(os.environ.get("SALA_SPARSE_SELECT_MAX_BLOCKS", "4096")),
                nbp_reg=4096, num_warps=4, num_stages=3, programs_per_sm=2, ch=256)
# nbp_reg: rows of at most this many blocks are searched in registers; longer rows (past 256K keys at
# block 64) are searched in chunks of nbp_reg reloaded from the scratch at every bisection step
# (31 x NBP / nbp_reg chunk reads per row: at 1M keys ~4 TB of L2 reads per layer, about a sixth of the
# scoring work there, instead of the online kernel's quadratic merge cost).
INTERPRET_PROGRAMS = 3  # small persistent grid under the interpreter: several items per program


@triton.jit
def _score_bits(rows, cb, walk_end, qb_tok, INIT, WB, TAILS: tl.constexpr, E: tl.constexpr):
    """[TSEL, len(cb)] int32 sort keys of blocks cb from the scratch rows: the score's float bits (scores
    are >= 0, so int order = float order), +inf for the forced blocks (init, local window), -1 for
    blocks after the token's own. A block's score is the max of its own windows' (rows) and of the
    last E windows of the block before it (rows + TAILS): the walk stores the two apart, so that it
    needs no shift across its sub-tile."""
    sc = tl.load(rows + cb[None, :], mask=(cb < walk_end)[None, :], other=0.0, cache_modifier=".cg")
    if E > 0:
        tail = tl.load(rows + TAILS + cb[None, :] - 1, mask=((cb >= 1) & (cb <= walk_end))[None, :], other=0.0,
                       cache_modifier=".cg")
        sc = tl.maximum(sc, tail)
    valid = cb[None, :] <= qb_tok[:, None]
    forced = (cb[None, :] < INIT) | ((cb[None, :] + WB >= qb_tok[:, None]) & valid)
    sc = tl.where(forced, float("inf"), sc)
    return tl.where(valid, sc.to(tl.int32, bitcast=True), -1)


@triton.jit
def _select_fast_kernel(Q, C1, C2, OUT, SCR, order, tile_seq, tile_start, cu_q, cu_k, c1_off, c2_off,
                        nseq, n_items, HKV,
                        sq_t, sq_h, sc1_t, sc1_h, sc2_t, sc2_h, so_t, so_h,
                        qk_scale, D, G, KS1, ST1, KS2, ST2, BS, INIT, WB, KSEL, W, DENSE_LEN,
                        TQ: tl.constexpr, GP: tl.constexpr, ROWS: tl.constexpr, BD: tl.constexpr,
                        SB: tl.constexpr, R: tl.constexpr, E: tl.constexpr, NBP: tl.constexpr,
                        TSEL: tl.constexpr, CH: tl.constexpr, WP: tl.constexpr, BN2: tl.constexpr, PREC: tl.constexpr,
                        SCH: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    scr = SCR + pid.to(tl.int64) * (2 * TQ * NBP)  # own scores, then tails
    r = tl.arange(0, ROWS)
    rm = r // GP
    rh = r % GP
    d = tl.arange(0, BD)
    dm = d < D
    wi = tl.arange(0, SB * R)
    si = tl.arange(0, SB)
    rr = tl.arange(0, R)
    tqi = tl.arange(0, TQ)
    bb = tl.arange(0, SCH)  # the search's blocks: the whole row (SCH == NBP) or one chunk of it
    ts = tl.arange(0, TSEL)
    wc = tl.arange(0, WP)
    ch = tl.arange(0, CH)
    for it in range(pid, n_items, nprog):
        tile = tl.load(order + it // HKV)
        g = it % HKV
        n = tl.load(tile_seq + tile)
        if n < nseq:
            m0 = tl.load(tile_start + tile).to(tl.int64)
            q0, Lq, k0, Lk = S.seq_bounds(cu_q, cu_k, n)
            t_last = Lk - Lq + tl.minimum(m0 + TQ, Lq) - 1
            qb_last = t_last // BS
            # blocks >= qb_last - WB are forced or future for every token of the tile; a tile whose
            # last query keeps every causal block (qb + 1 <= k_sel) or is dense needs no score at all
            need = (t_last + 1 >= DENSE_LEN) & (qb_last + 1 > KSEL)
            walk_end = tl.where(need, tl.maximum(qb_last - WB, 0), 0).to(tl.int32)
            if walk_end > 0:
                rtok = m0 + rm
                rok = (rtok < Lq) & (rh < G)
                t_row = Lk - Lq + rtok
                q = tl.load(Q + (q0 + rtok)[:, None] * sq_t + (g * G + rh)[:, None] * sq_h + d[None, :],
                            mask=rok[:, None] & dm[None, :], other=0.0)
                # ---- LSE over the visible C2 keys (log2 domain), as sparse_select; 0 when none
                c20 = tl.load(c2_off + n).to(tl.int64)
                n2 = tl.load(c2_off + n + 1).to(tl.int64) - c20
                n2v = tl.where(t_last + 1 >= KS2, (t_last + 1 - KS2) // ST2 + 1, 0)
                n2v = tl.minimum(n2v, n2)
                lse = S.c2_lse(q, C2, c20, n2v, sc2_t, sc2_h, g, d, dm, t_row, qk_scale, ROWS, BN2, KS2, ST2, PREC)
                # ---- block scores of blocks 0 .. walk_end - 1, SB at a time, into the scratch rows
                c10 = tl.load(c1_off + n).to(tl.int64)
                n1 = (tl.load(c1_off + n + 1).to(tl.int64) - c10).to(tl.int32)
                base = C1 + c10 * sc1_t + g * sc1_h
                # row visibility as one int32 count: window j is visible to a row iff j < nvis (complete
                # before the row's token, inside the sequence; 0 for padded rows). One compare per score.
                tv = (t_row + 1 - KS1).to(tl.int32)
                nvis = tl.where(rok & (tv >= 0), tv // ST1 + 1, 0)
                qt = tl.trans(q)
                cb = base  # the sub-tile's first window (a pointer stepped by SB * R windows)
                for b0 in range(0, walk_end, SB):
                    j = b0 * R + wi
                    # windows past the sequence's last (j >= n1 > 0: a walk needs > KSEL blocks) are read clamped
                    # to it, with no row predicate on the copies; j < nvis <= n1 gives them weight 0
                    jr = tl.minimum(wi, tl.maximum(n1 - 1 - b0 * R, 0))
                    c = tl.load(cb + (jr[:, None] * sc1_t + d[None, :]), mask=dm[None, :], other=0.0)
                    cb += SB * R * sc1_t
                    # windows as MMA rows, (token, head) as columns: the head sum is then mostly in-thread
                    st = tl.dot(c.to(q.dtype), qt, input_precision=PREC)              # [SB * R, ROWS]
                    p = tl.where(j[:, None] < nvis[None, :], tl.exp2(st * qk_scale - lse[None, :]), 0.0)
                    pj = tl.sum(tl.reshape(p, [SB * R, TQ, GP]), 2)            # summed over the heads
                    p3 = tl.reshape(pj, [SB, R, TQ])
                    bm = (b0 + si < NBP)[:, None]
                    # windows bR .. bR+R-1
                    tl.store(scr + tqi[None, :] * NBP + (b0 + si)[:, None], tl.max(p3, 1), mask=bm)
                    if E > 0:  # its last E windows, which block b + 1 also intersects (folded in by _score_bits)
                        tail = tl.max(tl.where(rr[None, :, None] >= R - E, p3, 0.0), 1)
                        tl.store(scr + TQ * NBP + tqi[None, :] * NBP + (b0 + si)[:, None], tail, mask=bm)
            tl.debug_barrier()
            # ---- exact top-k per token, TSEL rows at a time
            for r0 in tl.static_range(0, TQ, TSEL):
                tm = m0 + r0 + ts
                tok_ok = tm < Lq
                t_tok = Lk - Lq + tm
                qb_tok = t_tok // BS
                dense_tok = t_tok + 1 < DENSE_LEN
                ob = OUT + (q0 + tm)[:, None] * so_t + g * so_h
                tl.store(ob + wc[None, :], tl.where(wc[None, :] <= qb_tok[:, None], wc[None, :], -1).to(tl.int32),
                         mask=(tok_ok & dense_tok)[:, None] & (wc < W)[None, :])
                sp_ok = tok_ok & ~dense_tok
                if Lk - Lq + tl.minimum(m0 + r0 + TSEL, Lq) >= DENSE_LEN:  # some row of the chunk is sparse
                    rows = scr + (r0 + ts)[:, None] * NBP
                    n_sel = tl.minimum(qb_tok + 1, KSEL).to(tl.int32)
                    # S with #(bits > S) + #(ties at S taken lowest index first) = n_sel: the largest S with
                    # #(bits >= S) >= n_sel, by bisection over the int32 bit patterns, ending early for a row
                    # as soon as a probe counts exactly n_sel (hi = lo = that probe: then #(bits > S) or, if
                    # the probe is itself a score, #(bits > S) plus its lowest-index ties is n_sel, the same
                    # choice as the converged search; random scores converge in ~15 probes instead of 31)
                    lo = tl.zeros([TSEL], dtype=tl.int32)
                    hi = tl.full([TSEL], 2139095040, tl.int32)  # +inf
                    if SCH == NBP:  # the whole row in registers
                        bits = _score_bits(rows, bb, walk_end, qb_tok, INIT, WB, TQ * NBP, E)
                        go = True
                        while go:
                            mid = lo + (hi - lo + 1) // 2
                            cnt = tl.sum((bits >= mid[:, None]).to(tl.int32), axis=1)
                            ok = cnt >= n_sel
                            lo = tl.where(ok, mid, lo)
                            hi = tl.where(cnt == n_sel, mid, tl.where(ok, hi, mid - 1))
                            go = tl.max(hi - lo, axis=0) > 0
                        n_gt = tl.sum((bits > lo[:, None]).to(tl.int32), axis=1)
                    else:  # a long row: every count re-reads it from the scratch, SCH blocks at a time
                        go = True
                        while go:
                            mid = lo + (hi - lo + 1) // 2
                            cnt = tl.zeros([TSEL], dtype=tl.int32)
                            for s0 in range(0, qb_last + 1, SCH):
                                bits = _score_bits(rows, s0 + bb, walk_end, qb_tok, INIT, WB, TQ * NBP, E)
                                cnt += tl.sum((bits >= mid[:, None]).to(tl.int32), axis=1)
                            ok = cnt >= n_sel
                            lo = tl.where(ok, mid, lo)
                            hi = tl.where(cnt == n_sel, mid, tl.where(ok, hi, mid - 1))
                            go = tl.max(hi - lo, axis=0) > 0
                        n_gt = tl.zeros([TSEL], dtype=tl.int32)
                        for s0 in range(0, qb_last + 1, SCH):
                            bits = _score_bits(rows, s0 + bb, walk_end, qb_tok, INIT, WB, TQ * NBP, E)
                            n_gt += tl.sum((bits > lo[:, None]).to(tl.int32), axis=1)
                    n_eq = n_sel - n_gt  # how many of the blocks scoring exactly S, lowest index first
                    # compaction in chunks of CH blocks reloaded from the scratch (few registers)
                    eq_run = tl.zeros([TSEL], dtype=tl.int32)
                    out_run = tl.zeros([TSEL], dtype=tl.int32)
                    for c0 in range(0, qb_last + 1, CH):
                        cb = c0 + ch
                        bc = _score_bits(rows, cb, walk_end, qb_tok, INIT, WB, TQ * NBP, E)
                        eq = bc == lo[:, None]
                        rank = eq_run[:, None] + tl.cumsum(eq.to(tl.int32), axis=1)
                        chosen = (bc > lo[:, None]) | (eq & (rank <= n_eq[:, None]))
                        pos = out_run[:, None] + tl.cumsum(chosen.to(tl.int32), axis=1) - 1
                        tl.store(ob + pos, (cb[None, :] + tl.zeros([TSEL, CH], tl.int32)).to(tl.int32),
                                 mask=chosen & sp_ok[:, None])
                        eq_run += tl.sum(eq.to(tl.int32), axis=1)
                        out_run += tl.sum(chosen.to(tl.int32), axis=1)
                    tl.store(ob + wc[None, :], tl.full([TSEL, WP], -1, tl.int32),
                             mask=sp_ok[:, None] & (wc[None, :] >= n_sel[:, None]) & (wc < W)[None, :])
            tl.debug_barrier()


def supported(kernel_size: int, kernel_stride: int, block_size: int) -> bool:
    if block_size % kernel_stride:
        return False
    R, E = block_size // kernel_stride, (kernel_size - 1) // kernel_stride
    return R & (R - 1) == 0 and E <= R


def plan(G: int, nbp: int):
    """(TQ, GP, SB-independent) launch shape for a group of G heads and NBP blocks."""
    GP = S._pow2(G)
    TQ = max(S._pow2(FAST_CFG["tq"]), 16 // GP if GP < 16 else 1)
    TSEL = max(1, min(TQ, FAST_CFG["sel_elems"] // min(nbp, FAST_CFG["nbp_reg"])))
    return TQ, GP, TSEL


def _num_programs(device, n_items: int) -> int:
    if S._interpreted() or device.type != "cuda":
        return max(1, min(n_items, INTERPRET_PROGRAMS))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(n_items, sms * FAST_CFG["programs_per_sm"]))


def select(q: torch.Tensor, k: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor, scale: float,
           kernel_size: int, kernel_stride: int, lse_kernel_size: int, lse_kernel_stride: int,
           block_size: int, init_blocks: int, window_size: int, topk: int, dense_len: int = 0,
           width: int | None = None) -> torch.Tensor:
    """sparse_select.select with the fast kernel (falls back to it outside the limits above)."""
    args = (q, k, cu_q, cu_k, scale, kernel_size, kernel_stride, lse_kernel_size, lse_kernel_stride, block_size,
            init_blocks, window_size, topk, dense_len, width)
    Tq, H, D = q.shape
    Tk, Hkv = k.shape[0], k.shape[1]
    nbp = S._pow2(-(-Tk // block_size), 16)
    if not supported(kernel_size, kernel_stride, block_size) or nbp > FAST_CFG["nbp_max"]:
        return S.select(*args)
    G = H // Hkv
    wb = window_size // block_size
    k_sel = topk + wb
    W = k_sel if width is None else width
    assert W >= k_sel
    nseq = cu_q.numel() - 1
    out = S.empty((Tq, Hkv, W), torch.int32, q.device)
    if Tq == 0:
        return out
    c1, c1_off = S.compress(k, cu_k, kernel_size, kernel_stride, q.dtype)
    c2, c2_off = S.compress(k, cu_k, lse_kernel_size, lse_kernel_stride, q.dtype)
    TQ, GP, TSEL = plan(G, nbp)
    R, E = block_size // kernel_stride, (kernel_size - 1) // kernel_stride
    SB = max(S._pow2(FAST_CFG["sb"]), S._pow2(-(-16 // R)))
    lens_q = cu_q[1:] - cu_q[:-1]
    lens_k = cu_k[1:] - cu_k[:-1]
    ntiles = Tq // TQ + nseq + 1
    tseq, tstart = S.tile_map(lens_q, TQ, ntiles)
    # heaviest tiles (most keys before their last query) first; padding tiles (tseq = nseq) last
    sq = tseq.long().clamp(max=nseq - 1)
    last = torch.minimum(tstart.long() + TQ, lens_q[sq]) - 1
    work = torch.where(tseq < nseq, lens_k[sq] - lens_q[sq] + last, torch.full_like(last, -1))
    order = torch.argsort(work, descending=True, stable=True).to(torch.int32)
    n_items = ntiles * Hkv
    nprog = _num_programs(q.device, n_items)
    scr = torch.empty((nprog, 2, TQ, nbp), dtype=torch.float32, device=q.device)
    interp = S._interpreted()
    _select_fast_kernel[(nprog,)](
        q, c1, c2, out, scr, order, tseq, tstart, cu_q, cu_k, c1_off, c2_off, nseq, n_items, Hkv,
        q.stride(0), q.stride(1), c1.stride(0), c1.stride(1), c2.stride(0), c2.stride(1), out.stride(0), out.stride(1),
        scale * S.LOG2E, D, G, kernel_size, kernel_stride, lse_kernel_size, lse_kernel_stride, block_size,
        init_blocks, wb, k_sel, W, dense_len,
        TQ=TQ, GP=GP, ROWS=TQ * GP, BD=S._pow2(D, 16), SB=SB, R=R, E=E, NBP=nbp, TSEL=TSEL, CH=min(nbp, 16 if interp else FAST_CFG["ch"]), WP=S._pow2(W),
        BN2=16 if interp else 64, PREC=S._prec(q.dtype), SCH=min(nbp, FAST_CFG["nbp_reg"]),
        num_warps=4 if interp else FAST_CFG["num_warps"], num_stages=FAST_CFG["num_stages"])
    return out
