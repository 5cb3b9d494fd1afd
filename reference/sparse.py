"""Naive InfLLM-V2 sparse attention (MiniCPM-SALA sparse layers, spec section 2), the ground truth.

Notation for one sequence and one KV head g (all hyperparameters are arguments; defaults = 9B):
  ks, st   = kernel_size, kernel_stride          (C1 compression: 32, 16)
  ks2, st2 = lse_kernel_size, lse_kernel_stride  (C2 compression: 4 ks, 4 st = 128, 64)
  bs       = block_size (64); wb = window_size // bs (32); k_sel = topk + wb (96)

1. Compression. C1_j = mean(k[st*j : st*j + ks]) for every complete window j = 0 .. (Tk-ks)//st;
   C2 likewise with (ks2, st2). Values are never compressed.
2. Scores. A query at absolute position t (queries are bottom-right aligned to the keys: the i-th
   of Tq queries sits at t = Tk - Tq + i) sees the compressed key j iff its window is complete at
   t: st*j + ks <= t + 1. For every query head h of the group:
       lse_h(t) = logsumexp_{visible C2 j} (q_h(t) . C2_j * scale)     (0 if no C2 key is visible)
       p_h(t, j) = exp(q_h(t) . C1_j * scale - lse_h(t))               (0 if C1_j is not visible)
   and P(t, j) = sum_h p_h(t, j) over the query heads of the group.
3. Block scores. score(t, b) = max of P(t, j) over the C1 windows j that intersect block b
   ([bs*b, bs*b + bs) vs [st*j, st*j + ks)); 0 if none is visible. For the 9B configuration this
   is exactly max-pool(kernel 5, stride 4, padding 1) of the stride-16 scores.
4. Forced blocks. With qb = t // bs: blocks b < init_blocks and qb - wb <= b <= qb get +inf;
   future blocks b > qb get -inf (never selected).
5. Top-k. The min(k_sel, qb + 1) highest-scoring blocks, indices sorted ascending, padded with -1
   to k_sel. Ties are broken towards the lower block index (they are frequent: neighbouring
   blocks share the C1 window that straddles their border, so they often share a max). Requires topk >= init_blocks + 1 so the forced blocks always fit.
6. Attention. Each query head of group g attends with ordinary softmax over the tokens of the
   selected blocks of g that are <= t (token-level causal mask in the query's own block).

Dense below `dense_len`, per query: a query that sees fewer than dense_len keys (t + 1 < dense_len)
gets plain causal softmax attention; the others get selection + block-sparse attention. Decode sees
the same rule (a decode query at cache length L sees L keys), so prefill + token-by-token decode
equals one call over the whole sequence at every position; a sequence shorter than dense_len is
dense throughout. With every block selected (k_sel >= number of blocks) sparse equals dense.
"""
from __future__ import annotations

import math

import torch

NEG_INF = float("-inf")


def compress_keys(k: torch.Tensor, kernel_size: int, kernel_stride: int) -> torch.Tensor:
    """Mean of k [T, H, D] (or [B, T, H, D]) over windows (kernel_size, kernel_stride); complete
    windows only. Returns [N, H, D] (or [B, N, H, D]) in fp32, N = (T - ks)//st + 1 or 0."""
    T = k.shape[-3]
    n = 0 if T < kernel_size else (T - kernel_size) // kernel_stride + 1
    kf = k.float()
    windows = [kf[..., kernel_stride * j: kernel_stride * j + kernel_size, :, :].mean(dim=-3) for j in range(n)]
    if n == 0:
        return kf.new_zeros(*k.shape[:-3], 0, *k.shape[-2:])
    return torch.stack(windows, dim=-3)


def _visible(t: torch.Tensor, n: int, kernel_size: int, kernel_stride: int) -> torch.Tensor:
    """[Tq, n] mask: compressed key j is complete at query position t (st*j + ks <= t + 1)."""
    j = torch.arange(n, device=t.device)
    return (kernel_stride * j + kernel_size)[None, :] <= (t[:, None] + 1)


def _select_one(q, k, scale, kernel_size, kernel_stride, lse_kernel_size, lse_kernel_stride,
                block_size, init_blocks, window_size, topk):
    """Block indices [Tq, Hkv, k_sel] for one sequence: q [Tq, H, D], k [Tk, Hkv, D]."""
    Tq, H, D = q.shape
    Tk, Hkv = k.shape[0], k.shape[1]
    G = H // Hkv
    wb = window_size // block_size
    k_sel = topk + wb
    nb = (Tk + block_size - 1) // block_size
    t = torch.arange(Tk - Tq, Tk, device=q.device)
    c1 = compress_keys(k, kernel_size, kernel_stride)  # [N1, Hkv, D]
    c2 = compress_keys(k, lse_kernel_size, lse_kernel_stride)  # [N2, Hkv, D]
    vis1 = _visible(t, c1.shape[0], kernel_size, kernel_stride)  # [Tq, N1]
    vis2 = _visible(t, c2.shape[0], lse_kernel_size, lse_kernel_stride)
    # which C1 windows intersect which block: [nb, N1]
    j = torch.arange(c1.shape[0], device=q.device)
    b = torch.arange(nb, device=q.device)
    touches = (kernel_stride * j[None, :] < block_size * (b[:, None] + 1)) & \
              (kernel_stride * j[None, :] + kernel_size > block_size * b[:, None])
    qb = t // block_size
    out = torch.full((Tq, Hkv, k_sel), -1, dtype=torch.int32, device=q.device)
    qf = q.float()
    for g in range(Hkv):
        P = torch.zeros(Tq, c1.shape[0], device=q.device)
        for h in range(g * G, (g + 1) * G):
            s1 = qf[:, h] @ c1[:, g].T * scale
            s2 = (qf[:, h] @ c2[:, g].T * scale).masked_fill(~vis2, NEG_INF)
            lse = torch.logsumexp(s2, dim=-1) if c2.shape[0] > 0 else torch.full((Tq,), NEG_INF, device=q.device)
            lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
            P = P + torch.where(vis1, torch.exp(s1 - lse[:, None]), torch.zeros_like(s1))
        # max over the windows touching each block: [Tq, nb]
        score = torch.where(touches[None], P[:, None, :], torch.zeros((), device=q.device)).amax(-1) \
            if c1.shape[0] > 0 else torch.zeros(Tq, nb, device=q.device)
        forced = (b[None, :] < init_blocks) | ((b[None, :] >= qb[:, None] - wb) & (b[None, :] <= qb[:, None]))
        score = score.masked_fill(forced, float("inf")).masked_fill(b[None, :] > qb[:, None], NEG_INF)
        for i in range(Tq):
            n_sel = min(k_sel, int(qb[i]) + 1)
            # stable descending sort: among equal scores the lower block index wins (ties are common:
            # neighbouring blocks share the C1 window that straddles their border)
            idx = torch.sort(score[i], descending=True, stable=True).indices[:n_sel].sort().values
            out[i, g, :n_sel] = idx.to(torch.int32)
    return out


def _defaults(kernel_size, kernel_stride, lse_kernel_size, lse_kernel_stride):
    return (4 * kernel_size if lse_kernel_size is None else lse_kernel_size,
            4 * kernel_stride if lse_kernel_stride is None else lse_kernel_stride)


def _seq_ranges(Tq, Tk, B, cu_seqlens_q, cu_seqlens_k):
    """(batch row, q start, q end, k start, k end) for every sequence."""
    if cu_seqlens_q is None:
        return [(b, 0, Tq, 0, Tk) for b in range(B)]
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    return [(0, cq[n], cq[n + 1], ck[n], ck[n + 1]) for n in range(len(cq) - 1)]


def select_blocks(q, k, scale=None, kernel_size=32, kernel_stride=16, block_size=64, init_blocks=1,
                  window_size=2048, topk=64, lse_kernel_size=None, lse_kernel_stride=None,
                  cu_seqlens_q=None, cu_seqlens_k=None):
    """InfLLM-V2 block selection (steps 1-5). Returns int32 [B, Tq, Hkv, topk + window_size//block_size],
    block indices local to each sequence, ascending, padded with -1."""
    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    ks2, st2 = _defaults(kernel_size, kernel_stride, lse_kernel_size, lse_kernel_stride)
    k_sel = topk + window_size // block_size
    out = torch.full((B, Tq, Hkv, k_sel), -1, dtype=torch.int32, device=q.device)
    for b, qs, qe, ks_, ke in _seq_ranges(Tq, Tk, B, cu_seqlens_q, cu_seqlens_k):
        if qe > qs:
            out[b, qs:qe] = _select_one(q[b, qs:qe], k[b, ks_:ke], scale, kernel_size, kernel_stride, ks2, st2,
                                        block_size, init_blocks, window_size, topk)
    return out


def _attend(q, k, v, allowed, scale):
    """Softmax attention of q [Tq, H, D] over k, v [Tk, Hkv, *] with a boolean mask [Hkv, Tq, Tk]."""
    H, Hkv = q.shape[1], k.shape[1]
    G = H // Hkv
    kf = k.float().repeat_interleave(G, dim=1)
    vf = v.float().repeat_interleave(G, dim=1)
    s = torch.einsum("ihd,jhd->hij", q.float(), kf) * scale
    allowed = allowed.repeat_interleave(G, dim=0)
    s = s.masked_fill(~allowed, NEG_INF)
    p = torch.softmax(s, dim=-1)
    # a row with nothing allowed (never happens causally) gives 0; only such rows: a NaN that q or an allowed key
    # brings in must propagate (nan_to_num over all of p turned those rows into silent zeros)
    p = p.masked_fill(~allowed.any(-1, keepdim=True), 0.0)
    return torch.einsum("hij,jhd->ihd", p, vf)


def _causal_mask(Tq, Tk, device):
    t = torch.arange(Tk - Tq, Tk, device=device)
    return torch.arange(Tk, device=device)[None, :] <= t[:, None]  # [Tq, Tk]


def dense_attention(q, k, v, scale=None, cu_seqlens_q=None, cu_seqlens_k=None):
    """Causal softmax attention, queries bottom-right aligned to keys, GQA, varlen. fp32 math."""
    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    o = torch.zeros(B, Tq, H, v.shape[-1], dtype=torch.float32, device=q.device)
    for b, qs, qe, ks_, ke in _seq_ranges(Tq, Tk, B, cu_seqlens_q, cu_seqlens_k):
        if qe > qs:
            mask = _causal_mask(qe - qs, ke - ks_, q.device)
            o[b, qs:qe] = _attend(q[b, qs:qe], k[b, ks_:ke], v[b, ks_:ke], mask[None].expand(Hkv, -1, -1), scale)
    return o.to(q.dtype)


def block_sparse_attention(q, k, v, block_indices, block_size=64, scale=None, cu_seqlens_q=None,
                           cu_seqlens_k=None):
    """Step 6: softmax attention over the selected blocks (indices [B, Tq, Hkv, S], -1 = none), with
    the token-level causal mask. Written as dense attention under a mask. Any entry outside
    [0, n_blocks) is ignored like -1, a duplicate counts once (the kernels' sanitize_indices)."""
    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    o = torch.zeros(B, Tq, H, v.shape[-1], dtype=torch.float32, device=q.device)
    for b, qs, qe, ks_, ke in _seq_ranges(Tq, Tk, B, cu_seqlens_q, cu_seqlens_k):
        if qe == qs:
            continue
        L = ke - ks_
        nb = (L + block_size - 1) // block_size
        idx = block_indices[b, qs:qe].long()  # [Tq', Hkv, S]
        chosen = torch.zeros(qe - qs, Hkv, nb + 1, dtype=torch.bool, device=q.device)
        # negative and out-of-range entries land in the spare column nb
        chosen.scatter_(2, torch.where((idx < 0) | (idx >= nb), nb, idx), True)
        token_block = torch.arange(L, device=q.device) // block_size
        allowed = chosen[:, :, token_block].permute(1, 0, 2) & _causal_mask(qe - qs, L, q.device)[None]
        o[b, qs:qe] = _attend(q[b, qs:qe], k[b, ks_:ke], v[b, ks_:ke], allowed, scale)
    return _grad_linked(o, q, k, v).to(q.dtype)


def sparse_attention(q, k, v, scale=None, kernel_size=32, kernel_stride=16, block_size=64, init_blocks=1,
                     window_size=2048, topk=64, dense_len=8192, lse_kernel_size=None, lse_kernel_stride=None,
                     cu_seqlens_q=None, cu_seqlens_k=None, dense_rule="query"):
    """The whole InfLLM-V2 layer op: dense causal attention for the queries that see fewer than
    dense_len keys, selection + block-sparse attention for the others (module doc). dense_rule="call":
    the released code's rule instead, all queries of a sequence dense iff it has fewer than dense_len keys."""
    B, Tq, H, D = q.shape
    Tk = k.shape[1]
    o = torch.zeros(B, Tq, H, v.shape[-1], dtype=q.dtype, device=q.device)
    for b, qs, qe, ks_, ke in _seq_ranges(Tq, Tk, B, cu_seqlens_q, cu_seqlens_k):
        qq, kk, vv = q[b:b + 1, qs:qe], k[b:b + 1, ks_:ke], v[b:b + 1, ks_:ke]
        if qe == qs:
            continue
        t = torch.arange(ke - ks_ - (qe - qs), ke - ks_, device=q.device)  # absolute query positions
        if dense_rule == "call":
            dense_rows = torch.full_like(t, ke - ks_ < dense_len, dtype=torch.bool)[:, None, None]
        else:
            dense_rows = (t + 1 < dense_len)[:, None, None]
        out = dense_attention(qq, kk, vv, scale)[0]
        if not bool(dense_rows.all()):
            idx = select_blocks(qq, kk, scale, kernel_size, kernel_stride, block_size, init_blocks, window_size,
                                topk, lse_kernel_size, lse_kernel_stride)
            out = torch.where(dense_rows, out, block_sparse_attention(qq, kk, vv, idx, block_size, scale)[0])
        o[b, qs:qe] = out
    return _grad_linked(o, q, k, v)


def _grad_linked(o, q, k, v):
    """o itself, or, when no sequence wrote into it (an empty batch), o plus a zero term of q, k and v: the zero-size
    output then stays in their graph and backward works as for any other batch (as on the triton backend)."""
    if o.requires_grad or not (q.requires_grad or k.requires_grad or v.requires_grad):
        return o
    return o + 0 * (q.sum() + k.sum() + v.sum()).to(o.dtype)
