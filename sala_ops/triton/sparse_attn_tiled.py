"""Block-sparse attention forward with K/V shared across a tile of consecutive query tokens
(alternative to sparse_attn.forward; selected with SALA_SPARSE_FWD=tiled, see sala_ops/sparse.py).

Same contract as sparse_attn.forward: packed q [Tq, H, D], k [Tk, Hkv, D], v [Tk, Hkv, Dv], int64
cu_q / cu_k, idx int32 [Tq, Hkv, S] ascending, unique, each <= the query's own block, -1 padded
(sanitize_indices). Returns o [Tq, H, Dv] (q.dtype) and lse [Tq, H] fp32 (log2 domain, +inf for a
row with no key), so sparse_attn.backward works unchanged.

Why: the per-token kernel re-reads each selected 64 x D block of K and V for every token (3 MB per
token and KV head for the 9B config); it is L2-bandwidth bound and its MMAs have 16 rows. Here one
program = (a tile of TQ consecutive tokens of one sequence, KV head g) x the G heads of the group,
M = TQ x G rows (rows padded to 16 for tl.dot). It walks the tile's *union* of selected blocks once:
each block's K/V is loaded once for all TQ tokens, S = Q K^T is one M x 64 MMA, and a row is masked
out where its token did not select the block (plus the token-level causal mask).

The union is built on the device by `tile_union` (one Triton launch, no host sync; `tile_union_torch`
is the same in torch ops, 12 ms at 128K on the H200): per (tile, KV head) the TQ lists are concatenated
as keys block * TQ + token, sorted, and cut into runs of equal block; each run becomes one int64 entry
(block << 32) | bitmask-of-tokens-that-chose-it, ascending, -1 padded, with a count per (tile, head).
The kernel reads entry s, tests bit `token` per row, and its loop is a plain `for s in range(count)`
over a precomputed list, so Triton's pipeliner can prefetch K/V.

Hybrid (min_share > 1): a union block chosen by fewer than min_share of the tile's tokens wastes most
of its M rows. Such entries are left out of the tile list and go, per token, through the existing
one-token kernel (sparse_attn._fwd_kernel) into an fp32 partial (o, lse); the tiled kernel then
starts its online softmax from that partial (m = lse, l = 1, acc = o: exactly the state that the
partial stands for) and writes the final o and lse. min_share = 1 is the pure tiled kernel.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import sparse_attn as _A
from . import sparse_select as _sel
from .sparse_select import LOG2E, _interpreted, _pow2, _prec

# Launch parameters (module level so that bench/bench_sparse.py --tiled-sweep can try others).
# tq: tokens per tile (M = tq x G rows), min_share: hybrid threshold (1 = pure tiled).
TILED_CFG = dict(tq=4, min_share=2, num_warps=4, num_stages=3)  # H200 sweep 2026-11-30: best at 128K, random q
# The tiled dq (backward_dq; the default since H200 run 4, SALA_SPARSE_BWD_DQ=onetoken for the older kernel).
TILED_DQ_CFG = dict(tq=4, min_share=2, num_warps=4, num_stages=2)
# The hybrid forward's one-token launch over the residual (the union blocks chosen by fewer than min_share tokens
# of a tile: ~44 per token at 128K with random q, instead of the 96 that sparse_attn.FWD_CFG was tuned for in run
# 1). bench/sweep_sparse_hybrid.py (session 14; 128K, bf16, D 128, 9B config), the whole hybrid forward given the
# union, 2 warps / 3 stages vs FWD_CFG (4 / 3): H200 64.8 vs 70.0 ms; H100 4 of 5 runs faster (73.4-77.9 vs
# 80.9-82.5 ms), one 81.5 vs 80.9. Used for 16-bit tiles up to 128 wide (what was timed); the rest keep FWD_CFG.
RESID_FWD_CFG = dict(num_warps=2, num_stages=3)
# The same for the tiled dq's residual (sparse_attn.DQ_CFG, 4 / 2, was tuned on whole one-token dq passes): 2 warps /
# 3 stages took 1.3-2.5 ms off the whole dq at 128K in each of four H100 runs of the same sweep (78.8 / 79.9 / 79.6
# / 79.5 ms vs 80.1 / 81.7 / 82.0 / 81.3), 2.9 ms on the H200 (70.7 vs 73.6).
RESID_DQ_CFG = dict(num_warps=2, num_stages=3)
_INV = 1 << 62


def resid_fwd_launch(element_size, width):
    """Launch config of the hybrid forward's one-token residual pass: RESID_FWD_CFG for 16-bit tiles up to 128
    wide (head dims padded to a power of two), sparse_attn.FWD_CFG otherwise."""
    return RESID_FWD_CFG if element_size == 2 and width <= 128 else _A.FWD_CFG


def resid_dq_launch(element_size, width):
    """Launch config of the tiled dq's one-token residual pass: RESID_DQ_CFG for 16-bit tiles up to 128 wide,
    sparse_attn.DQ_CFG otherwise."""
    return RESID_DQ_CFG if element_size == 2 and width <= 128 else _A.DQ_CFG


@triton.jit
def tile_rows(m0, Lq, Lk, g, G, TQ: tl.constexpr, GP: tl.constexpr, ROWS: tl.constexpr):
    """The M = ROWS rows of a tile program (TQ tokens from m0 x GP padded heads of KV group g):
    rm (token of the row in the tile), rtok (its query index in the sequence), rok (a real row),
    t_row (its key position, bottom-right aligned), head (its query head)."""
    r = tl.arange(0, ROWS)
    rm = r // GP
    rh = r % GP
    rtok = m0 + rm
    rok = (rm < TQ) & (rtok < Lq) & (rh < G)
    return rm, rtok, rok, Lk - Lq + rtok, g * G + rh


@triton.jit
def union_block(e, rbit, rok, t_row, nn, K, V, k0, Lk, g, sk_t, sk_h, sv_t, sv_h, d, dv, D, DV, BS):
    """One tile_union entry e = (block << 32) | token bitmask: the block's K and V rows (once for the
    whole tile, read by _A.block_kv_rows without row predicates) and rel per row: the last key of the
    block the row may see (_A.key_limit), -1 where the row's token did not choose the block. A row's
    allowed keys are exactly nn <= rel."""
    b = e >> 32
    sel = (((e >> rbit) & 1) != 0) & rok  # the row's token selected block b (bits 0..31 of e)
    rel = tl.where(sel, _A.key_limit(t_row, b, BS), -1)
    kk, vv = _A.block_kv_rows(K, V, k0, b, BS, Lk, nn, g, sk_t, sk_h, sv_t, sv_h, d, dv, D, DV)
    return kk, vv, rel


@triton.jit
def _fwd_tiled_kernel(Q, K, V, O, LSE, OP, LSEP, UNI, UCNT, tile_seq, tile_start, cu_q, cu_k, nseq,
                      sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, so_t, so_h, sl_t, sop_t, sop_h, slp_t, su_t, su_h,
                      qk_scale, D, DV, G, BS,
                      TQ: tl.constexpr, GP: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
                      BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr, HAS_INIT: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    nh = tl.num_programs(1)
    n = tl.load(tile_seq + pid)
    if n < nseq:
        m0 = tl.load(tile_start + pid).to(tl.int64)
        q0, Lq, k0, Lk = _sel.seq_bounds(cu_q, cu_k, n)
        rm, rtok, rok, t_row, head = tile_rows(m0, Lq, Lk, g, G, TQ, GP, ROWS)
        d = tl.arange(0, BLOCK_D)
        dv = tl.arange(0, BLOCK_DV)
        q = tl.load(Q + (q0 + rtok)[:, None] * sq_t + head[:, None] * sq_h + d[None, :],
                    mask=rok[:, None] & (d < D)[None, :], other=0.0)
        if HAS_INIT:
            # the partial softmax of the blocks done per token: (m, l, acc) = (lse, 1, o)
            lse_p = tl.load(LSEP + (q0 + rtok) * slp_t + head, mask=rok, other=float("inf"))
            has_p = lse_p < float("inf")
            m_i = tl.where(has_p, lse_p, float("-inf"))
            l_i = tl.where(has_p, 1.0, 0.0)
            acc = tl.load(OP + (q0 + rtok)[:, None] * sop_t + head[:, None] * sop_h + dv[None, :],
                          mask=(rok & has_p)[:, None] & (dv < DV)[None, :], other=0.0).to(tl.float32)
        else:
            m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
            l_i = tl.zeros([ROWS], dtype=tl.float32)
            acc = tl.zeros([ROWS, BLOCK_DV], dtype=tl.float32)
        ub = UNI + pid * su_t + g * su_h
        cnt = tl.load(UCNT + pid * nh + g)
        nn = tl.arange(0, BLOCK_N)
        rbit = rm.to(tl.int64)
        for s in range(0, cnt):
            kk, vv, rel = union_block(tl.load(ub + s), rbit, rok, t_row, nn, K, V, k0, Lk, g,
                                      sk_t, sk_h, sv_t, sv_h, d, dv, D, DV, BS)
            sc = tl.where(nn[None, :] <= rel[:, None], tl.dot(q, tl.trans(kk), input_precision=PREC), float("-inf"))
            m_i, l_i, acc = _A.softmax_step(m_i, l_i, acc, sc, vv, qk_scale, PREC)
        o, lse = _A.softmax_finish(m_i, l_i, acc)
        tl.store(O + (q0 + rtok)[:, None] * so_t + head[:, None] * so_h + dv[None, :], o.to(O.dtype.element_ty),
                 mask=rok[:, None] & (dv < DV)[None, :])
        tl.store(LSE + (q0 + rtok) * sl_t + head, lse, mask=rok)


def tile_union_torch(idx, cu_q, tq, min_share=1):
    """Per (tile of tq consecutive tokens of one sequence, KV head) the union of the tokens' selected
    blocks. Device torch ops only, no host synchronisation. The first version (12 ms at 128K on the
    H200, a dozen [grid, Hkv, tq*S] int64 temporaries); tile_union runs one Triton kernel instead and
    is tested against this.

    Returns a dict:
      uni    int64 [grid, Hkv, tq*S]: (block << 32) | bitmask of the tile's tokens that chose it,
             ascending, -1 padded; only blocks chosen by >= min_share tokens;
      ucnt   int32 [grid, Hkv]: number of entries in uni;
      tseq, tstart: the tile map (sparse_select.tile_map; padding tiles have tseq = N);
      resid  int32 [Tq, Hkv, S] or None (min_share <= 1): the blocks left out of uni, per token,
             ascending, -1 padded (the one-token kernel's input);
      union  int64 [grid, Hkv]: the full union size (statistics), tile_ok bool [grid].
    """
    assert 1 <= tq <= 32, "the token bitmask holds 32 tokens"
    Tq, Hkv, S = idx.shape
    dev = idx.device
    nseq = cu_q.numel() - 1
    lens_q = cu_q[1:] - cu_q[:-1]
    grid = Tq // tq + nseq + 1
    tseq, tstart = _sel.tile_map(lens_q, tq, grid)
    ts = tseq.long().clamp(max=nseq - 1)
    r = torch.arange(tq, device=dev)
    loc = tstart.long()[:, None] + r[None, :]  # [grid, tq] position in the sequence
    tvalid = (tseq.long()[:, None] < nseq) & (loc < lens_q[ts][:, None])
    tok = (cu_q[ts][:, None] + loc).clamp(min=0, max=max(Tq - 1, 0))
    x = idx[tok].permute(0, 2, 1, 3)  # [grid, Hkv, tq, S]
    ok = tvalid[:, None, :, None] & (x >= 0)
    key = torch.where(ok, x.long() * tq + r[None, None, :, None], _INV).reshape(grid, Hkv, tq * S)
    sk, perm = torch.sort(key, dim=-1)
    valid = sk != _INV
    blk = torch.div(sk, tq, rounding_mode="floor")
    rr = sk - blk * tq
    first = torch.ones_like(valid)
    first[..., 1:] = blk[..., 1:] != blk[..., :-1]
    runid = torch.cumsum(first, -1) - 1
    bits = torch.where(valid, torch.bitwise_left_shift(torch.ones_like(rr), rr), torch.zeros_like(rr))
    ubits = torch.zeros_like(sk).scatter_add_(-1, runid, bits)
    upop = torch.zeros_like(sk).scatter_add_(-1, runid, valid.long())
    ublk = torch.full_like(sk, _INV).scatter_(-1, runid, torch.where(valid, blk, _INV))
    urun = ublk != _INV
    dense = urun & (upop >= min_share)
    pos = torch.cumsum(dense, -1) - 1
    L = tq * S
    ent = torch.bitwise_left_shift(torch.where(dense, ublk, 0), 32) | ubits
    uni = torch.full((grid, Hkv, L + 1), -1, dtype=torch.int64, device=dev)
    uni.scatter_(-1, torch.where(dense, pos, L), ent)
    uni = uni[..., :L].contiguous()
    ucnt = dense.sum(-1).to(torch.int32).contiguous()
    resid = None
    if min_share > 1:
        keep = valid & ~dense.gather(-1, runid)
        keep = torch.zeros_like(keep).scatter_(-1, perm, keep).reshape(grid, Hkv, tq, S).permute(0, 2, 1, 3)
        xr = torch.where(keep, x.permute(0, 2, 1, 3).long(), _INV)  # [grid, tq, Hkv, S]
        res = torch.full((Tq, Hkv, S), _INV, dtype=torch.int64, device=dev)
        res[tok[tvalid]] = xr[tvalid]
        res = torch.sort(res, dim=-1).values
        resid = torch.where(res == _INV, -1, res).to(torch.int32).contiguous()
    return dict(uni=uni, ucnt=ucnt, tseq=tseq, tstart=tstart, resid=resid, union=urun.sum(-1),
                nsel=valid.sum(-1), tq=tq, tile_ok=tvalid.any(1))


@triton.jit
def _tile_union_kernel(IDX, UNI, UCNT, USZ, NSEL, RES, tile_seq, tile_start, cu_q, nseq, HKV, S, L,
                       si_t, si_h, su_t, su_h, sr_t, sr_h,
                       TQ: tl.constexpr, SP: tl.constexpr, MIN_SHARE: tl.constexpr, HAS_RESID: tl.constexpr):
    """One (tile, KV head): the tile's TQ index lists as keys block * TQ + token in one [TQ * SP] vector,
    sorted in registers; runs of equal block (at most TQ long: a token lists a block once) found by
    gathering the neighbours; a run with >= MIN_SHARE tokens becomes one entry (block << 32) | token
    bits at position cumsum - 1; with HAS_RESID the other runs' (token, block) pairs go to the token's
    residual list, ascending (the sorted order is block-major), -1 padded. Same output as
    tile_union_torch."""
    tile = tl.program_id(0)
    g = tl.program_id(1)
    N: tl.constexpr = TQ * SP
    BIG: tl.constexpr = 2147483647
    i = tl.arange(0, N)
    r = i // SP
    c = i % SP
    n = tl.load(tile_seq + tile)
    nn = tl.minimum(n, nseq - 1)
    q0 = tl.load(cu_q + nn)
    Lq = tl.where(n < nseq, tl.load(cu_q + nn + 1) - q0, 0)  # a padding tile has no token
    loc = tl.load(tile_start + tile).to(tl.int64) + r
    tok_ok = loc < Lq
    x = tl.load(IDX + (q0 + loc) * si_t + g * si_h + c, mask=tok_ok & (c < S), other=-1)
    sk = tl.sort(tl.where(x >= 0, x * TQ + r, BIG))
    valid = sk != BIG
    blk = sk // TQ
    rr = sk % TQ
    first = valid & ((i == 0) | (tl.gather(blk, tl.maximum(i - 1, 0), 0) != blk))
    bits = tl.zeros([N], dtype=tl.int64)
    pop = tl.zeros([N], dtype=tl.int32)  # size of the run the entry belongs to
    for k in tl.static_range(1 - TQ, TQ):
        j = i + k
        sj = tl.gather(sk, tl.minimum(tl.maximum(j, 0), N - 1), 0)
        same = valid & (j >= 0) & (j < N) & (sj != BIG) & (sj // TQ == blk)
        pop += same.to(tl.int32)
        if k >= 0:  # the run's later entries: their token bits (used at the run's first entry)
            bits |= tl.where(same, tl.full([N], 1, tl.int64) << (sj % TQ).to(tl.int64), 0)
    dense = pop >= MIN_SHARE
    head = first & dense
    pos = tl.cumsum(head.to(tl.int32), 0) - 1
    ub = UNI + tile.to(tl.int64) * su_t + g * su_h
    tl.store(ub + pos, (blk.to(tl.int64) << 32) | bits, mask=head)
    cnt = tl.sum(head.to(tl.int32), 0)
    tl.store(ub + i, tl.full([N], -1, tl.int64), mask=(i >= cnt) & (i < L))
    tl.store(UCNT + tile * HKV + g, cnt)
    tl.store(USZ + tile * HKV + g, tl.sum(first.to(tl.int32), 0))
    tl.store(NSEL + tile * HKV + g, tl.sum(valid.to(tl.int32), 0))
    if HAS_RESID:
        # (token, block) pairs of the runs left out, per token in ascending block order
        rest = valid & ~dense
        rpos = tl.zeros([N], dtype=tl.int32)
        rcnt = tl.zeros([N], dtype=tl.int32)  # per slot i of the [TQ, SP] layout: its token's residual count
        for t in tl.static_range(TQ):
            mine = rest & (rr == t)
            rpos = tl.where(mine, tl.cumsum(mine.to(tl.int32), 0) - 1, rpos)
            rcnt = tl.where(r == t, tl.sum(mine.to(tl.int32), 0), rcnt)
        rtok = tl.load(tile_start + tile).to(tl.int64) + rr
        tl.store(RES + (q0 + rtok) * sr_t + g * sr_h + rpos, blk, mask=rest)
        tl.store(RES + (q0 + loc) * sr_t + g * sr_h + c, tl.full([N], -1, tl.int32),
                 mask=tok_ok & (c < S) & (c >= rcnt))


def tile_union(idx, cu_q, tq, min_share=1, kernel=None):
    """tile_union_torch's result (same dict) from one Triton launch per call: grid (tiles, Hkv).
    kernel=None: the kernel on a GPU, the torch ops under the interpreter (whose op-by-op bitonic sort made
    the union 60% of a sparse backward test's time); the kernel's own test passes kernel=True."""
    Tq, Hkv, S = idx.shape
    if kernel is None:
        kernel = not _interpreted()
    if not kernel or tq > 16 or Tq == 0:  # the sort vector is tq x pow2(S) keys; larger tiles keep the torch ops
        return tile_union_torch(idx, cu_q, tq, min_share)
    dev = idx.device
    nseq = cu_q.numel() - 1
    grid = Tq // tq + nseq + 1
    tseq, tstart = _sel.tile_map(cu_q[1:] - cu_q[:-1], tq, grid)
    L = tq * S
    idx = idx.contiguous()
    uni = torch.empty((grid, Hkv, L), dtype=torch.int64, device=dev)
    ucnt = torch.empty((grid, Hkv), dtype=torch.int32, device=dev)
    usz = torch.empty((grid, Hkv), dtype=torch.int32, device=dev)
    nsel = torch.empty((grid, Hkv), dtype=torch.int32, device=dev)
    resid = torch.empty((Tq, Hkv, S), dtype=torch.int32, device=dev) if min_share > 1 else None
    res = resid if resid is not None else ucnt  # unused pointer when there is no residual
    _tile_union_kernel[(grid, Hkv)](
        idx, uni, ucnt, usz, nsel, res, tseq, tstart, cu_q, nseq, Hkv, S, L,
        idx.stride(0), idx.stride(1), uni.stride(0), uni.stride(1),
        res.stride(0) if resid is not None else 0, res.stride(1) if resid is not None else 0,
        TQ=tq, SP=_pow2(S), MIN_SHARE=min_share, HAS_RESID=resid is not None, num_warps=4)
    tile_ok = (tseq.long() < nseq) & (tstart.long() < (cu_q[1:] - cu_q[:-1])[tseq.long().clamp(max=nseq - 1)])
    return dict(uni=uni, ucnt=ucnt, tseq=tseq, tstart=tstart, resid=resid, union=usz.long(), nsel=nsel.long(),
                tq=tq, tile_ok=tile_ok)


def forward(q, k, v, idx, cu_q, cu_k, tok_seq, scale, block_size, tq=None, min_share=None, union=None):
    """o [Tq, H, Dv] (q.dtype), lse [Tq, H] fp32 (log2 domain): the same as sparse_attn.forward.
    `union`: a precomputed tile_union(idx, cu_q, tq, min_share) (benchmarks time the kernels alone)."""
    Tq, H, D = q.shape
    Hkv, DV = k.shape[1], v.shape[2]
    G = H // Hkv
    tq = TILED_CFG["tq"] if tq is None else tq
    min_share = TILED_CFG["min_share"] if min_share is None else min_share
    o = _sel.empty((Tq, H, DV), q.dtype, q.device)
    lse = _sel.empty((Tq, H), torch.float32, q.device)
    if Tq == 0:
        return o, lse
    u = tile_union(idx, cu_q, tq, min_share) if union is None else union
    nseq = cu_q.numel() - 1
    BD, BDV, BN = _pow2(D, 16), _pow2(DV, 16), _pow2(block_size, 16)
    prec = _prec(q.dtype)
    interp = _interpreted()
    if u["resid"] is not None:
        # blocks chosen by few tokens of their tile: the one-token kernel, into an fp32 partial
        ri = u["resid"]
        S = ri.shape[2]
        rcfg = resid_fwd_launch(q.element_size(), max(BD, BDV))
        op = _sel.empty((Tq, H, DV), torch.float32, q.device)
        lsep = _sel.empty((Tq, H), torch.float32, q.device)
        _A._fwd_kernel[(Tq, Hkv)](
            q, k, v, op, lsep, ri, tok_seq, cu_q, cu_k,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), op.stride(0), op.stride(1),
            lsep.stride(0), ri.stride(0), ri.stride(1),
            scale * LOG2E, D, DV, G, block_size, S,
            ROWS=_A._rows(G), BLOCK_D=BD, BLOCK_DV=BDV, BLOCK_N=BN, BLOCK_S=_pow2(S), PREC=prec,
            num_warps=rcfg["num_warps"], num_stages=1 if interp else rcfg["num_stages"])
        has_init = True
    else:
        op, lsep, has_init = o, lse, False  # unused
    GP = _pow2(G)
    rows = _pow2(tq * GP, 16)
    uni, ucnt = u["uni"], u["ucnt"]
    _fwd_tiled_kernel[(uni.shape[0], Hkv)](
        q, k, v, o, lse, op, lsep, uni, ucnt, u["tseq"], u["tstart"], cu_q, cu_k, nseq,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), o.stride(0), o.stride(1),
        lse.stride(0), op.stride(0), op.stride(1), lsep.stride(0), uni.stride(0), uni.stride(1),
        scale * LOG2E, D, DV, G, block_size,
        TQ=tq, GP=GP, ROWS=rows, BLOCK_D=BD, BLOCK_DV=BDV, BLOCK_N=BN, HAS_INIT=has_init, PREC=prec,
        num_warps=4 if interp else TILED_CFG["num_warps"], num_stages=1 if interp else TILED_CFG["num_stages"])
    return o, lse


# ----------------------------------------------------------------------------------------------
# backward: dq over the tile's union (the default; SALA_SPARSE_BWD_DQ=onetoken: the one-token kernel)


@triton.jit
def _bwd_dq_tiled_kernel(Q, K, V, DO, DQ, DQP, LSE, DELTA, UNI, UCNT, tile_seq, tile_start, cu_q, cu_k, nseq,
                         sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sdo_t, sdo_h, sdq_t, sdq_h, sdp_t, sdp_h, sl_t,
                         su_t, su_h, qk_scale, scale, D, DV, G, BS,
                         TQ: tl.constexpr, GP: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr, HAS_INIT: tl.constexpr, PREC: tl.constexpr):
    """dq of a tile of TQ tokens x the G heads of KV group g: sparse_attn._bwd_dq_kernel's math
    (p = exp2(q k^T * qk_scale - lse), dp = do v^T, ds = p (dp - delta), dq += ds k) over the tile's
    union of blocks, each K/V block loaded once for the M = TQ x G rows; a row is masked where its
    token did not choose the block, plus token causality. HAS_INIT: add the fp32 dq partial of the
    blocks done per token (already times scale)."""
    pid = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    nh = tl.num_programs(1)
    n = tl.load(tile_seq + pid)
    if n < nseq:
        m0 = tl.load(tile_start + pid).to(tl.int64)
        q0, Lq, k0, Lk = _sel.seq_bounds(cu_q, cu_k, n)
        rm, rtok, rok, t_row, head = tile_rows(m0, Lq, Lk, g, G, TQ, GP, ROWS)
        d = tl.arange(0, BLOCK_D)
        dv = tl.arange(0, BLOCK_DV)
        q = tl.load(Q + (q0 + rtok)[:, None] * sq_t + head[:, None] * sq_h + d[None, :],
                    mask=rok[:, None] & (d < D)[None, :], other=0.0)
        do = tl.load(DO + (q0 + rtok)[:, None] * sdo_t + head[:, None] * sdo_h + dv[None, :],
                     mask=rok[:, None] & (dv < DV)[None, :], other=0.0)
        lse = tl.load(LSE + (q0 + rtok) * sl_t + head, mask=rok, other=float("inf"))
        delta = tl.load(DELTA + (q0 + rtok) * sl_t + head, mask=rok, other=0.0)
        dq = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
        ub = UNI + pid * su_t + g * su_h
        cnt = tl.load(UCNT + pid * nh + g)
        nn = tl.arange(0, BLOCK_N)
        rbit = rm.to(tl.int64)
        for s in range(0, cnt):
            kk, vv, rel = union_block(tl.load(ub + s), rbit, rok, t_row, nn, K, V, k0, Lk, g,
                                      sk_t, sk_h, sv_t, sv_h, d, dv, D, DV, BS)
            sc = tl.dot(q, tl.trans(kk), input_precision=PREC) * qk_scale
            p = tl.where(nn[None, :] <= rel[:, None], tl.exp2(sc - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(vv), input_precision=PREC)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(kk.dtype), kk, input_precision=PREC)
        dq = dq * scale
        if HAS_INIT:
            dq += tl.load(DQP + (q0 + rtok)[:, None] * sdp_t + head[:, None] * sdp_h + d[None, :],
                          mask=rok[:, None] & (d < D)[None, :], other=0.0)
        tl.store(DQ + (q0 + rtok)[:, None] * sdq_t + head[:, None] * sdq_h + d[None, :], dq.to(DQ.dtype.element_ty),
                 mask=rok[:, None] & (d < D)[None, :])


def backward_dq(do, q, k, v, lse, delta, idx, cu_q, cu_k, tok_seq, scale, block_size, union=None, tq=None,
                min_share=None):
    """dq [Tq, H, D] in q.dtype, the same as sparse_attn's one-token dq kernel, with K/V shared across
    tiles of tq consecutive tokens (TILED_DQ_CFG). do [Tq, H, Dv] contiguous, lse / delta fp32 [Tq, H]
    (delta = rowsum(o * do)). `union`: a precomputed tile_union(idx, cu_q, tq, min_share) (must match
    tq and min_share). min_share > 1: union blocks chosen by fewer tokens of the tile go per token
    through sparse_attn._bwd_dq_kernel (over tile_union's `resid`) into an fp32 partial that this
    kernel adds to its sum (dq is a sum over blocks: exact up to fp32 rounding order)."""
    Tq, H, D = q.shape
    Hkv, DV = k.shape[1], v.shape[2]
    G = H // Hkv
    tq = TILED_DQ_CFG["tq"] if tq is None else tq
    min_share = TILED_DQ_CFG["min_share"] if min_share is None else min_share
    dq = _sel.empty(q.shape, q.dtype, q.device)
    if Tq == 0:
        return dq
    u = tile_union(idx, cu_q, tq, min_share) if union is None else union
    assert u["tq"] == tq, "union built for another tile size"
    nseq = cu_q.numel() - 1
    BD, BDV, BN = _pow2(D, 16), _pow2(DV, 16), _pow2(block_size, 16)
    prec = _prec(q.dtype)
    interp = _interpreted()
    if u["resid"] is not None:
        dqp = _A.backward_dq(do, q, k, v, lse, delta, u["resid"], cu_q, cu_k, tok_seq, scale, block_size,
                             out=_sel.empty(q.shape, torch.float32, q.device),
                             launch=resid_dq_launch(q.element_size(), max(BD, BDV)))
        has_init = True
    else:
        dqp, has_init = dq, False  # unused
    GP = _pow2(G)
    rows = _pow2(tq * GP, 16)
    uni, ucnt = u["uni"], u["ucnt"]
    _bwd_dq_tiled_kernel[(uni.shape[0], Hkv)](
        q, k, v, do, dq, dqp, lse, delta, uni, ucnt, u["tseq"], u["tstart"], cu_q, cu_k, nseq,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1),
        dq.stride(0), dq.stride(1), dqp.stride(0), dqp.stride(1), lse.stride(0), uni.stride(0), uni.stride(1),
        scale * LOG2E, scale, D, DV, G, block_size,
        TQ=tq, GP=GP, ROWS=rows, BLOCK_D=BD, BLOCK_DV=BDV, BLOCK_N=BN, HAS_INIT=has_init, PREC=prec,
        num_warps=4 if interp else TILED_DQ_CFG["num_warps"],
        num_stages=1 if interp else TILED_DQ_CFG["num_stages"])
    return dq


def union_stats(u):
    """Host summary of a tile_union (synchronises): mean / max union size per (tile, KV head), mean
    entries of the tiled list, and `fill` = selected (token, block) pairs / (union x tq): the share of
    the tile's score rows that are not masked out (1 = every token of the tile chose every block)."""
    ok = u["tile_ok"]
    union = u["union"][ok].double()
    return {"tiles": int(ok.sum()), "union_mean": float(union.mean()), "union_max": int(u["union"][ok].max()),
            "tile_entries_mean": float(u["ucnt"][ok].double().mean()),
            "fill": float(u["nsel"][ok].double().sum() / (union.sum() * u["tq"]).clamp(min=1))}
