"""Properties of the naive references themselves: the ground truth has to be right first.

Each property is checked on hypothesis-drawn shapes against an independent formulation (not
against the function itself), so a wrong reference fails here.
"""
import math

import pytest
import torch
from hypothesis import given, strategies as st

import sala_ops.reference as R
from helpers import assert_close, gqa_heads, seeded_randn, varlen_splits


# ---------------------------------------------------------------- lightning
@given(heads=gqa_heads(), T=st.integers(1, 40), D=st.sampled_from([1, 3, 8]), B=st.integers(1, 2),
       with_state=st.booleans(), seed=st.integers(0, 2**16))
def test_lightning_recurrent_equals_parallel(heads, T, D, B, with_state, seed):
    H, Hkv = heads
    q, k, v = (seeded_randn(seed + i, B, T, h, D) for i, h in enumerate((H, Hkv, Hkv)))
    decay = seeded_randn(seed + 3, H).abs()
    S0 = seeded_randn(seed + 4, B, H, D, D) if with_state else None
    o1, f1 = R.lightning_recurrent(q, k, v, decay, initial_state=S0, output_final_state=True)
    o2, f2 = R.lightning_parallel(q, k, v, decay, initial_state=S0, output_final_state=True)
    assert_close(o2, o1, 1e-5, "parallel vs recurrent output")
    assert_close(f2, f1, 1e-5, "parallel vs recurrent final state")


@given(T=st.integers(2, 40), split=st.data(), seed=st.integers(0, 2**16))
def test_lightning_segments_carry_state(T, split, seed):
    cut = split.draw(st.integers(1, T - 1))
    H, D = 2, 4
    q, k, v = (seeded_randn(seed + i, 1, T, H, D) for i in range(3))
    decay = R.sala_decay_slopes(H)
    o, f = R.lightning_parallel(q, k, v, decay, output_final_state=True)
    oa, fa = R.lightning_parallel(q[:, :cut], k[:, :cut], v[:, :cut], decay, output_final_state=True)
    ob, fb = R.lightning_parallel(q[:, cut:], k[:, cut:], v[:, cut:], decay, initial_state=fa, output_final_state=True)
    assert_close(torch.cat([oa, ob], 1), o, 1e-5, "segmented output")
    assert_close(fb, f, 1e-5, "segmented final state")


@given(split=varlen_splits(total_max=30), seed=st.integers(0, 2**16))
def test_lightning_varlen_equals_separate(split, seed):
    lens, cu = split
    T, H, D = sum(lens), 2, 4
    q, k, v = (seeded_randn(seed + i, 1, T, H, D) for i in range(3))
    decay = R.sala_decay_slopes(H)
    S0 = seeded_randn(seed + 5, len(lens), H, D, D)
    o, f = R.lightning_recurrent(q, k, v, decay, initial_state=S0, output_final_state=True, cu_seqlens=cu)
    for n in range(len(lens)):
        s, e = int(cu[n]), int(cu[n + 1])
        on, fn = R.lightning_parallel(q[:, s:e], k[:, s:e], v[:, s:e], decay, initial_state=S0[n:n + 1],
                                      output_final_state=True)
        assert_close(o[:, s:e], on, 1e-5, f"sequence {n} output")
        assert_close(f[n:n + 1], fn, 1e-5, f"sequence {n} state")


def test_lightning_step_matches_recurrence_and_by_hand():
    H, D = 2, 3
    q, k, v = (seeded_randn(i, 1, 5, H, D) for i in range(3))
    decay = torch.tensor([0.5, 0.0])
    o, f = R.lightning_recurrent(q, k, v, decay, output_final_state=True)
    S = torch.zeros(1, H, D, D)
    for t in range(5):
        ot, S = R.lightning_step(q[:, t], k[:, t], v[:, t], S, decay)
        assert_close(ot, o[:, t], 1e-6, f"step {t}")
    assert_close(S, f, 1e-6, "state")
    # head 1 has no decay: its state is exactly the sum of outer products
    assert_close(f[0, 1], torch.einsum("tk,tv->kv", k[0, :, 1], v[0, :, 1]), 1e-6, "undecayed state")


def test_decay_slopes():
    s = R.sala_decay_slopes(32)
    assert s[0].item() == pytest.approx(2 ** -0.25) and s[-1].item() == pytest.approx(2 ** -8)
    assert torch.all(s[1:] < s[:-1])
    m = R.minimax_decay_slopes(32, layer_idx=31, num_layers=32)
    assert_close(m, s * 1e-5, 1e-6, "last MiniMax layer")


# ---------------------------------------------------------------- sparse
SMALL = dict(kernel_size=8, kernel_stride=4, block_size=16, window_size=32)


@given(T=st.integers(1, 90), ks=st.sampled_from([(4, 2), (8, 4), (6, 3)]), seed=st.integers(0, 2**16))
def test_compression_is_window_mean(T, ks, seed):
    size, stride = ks
    k = seeded_randn(seed, 1, T, 2, 3)
    c = R.compress_keys(k, size, stride)
    n = 0 if T < size else (T - size) // stride + 1
    assert c.shape == (1, n, 2, 3)
    for j in range(n):
        window = k[0, stride * j: stride * j + size]
        assert window.shape[0] == size  # only complete windows
        assert_close(c[0, j], window.mean(0), 1e-6, f"window {j}")


@given(heads=gqa_heads(), T=st.integers(1, 200), Tq=st.data(), topk=st.integers(2, 6),
       init=st.integers(0, 1), seed=st.integers(0, 2**16))
def test_selection_invariants(heads, T, Tq, topk, init, seed):
    H, Hkv = heads
    tq = Tq.draw(st.integers(1, T))
    q = seeded_randn(seed, 1, tq, H, 8)
    k = seeded_randn(seed + 1, 1, T, Hkv, 8)
    idx = R.select_blocks(q, k, topk=topk, init_blocks=init, **SMALL)
    bs, wb = SMALL["block_size"], SMALL["window_size"] // SMALL["block_size"]
    assert idx.shape == (1, tq, Hkv, topk + wb) and idx.dtype == torch.int32
    for i in range(tq):
        t = T - tq + i
        qb = t // bs
        for g in range(Hkv):
            row = idx[0, i, g].tolist()
            valid = [b for b in row if b >= 0]
            assert row[len(valid):] == [-1] * (len(row) - len(valid)), "padding only at the end"
            assert len(valid) == min(topk + wb, qb + 1)
            assert valid == sorted(valid) and len(set(valid)) == len(valid)
            assert max(valid) <= qb, "never a future block"
            forced = set(range(min(init, qb + 1))) | set(range(max(0, qb - wb), qb + 1))
            assert forced <= set(valid), f"forced blocks {forced} missing from {valid}"


def _selection_by_hand(q, k, topk, scale):
    """Independent per-query loop of the 9B-shaped rule: max-pool(kernel 5, stride 4, pad 1) over
    stride-4 C1 scores onto 16-token blocks (kernel 8, stride 4, block 16 is the 9B geometry / 4)."""
    T, H, D = q.shape[1], q.shape[2], q.shape[3]
    c1 = R.compress_keys(k, 8, 4)[0, :, 0]
    c2 = R.compress_keys(k, 32, 16)[0, :, 0]
    out = []
    for t in range(T):
        p = torch.zeros(c1.shape[0])
        for h in range(H):
            vis2 = [j for j in range(c2.shape[0]) if 16 * j + 32 <= t + 1]
            lse = torch.logsumexp(torch.stack([q[0, t, h] @ c2[j] * scale for j in vis2]), 0) if vis2 else 0.0
            for j in range(c1.shape[0]):
                if 4 * j + 8 <= t + 1:
                    p[j] += torch.exp(q[0, t, h] @ c1[j] * scale - lse)
        qb = t // 16
        padded = torch.cat([torch.zeros(1), p, torch.zeros(5)])
        scores = torch.stack([padded[4 * b: 4 * b + 5].max() for b in range(qb + 1)])
        forced = [b for b in range(qb + 1) if b < 1 or b >= qb - 2]
        scores[forced] = float("inf")
        # ties (frequent: neighbouring blocks share a border window) go to the lower block index
        order = sorted(range(qb + 1), key=lambda b: (-scores[b].item(), b))
        out.append(sorted(order[:min(topk + 2, qb + 1)]))
    return out


def test_selection_matches_maxpool_formulation():
    T, H = 160, 3
    q = seeded_randn(7, 1, T, H, 8)
    k = seeded_randn(8, 1, T, 1, 8)
    idx = R.select_blocks(q, k, kernel_size=8, kernel_stride=4, block_size=16, window_size=32, topk=3)
    expect = _selection_by_hand(q, k, 3, 8 ** -0.5)
    for t in range(T):
        got = [b for b in idx[0, t, 0].tolist() if b >= 0]
        assert got == expect[t], f"query {t}: {got} != {expect[t]}"


@given(heads=gqa_heads(), T=st.integers(1, 120), Tq=st.data(), seed=st.integers(0, 2**16))
def test_sparse_with_every_block_equals_dense(heads, T, Tq, seed):
    H, Hkv = heads
    tq = Tq.draw(st.integers(1, T))
    q = seeded_randn(seed, 1, tq, H, 8)
    k, v = seeded_randn(seed + 1, 1, T, Hkv, 8), seeded_randn(seed + 2, 1, T, Hkv, 8)
    nb = (T + 15) // 16
    o = R.sparse_attention(q, k, v, topk=nb + 1, dense_len=0, **SMALL)
    assert_close(o, _sdpa_causal(q, k, v), 1e-5, "sparse with every block vs dense")


def _sdpa_causal(q, k, v):
    """Dense bottom-right causal attention by torch's own SDPA (an independent implementation)."""
    Tq, Tk, G = q.shape[1], k.shape[1], q.shape[2] // k.shape[2]
    mask = torch.arange(Tk)[None, :] <= torch.arange(Tk - Tq, Tk)[:, None]
    o = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.repeat_interleave(G, 2).transpose(1, 2), v.repeat_interleave(G, 2).transpose(1, 2),
        attn_mask=mask)
    return o.transpose(1, 2)


@given(T=st.integers(1, 100), seed=st.integers(0, 2**16))
def test_dense_attention_matches_sdpa(T, seed):
    q, k, v = seeded_randn(seed, 1, T, 4, 8), seeded_randn(seed + 1, 1, T, 2, 8), seeded_randn(seed + 2, 1, T, 2, 8)
    assert_close(R.dense_attention(q, k, v), _sdpa_causal(q, k, v), 1e-5)


def test_sparse_below_dense_len_is_dense_and_above_is_not():
    T = 120
    q, k, v = seeded_randn(1, 1, T, 2, 8), seeded_randn(2, 1, T, 1, 8), seeded_randn(3, 1, T, 1, 8)
    dense = _sdpa_causal(q, k, v)
    assert_close(R.sparse_attention(q, k, v, topk=2, dense_len=T + 1, **SMALL), dense, 1e-6, "below dense_len")
    sparse = R.sparse_attention(q, k, v, topk=2, dense_len=T, **SMALL)
    assert (sparse - dense).abs().max() > 1e-3, "at dense_len the sparse path must drop blocks"


@given(T=st.integers(40, 150), cut=st.data(), seed=st.integers(0, 2**16))
def test_sparse_chunked_prefill_equals_one_call(T, cut, seed):
    c = cut.draw(st.integers(1, T - 1))
    q, k, v = seeded_randn(seed, 1, T, 2, 8), seeded_randn(seed + 1, 1, T, 1, 8), seeded_randn(seed + 2, 1, T, 1, 8)
    full = R.sparse_attention(q, k, v, topk=2, dense_len=0, **SMALL)
    # the second chunk's queries continue the key prefix (q shorter than k, bottom-right aligned)
    part = R.sparse_attention(q[:, c:], k, v, topk=2, dense_len=0, **SMALL)
    assert_close(part, full[:, c:], 1e-5, "chunked prefill")


@given(split=varlen_splits(total_max=120, max_seqs=3), seed=st.integers(0, 2**16))
def test_sparse_varlen_equals_separate(split, seed):
    lens, cu = split
    T = sum(lens)
    q, k, v = seeded_randn(seed, 1, T, 2, 8), seeded_randn(seed + 1, 1, T, 1, 8), seeded_randn(seed + 2, 1, T, 1, 8)
    o = R.sparse_attention(q, k, v, topk=2, dense_len=20, cu_seqlens_q=cu, cu_seqlens_k=cu, **SMALL)
    for n in range(len(lens)):
        s, e = int(cu[n]), int(cu[n + 1])
        on = R.sparse_attention(q[:, s:e], k[:, s:e], v[:, s:e], topk=2, dense_len=20, **SMALL)
        assert_close(o[:, s:e], on, 1e-6, f"sequence {n}")


# ---------------------------------------------------------------- RoPE / HyPE
@given(T=st.integers(1, 20), D=st.sampled_from([2, 8, 16]), rot=st.data(), start=st.integers(-50, 10**6),
       seed=st.integers(0, 2**16))
def test_rope_preserves_norm(T, D, rot, start, seed):
    r = rot.draw(st.sampled_from([d for d in (2, 4, 8, 16) if d <= D]))
    x = seeded_randn(seed, 2, T, 3, D)
    pos = torch.arange(start, start + T)
    y = R.apply_rope(x, pos, rotary_dim=r)
    assert_close(y.norm(dim=-1), x.norm(dim=-1), 1e-5, "norm")
    assert torch.equal(y[..., r:], x[..., r:]), "dims past rotary_dim pass through"


@given(m=st.integers(-1000, 1000), n=st.integers(-1000, 1000), shift=st.integers(-10**5, 10**5),
       seed=st.integers(0, 2**16))
def test_rope_dot_depends_on_position_difference(m, n, shift, seed):
    q, k = seeded_randn(seed, 1, 1, 1, 16).double(), seeded_randn(seed + 1, 1, 1, 1, 16).double()
    def dot(a, b):
        return (R.apply_rope(q, torch.tensor([a])) * R.apply_rope(k, torch.tensor([b]))).sum()
    assert dot(m, n).item() == pytest.approx(dot(m + shift, n + shift).item(), rel=1e-6, abs=1e-6)


def test_rope_rotate_half_pairing_by_hand():
    x = torch.zeros(1, 1, 1, 4)
    x[..., 0] = 1.0  # pairs (0, 2) and (1, 3); inv_freq = [1, theta^-1/2]
    y = R.apply_rope(x, torch.tensor([3]), theta=100.0)
    assert_close(y[0, 0, 0], torch.tensor([math.cos(3), 0.0, math.sin(3), 0.0]), 1e-6)


def test_hype_policy_rope_on_lightning_none_on_sparse():
    q, k = seeded_randn(1, 1, 6, 2, 8), seeded_randn(2, 1, 6, 1, 8)
    pos = torch.arange(6)
    qs, ks = R.hype_embed(q, k, pos, layer_type="sparse")
    assert torch.equal(qs, q) and torch.equal(ks, k)
    w = seeded_randn(3, 8).abs()
    ql, kl = R.hype_embed(q, k, pos, layer_type="lightning", q_norm_weight=w, k_norm_weight=w)
    assert_close(ql, R.apply_rope(R.rms_norm(q, w), pos), 1e-6, "norm then rope")
    assert R.HYPE_POLICY == {"lightning": "rope", "sparse": "none"}


@given(T=st.integers(2, 70), dense_len=st.integers(0, 80), seed=st.integers(0, 2**16))
def test_sparse_one_call_equals_every_prefix(T, dense_len, seed):
    """The per-query dense_len rule: row t of one call over T tokens equals a call whose last query is
    t over the t + 1 keys so far (what decode computes), whether t is below or above dense_len."""
    q, k, v = seeded_randn(seed, 1, T, 2, 8), seeded_randn(seed + 1, 1, T, 1, 8), seeded_randn(seed + 2, 1, T, 1, 8)
    full = R.sparse_attention(q, k, v, topk=2, dense_len=dense_len, **SMALL)
    for t in range(T):
        last = R.sparse_attention(q[:, t:t + 1], k[:, :t + 1], v[:, :t + 1], topk=2, dense_len=dense_len, **SMALL)
        assert_close(last, full[:, t:t + 1], 1e-6, f"row {t}")


# ---------------------------------------------------------------- spec pins at the 9B geometry
def test_decay_slopes_are_the_spec_formula_for_every_head():
    """Spec 3: 's_h = 2^(-8(h+1)/H) for h = 0..H-1, not scaled by layer'."""
    for H in (32, 4, 6):
        expect = torch.tensor([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)])
        assert_close(R.sala_decay_slopes(H), expect, 1e-7, f"H={H}")


def test_selection_at_the_9b_geometry_matches_torch_max_pool():
    """Spec 2, steps 1-5 with the 9B numbers: C1 = mean over 32 tokens stride 16, C2 = 128 / 64 (LSE only),
    p = exp(q.C1 * scale - lse) summed over the group, 'max-pool the stride-16 scores onto 64-token blocks
    (window 5, stride 4, padding 1)', block 0 and the local window (32 blocks back + own block) forced,
    k = topk + window_size / block_size. window_size / topk are shrunk so that selection drops blocks."""
    import torch.nn.functional as F
    T, H, Hkv, D, topk, window = 700, 4, 2, 16, 3, 128
    q, k = seeded_randn(11, 1, T, H, D) * 2, seeded_randn(12, 1, T, Hkv, D) * 2
    idx = R.select_blocks(q, k, window_size=window, topk=topk)  # 9B defaults otherwise: 32 / 16 / 64, init 1
    scale, G, wb = D ** -0.5, H // Hkv, window // 64
    c1 = torch.stack([k[0, 16 * j: 16 * j + 32].mean(0) for j in range((T - 32) // 16 + 1)])
    c2 = torch.stack([k[0, 64 * j: 64 * j + 128].mean(0) for j in range((T - 128) // 64 + 1)])
    for t in range(0, T, 7):
        qb = t // 64
        for g in range(Hkv):
            p = torch.zeros(c1.shape[0])
            for h in range(g * G, (g + 1) * G):
                n2 = [j for j in range(c2.shape[0]) if 64 * j + 128 <= t + 1]
                lse = torch.logsumexp(q[0, t, h] @ c2[n2, g].T * scale, 0) if n2 else 0.0
                n1 = [j for j in range(c1.shape[0]) if 16 * j + 32 <= t + 1]
                p[n1] += torch.exp(q[0, t, h] @ c1[n1, g].T * scale - lse)
            pooled = F.max_pool1d(p[None, None], 5, 4, 1)[0, 0]
            scores = torch.zeros(qb + 1)
            n = min(qb + 1, pooled.shape[0])
            scores[:n] = pooled[:n]
            scores[[b for b in range(qb + 1) if b < 1 or b >= qb - wb]] = float("inf")
            order = sorted(range(qb + 1), key=lambda b: (-scores[b].item(), b))[:topk + wb]
            got = [b for b in idx[0, t, g].tolist() if b >= 0]
            assert got == sorted(order), f"query {t}, KV head {g}: {got} != {sorted(order)}"
