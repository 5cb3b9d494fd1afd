"""InfLLM-V2 key compression and block selection (Triton). Kernels and their launchers only; the
policy (checks, dense fallback, autograd) lives in sala_ops/sparse.py. The exact rules are the ones
in reference/sparse.py (its docstring).

Everything works on *packed* sequences: q [Tq_total, H, D], k [Tk_total, Hkv, D] with int64
offsets cu_q / cu_k ([N+1], on the device). A batch [B, T, ...] is packed as N = B sequences of
equal length. No launcher reads a device value on the host: grids are sized from shapes (upper
bounds) and the per-program work is looked up on the device (`tile_map`).

Selection, one program per (tile of M query tokens, KV head g):
  1. load the M x G query rows (heads of the group) once;
  2. LSE over the visible C2 keys, online (log2 domain), per row;
  3. stream the blocks in tiles of NB blocks: for each block, the C1 windows that intersect it are
     gathered (NWIN per block, a constexpr), p = exp2(q.C1 * scale*log2e - lse2) masked by
     visibility, summed over the G heads, max-pooled onto the block; forced (init + local window)
     blocks get +inf and future blocks -inf;
  4. online top-k: a running buffer of the NB best (score, block) pairs per token, packed in int64
     keys (order-preserving float bits << 32 | ~block, so ties prefer the lower block), merged with
     each new tile by the bitonic rule max(buffer_desc, tile_asc) and re-sorted with tl.sort;
  5. the min(k_sel, qb+1) best are sorted ascending and written, -1 padded.
Memory: O(M x NB) registers per program; nothing of size T x T/bs ever exists in device memory.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
_BIG = 2 ** 30
_MIN_KEY = tl.constexpr(-(2 ** 63))
# Tests set POISON = True: kernel outputs are then allocated filled with NaN (floats) or -7 (ints)
# instead of torch.empty, so an element a kernel never writes fails the comparison.
POISON = False
SELECT_CFG = dict(num_warps=8, num_stages=1, rows=64)


def empty(shape, dtype, device):
    if not POISON:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.full(shape, float("nan") if dtype.is_floating_point else -7, dtype=dtype, device=device)


def _interpreted() -> bool:
    import os
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _pow2(x: int, minimum: int = 1) -> int:
    return max(minimum, triton.next_power_of_2(max(1, int(x))))


def tile_map(lens: torch.Tensor, block: int, grid: int):
    """Programs for tiles of `block` items over sequences of device lengths `lens` [N] (int64).
    `grid` is a host upper bound on the number of tiles (sum(ceil(len/block)) <= total//block + N).
    Returns (tile_seq int32 [grid], tile_start int32 [grid]); padding programs get tile_seq = N."""
    n = lens.numel()
    ntiles = (lens + block - 1) // block
    cum = torch.cumsum(ntiles, 0)
    ids = torch.arange(grid, device=lens.device, dtype=cum.dtype)
    seq = torch.searchsorted(cum, ids, right=True)
    first = (cum - ntiles)[seq.clamp(max=n - 1)]
    start = (ids - first) * block
    return seq.to(torch.int32), start.to(torch.int32)


def compressed_count(lens: torch.Tensor, kernel_size: int, kernel_stride: int) -> torch.Tensor:
    """Number of complete windows per sequence (device, int64)."""
    return torch.where(lens >= kernel_size, torch.div(lens - kernel_size, kernel_stride, rounding_mode="floor") + 1,
                       torch.zeros_like(lens))


# ----------------------------------------------------------------------------------------------
# compression


@triton.jit
def seq_bounds(cu_q, cu_k, n):
    """(q0, Lq, k0, Lk) of packed sequence n: its first query / key row and its query / key lengths (int64).
    Queries are bottom-right aligned: query i of the sequence sits at key position Lk - Lq + i."""
    q0 = tl.load(cu_q + n).to(tl.int64)
    Lq = tl.load(cu_q + n + 1).to(tl.int64) - q0
    k0 = tl.load(cu_k + n).to(tl.int64)
    Lk = tl.load(cu_k + n + 1).to(tl.int64) - k0
    return q0, Lq, k0, Lk


@triton.jit
def c2_lse(q, C2, c20, n2v, sc2_t, sc2_h, g, d, dm, t_row, qk_scale,
           ROWS: tl.constexpr, BN2: tl.constexpr, KS2: tl.constexpr, ST2: tl.constexpr, PREC: tl.constexpr):
    """Stage-1 LSE of each row (a query token x head) over the C2 keys 0 .. n2v-1 of its sequence that it
    can see (key window end <= t_row + 1), online, log2 domain; 0 for a row that sees none (the
    reference's fallback). Shared by the online (sparse_select) and fast (sparse_select_fast) kernels."""
    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    # key j is visible to a row iff j < nv (its window ends by the row's token; j < n2v): one int32
    # compare per score instead of the int64 window-end arithmetic
    tv = (t_row + 1 - KS2).to(tl.int32)
    nv = tl.minimum(tl.where(tv >= 0, tv // ST2 + 1, 0), n2v.to(tl.int32))
    n2 = n2v.to(tl.int32)
    jj = tl.arange(0, BN2)
    for j0 in range(0, n2, BN2):
        j = j0 + jj
        # keys past the last (j >= n2v) read clamped to it (no row predicate on the copies), weight 0 by j < nv;
        # an int64 scalar base plus int32 in-tile offsets
        jr = tl.minimum(jj, n2 - 1 - j0)
        c = tl.load(C2 + (c20 + j0) * sc2_t + g * sc2_h + (jr[:, None] * sc2_t + d[None, :]), mask=dm[None, :],
                    other=0.0)
        s = tl.dot(q, tl.trans(c.to(q.dtype)), input_precision=PREC)
        s = tl.where(j[None, :] < nv[:, None], s, float("-inf"))
        # the scale on the row maxima and into the exponent's FMA (as sparse_attn.softmax_step)
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s * qk_scale - m_safe[:, None]), 1)
        m_i = m_new
    return tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), 0.0)


@triton.jit
def _compress_kernel(K, C, tile_seq, tile_start, cu_k, c_off, nseq,
                     stride_kt, stride_kh, stride_ct, stride_ch, D, KS, ST,
                     BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    g = tl.program_id(1)
    n = tl.load(tile_seq + pid)
    if n < nseq:
        j0 = tl.load(tile_start + pid)
        k0 = tl.load(cu_k + n).to(tl.int64)
        L = tl.load(cu_k + n + 1).to(tl.int64) - k0
        N = tl.where(L >= KS, (L - KS) // ST + 1, 0)
        c0 = tl.load(c_off + n).to(tl.int64)
        j = j0 + tl.arange(0, BLOCK_J)
        d = tl.arange(0, BLOCK_D)
        mask = (j < N)[:, None] & (d < D)[None, :]
        base = K + (k0 + j.to(tl.int64) * ST)[:, None] * stride_kt + g * stride_kh + d[None, :]
        acc = tl.zeros([BLOCK_J, BLOCK_D], dtype=tl.float32)
        for r in range(0, KS):
            acc += tl.load(base + r * stride_kt, mask=mask, other=0.0).to(tl.float32)
        acc = acc / KS
        tl.store(C + (c0 + j.to(tl.int64))[:, None] * stride_ct + g * stride_ch + d[None, :], acc.to(C.dtype.element_ty),
                 mask=mask)


def compress(k: torch.Tensor, cu_k: torch.Tensor, kernel_size: int, kernel_stride: int, dtype=torch.float32):
    """Mean-pooled keys of packed k [Tk, Hkv, D] -> (c [bound, Hkv, D] in `dtype` (fp32 sums),
    c_off int64 [N+1]).
    Sequence n's windows are rows c_off[n] .. c_off[n+1]; rows past c_off[-1] are unused."""
    Tk, Hkv, D = k.shape
    nseq = cu_k.numel() - 1
    lens = cu_k[1:] - cu_k[:-1]
    cnt = compressed_count(lens, kernel_size, kernel_stride)
    c_off = torch.zeros(nseq + 1, dtype=torch.int64, device=k.device)
    c_off[1:] = torch.cumsum(cnt, 0)
    # sum over sequences of (L - ks) // st + 1 <= Tk // st + nseq (Tk // st alone when ks >= st, but C2 and
    # compress_keys allow st > ks: windows with gaps, one more than L // st per sequence); +1 keeps a row
    bound = Tk // kernel_stride + nseq + 1
    c = empty((bound, Hkv, D), dtype, k.device)
    BLOCK_J = 16 if _interpreted() else 32
    grid = bound // BLOCK_J + nseq + 1
    tseq, tstart = tile_map(cnt, BLOCK_J, grid)
    _compress_kernel[(grid, Hkv)](k, c, tseq, tstart, cu_k, c_off, nseq, k.stride(0), k.stride(1),
                                  c.stride(0), c.stride(1), D, kernel_size, kernel_stride,
                                  BLOCK_J=BLOCK_J, BLOCK_D=_pow2(D, 16), num_warps=4)
    return c, c_off


# ----------------------------------------------------------------------------------------------
# selection


def _prec(dtype) -> str:
    """tl.dot input precision: exact fp32 products for fp32 inputs (selection must match the fp32
    reference), the default (tensor cores) for fp16/bf16."""
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def _select_kernel(Q, C1, C2, OUT, tile_seq, tile_start, cu_q, cu_k, c1_off, c2_off, nseq,
                   sq_t, sq_h, sc1_t, sc1_h, sc2_t, sc2_h, so_t, so_h,
                   qk_scale, D, G, KS1, ST1, KS2, ST2, BS, INIT, WB, KSEL, W, DENSE_LEN,
                   M: tl.constexpr, GP: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr, NB: tl.constexpr,
                   BN2: tl.constexpr, NWIN: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)
    g = tl.program_id(1)
    n = tl.load(tile_seq + pid)
    if n < nseq:
        m0 = tl.load(tile_start + pid).to(tl.int64)
        q0, Lq, k0, Lk = seq_bounds(cu_q, cu_k, n)
        # per token of the tile
        tm = m0 + tl.arange(0, M)
        tok_ok = tm < Lq
        t_tok = Lk - Lq + tm
        qb_tok = t_tok // BS
        cols = tl.arange(0, NB)
        out_base = OUT + (q0 + tm)[:, None] * so_t + g * so_h
        # dense below dense_len, per query: a query seeing fewer than DENSE_LEN keys gets every causal
        # block (as if all were selected); the same rule as decode, so prefill and decode agree
        dense_tok = t_tok + 1 < DENSE_LEN
        t_first = Lk - Lq + m0
        if t_first + 1 < DENSE_LEN:
            for c0 in range(0, W, NB):
                c = c0 + cols
                val = tl.where(c[None, :] <= qb_tok[:, None], c[None, :], -1)
                tl.store(out_base + c[None, :], val.to(tl.int32),
                         mask=(tok_ok & dense_tok)[:, None] & (c < W)[None, :])
        if Lk - Lq + tl.minimum(m0 + M, Lq) >= DENSE_LEN:  # the tile's last query is sparse
            r = tl.arange(0, ROWS)
            rm = r // GP
            rh = r % GP
            rtok = m0 + rm
            rok = (rtok < Lq) & (rh < G)
            t_row = Lk - Lq + rtok
            d = tl.arange(0, BLOCK_D)
            dm = d < D
            q = tl.load(Q + (q0 + rtok)[:, None] * sq_t + (g * G + rh)[:, None] * sq_h + d[None, :],
                        mask=rok[:, None] & dm[None, :], other=0.0)
            t_max = Lk - Lq + tl.minimum(m0 + M, Lq) - 1
            # ---- LSE over the visible C2 keys (log2 domain); 0 when none is visible
            c20 = tl.load(c2_off + n).to(tl.int64)
            n2 = tl.load(c2_off + n + 1).to(tl.int64) - c20
            n2v = tl.where(t_max + 1 >= KS2, (t_max + 1 - KS2) // ST2 + 1, 0)
            n2v = tl.minimum(n2v, n2)
            lse = c2_lse(q, C2, c20, n2v, sc2_t, sc2_h, g, d, dm, t_row, qk_scale, ROWS, BN2, KS2, ST2, PREC)
            # ---- block scores + online top-k
            c10 = tl.load(c1_off + n).to(tl.int64)
            n1 = tl.load(c1_off + n + 1).to(tl.int64) - c10
            qb_max = t_max // BS
            buf = tl.full([M, NB], _MIN_KEY, dtype=tl.int64)
            for b0 in range(0, qb_max + 1, NB):
                b = b0 + cols
                jf = tl.where(BS * b >= KS1, (BS * b - KS1) // ST1 + 1, 0)
                jl = (BS * b + BS - 1) // ST1
                score = tl.zeros([M, NB], dtype=tl.float32)
                for o in range(NWIN):
                    j = jf + o
                    jv = (j <= jl) & (j < n1)
                    c = tl.load(C1 + (c10 + j)[:, None] * sc1_t + g * sc1_h + d[None, :],
                                mask=jv[:, None] & dm[None, :], other=0.0)
                    s = tl.dot(q, tl.trans(c.to(q.dtype)), input_precision=PREC) * qk_scale - lse[:, None]
                    vis = jv[None, :] & ((ST1 * j + KS1)[None, :] <= (t_row + 1)[:, None]) & rok[:, None]
                    p = tl.where(vis, tl.exp2(s), 0.0)
                    pp = tl.sum(tl.reshape(p, [M, GP, NB]), 1)
                    score = tl.maximum(score, pp)
                forced = (b[None, :] < INIT) | ((b[None, :] + WB >= qb_tok[:, None]) & (b[None, :] <= qb_tok[:, None]))
                score = tl.where(forced, float("inf"), score)
                score = tl.where(b[None, :] > qb_tok[:, None], float("-inf"), score)
                bits = score.to(tl.int32, bitcast=True)
                ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
                key = (ordered.to(tl.int64) << 32) | (0x7FFFFFFF - b[None, :]).to(tl.int64)
                key = tl.sort(key, descending=False)
                buf = tl.sort(tl.maximum(buf, key), descending=True)
            nsel = tl.minimum(qb_tok + 1, KSEL)
            blk = 0x7FFFFFFF - (buf & 0xFFFFFFFF)
            blk = tl.where(cols[None, :] < nsel[:, None], blk, 1073741824)
            blk = tl.sort(blk, descending=False)
            blk = tl.where(blk == 1073741824, -1, blk)
            tl.store(out_base + cols[None, :], blk.to(tl.int32),
                     mask=(tok_ok & ~dense_tok)[:, None] & (cols < W)[None, :])


@functools.lru_cache(maxsize=None)
def num_windows_per_block(kernel_size: int, kernel_stride: int, block_size: int) -> int:
    """Max number of C1 windows intersecting one block (5 for the 9B config)."""
    best = 1
    period = kernel_stride * block_size  # the pattern repeats with this many blocks at most
    for b in range(min(period, 4096) + 2):
        jf = 0 if block_size * b < kernel_size else (block_size * b - kernel_size) // kernel_stride + 1
        jl = (block_size * b + block_size - 1) // kernel_stride
        best = max(best, jl - jf + 1)
    return best


def select(q: torch.Tensor, k: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor, scale: float,
           kernel_size: int, kernel_stride: int, lse_kernel_size: int, lse_kernel_stride: int,
           block_size: int, init_blocks: int, window_size: int, topk: int, dense_len: int = 0,
           width: int | None = None) -> torch.Tensor:
    """Block indices int32 [Tq, Hkv, width] for packed q [Tq, H, D], k [Tk, Hkv, D].
    Queries that see fewer than dense_len keys (t + 1 < dense_len) get every causal block (0..qb),
    as dense attention; pass dense_len=0 for pure selection."""
    Tq, H, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    wb = window_size // block_size
    k_sel = topk + wb
    W = k_sel if width is None else width
    assert W >= k_sel
    nseq = cu_q.numel() - 1
    out = empty((Tq, Hkv, W), torch.int32, q.device)
    if Tq == 0:
        return out
    # the scores are tl.dot(q, C^T) in q's dtype: storing C in that dtype halves the selection's
    # traffic for bf16/fp16 and rounds exactly as a cast at load would (fp32 stays fp32)
    c1, c1_off = compress(k, cu_k, kernel_size, kernel_stride, q.dtype)
    c2, c2_off = compress(k, cu_k, lse_kernel_size, lse_kernel_stride, q.dtype)
    GP = _pow2(G)
    M = max(1, SELECT_CFG["rows"] // GP)  # rows = tokens x heads of the group, per program
    NB = _pow2(W, 16)
    lens_q = cu_q[1:] - cu_q[:-1]
    grid = Tq // M + nseq + 1
    tseq, tstart = tile_map(lens_q, M, grid)
    nwin = num_windows_per_block(kernel_size, kernel_stride, block_size)
    prec = _prec(q.dtype)
    _select_kernel[(grid, Hkv)](
        q, c1, c2, out, tseq, tstart, cu_q, cu_k, c1_off, c2_off, nseq,
        q.stride(0), q.stride(1), c1.stride(0), c1.stride(1), c2.stride(0), c2.stride(1), out.stride(0), out.stride(1),
        scale * LOG2E, D, G, kernel_size, kernel_stride, lse_kernel_size, lse_kernel_stride, block_size,
        init_blocks, wb, k_sel, W, dense_len,
        M=M, GP=GP, ROWS=M * GP, BLOCK_D=_pow2(D, 16), NB=NB, BN2=16 if _interpreted() else 64, NWIN=nwin, PREC=prec,
        num_warps=4 if _interpreted() else SELECT_CFG["num_warps"], num_stages=SELECT_CFG["num_stages"])
    return out
