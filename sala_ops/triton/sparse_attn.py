"""Block-sparse softmax attention over given block indices (InfLLM-V2 step 6), forward and backward
(Triton). Kernels and launchers only; sala_ops/sparse.py holds the autograd.Function and policy.

Packed layout: q [Tq, H, D], k [Tk, Hkv, D], v [Tk, Hkv, Dv], int64 offsets cu_q / cu_k [N+1];
queries bottom-right aligned to the keys of their sequence (t = Lk - Lq + i). Block indices
idx int32 [Tq, Hkv, S]: block numbers local to the sequence, strictly ascending, each <= the
query's own block, -1 padding at the end (`sanitize_indices` makes arbitrary user indices so).

Forward: one program = one query token x the G query heads of its KV group (rows padded to 16 for
tl.dot); it walks the token's selected blocks, loads each 64-key block of K and V once for all G
heads, and runs the online softmax in the log2 domain with the token-level causal mask (only the
query's own block is cut). Saves lse (log2 domain, fp32 [Tq, H]); +inf marks a row with no key.

Backward:
  dq   : the same walk as the forward (recompute p from lse; dq += ds @ k).
  dk,dv: a transposed index is built on the device with one stable sort (key = (g, global block),
         value = token): for every (KV head, key block) the queries that selected it, ascending.
         Programs take chunks of at most CHUNK such queries (a chunk map built with searchsorted, so
         the busy blocks - block 0 and the local window - are spread over many programs), gather
         the G heads of each query, and add their dk/dv tile into fp32 buffers with atomics. The programs
         run in order of their chunk's first query token (_order_by_first_token), so q / do come from L2.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .. import _dispatch
from .._segments import segment_of
from . import sparse_select as _sel
from .sparse_select import LOG2E, _interpreted, _pow2, _prec

_BIG = 1 << 30
# Launch parameters (module level so that bench/bench_sparse.py --sweep can try others).
FWD_CFG = dict(num_warps=4, num_stages=3)
DQ_CFG = dict(num_warps=4, num_stages=2)
# dk/dv pass, 16-bit inputs with head dims <= 128 (the 9B shapes): H100, session 13, 128K tokens, 32/2 heads, D 128
# (bench/sweep_sparse_dkdv.py): 89.8 ms, against 110.5 ms for the old (4 warps, 1 stage, 64 rows, block order);
# the program order alone ("token", _order_by_first_token) gave 97.0 ms.
DKDV_CFG = dict(num_warps=8, num_stages=2, rows=128, chunk=256, order="token")
# fp32 inputs or wider heads: the old launch (its shared memory fits: 128 rows x 2 stages of fp32 q / do would not)
DKDV_CFG_WIDE = dict(num_warps=4, num_stages=1, rows=64, chunk=256, order="token")


# ----------------------------------------------------------------------------------------------
# forward


@triton.jit
def key_limit(t, b, BS):
    """The last key nn of block b that a query at key position t may see, at most BS - 1 (int32; negative: none):
    a key is allowed iff nn <= the limit. Token causality (nn <= t - b*BS) also keeps keys inside the sequence
    (t < Lk), and the clamp keeps them inside the block (key tiles are pow2(BS) wide), so every score mask is
    one compare against a per-row limit. (Callers pass blocks at most a tile past t, or discard the result,
    so t - b*BS fits int32.)"""
    return tl.minimum(t - b * BS, BS - 1).to(tl.int32)


@triton.jit
def block_kv_rows(K, V, k0, b, BS, Lk, nn, g, sk_t, sk_h, sv_t, sv_h, d, dv, D, DV):
    """The K [BLOCK_N, BLOCK_D] and V [BLOCK_N, BLOCK_DV] rows b*BS + nn of KV head g (sequence starting at key
    row k0, Lk keys), padded columns read as 0. No row mask: rows past the sequence end are read clamped to
    its last row, and callers give them (and rows past the block, nn >= BS) weight 0 through their score mask,
    so the copies need no per-row predicate; the addresses are an int64 scalar block base plus int32 in-tile
    offsets (sm_90 SASS, bench/NOTES_sparse.md session 10)."""
    kb = k0 + b * BS
    rows = tl.minimum(nn, tl.maximum(tl.minimum(Lk - 1 - b * BS, BS), 0).to(tl.int32))
    kk = tl.load(K + kb * sk_t + g * sk_h + (rows[:, None] * sk_t + d[None, :]), mask=(d < D)[None, :], other=0.0)
    vv = tl.load(V + kb * sv_t + g * sv_h + (rows[:, None] * sv_t + dv[None, :]), mask=(dv < DV)[None, :],
                 other=0.0)
    return kk, vv


@triton.jit
def softmax_step(m_i, l_i, acc, sc, vv, qk_scale, PREC: tl.constexpr):
    """Online softmax (log2 domain): fold the raw scores sc = q k^T [M, N] (-inf = masked) of one key block,
    times qk_scale (> 0), and its values vv into the running row max m_i, sum l_i and unnormalised output
    acc. A row with every key masked so far keeps m = -inf, l = 0, acc = 0. The scale goes on the row
    maxima (max(sc) * s == max(sc * s) exactly: rounding is monotonic) and into one FMA per score in the
    exponent, instead of a multiply per score before the max."""
    m_new = tl.maximum(m_i, tl.max(sc, 1) * qk_scale)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(sc * qk_scale - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv, input_precision=PREC)
    return m_new, l_i, acc


@triton.jit
def softmax_finish(m_i, l_i, acc):
    """(o, lse) from the running state: o = acc / l, lse = m + log2 l; a row that saw no key gets
    o = 0 and lse = +inf (what the backward and the reference expect)."""
    has = l_i > 0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("inf"))
    return o, lse


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, IDX, tok_seq, cu_q, cu_k,
                sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, so_t, so_h, sl_t, si_t, si_h,
                qk_scale, D, DV, G, BS, S,
                ROWS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_S: tl.constexpr, PREC: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    n = tl.load(tok_seq + i)
    q0, Lq, k0, Lk = _sel.seq_bounds(cu_q, cu_k, n)
    t = Lk - Lq + (i - q0)
    h = tl.arange(0, ROWS)
    hm = h < G
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + i * sq_t + (g * G + h)[:, None] * sq_h + d[None, :], mask=hm[:, None] & (d < D)[None, :], other=0.0)
    # number of selected blocks (-1 padding sits at the end)
    s_off = tl.arange(0, BLOCK_S)
    ib = IDX + i * si_t + g * si_h
    cnt = tl.sum((tl.load(ib + s_off, mask=s_off < S, other=-1) >= 0).to(tl.int32), 0)
    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, BLOCK_DV], dtype=tl.float32)
    nn = tl.arange(0, BLOCK_N)
    for s in range(0, cnt):
        b = tl.load(ib + s).to(tl.int64)
        kmask = nn <= key_limit(t, b, BS)  # rows read clamped by block_kv_rows get weight 0 here
        kk, vv = block_kv_rows(K, V, k0, b, BS, Lk, nn, g, sk_t, sk_h, sv_t, sv_h, d, dv, D, DV)
        sc = tl.where(kmask[None, :], tl.dot(q, tl.trans(kk), input_precision=PREC), float("-inf"))
        m_i, l_i, acc = softmax_step(m_i, l_i, acc, sc, vv, qk_scale, PREC)
    o, lse = softmax_finish(m_i, l_i, acc)
    tl.store(O + i * so_t + (g * G + h)[:, None] * so_h + dv[None, :], o.to(O.dtype.element_ty),
             mask=hm[:, None] & (dv < DV)[None, :])
    tl.store(LSE + i * sl_t + g * G + h, lse, mask=hm)


def _rows(G: int) -> int:
    return _pow2(G, 16)


def token_seq(cu_q: torch.Tensor, Tq: int) -> torch.Tensor:
    """Sequence id of every packed query token (device, int32)."""
    ids = torch.arange(Tq, device=cu_q.device, dtype=cu_q.dtype)
    return segment_of(cu_q, ids).to(torch.int32)


def forward(q, k, v, idx, cu_q, cu_k, tok_seq, scale, block_size):
    """o [Tq, H, Dv] (q.dtype), lse [Tq, H] fp32 (log2 domain)."""
    Tq, H, D = q.shape
    Hkv, DV = k.shape[1], v.shape[2]
    G = H // Hkv
    o = _sel.empty((Tq, H, DV), q.dtype, q.device)
    lse = _sel.empty((Tq, H), torch.float32, q.device)
    if Tq == 0:
        return o, lse
    S = idx.shape[2]
    _fwd_kernel[(Tq, Hkv)](
        q, k, v, o, lse, idx, tok_seq, cu_q, cu_k,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), o.stride(0), o.stride(1),
        lse.stride(0), idx.stride(0), idx.stride(1),
        scale * LOG2E, D, DV, G, block_size, S,
        ROWS=_rows(G), BLOCK_D=_pow2(D, 16), BLOCK_DV=_pow2(DV, 16), BLOCK_N=_pow2(block_size, 16),
        BLOCK_S=_pow2(S), PREC=_prec(q.dtype), num_warps=FWD_CFG["num_warps"],
        num_stages=1 if _interpreted() else FWD_CFG["num_stages"])
    return o, lse


# ----------------------------------------------------------------------------------------------
# backward: dq


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA, IDX, tok_seq, cu_q, cu_k,
                   sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sdo_t, sdo_h, sdq_t, sdq_h, sl_t, si_t, si_h,
                   qk_scale, scale, D, DV, G, BS, S,
                   ROWS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_S: tl.constexpr, PREC: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    n = tl.load(tok_seq + i)
    q0, Lq, k0, Lk = _sel.seq_bounds(cu_q, cu_k, n)
    t = Lk - Lq + (i - q0)
    h = tl.arange(0, ROWS)
    hm = h < G
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + i * sq_t + (g * G + h)[:, None] * sq_h + d[None, :], mask=hm[:, None] & (d < D)[None, :], other=0.0)
    do = tl.load(DO + i * sdo_t + (g * G + h)[:, None] * sdo_h + dv[None, :],
                 mask=hm[:, None] & (dv < DV)[None, :], other=0.0)
    lse = tl.load(LSE + i * sl_t + g * G + h, mask=hm, other=float("inf"))
    delta = tl.load(DELTA + i * sl_t + g * G + h, mask=hm, other=0.0)
    s_off = tl.arange(0, BLOCK_S)
    ib = IDX + i * si_t + g * si_h
    cnt = tl.sum((tl.load(ib + s_off, mask=s_off < S, other=-1) >= 0).to(tl.int32), 0)
    dq = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    nn = tl.arange(0, BLOCK_N)
    for s in range(0, cnt):
        b = tl.load(ib + s).to(tl.int64)
        kmask = nn <= key_limit(t, b, BS)  # rows read clamped by block_kv_rows get weight 0 here
        kk, vv = block_kv_rows(K, V, k0, b, BS, Lk, nn, g, sk_t, sk_h, sv_t, sv_h, d, dv, D, DV)
        sc = tl.dot(q, tl.trans(kk), input_precision=PREC) * qk_scale
        p = tl.where(kmask[None, :], tl.exp2(sc - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(vv), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kk.dtype), kk, input_precision=PREC)
    dq = dq * scale
    tl.store(DQ + i * sdq_t + (g * G + h)[:, None] * sdq_h + d[None, :], dq.to(DQ.dtype.element_ty),
             mask=hm[:, None] & (d < D)[None, :])


# ----------------------------------------------------------------------------------------------
# backward: dk, dv over the transposed index


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, DK, DV_, LSE, DELTA, TOK, BUCKET_OFF, CHUNK_BUCKET, CHUNK_START,
                     BLK_SEQ, BLK_OFF, cu_q, cu_k, n_buckets, NBT,
                     sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sdo_t, sdo_h, sdk_t, sdk_h, sdv_t, sdv_h, sl_t,
                     qk_scale, scale, D, DV, G, BS, CHUNK,
                     BQ: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                     BLOCK_N: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)
    bucket = tl.load(CHUNK_BUCKET + pid)
    if bucket < n_buckets:
        g = bucket // NBT
        gb = bucket % NBT
        n = tl.load(BLK_SEQ + gb)
        b = (gb - tl.load(BLK_OFF + n)).to(tl.int64)
        q0, Lq, k0, Lk = _sel.seq_bounds(cu_q, cu_k, n)
        e0 = tl.load(BUCKET_OFF + bucket) + tl.load(CHUNK_START + pid)
        e1 = tl.minimum(e0 + CHUNK, tl.load(BUCKET_OFF + bucket + 1))
        nn = tl.arange(0, BLOCK_N)
        kpos = b * BS + nn
        kin = (nn < BS) & (kpos < Lk)
        d = tl.arange(0, BLOCK_D)
        dv = tl.arange(0, BLOCK_DV)
        kk = tl.load(K + (k0 + kpos)[:, None] * sk_t + g * sk_h + d[None, :],
                     mask=kin[:, None] & (d < D)[None, :], other=0.0)
        vv = tl.load(V + (k0 + kpos)[:, None] * sv_t + g * sv_h + dv[None, :],
                     mask=kin[:, None] & (dv < DV)[None, :], other=0.0)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dvacc = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
        r = tl.arange(0, ROWS)
        rm = r // G
        rh = r % G
        for e in range(e0, e1, BQ):
            ent = e + rm
            ok = (rm < BQ) & (ent < e1)
            tok = tl.load(TOK + ent, mask=ok, other=0).to(tl.int64)
            t = Lk - Lq + (tok - q0)
            head = g * G + rh
            q = tl.load(Q + tok[:, None] * sq_t + head[:, None] * sq_h + d[None, :],
                        mask=ok[:, None] & (d < D)[None, :], other=0.0)
            do = tl.load(DO + tok[:, None] * sdo_t + head[:, None] * sdo_h + dv[None, :],
                         mask=ok[:, None] & (dv < DV)[None, :], other=0.0)
            lse = tl.load(LSE + tok * sl_t + head, mask=ok, other=float("inf"))
            delta = tl.load(DELTA + tok * sl_t + head, mask=ok, other=0.0)
            sc = tl.dot(q, tl.trans(kk), input_precision=PREC) * qk_scale
            lim = tl.where(ok, key_limit(t, b, BS), -1)  # -1: padding rows see no key
            p = tl.where(nn[None, :] <= lim[:, None], tl.exp2(sc - lse[:, None]), 0.0)
            dvacc += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
            dp = tl.dot(do, tl.trans(vv), input_precision=PREC)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
        dk = dk * scale
        tl.atomic_add(DK + (k0 + kpos)[:, None] * sdk_t + g * sdk_h + d[None, :], dk,
                      mask=kin[:, None] & (d < D)[None, :])
        tl.atomic_add(DV_ + (k0 + kpos)[:, None] * sdv_t + g * sdv_h + dv[None, :], dvacc,
                      mask=kin[:, None] & (dv < DV)[None, :])


def _transposed(idx, cu_q, cu_k, tok_seq, block_size, chunk, Tk_total):
    """For every (KV head g, global key block) the ascending list of query tokens that selected it.
    bucket = g * NBT + global block (NBT: a host bound on the number of key blocks). Returns the
    token list (int32 [E]), bucket offsets, the chunk map (bucket and start of every program) and
    the block -> sequence map. One stable sort; no host synchronisation."""
    Tq, Hkv, S = idx.shape
    dev = idx.device
    nseq = cu_q.numel() - 1
    lens_k = cu_k[1:] - cu_k[:-1]
    nb = (lens_k + block_size - 1) // block_size
    blk_off = torch.zeros(nseq + 1, dtype=torch.int64, device=dev)
    blk_off[1:] = torch.cumsum(nb, 0)
    NBT = Tk_total // block_size + nseq + 1  # host bound on the number of key blocks
    blk_seq = segment_of(blk_off, torch.arange(NBT, device=dev, dtype=torch.int64))
    blk_seq = blk_seq.clamp(max=nseq - 1).to(torch.int32)
    n_buckets = Hkv * NBT
    gb = idx.to(torch.int64) + blk_off[tok_seq.long()][:, None, None]
    key = torch.arange(Hkv, device=dev, dtype=torch.int64)[None, :, None] * NBT + gb
    key = torch.where(idx < 0, torch.full_like(key, n_buckets), key).reshape(-1)
    key = key.to(torch.int32) if n_buckets < 2 ** 31 - 1 else key
    skey, perm = torch.sort(key, stable=True)
    tok = torch.div(perm, Hkv * S, rounding_mode="floor").to(torch.int32)
    # bucket offsets by binary search in the sorted keys (torch.bincount would sync on CUDA)
    bucket_off = torch.searchsorted(skey, torch.arange(n_buckets + 1, device=dev, dtype=skey.dtype))
    counts = bucket_off[1:] - bucket_off[:-1]
    nch = (counts + chunk - 1) // chunk
    cum = torch.cumsum(nch, 0)
    grid = n_buckets + (Tq * Hkv * S) // chunk + 1
    ids = torch.arange(grid, device=dev, dtype=torch.int64)
    cb = torch.searchsorted(cum, ids, right=True)
    cstart = (ids - (cum - nch)[cb.clamp(max=n_buckets - 1)]) * chunk
    return tok, bucket_off, cb, cstart, blk_seq, blk_off, NBT, n_buckets, grid


def _order_by_first_token(tok, bucket_off, cb, cstart, NBT, n_buckets, Tq):
    """The chunk map (cb, cstart) permuted so that programs run in order of (KV head, first query token of
    their chunk) instead of (KV head, key block). Why: a token's q / do rows are gathered by each of the ~96
    programs of the blocks it chose; in block order those programs run far apart in time, so the rows come
    from HBM every time (128K tokens: ~200 GB of gathers), while in token order the programs running at once
    read the same stretch of tokens, which stays in L2. It also spreads the chunks of one busy block (the
    local window's) over time, so their fp32 atomics into the same dk/dv rows contend less. Same sums (the
    order of the fp32 atomic adds changes, as it does between runs)."""
    valid = cb < n_buckets
    e0 = bucket_off[cb.clamp(max=n_buckets - 1)] + cstart
    first = tok[e0.clamp(max=max(tok.numel() - 1, 0))].to(torch.int64) if tok.numel() else torch.zeros_like(e0)
    g = torch.div(cb, NBT, rounding_mode="floor")
    key = torch.where(valid, g * (Tq + 1) + first, torch.full_like(first, 2 ** 62))
    order = torch.argsort(key)
    return cb[order], cstart[order]


def backward_dq(do, q, k, v, lse, delta, idx, cu_q, cu_k, tok_seq, scale, block_size, out=None, launch=None):
    """dq [Tq, H, D] by the one-token walk (_bwd_dq_kernel), into `out` (any float dtype, e.g. an fp32
    partial) or a new tensor in q.dtype. do [Tq, H, Dv] contiguous, lse / delta fp32 [Tq, H]. `launch`: num_warps /
    num_stages (default DQ_CFG; the tiled dq's residual pass brings its own)."""
    launch = DQ_CFG if launch is None else launch
    Tq, H, D = q.shape
    Hkv, DV = k.shape[1], v.shape[2]
    G = H // Hkv
    dq = _sel.empty(q.shape, q.dtype, q.device) if out is None else out
    if Tq == 0:
        return dq
    S = idx.shape[2]
    _bwd_dq_kernel[(Tq, Hkv)](
        q, k, v, do, dq, lse, delta, idx, tok_seq, cu_q, cu_k,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1),
        dq.stride(0), dq.stride(1), lse.stride(0), idx.stride(0), idx.stride(1),
        scale * LOG2E, scale, D, DV, G, block_size, S,
        ROWS=_rows(G), BLOCK_D=_pow2(D, 16), BLOCK_DV=_pow2(DV, 16), BLOCK_N=_pow2(block_size, 16),
        BLOCK_S=_pow2(S), PREC=_prec(q.dtype),
        num_warps=launch["num_warps"], num_stages=1 if _interpreted() else launch["num_stages"])
    return dq


@triton.jit
def _row_dot_kernel(O, DO, DELTA, n_rows, H, so_t, so_h, sdo_t, sdo_h, DV,
                    BLOCK_R: tl.constexpr, BLOCK_DV: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rm = r < n_rows
    t = (r // H).to(tl.int64)
    h = r % H
    dv = tl.arange(0, BLOCK_DV)
    m = rm[:, None] & (dv < DV)[None, :]
    o = tl.load(O + t[:, None] * so_t + h[:, None] * so_h + dv[None, :], mask=m, other=0.0).to(tl.float32)
    do = tl.load(DO + t[:, None] * sdo_t + h[:, None] * sdo_h + dv[None, :], mask=m, other=0.0).to(tl.float32)
    tl.store(DELTA + r, tl.sum(o * do, axis=1), mask=rm)


def row_dot(o, do):
    """delta = rowsum(o * do) in fp32, [Tq, H] (the softmax backward's correction term), in one read of o and do:
    `(o.float() * do.float()).sum(-1)` wrote and re-read three fp32 temporaries of o's size (at 128K tokens,
    32 heads, D 128: ~14 GB of traffic, ~4 ms on the H200, against ~2 GB here). o, do [Tq, H, Dv], unit stride
    (other strides are copied first)."""
    Tq, H, DV = o.shape
    o, do = (x if x.stride(2) == 1 else x.contiguous() for x in (o, do))
    delta = torch.empty(Tq, H, dtype=torch.float32, device=o.device)
    if Tq * H == 0:
        return delta
    BLOCK_DV = _pow2(DV, 16)
    BLOCK_R = max(1, 4096 // BLOCK_DV)
    _row_dot_kernel[(triton.cdiv(Tq * H, BLOCK_R),)](
        o, do, delta, Tq * H, H, o.stride(0), o.stride(1), do.stride(0), do.stride(1), DV,
        BLOCK_R=BLOCK_R, BLOCK_DV=BLOCK_DV, num_warps=4)
    return delta


def backward(do, q, k, v, o, lse, idx, cu_q, cu_k, tok_seq, scale, block_size, dq_union=None):
    """dq, dk, dv (dtypes of q, k, v). dq by default with sparse_attn_tiled.backward_dq (K/V shared across
    tiles of consecutive tokens; `dq_union`: its precomputed tile_union, else built here); H200, 9B config,
    random q: the whole backward 221 vs 235 ms at 128K, 47.9 vs 53.5 at 32K (bench/NOTES_sparse.md, run 4).
    SALA_SPARSE_BWD_DQ=onetoken (read per call) forces the one-token dq kernel below."""
    Tk, Hkv, DV = v.shape
    Tq, D = q.shape[0], q.shape[2]
    tiled_dq = _dispatch.env_choice("SALA_SPARSE_BWD_DQ", "tiled", ("tiled", "onetoken"), "sparse_attention") == "tiled"
    dq = None if tiled_dq and Tq > 0 else _sel.empty(q.shape, q.dtype, q.device)
    dk32 = torch.zeros(Tk, Hkv, D, dtype=torch.float32, device=q.device)
    dv32 = torch.zeros(Tk, Hkv, DV, dtype=torch.float32, device=q.device)
    if Tq == 0:
        return dq, dk32.to(k.dtype), dv32.to(v.dtype)
    do = do.contiguous()
    delta = row_dot(o, do)  # [Tq, H] fp32
    if tiled_dq:
        from . import sparse_attn_tiled
        dq = sparse_attn_tiled.backward_dq(do, q, k, v, lse, delta, idx, cu_q, cu_k, tok_seq, scale, block_size,
                                           union=dq_union)
    else:
        backward_dq(do, q, k, v, lse, delta, idx, cu_q, cu_k, tok_seq, scale, block_size, out=dq)
    backward_dkdv(do, q, k, v, lse, delta, idx, cu_q, cu_k, tok_seq, scale, block_size, dk32, dv32)
    return dq, dk32.to(k.dtype), dv32.to(v.dtype)


def backward_dkdv(do, q, k, v, lse, delta, idx, cu_q, cu_k, tok_seq, scale, block_size, dk32, dv32):
    """Adds dk, dv (scaled) into the fp32 buffers dk32 [Tk, Hkv, D] / dv32 [Tk, Hkv, Dv] (zeroed by the
    caller) over the transposed index: the second half of `backward`, callable alone so that a benchmark
    can time it under other DKDV_CFG launch configurations. do [Tq, H, Dv] contiguous, lse / delta fp32."""
    Tq, H, D = q.shape
    Tk, Hkv, DV = v.shape
    G = H // Hkv
    if Tq == 0:
        return dk32, dv32
    BD, BDV = _pow2(D, 16), _pow2(DV, 16)
    big = _dkdv_big_tiles(q.device, q.element_size(), max(BD, BDV), _pow2(block_size, 16))
    cfg = DKDV_CFG if big else DKDV_CFG_WIDE
    chunk = 64 if _interpreted() else cfg["chunk"]
    tok, bucket_off, cb, cstart, blk_seq, blk_off, NBT, n_buckets, grid = _transposed(
        idx, cu_q, cu_k, tok_seq, block_size, chunk, Tk)
    order = cfg.get("order", "bucket")
    if order not in ("bucket", "token"):
        raise ValueError(f"sparse_attention backward: the dk/dv config's order must be 'bucket' or 'token', "
                         f"got {order!r}")
    if order == "token":
        cb, cstart = _order_by_first_token(tok, bucket_off, cb, cstart, NBT, n_buckets, Tq)
    BQ = max(1, (16 if _interpreted() else cfg["rows"]) // _pow2(G))
    ROWS = _pow2(BQ * G, 16)
    _bwd_dkdv_kernel[(grid,)](
        q, k, v, do, dk32, dv32, lse, delta, tok, bucket_off, cb, cstart, blk_seq, blk_off, cu_q, cu_k,
        n_buckets, NBT,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1),
        dk32.stride(0), dk32.stride(1), dv32.stride(0), dv32.stride(1), lse.stride(0),
        scale * LOG2E, scale, D, DV, G, block_size, chunk,
        BQ=BQ, ROWS=ROWS, BLOCK_D=BD, BLOCK_DV=BDV, BLOCK_N=_pow2(block_size, 16),
        PREC=_prec(q.dtype), num_warps=4 if _interpreted() else cfg["num_warps"],
        num_stages=1 if _interpreted() else cfg["num_stages"])
    return dk32, dv32


@functools.lru_cache(maxsize=None)
def _sm_major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def _dkdv_big_tiles(device, element_size, block_d, block_n=64):
    """DKDV_CFG (128 rows, 2 stages: ~181 KB of shared memory for bf16, D 128, 64-key blocks; sm_90 AOT) fits sm_90's
    227 KB per block, not sm_80's 163 KB or sm_86/89's 99 KB, nor fp32 tiles, head dims past 128 or key blocks past
    64 (128: 226 KB and 880 B spilled; 256: 329 KB): those take DKDV_CFG_WIDE (~73 KB at the 9B shapes)."""
    if element_size != 2 or block_d > 128 or block_n > 64:
        return False
    if device.type != "cuda":
        return True  # the interpreter (its launch is forced small anyway)
    return _sm_major(device.index if device.index is not None else torch.cuda.current_device()) >= 9


def sanitize_indices(idx, cu_q, cu_k, tok_seq, block_size):
    """Arbitrary user block indices [Tq, Hkv, S] -> the kernels' form: valid (0 <= b <= own block),
    unique, ascending, -1 padded at the end. Device ops only."""
    Tq = idx.shape[0]
    dev = idx.device
    ts = tok_seq.long()
    lq = (cu_q[1:] - cu_q[:-1])[ts]
    lk = (cu_k[1:] - cu_k[:-1])[ts]
    t = lk - lq + (torch.arange(Tq, device=dev) - cu_q[:-1][ts])
    qb = torch.div(t, block_size, rounding_mode="floor")[:, None, None]
    x = idx.to(torch.int64)
    x = torch.where((x < 0) | (x > qb), torch.full_like(x, _BIG), x)
    x = torch.sort(x, dim=-1).values
    if x.shape[-1] > 1:
        dup = torch.zeros_like(x, dtype=torch.bool)
        dup[..., 1:] = x[..., 1:] == x[..., :-1]
        x = torch.where(dup, torch.full_like(x, _BIG), x)
        x = torch.sort(x, dim=-1).values
    return torch.where(x == _BIG, torch.full_like(x, -1), x).to(torch.int32).contiguous()


def dense_indices(cu_q, cu_k, tok_seq, block_size, width, Hkv):
    """Every causal block of every query (0..qb, -1 after): dense attention as block-sparse."""
    Tq = tok_seq.numel()
    dev = tok_seq.device
    ts = tok_seq.long()
    lq = (cu_q[1:] - cu_q[:-1])[ts]
    lk = (cu_k[1:] - cu_k[:-1])[ts]
    t = lk - lq + (torch.arange(Tq, device=dev) - cu_q[:-1][ts])
    qb = torch.div(t, block_size, rounding_mode="floor")[:, None]
    s = torch.arange(width, device=dev)[None, :]
    idx = torch.where(s <= qb, s, torch.full_like(s, -1)).to(torch.int32)
    return idx[:, None, :].expand(Tq, Hkv, width).contiguous()
