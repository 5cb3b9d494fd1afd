"""Sparse decode (sala_ops.sparse_decode): prefill n tokens, then decode one token at a time, must give
at every position what one reference sparse_attention call over the whole sequence gives (queries
bottom-right aligned; below dense_len keys, dense causal attention), with the selected blocks equal
to reference select_blocks, the incrementally built compressed keys equal to compress_keys from
scratch, and the sequences of a batch independent.

CPU: the PyTorch path (fast, long sequences) and the Triton kernels through the interpreter (fp32,
small configs: kernel 8, stride 4, block 16, window 32, topk 2..4, dense_len crossed during decode).
GPU-marked: the real 9B configuration in bf16, and a CUDA-graph replay of the decode step.
"""
import math

import os

import pytest
import torch

from sala_ops import use_backend
from sala_ops.reference import sparse as R
from sala_ops.sparse_decode import SparseLayerCache, sparse_decode, sparse_decode_step, sparse_prefill
from helpers import assert_close, rel_err, seeded_randn

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"

SMALL = dict(kernel_size=8, kernel_stride=4, block_size=16, window_size=32, init_blocks=1)
SPARSE_KEYS = ("kernel_size", "kernel_stride", "block_size", "init_blocks", "window_size", "topk", "dense_len",
               "lse_kernel_size", "lse_kernel_stride")


@pytest.fixture(autouse=True)
def _sort_path_unless_fast(request, monkeypatch):
    """The default decode path is the 3-launch kernel (sparse_decode_fast.py), tested by the test_fast_*
    and test_gpu_fast_* cases (which set SALA_SPARSE_DECODE=fast themselves) and by tests/test_layers.py;
    every other test here runs the 5-launch "sort" path, so both stay covered."""
    if "fast" not in request.node.name:
        monkeypatch.setenv("SALA_SPARSE_DECODE", "sort")


def _ref_kw(cfg):
    return {k: v for k, v in cfg.items() if k in SPARSE_KEYS}


def _expected(q, k, v, cfg, positions):
    """Reference outputs [len(positions), H, D] and indices [len(positions), Hkv, k_sel] of one
    sequence q [T, H, D], k/v [T, Hkv, D] at the given positions: ONE sparse_attention call over the
    whole sequence (dense for the queries with t + 1 < dense_len, by the op's per-query rule); the
    expected indices are the selection's for t + 1 >= dense_len and none below."""
    kw = _ref_kw(cfg)
    full = R.sparse_attention(q[None], k[None], v[None], **kw)[0]
    sel_kw = {a: b for a, b in kw.items() if a != "dense_len"}
    idx = R.select_blocks(q[None], k[None], **sel_kw)[0]
    ksel = cfg["topk"] + cfg["window_size"] // cfg["block_size"]
    outs, idxs = [], []
    for t in positions:
        outs.append(full[t])
        if t + 1 >= cfg["dense_len"]:
            idxs.append(idx[t])
        else:
            idxs.append(torch.full((k.shape[1], ksel), -1, dtype=torch.int32))
    return torch.stack(outs), torch.stack(idxs)


def _run(backend, cfg, prompt_lens, steps, H, Hkv, D, dtype=torch.float32, device="cpu", seed=0, chunk_target=None,
         check_prefill=False):
    """Prefill each sequence with its prompt, decode `steps` tokens; compare with the reference."""
    B = len(prompt_lens)
    seqs = []
    for b, n in enumerate(prompt_lens):
        T = n + steps
        seqs.append(tuple(seeded_randn(seed + 10 * b + i, T, h, D) for i, h in enumerate((H, Hkv, Hkv))))
    max_len = max(prompt_lens) + steps + 3
    cache = SparseLayerCache(B, max_len, Hkv, D, dtype=dtype, device=device, **_ref_kw(cfg))
    if chunk_target is not None:
        cache.chunk_target = chunk_target
    # prefill: packed varlen when the prompts differ
    cu = torch.tensor([0] + list(torch.tensor(prompt_lens).cumsum(0).tolist()), dtype=torch.int32, device=device)
    cat = [torch.cat([s[i][:n] for s, n in zip(seqs, prompt_lens)])[None].to(device, dtype) for i in range(3)]
    if check_prefill:
        with use_backend("reference"):
            o = sparse_prefill(cat[0], cat[1], cat[2], cache, cu_seqlens=cu)
        for b, (s, n) in enumerate(zip(seqs, prompt_lens)):
            want = R.sparse_attention(s[0][None, :n], s[1][None, :n], s[2][None, :n], **_ref_kw(cfg))[0]
            assert_close(o[0, cu[b]:cu[b + 1]].float().cpu(), want, 1e-5, f"prefill output of sequence {b}")
    else:
        cache.append(cat[1], cat[2], cu_seqlens=cu)
    outs, idxs = [], []
    with use_backend(backend):
        for i in range(steps):
            qt = torch.stack([s[0][n + i] for s, n in zip(seqs, prompt_lens)]).to(device, dtype)
            kt = torch.stack([s[1][n + i] for s, n in zip(seqs, prompt_lens)]).to(device, dtype)
            vt = torch.stack([s[2][n + i] for s, n in zip(seqs, prompt_lens)]).to(device, dtype)
            cache.append_token(kt, vt)
            o, idx = sparse_decode(qt, cache, return_indices=True)
            outs.append(o.float().cpu())
            idxs.append(idx.cpu().clone())
    assert cache.lengths_host() == [n + steps for n in prompt_lens]
    cache.check()
    if backend == "triton":
        assert cache._ws, "the Triton path did not run"
        if chunk_target is not None and chunk_target <= 8:
            assert cache._ws[H]["p"]["NCH"] >= 2, "the multi-chunk top-k merge was not exercised"
    outs, idxs = torch.stack(outs, 1), torch.stack(idxs, 1)  # [B, steps, ...]
    for b, ((q, k, v), n) in enumerate(zip(seqs, prompt_lens)):
        pos = list(range(n, n + steps))
        want_o, want_i = _expected(q, k, v, cfg, pos)
        assert torch.equal(idxs[b].long(), want_i.long()), \
            f"selected blocks of sequence {b} differ at positions " \
            f"{[t for t, a, r in zip(pos, idxs[b], want_i) if not torch.equal(a.long(), r.long())]}"
        for s_, t in enumerate(pos):
            assert_close(outs[b, s_], want_o[s_], 1e-5, f"decode output of sequence {b} at position {t}")
        # incrementally built compressed keys = compress_keys from scratch
        c1, c2 = cache.compressed_keys(b)
        ks2, st2 = cache.config.c2
        ref1 = R.compress_keys(k, cfg["kernel_size"], cfg["kernel_stride"])
        ref2 = R.compress_keys(k, ks2, st2)
        assert c1.shape == ref1.shape and c2.shape == ref2.shape
        assert_close(c1.cpu(), ref1, 1e-6, f"C1 keys of sequence {b}")
        assert_close(c2.cpu(), ref2, 1e-6, f"C2 keys of sequence {b}")
    return cache, outs


# ---------------------------------------------------------------- PyTorch path (CPU, long)
@pytest.mark.parametrize("topk,heads,prompts,dense_len", [
    (2, (2, 1), [40], 64),
    (3, (4, 2), [37, 90], 100),
    (4, (6, 2), [1, 129, 63], 120),
])
def test_reference_path_prefill_then_decode(topk, heads, prompts, dense_len):
    H, Hkv = heads
    cfg = dict(SMALL, topk=topk, dense_len=dense_len)
    steps = 200 - max(prompts)
    _run("reference", cfg, prompts, steps, H, Hkv, 16, seed=topk, check_prefill=True)


@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16])
def test_reference_path_under_autocast(amp_dtype):
    """AMP (torch.autocast) must not reach into the ops: the reference backend's fp32 softmax math ran its
    matmuls in 16 bits under autocast (10x the error of the same call outside it for bf16 inputs, silently).
    sparse_attention, select_blocks, block_sparse_attention, sparse_prefill and the decode steps give inside
    autocast exactly what they give outside."""
    from sala_ops import block_sparse_attention, select_blocks, sparse_attention
    from sala_ops.sparse import SparseConfig
    cfg = SparseConfig(kernel_size=4, kernel_stride=2, block_size=4, init_blocks=1, window_size=4, topk=2,
                       dense_len=16)
    g = torch.Generator().manual_seed(0)
    q = (torch.randn(2, 40, 4, 16, generator=g) * 3).to(amp_dtype)
    k, v = ((torch.randn(2, 40, 2, 16, generator=g) * 3).to(amp_dtype) for _ in range(2))

    def run():
        idx = select_blocks(q, k, config=cfg)
        cache = SparseLayerCache(2, 64, 2, 16, dtype=amp_dtype, config=cfg)
        prefill = sparse_prefill(q[:, :30], k[:, :30], v[:, :30], cache)
        steps = [sparse_decode_step(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], cache) for t in range(30, 40)]
        return (sparse_attention(q, k, v, config=cfg), block_sparse_attention(q, k, v, idx, cfg.block_size),
                torch.cat([prefill] + steps, 1), idx)

    with use_backend("reference"):
        want = run()
        with torch.autocast("cpu", dtype=amp_dtype):
            got = run()
    for name, a, b in zip(("sparse_attention", "block_sparse_attention", "prefill + decode", "select_blocks"),
                          want, got):
        assert b.dtype == a.dtype and torch.equal(a, b), name


# ---------------------------------------------------------------- Triton kernels (interpreter on CPU)
@pytest.mark.parametrize("topk,heads,prompts,steps,D,chunk_target", [
    # two sequences of different lengths cross dense_len = 64 during decode; one chunk per row
    (3, (4, 2), [40, 55], 36, 16, 32),
    # GQA group 3, odd head dim, several selection chunks (multi-chunk top-k merge), T up to 200
    (4, (3, 1), [150], 14, 24, 4),
    # topk 2 (4 blocks selected), group 1: four selection chunks of 4 blocks merged
    (2, (2, 2), [150], 30, 32, 8),
])
def test_triton_prefill_then_decode(topk, heads, prompts, steps, D, chunk_target):
    H, Hkv = heads
    cfg = dict(SMALL, topk=topk, dense_len=64)
    _run("triton", cfg, prompts, steps, H, Hkv, D, device=DEV, seed=100 + topk, chunk_target=chunk_target)


def test_triton_batch_rows_independent():
    """Row 1 of a batch decodes exactly as it does alone in a cache of batch 1."""
    cfg = dict(SMALL, topk=3, dense_len=50)
    H, Hkv, D, steps = 4, 2, 16, 6
    cache3, outs3 = _run("triton", cfg, [20, 60, 45], steps, H, Hkv, D, device=DEV, seed=7)
    # sequence b of _run is seeded with seed + 10 * b: alone, sequence 1 is seed 17 at b = 0
    cache1, outs1 = _run("triton", cfg, [60], steps, H, Hkv, D, device=DEV, seed=17)
    assert_close(outs3[1], outs1[0], 1e-6, "row 1 of a batch vs alone")


def test_decode_step_and_overflow():
    """sparse_decode_step = append_token + sparse_decode; a full sequence drops tokens and check() says so."""
    cfg = dict(SMALL, topk=2, dense_len=10)
    H, Hkv, D = 2, 1, 16
    k = seeded_randn(1, 1, 20, Hkv, D)
    q = seeded_randn(2, 1, 20, H, D)
    with use_backend("triton"):
        cache = SparseLayerCache(1, 20, Hkv, D, dtype=torch.float32, device=DEV, **_ref_kw(cfg))
        cache.append(k[:, :19].to(DEV), k[:, :19].to(DEV))
        o = sparse_decode_step(q[:, 19].to(DEV), k[:, 19].to(DEV), k[:, 19].to(DEV), cache)
        want = R.sparse_attention(q, k, k, **_ref_kw(cfg))[:, 19]
        assert_close(o.float().cpu(), want, 1e-5, "sparse_decode_step")
        cache.check()
        cache.append_token(k[:, 0].to(DEV), k[:, 0].to(DEV))
    assert cache.lengths_host() == [20]
    with pytest.raises(ValueError, match="max_len"):
        cache.check()


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_truncate_keeps_overflow_unless_it_cuts_the_dropped_tokens(backend):
    """A sequence that dropped tokens at max_len keeps its overflow flag through a truncate that does not cut it
    (length >= max_len: the dropped tokens are still missing); truncate cleared every flag unconditionally, so
    check() stopped reporting the loss. A truncate below max_len rolls back past the loss and clears it."""
    cfg = dict(SMALL, topk=2, dense_len=10)
    k = seeded_randn(1, 2, 20, 1, 16, device=DEV)
    cache = SparseLayerCache(2, 20, 1, 16, dtype=torch.float32, device=DEV, **_ref_kw(cfg))
    cache.append(k, k)
    with use_backend(backend):
        cache.append_token(k[:, 0], k[:, 0])
    for length in (25, 20):
        cache.truncate(length)
        assert cache.lengths_host() == [20, 20]
        with pytest.raises(ValueError, match="max_len"):
            cache.check()
    cache.truncate(19)
    cache.check()
    assert cache.lengths_host() == [19, 19]


def test_bad_arguments_name_the_op():
    cache = SparseLayerCache(2, 32, 2, 16, dtype=torch.float32, **dict(SMALL, topk=2, dense_len=16))
    with pytest.raises(TypeError, match="sparse_decode"):
        sparse_decode(torch.zeros(2, 4, 16, dtype=torch.float16), cache)
    with pytest.raises(ValueError, match="sparse_decode.*batch"):
        sparse_decode(torch.zeros(3, 4, 16), cache)
    with pytest.raises(ValueError, match="sparse_decode.*multiple"):
        sparse_decode(torch.zeros(2, 3, 16), cache)
    with pytest.raises(ValueError, match="append.*max_len"):
        cache.append(torch.zeros(2, 33, 2, 16), torch.zeros(2, 33, 2, 16))


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("cached", [[10, 10], [10, 25]])
def test_prefill_without_tokens_names_the_op(backend, cached):
    """sparse_prefill with a zero-length chunk (q, k, v [B, 0, ...]) failed with torch.arange's bare 'step must be
    nonzero' (sequences of different cached lengths) or with sparse_attention's message (equal lengths); it is a
    ValueError naming sparse_prefill and q, and the cache is left alone."""
    cfg = dict(SMALL, topk=2, dense_len=16)
    cache = SparseLayerCache(2, 64, 1, 16, dtype=torch.float32, device=DEV, **cfg)
    cu = torch.tensor([0, cached[0], sum(cached)], device=DEV)
    kv = seeded_randn(0, 1, sum(cached), 1, 16, device=DEV)
    cache.append(kv, kv, cu_seqlens=cu)
    q, k = torch.zeros(2, 0, 2, 16, device=DEV), torch.zeros(2, 0, 1, 16, device=DEV)
    with use_backend(backend):
        with pytest.raises(ValueError, match="sparse_prefill.*q.*at least one token"):
            sparse_prefill(q, k, k, cache)
    assert cache.lengths_host() == cached


def test_resized_refuses_to_drop_cached_tokens():
    """resized(max_len, keep) keeps every cached token or raises: a keep (or a new capacity) below a sequence's
    length copied only `keep` positions but all the old lengths, so the new cache claimed tokens it did not hold
    (zero keys attended silently; lengths past the new max_len made the decode kernels read out of bounds)."""
    cache = SparseLayerCache(2, 64, 2, 16, dtype=torch.float32, **dict(SMALL, topk=2, dense_len=16))
    kv = seeded_randn(0, 2, 50, 2, 16)
    cache.append(kv, kv)
    for max_len, keep in ((40, 40), (100, 20), (100, -3)):
        with pytest.raises(ValueError, match="resized.*keep"):
            cache.resized(max_len, keep=keep)
    with pytest.raises(TypeError, match="resized.*max_len"):
        cache.resized(100.0)
    with pytest.raises(ValueError, match="resized.*max_len"):
        cache.resized(0, keep=0)
    # a smaller capacity that still holds every token is fine, and keeps the contents
    small = cache.resized(50, keep=50)
    assert small.lengths_host() == [50, 50] and torch.equal(small.k, cache.k[:, :50])
    for b in range(2):
        for x, y in zip(small.compressed_keys(b), cache.compressed_keys(b)):
            assert torch.equal(x, y)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_failed_prefill_or_step_leaves_the_cache_alone(backend):
    """A sparse_prefill / sparse_decode_step whose q is refused raises naming the op and the argument before
    anything is appended: the K/V append used to run first (the q checks came later, inside sparse_attention /
    sparse_decode), so every refused call still grew the cache by its tokens."""
    cfg = dict(SMALL, topk=2, dense_len=16)
    B, H, Hkv, D, T = 2, 4, 2, 16, 5
    cache = SparseLayerCache(B, 64, Hkv, D, dtype=torch.float32, device=DEV, **cfg)
    kv = seeded_randn(0, B, 20, Hkv, D, device=DEV)
    cache.append(kv, kv)
    k = seeded_randn(1, B, T, Hkv, D, device=DEV)
    q = seeded_randn(2, B, T, H, D, device=DEV)
    bad_q = [(TypeError, "q.*dtype", q.half()), (ValueError, "q.*heads", q[:, :, :3]),
             (ValueError, "q.*head dim", torch.cat([q, q], -1)), (TypeError, "q must be a torch.Tensor", q.tolist())]
    with use_backend(backend):
        for exc, what, qq in bad_q:
            with pytest.raises(exc, match=f"sparse_prefill.*{what}"):
                sparse_prefill(qq, k, k, cache)
            assert cache.lengths_host() == [20, 20], what
        with pytest.raises(ValueError, match="sparse_prefill.*scale"):
            sparse_prefill(q, k, k, cache, scale=float("nan"))
        with pytest.raises(TypeError, match="sparse_prefill.*k must be a torch.Tensor"):
            sparse_prefill(q, k.tolist(), k, cache)
        assert cache.lengths_host() == [20, 20]
        for exc, what, qq in bad_q:
            qq = qq[:, 0] if isinstance(qq, torch.Tensor) else qq
            with pytest.raises(exc, match=f"sparse_decode.*{what}"):
                sparse_decode_step(qq, k[:, 0], k[:, 0], cache)
            assert cache.lengths_host() == [20, 20], what
        if backend == "triton":  # the kernels have no backward: refused, and nothing appended either
            with pytest.raises(ValueError, match="sparse_decode.*requires grad"):
                sparse_decode_step(q[:, 0].clone().requires_grad_(), k[:, 0], k[:, 0], cache)
            assert cache.lengths_host() == [20, 20]
        # the valid calls still work
        o = sparse_prefill(q, k, k, cache)
        assert o.shape == q.shape and cache.lengths_host() == [25, 25]
        o = sparse_decode_step(q[:, 0], k[:, 0], k[:, 0], cache)
        assert o.shape == q[:, 0].shape and cache.lengths_host() == [26, 26]


def test_triton_decode_refuses_q_that_requires_grad():
    """The Triton decode kernels have no backward: a q that requires grad under autograd is an error
    naming the op (not an output without a gradient path); under no_grad the same call runs."""
    cache = SparseLayerCache(1, 32, 1, 16, dtype=torch.float32, device=DEV, **dict(SMALL, topk=2, dense_len=16))
    kv = torch.randn(1, 1, 16, device=DEV)
    cache.append_token(kv, kv)
    q = torch.randn(1, 2, 16, device=DEV, requires_grad=True)
    with use_backend("triton"):
        with pytest.raises(ValueError, match="sparse_decode.*requires grad"):
            sparse_decode(q, cache)
        with torch.no_grad():
            assert torch.isfinite(sparse_decode(q, cache)).all()


@pytest.mark.parametrize("path", ["fast", "sort"])
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_returned_indices_survive_the_next_decode(monkeypatch, backend, path):
    """sparse_decode(..., return_indices=True) returns indices the caller owns: the Triton paths returned their
    workspace buffer itself, so the indices kept from one step were overwritten by the next decode (here: a
    sparse step's blocks turned into the -1s of a dense step after a truncate), silently; the reference backend
    returns a fresh tensor."""
    monkeypatch.setenv("SALA_SPARSE_DECODE", path)
    cfg = dict(SMALL, topk=2, dense_len=40)
    g = torch.Generator().manual_seed(0)
    cache = SparseLayerCache(1, 120, 1, 16, dtype=torch.float32, device=DEV, **cfg)
    cache.append(*(torch.randn(1, 100, 1, 16, generator=g).to(DEV) for _ in range(2)))
    with use_backend(backend):
        _, first = sparse_decode(torch.randn(1, 2, 16, generator=g).to(DEV), cache, return_indices=True)
        kept = first.clone()
        assert bool((kept >= 0).any()), "the first step must decode sparsely"
        cache.truncate(20)  # below dense_len: the next step decodes densely, its indices all -1
        _, second = sparse_decode(torch.randn(1, 2, 16, generator=g).to(DEV), cache, return_indices=True)
    assert bool((second == -1).all())
    assert torch.equal(first, kept), "the indices returned by the first step changed after the second step"


# ---------------------------------------------------------------- GPU: the 9B configuration
def _lowp_attend(q, k, v, allowed, scale, dtype):
    """PyTorch's own attention in `dtype` (for the DESIGN's 2x-low-precision bound): q [H, D], k/v [L, Hkv, D]."""
    G = q.shape[0] // k.shape[1]
    kk, vv = k.to(dtype).repeat_interleave(G, 1), v.to(dtype).repeat_interleave(G, 1)
    s = torch.einsum("hd,lhd->hl", q.to(dtype), kk) * scale
    s = s.masked_fill(~allowed.repeat_interleave(G, 0), float("-inf"))
    return torch.einsum("hl,lhd->hd", torch.softmax(s, -1), vv)


@pytest.mark.gpu
def test_gpu_9b_config_decode_crosses_dense_len():
    torch.manual_seed(0)
    B, H, Hkv, D, dtype = 2, 32, 2, 128, torch.bfloat16
    prompts, steps = [8150, 12000], 80
    cache = SparseLayerCache(B, 16384, Hkv, D, dtype=dtype, device="cuda")
    cfg = cache.config
    seqs = [tuple(torch.randn(n + steps, h, D, device="cuda").to(dtype) for h in (H, Hkv, Hkv)) for n in prompts]
    cu = torch.tensor([0, prompts[0], sum(prompts)], dtype=torch.int32, device="cuda")
    cache.append(torch.cat([s[1][:n] for s, n in zip(seqs, prompts)])[None],
                 torch.cat([s[2][:n] for s, n in zip(seqs, prompts)])[None], cu_seqlens=cu)
    scale = 1 / math.sqrt(D)
    for i in range(steps):
        cache.append_token(torch.stack([s[1][n + i] for s, n in zip(seqs, prompts)]),
                           torch.stack([s[2][n + i] for s, n in zip(seqs, prompts)]))
        qt = torch.stack([s[0][n + i] for s, n in zip(seqs, prompts)])
        o, idx = sparse_decode(qt, cache, return_indices=True)
        if i % 9 and i != steps - 1:
            continue
        for b, ((q, k, v), n) in enumerate(zip(seqs, prompts)):
            t = n + i
            L = t + 1
            want = R.sparse_attention(q[None, t:t + 1], k[None, :L], v[None, :L])[0, 0]
            if L >= cfg.dense_len:
                ridx = R.select_blocks(q[None, t:t + 1], k[None, :L])[0, 0]
                assert torch.equal(idx[b].cpu(), ridx.cpu()), f"selected blocks, sequence {b}, position {t}"
                nb = t // cfg.block_size + 1
                chosen = torch.zeros(Hkv, nb + 1, dtype=torch.bool, device="cuda")
                chosen.scatter_(1, torch.where(ridx < 0, nb, ridx).long(), True)
                allowed = chosen[:, torch.arange(L, device="cuda") // cfg.block_size]
            else:
                assert bool((idx[b] == -1).all())
                allowed = torch.ones(Hkv, L, dtype=torch.bool, device="cuda")
            exact = _lowp_attend(q[t].double(), k[:L].double(), v[:L].double(), allowed, scale, torch.float64)
            tol = max(2 * rel_err(_lowp_attend(q[t], k[:L], v[:L], allowed, scale, dtype), exact), 1e-5)
            assert rel_err(o[b], exact) <= tol, f"sequence {b} position {t}: {rel_err(o[b], exact):.2e} > {tol:.2e}"
            assert rel_err(want, exact) <= tol
    for b, ((q, k, v), n) in enumerate(zip(seqs, prompts)):
        c1, c2 = cache.compressed_keys(b)
        assert_close(c1, R.compress_keys(k, 32, 16), 1e-6, "C1 keys")
        assert_close(c2, R.compress_keys(k, 128, 64), 1e-6, "C2 keys")


@pytest.mark.gpu
def test_gpu_cuda_graph_replay_equals_eager():
    torch.manual_seed(1)
    B, H, Hkv, D, dtype = 3, 32, 2, 128, torch.bfloat16
    n, steps = 9000, 12
    k = torch.randn(B, n + steps, Hkv, D, device="cuda").to(dtype)
    v = torch.randn_like(k)
    q = torch.randn(B, n + steps, H, D, device="cuda").to(dtype)
    caches = [SparseLayerCache(B, n + 64, Hkv, D, dtype=dtype, device="cuda") for _ in range(2)]
    for c in caches:
        c.append(k[:, :n], v[:, :n])
    # eager
    eager = [sparse_decode_step(q[:, n + i], k[:, n + i], v[:, n + i], caches[0]) for i in range(steps)]
    # graph: static inputs, warm up (allocates the workspace), capture one step, replay
    c = caches[1]
    sq, sk, sv = q[:, n].clone(), k[:, n].clone(), v[:, n].clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        c._workspace(H)
        sparse_decode(sq, c)  # compiles the kernels; appends nothing
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        so = sparse_decode_step(sq, sk, sv, c)
    outs = []
    for i in range(steps):
        sq.copy_(q[:, n + i]); sk.copy_(k[:, n + i]); sv.copy_(v[:, n + i])
        g.replay()
        outs.append(so.clone())
    assert c.lengths_host() == [n + steps] * B
    for i in range(steps):
        assert torch.equal(outs[i], eager[i]), f"graph replay differs from eager at step {i}"


def test_triton_fp16_within_twice_torch_error():
    """fp16 cache and query: same selection as the reference on the same fp16 values, output within 2x the
    error of PyTorch's own fp16 attention over the same keys (vs fp64)."""
    cfg = dict(SMALL, topk=3, dense_len=64)
    H, Hkv, D, n, steps = 4, 2, 32, 58, 10
    q, k, v = (seeded_randn(300 + i, n + steps, h, D, dtype=torch.float16) for i, h in enumerate((H, Hkv, Hkv)))
    cache = SparseLayerCache(1, n + steps, Hkv, D, dtype=torch.float16, device=DEV, **_ref_kw(cfg))
    cache.append(k[None, :n].to(DEV), v[None, :n].to(DEV))
    scale = 1 / math.sqrt(D)
    bs = cfg["block_size"]
    with use_backend("triton"):
        for i in range(steps):
            t = n + i
            L = t + 1
            cache.append_token(k[None, t].to(DEV), v[None, t].to(DEV))
            o, idx = sparse_decode(q[None, t].to(DEV), cache, return_indices=True)
            if L >= cfg["dense_len"]:
                kw = {a: b for a, b in _ref_kw(cfg).items() if a != "dense_len"}
                ridx = R.select_blocks(q[None, t:t + 1], k[None, :L], **kw)[0, 0]
                assert torch.equal(idx[0].cpu(), ridx), f"selected blocks at position {t}"
                nb = t // bs + 1
                chosen = torch.zeros(Hkv, nb + 1, dtype=torch.bool)
                chosen.scatter_(1, torch.where(ridx < 0, nb, ridx).long(), True)
                allowed = chosen[:, torch.arange(L) // bs]
            else:
                allowed = torch.ones(Hkv, L, dtype=torch.bool)
            exact = _lowp_attend(q[t].double(), k[:L].double(), v[:L].double(), allowed, scale, torch.float64)
            tol = max(2 * rel_err(_lowp_attend(q[t], k[:L], v[:L], allowed, scale, torch.float16), exact), 1e-5)
            err = rel_err(o[0].cpu(), exact)
            assert err <= tol, f"position {t}: {err:.2e} > {tol:.2e}"


# ---------------------------------------------------------------- fast variant (SALA_SPARSE_DECODE=fast)
def _fast_knobs(monkeypatch, sb=None, cb=None, spb=None, programs=None, merge=2, select_range=None, merge_in=None):
    from sala_ops.triton import sparse_decode_fast as FAST
    monkeypatch.setenv("SALA_SPARSE_DECODE", "fast")
    monkeypatch.setattr(FAST, "FUSED", "0")  # these tests are about the multi-launch step
    if merge_in is not None:
        monkeypatch.setattr(FAST, "ATTEND_MERGE", merge_in)
    if select_range is not None:
        monkeypatch.setattr(FAST, "SELECT_RANGE", select_range)
    monkeypatch.setattr(FAST, "MERGE_CHUNK", merge)
    monkeypatch.setattr(FAST, "SB_BLOCKS", sb)
    monkeypatch.setattr(FAST, "CB_BLOCKS", cb)
    monkeypatch.setattr(FAST, "SPB_BLOCKS", spb)
    if programs is not None:
        monkeypatch.setattr(FAST, "TARGET_PROGRAMS", programs)
        monkeypatch.setattr(FAST, "SCORE_PROGRAMS", programs)


@pytest.mark.parametrize("topk,heads,prompts,steps,D,lse,knobs,expect", [
    # G = 2, two sequences of different lengths cross dense_len = 64; one score range per row
    (3, (4, 2), [40, 55], 30, 16, None, {}, dict(NCH=1)),
    # G = 4, odd head dim, 2 sub-tiles per range (carry), 2 ranges (boundary dot), 2+ LSE splits,
    # 6 attention splits merged in 3 chunks by the last split program
    (4, (8, 2), [150], 12, 24, (16, 8), dict(sb=4, cb=8, spb=1, programs=4096, merge_in="last"),
     dict(NCH=2, NSUB=2, NSPLIT=6, SPC=2)),
    # G = 1, 3 ranges of one sub-tile each, batch with different lengths (one still dense at first)
    (2, (2, 2), [150, 60], 14, 32, (16, 8), dict(sb=4, cb=4, programs=4096), dict(NCH=3, NSUB=1)),
    # the two-level select: 4 ranges of 4 blocks, the shorter sequence's last ranges past its query block
    (2, (2, 2), [150, 60], 14, 32, (16, 8), dict(sb=4, cb=4, programs=4096, select_range=4), dict(NR=4, P=4)),
    # the attention partials merged by a launch of their own (one program per query head), 6 splits
    (4, (8, 2), [150], 12, 24, (16, 8), dict(sb=4, cb=8, spb=1, programs=4096, merge_in="kernel"), dict(NSPLIT=6)),
])
def test_fast_prefill_then_decode(monkeypatch, topk, heads, prompts, steps, D, lse, knobs, expect):
    H, Hkv = heads
    _fast_knobs(monkeypatch, **knobs)
    cfg = dict(SMALL, topk=topk, dense_len=64)
    if lse is not None:
        cfg.update(lse_kernel_size=lse[0], lse_kernel_stride=lse[1])
    cache, _ = _run("triton", cfg, prompts, steps, H, Hkv, D, device=DEV, seed=200 + topk)
    p = cache._ws[("fast", H)]["p"]
    for k, v in expect.items():
        assert p[k] == v, f"plan {k} = {p[k]}, expected {v}: the case does not exercise what it should"
    if lse is not None:
        assert p["S2"] >= 2, "several LSE splits not exercised"


@pytest.mark.parametrize("merge_in", ["kernel", "last"])
def test_fast_nan_poisoned_workspace(monkeypatch, merge_in):
    """Every workspace entry read in a step is written in that step: NaN / garbage before each step
    changes nothing (the self-resetting counters are the only state kept between steps)."""
    _fast_knobs(monkeypatch, sb=4, cb=4, spb=2, programs=4096, select_range=2, merge_in=merge_in)
    import sys
    orig = sparse_decode
    mod = sys.modules[__name__]

    def poisoned(q, cache, *a, **kw):
        ws = cache._ws.get(("fast", q.shape[-2]))
        if ws is not None:
            for name in ("m2", "l2", "bscore", "o_part", "m_part", "l_part"):
                ws[name].fill_(float("nan"))
            ws["sel"].fill_(12345)
            ws["cand_bits"].fill_(2139095040)  # +inf: a stale candidate would win every selection
            ws["cand_idx"].fill_(12345)
        return orig(q, cache, *a, **kw)
    monkeypatch.setattr(mod, "sparse_decode", poisoned)
    cfg = dict(SMALL, topk=3, dense_len=50, lse_kernel_size=16, lse_kernel_stride=8)
    cache, _ = _run("triton", cfg, [20, 120, 45], 8, 4, 2, 16, device=DEV, seed=31)
    ws = cache._ws[("fast", 4)]
    assert ws["p"]["P"] >= 4, ws["p"]  # the two-level select's candidates are poisoned too
    assert int(ws["cnt_sel"].abs().sum()) == 0 and int(ws["cnt_att"].abs().sum()) == 0, "counters not reset"


@pytest.mark.parametrize("select_range", [0, 16])
def test_fast_long_sequence_many_ranges(monkeypatch, select_range):
    """A longer sequence (many score ranges, many LSE splits, many ties between neighbouring blocks), with
    the one-level and the two-level select (8 ranges of 16 blocks): blocks and outputs equal the reference's."""
    _fast_knobs(monkeypatch, sb=8, cb=8, programs=4096, select_range=select_range)
    cfg = dict(SMALL, topk=6, dense_len=64, lse_kernel_size=16, lse_kernel_stride=8)
    cache, _ = _run("triton", cfg, [1500], 4, 8, 2, 16, device=DEV, seed=77)
    p = cache._ws[("fast", 8)]["p"]
    assert p["NCH"] >= 10 and p["S2"] >= 8, p
    assert p["P"] == (8 if select_range else 0), p


def test_fast_pdl_knob(monkeypatch):
    """SALA_SPARSE_DECODE_PDL asks for programmatic dependent launch; it engages only for compiled kernels on
    sm_90+ (the interpreter cannot run griddepcontrol), and the results stay the reference's either way."""
    from sala_ops.triton import sparse_decode_fast as FAST
    _fast_knobs(monkeypatch, sb=4, cb=4, programs=4096)
    monkeypatch.setattr(FAST, "PDL", True)
    cfg = dict(SMALL, topk=3, dense_len=50)
    cache, _ = _run("triton", cfg, [70, 20], 6, 4, 2, 16, device=DEV, seed=5)
    lp = cache._ws[("fast", 4)]["launch"]
    on_gpu = (DEV != "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1"
              and torch.cuda.get_device_capability()[0] >= 9)
    assert lp.pdl == (dict(PDL=True, launch_pdl=True) if on_gpu else {}), lp.pdl


def _fused_knobs(monkeypatch, programs, select="auto", early=True, tile=128, local=True):
    from sala_ops.triton import sparse_decode_fast as FAST
    from sala_ops.triton import sparse_decode_fused as FUSED
    monkeypatch.setenv("SALA_SPARSE_DECODE", "fast")
    monkeypatch.setattr(FAST, "FUSED", "1")
    monkeypatch.setattr(FUSED, "FUSED_PROGRAMS", programs)
    monkeypatch.setattr(FUSED, "FUSED_SELECT", select)
    monkeypatch.setattr(FUSED, "FUSED_EARLY", early)
    monkeypatch.setattr(FUSED, "FUSED_ATTEND_TILE", tile)
    monkeypatch.setattr(FUSED, "FUSED_LOCAL_EARLY", local)


def _fused_ws(cache):
    """The fused step's workspace of this cache (None if it declined the cache)."""
    found = [v for k, v in cache._ws.items() if isinstance(k, tuple) and k[0] == "fused"]
    assert len(found) == 1, list(cache._ws)
    return found[0]


@pytest.mark.parametrize("topk,heads,prompts,steps,D,lse,programs,sb,select,early,expect", [
    # G = 2, two sequences of different lengths cross dense_len = 64 (one row dense, one not);
    # 3 programs per row (not a power of two), one score range: the products before barrier 1 (EARLY);
    # the 2 slots of a program as one tile of 2 blocks (TB); no early local block (LOCAL off)
    (3, (4, 2), [40, 55], 30, 16, None, 3, None, "auto", True, dict(NP=3, EARLY=True, SORT=True, TB=2, LOCAL=False,
                                                                     TAG=True, CARRY=True)),
    # bisect select, no EARLY, the slots one block per step (_attend_split: tile 0), LOCAL off
    (3, (4, 2), [40, 55], 30, 16, None, 5, None, "bisect", False, dict(NP=5, EARLY=False, SORT=False, TB=1, TAG=False,
                                                                        LOCAL=False, CARRY=False)),
    # LOCAL: 8 programs, up to 5 score ranges of 4 blocks: the programs without one attend to the window's blocks
    # early (E > 0), the rest of the list one block per program
    (4, (8, 2), [150, 260], 12, 24, (16, 8), 8, 4, "sort", True, dict(NP=8, NSUB=1, EARLY=True, SORT=True, MC=2,
                                                                       LOCAL=True)),
    # G = 4, odd head dim, 3 programs: ranges of 2 score sub-tiles (no EARLY); no program free of a score range at
    # the cache's full length, so no LOCAL
    (4, (8, 2), [150, 260], 12, 24, (16, 8), 3, 4, "sort", True, dict(NP=3, NSUB=2, EARLY=False, LOCAL=False)),
    # G = 8 heads per row merged by 2 programs (4 heads each), several LSE key tiles per program; 3 slots per
    # program in one tile of 4 blocks (the 4th masked), LOCAL off
    (4, (8, 1), [300], 10, 32, (16, 8), 2, 4, "bisect", True, dict(NP=2, NSUB=4, TB=4, LOCAL=False)),
    # LOCAL with bisect, 6 programs, short prompts (dense rows and rows whose window reaches the init block)
    (3, (4, 2), [40, 70], 30, 16, None, 6, None, "bisect", True, dict(NP=6, LOCAL=True)),
    # LOCAL where programs past the output slots (s_lo >= KSEL: dense_len 256 makes 3 slots per program) hold list
    # blocks, so they must select too (if they skip it they read other programs' sel stores: a race that only
    # the GPU tests can catch, the interpreter runs the writers first; H200 run 6 call 3)
    (3, (4, 2), [300, 390], 12, 16, None, 6, 4, "sort", True, dict(NP=6, LOCAL=True, dense_len=256)),
    # LOCAL with the bisect select, the LSE partials from the first programs (FUSED_LSE_LAST off)
    (4, (8, 2), [150, 260], 12, 24, (16, 8), 8, 4, "bisect", True, dict(NP=8, LOCAL=True, LSE_LAST=False)),
])
def test_fast_fused_prefill_then_decode(monkeypatch, topk, heads, prompts, steps, D, lse, programs, sb, select, early,
                                        expect):
    """The one-launch step (sparse_decode_fused.py), run as its phase launches under the interpreter:
    selection exactly the reference's, outputs and compressed keys as in _run."""
    from sala_ops.triton import sparse_decode_fast as FAST
    H, Hkv = heads
    _fused_knobs(monkeypatch, programs, select, early, 0 if expect.get("TB") == 1 else 128, expect.get("LOCAL", True))
    monkeypatch.setattr(FAST, "SB_BLOCKS", sb)
    if expect.get("LSE_LAST") is False:
        from sala_ops.triton import sparse_decode_fused as FUSED
        monkeypatch.setattr(FUSED, "FUSED_LSE_LAST", False)
    expect = dict(expect)
    cfg = dict(SMALL, topk=topk, dense_len=expect.pop("dense_len", 64))
    if lse is not None:
        cfg.update(lse_kernel_size=lse[0], lse_kernel_stride=lse[1])
    cache, _ = _run("triton", cfg, prompts, steps, H, Hkv, D, device=DEV, seed=300 + topk)
    ws = _fused_ws(cache)
    assert ("fast", H) not in cache._ws, "the 5-launch step ran instead of the fused one"
    for k, v in expect.items():
        assert ws["cx"][k] == v, f"plan {k} = {ws['cx'][k]}, expected {v}: the case does not exercise what it should"


def test_fast_fused_block_size_not_a_power_of_two(monkeypatch):
    """Blocks of 24 tokens (R = 4 windows of stride 6): the attention takes one block per step (_attend_split),
    since _attend_tiles' tile of TB * block_size keys must be a power of two; results as in _run."""
    _fused_knobs(monkeypatch, 3)
    cfg = dict(kernel_size=12, kernel_stride=6, block_size=24, window_size=48, init_blocks=1, topk=3, dense_len=96)
    cache, _ = _run("triton", cfg, [90, 200], 12, 4, 2, 16, device=DEV, seed=23)
    cx = _fused_ws(cache)["cx"]
    assert cx["TB"] == 1 and cx["BS"] == 24, cx


@pytest.mark.parametrize("local", [True, False])
def test_fast_fused_nan_poisoned_workspace(monkeypatch, local):
    """Every workspace entry the fused step reads is written earlier in the same step: NaN / garbage in all of
    them before each step changes nothing (the barrier counters only grow and are not poisoned)."""
    _fused_knobs(monkeypatch, 3, local=local)
    import sys
    orig = sparse_decode
    mod = sys.modules[__name__]

    def poisoned(q, cache, *a, **kw):
        for k, ws in cache._ws.items():
            if k[0] == "fused" and ws is not None:
                for name in ("m2", "l2", "bscore", "o_part", "m_part", "l_part"):
                    # TAG's int64 score words: garbage bits with the tag of step 0
                    ws[name].fill_(float("nan") if ws[name].is_floating_point() else 12345)
                # CARRY's words: a huge score (1.7e38) with the tag of step 0, which wins the selection wherever a
                # carry is read that this step did not write
                ws["bcarry"].fill_(0x7F000000)
                ws["sel"].fill_(12345)
        return orig(q, cache, *a, **kw)
    monkeypatch.setattr(mod, "sparse_decode", poisoned)
    cfg = dict(SMALL, topk=3, dense_len=50, lse_kernel_size=16, lse_kernel_stride=8)
    _run("triton", cfg, [20, 120, 45], 8, 4, 2, 16, device=DEV, seed=41)


def test_fast_fused_stale_compressed_key_capacity(monkeypatch):
    """Compressed-key rows past a sequence's count (a former sequence's keys, here NaN) must not reach its scores,
    LSE or selection. Results as in _run with NaN in every row past the counts before each step."""
    _fused_knobs(monkeypatch, 8)
    import sys
    orig = sparse_decode
    mod = sys.modules[__name__]

    def poisoned(q, cache, *a, **kw):
        cfg = cache.config
        for b, L in enumerate(cache.lengths_host()):
            n1 = 0 if L < cfg.kernel_size else (L - cfg.kernel_size) // cfg.kernel_stride + 1
            n2 = 0 if L < cfg.c2[0] else (L - cfg.c2[0]) // cfg.c2[1] + 1
            cache.c1[b, n1:] = float("nan")
            cache.c2[b, n2:] = float("nan")
        return orig(q, cache, *a, **kw)
    monkeypatch.setattr(mod, "sparse_decode", poisoned)
    # 6 selected blocks, 3 of them free at the longest prompts; 4 query heads per KV head weighed by their LSE
    cfg = dict(SMALL, topk=6, dense_len=50, lse_kernel_size=16, lse_kernel_stride=8)
    cache, _ = _run("triton", cfg, [150, 260, 45], 10, 8, 2, 24, device=DEV, seed=43)
    assert _fused_ws(cache)["cx"]["CARRY"]


def test_fast_fused_falls_back_past_its_block_limit(monkeypatch):
    """A cache with more padded blocks than FUSED_MAX_BLOCKS takes the multi-launch step (same results)."""
    from sala_ops.triton import sparse_decode_fused as FUSED
    _fused_knobs(monkeypatch, 4)
    monkeypatch.setattr(FUSED, "FUSED_MAX_BLOCKS", 8)
    cfg = dict(SMALL, topk=2, dense_len=64)
    cache, _ = _run("triton", cfg, [150], 4, 4, 2, 16, device=DEV, seed=9)
    assert _fused_ws(cache) is None and ("fast", 4) in cache._ws


@pytest.mark.gpu
def test_gpu_fast_variant_9b_and_graph(monkeypatch):
    """The fast variant on the 9B config: reference selection + 2x-bf16 error bound, graph replay == eager."""
    from sala_ops.triton import sparse_decode_fast as FAST
    monkeypatch.setenv("SALA_SPARSE_DECODE", "fast")
    monkeypatch.setattr(FAST, "FUSED", "0")  # the multi-launch step (test_gpu_fast_fused_* covers the fused one)
    test_gpu_9b_config_decode_crosses_dense_len()
    test_gpu_cuda_graph_replay_equals_eager()


def test_fast_fused_auto_rule(monkeypatch):
    """SALA_SPARSE_DECODE_FUSED=auto (the default) takes the fused step only where the H200 measured it faster:
    caches of up to 2048 padded blocks with at least 32 programs per row; FUSED=1 takes it up to 4096 blocks."""
    from sala_ops.triton import sparse_decode_fused as FUSED
    monkeypatch.setattr(FUSED, "FUSED_PROGRAMS", 64)
    mk = lambda L: SparseLayerCache(1, L, 2, 128, dtype=torch.bfloat16, device="cpu")  # noqa: E731  9B config
    assert FUSED.plan(mk(32768), 32, auto=True)["grid"] == (1, 2, 64)
    assert FUSED.plan(mk(131072), 32, auto=True)["grid"] == (1, 2, 64)
    assert FUSED.plan(mk(131073), 32, auto=True) is None         # 2049 blocks: padded to 4096
    assert FUSED.plan(mk(65536), 32, auto=False)["grid"] == (1, 2, 64)
    assert FUSED.plan(mk(262145), 32, auto=False) is None        # past 4096 blocks
    monkeypatch.setattr(FUSED, "FUSED_PROGRAMS", 16)
    assert FUSED.plan(mk(32768), 32, auto=True) is None and FUSED.plan(mk(32768), 32)["grid"] == (1, 2, 16)


@pytest.mark.gpu
@pytest.mark.parametrize("local,tagged", [(True, True), (False, True), (True, False), (False, False)])
def test_gpu_fast_fused_9b_and_graph(monkeypatch, local, tagged):
    """The one-launch step on the 9B config (caches of 16K tokens, 4 and 6 rows: 33 and 22 programs per row):
    reference selection + 2x-bf16 error bound, graph replay == eager; then B = 1 at 128K and 32K cached
    tokens (64 programs per row, 3 row barriers per step, 2 with FUSED_TAGGED): the one launch == its phase
    launches (bitwise: the same code per phase) == the multi-launch step's selection, over 20 steps; with and
    without the early local blocks and the tagged scores (2 barriers per step instead of 3)."""
    from sala_ops.triton import sparse_decode_fused as FUSED
    _fused_knobs(monkeypatch, 64, local=local)
    monkeypatch.setattr(FUSED, "FUSED_TAGGED", tagged)
    calls = []
    orig = FUSED.decode
    monkeypatch.setattr(FUSED, "decode", lambda *a: calls.append(1) or orig(*a))
    test_gpu_9b_config_decode_crosses_dense_len()
    test_gpu_cuda_graph_replay_equals_eager()
    assert calls, "the fused step did not run"
    torch.manual_seed(3)
    H, Hkv, D, dtype = 32, 2, 128, torch.bfloat16
    for L in (131072, 32768):
        cache = SparseLayerCache(1, L + 32, Hkv, D, dtype=dtype, device="cuda")
        cache.append(torch.randn(1, L, Hkv, D, device="cuda").to(dtype), torch.randn(1, L, Hkv, D, device="cuda").to(dtype))
        assert FUSED.plan(cache, H)["grid"] == (1, Hkv, 64)
        if L == 32768:  # 32 programs without a score range: early local blocks (none free at 128K)
            assert FUSED.plan(cache, H)["cx"]["LOCAL"] == local
        for i in range(20):
            q, kt, vt = (torch.randn(1, h, D, device="cuda").to(dtype) for h in (H, Hkv, Hkv))
            cache.append_token(kt, vt)
            o1, i1 = (x.clone() for x in sparse_decode(q, cache, return_indices=True))
            monkeypatch.setattr(FUSED, "FUSED_PHASES", True)
            o2, i2 = (x.clone() for x in sparse_decode(q, cache, return_indices=True))
            monkeypatch.setattr(FUSED, "FUSED_PHASES", False)
            monkeypatch.setenv("SALA_SPARSE_DECODE", "sort")
            _, i3 = sparse_decode(q, cache, return_indices=True)
            monkeypatch.setenv("SALA_SPARSE_DECODE", "fast")
            # the same arithmetic per phase, but one compiled function vs one per phase: the compiler may contract and order
            # fp32 operations differently, so the bf16 outputs may differ by one rounding (H200 run 5 call 3)
            assert torch.equal(i1, i2), f"L={L} step {i}: one launch selected other blocks than the phase launches"
            diff = (o1.float() - o2.float()).abs()
            assert bool((diff <= 2 ** -7 * o2.float().abs() + 1e-6).all()), \
                f"L={L} step {i}: one launch != the phase launches beyond one bf16 rounding: {diff.max().item():.3g}"
            assert torch.equal(i1, i3), f"L={L} step {i}: fused selection != the sort path's"
        ws = FUSED.plan(cache, H)
        # 20 one-launch steps (the barriers) and 20 phase-launch steps (their last launch adds as much)
        assert int(ws["cnt"][0]) == ws["barriers"] * 64 * 40, "row barrier counter"


@pytest.mark.parametrize("n,spread,n_sel", [(300, "wide", 7), (300, "dups", 50), (4096, "wide", 96), (4096, "dups", 96),
                                            (1000, "one", 1), (64, "dups", 64)])
def test_fast_kth_largest_bisect(n, spread, n_sel):
    """The fast select's threshold search (sparse_decode_fast._kth_largest_bisect), for every number of
    thresholds per step, gives the exact n_sel-th largest of non-negative fp32 score bits (+inf included),
    with heavy ties and with values spread over every exponent, as torch.topk does."""
    from kth_probe import kth_kernel
    from sala_ops.triton.sparse_decode_fast import search_steps
    g = torch.Generator().manual_seed(n + n_sel)
    if spread == "wide":  # every exponent from 2^-60 to 2^60, random mantissas
        x = torch.exp2(torch.rand(n, generator=g) * 120 - 60)
    elif spread == "dups":  # few distinct values, several +inf (forced blocks)
        x = torch.randint(0, 5, (n,), generator=g).float() * 0.25
        x[torch.randperm(n, generator=g)[:3]] = float("inf")
    else:
        x = torch.full((n,), 0.5)
    x[0] = 0.0
    want = torch.topk(x, n_sel).values[-1]
    np2 = 1 << (n - 1).bit_length()
    for k in (1, 2, 3, 4):
        out = torch.zeros(1, dtype=torch.int32, device=DEV)
        kth_kernel[(1,)](x.to(DEV), out, n, n_sel, NP=np2, K=k, NIT=search_steps(k))
        got = out.cpu().view(torch.float32)[0]
        assert got == want, f"K={k}: {got} != {want}"
