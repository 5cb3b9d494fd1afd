"""The SALA mixers (sala_ops.layers) and the hybrid cache (sala_ops.cache), on CPU with the
reference backend: each mixer against the spec's formulas written out here from the reference
pieces, dense/sparse switching at dense_len, decode and chunked prefill through the cache against
one full pass, packed sequences against separate calls."""
import math

import pytest
import torch

from sala_ops.cache import SalaCache
from sala_ops.lightning import lightning_attention, lightning_attention_step, sala_decay_slopes
from sala_ops.layers import MIXER_LIGHTNING, MIXER_SPARSE, LightningMixer, SparseMixer
from sala_ops.reference import lightning as ref_lightning
from sala_ops.reference import rope as ref_rope
from sala_ops.reference import sparse as ref_sparse
from sala_ops.sparse import SparseConfig, sparse_attention

from helpers import assert_close

# small enough that sequences of a few dozen tokens run the InfLLM-V2 path with real selection
SMALL = SparseConfig(kernel_size=4, kernel_stride=2, block_size=4, init_blocks=1, window_size=4, topk=2, dense_len=16)
HIDDEN, H, HKV, D = 32, 4, 2, 8


def _init(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() > 1 else 1.0) + (1.0 if p.dim() == 1 else 0.0))
    return module


def sparse_mixer(seed=0, cfg=SMALL, **kw):
    return _init(SparseMixer(HIDDEN, H, HKV, D, cfg, layer_idx=0, **kw), seed).eval()


def lightning_mixer(seed=0, **kw):
    return _init(LightningMixer(HIDDEN, H, D, layer_idx=0, **kw), seed).eval()


def _u(B, T, seed=1):
    return torch.randn(B, T, HIDDEN, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------ sparse

def test_sparse_mixer_equals_op_called_directly():
    m, u = sparse_mixer(), _u(2, 40)
    q, k, v = m.qkv(u)
    attn = sparse_attention(q, k, v, config=SMALL)
    expect = m.o_proj(attn.reshape(2, 40, -1) * torch.sigmoid(m.o_gate(u)))
    out, none = m(u)
    assert none is None
    assert_close(out, expect, 1e-6)


@pytest.mark.parametrize("T", [SMALL.dense_len - 1, SMALL.dense_len, 3 * SMALL.dense_len])
def test_sparse_mixer_dense_below_dense_len(T):
    """A query that sees fewer than dense_len keys: plain causal softmax with the same weights; the
    others: InfLLM-V2 (the per-query rule, which decode follows too)."""
    m, u = sparse_mixer(), _u(1, T)
    q, k, v = m.qkv(u)
    gate = torch.sigmoid(m.o_gate(u))
    dense = m.o_proj(ref_sparse.dense_attention(q, k, v).reshape(1, T, -1) * gate)
    idx = ref_sparse.select_blocks(q, k, None, SMALL.kernel_size, SMALL.kernel_stride, SMALL.block_size,
                                   SMALL.init_blocks, SMALL.window_size, SMALL.topk)
    sparse = m.o_proj(ref_sparse.block_sparse_attention(q, k, v, idx, SMALL.block_size).reshape(1, T, -1) * gate)
    out, _ = m(u)
    dense_rows = (torch.arange(T) + 1 < SMALL.dense_len)[None, :, None]
    if T < SMALL.dense_len:
        assert_close(out, dense, 1e-6)
    else:
        assert_close(out, torch.where(dense_rows, dense, sparse), 1e-6)
        if T > SMALL.dense_len:  # the selection really drops blocks, so the two paths differ
            assert (out - dense).abs().max() > 1e-4


def test_sparse_mixer_is_nope():
    """No positional encoding: the output at the last token does not change when the earlier
    tokens are the same but the sequence is shifted in absolute position (cache offset)."""
    m, u = sparse_mixer(cfg=SparseConfig(dense_len=1 << 20)), _u(1, 12)
    out, _ = m(u, position_ids=torch.arange(12)[None])
    out2, _ = m(u, position_ids=torch.arange(100, 112)[None])
    assert torch.equal(out, out2)


@pytest.mark.parametrize("prefill", [SMALL.dense_len, 23])
def test_sparse_decode_through_cache_matches_full_pass(prefill):
    """Prefill at >= dense_len keys, then decode: every call runs InfLLM-V2, as the full pass does."""
    m, u = sparse_mixer(), _u(2, 36)
    full, _ = m(u)
    cache = SalaCache(mixer_types=[MIXER_SPARSE])
    outs = [m(u[:, :prefill], cache=cache)[0]]
    for t in range(prefill, 36):
        outs.append(m(u[:, t:t + 1], cache=cache)[0])  # decode: one query over every cached key
    assert cache.get_seq_length() == 36
    assert cache.layers[0].keys.shape == (2, 36, HKV, D)
    assert_close(torch.cat(outs, 1), full, 1e-5)


def test_sparse_decode_across_dense_len_matches_full_pass():
    """Decoding from a short prompt across dense_len: step t equals row t of ONE full pass (dense
    for the queries that see fewer than dense_len keys, sparse after: the op's per-query rule), and
    the last row of a pass over the t+1 tokens so far."""
    m, u = sparse_mixer(), _u(1, 30)
    full, _ = m(u)
    cache = SalaCache(mixer_types=[MIXER_SPARSE])
    m(u[:, :3], cache=cache)
    for t in range(3, 30):
        step = m(u[:, t:t + 1], cache=cache)[0]
        assert_close(step, full[:, t:t + 1], 1e-5, what=f"step {t} vs full pass")
        assert_close(step, m(u[:, :t + 1])[0][:, -1:], 1e-5, what=f"step {t} vs prefix pass")


def test_sparse_chunked_prefill_through_cache():
    m, u = sparse_mixer(), _u(1, 40)
    full, _ = m(u)
    cache = SalaCache(mixer_types=[MIXER_SPARSE])
    parts = [m(u[:, a:b], cache=cache)[0] for a, b in ((0, 17), (17, 30), (30, 40))]  # every call >= dense_len keys
    assert_close(torch.cat(parts, 1), full, 1e-5)


def test_sparse_packed_equals_separate():
    m = sparse_mixer()
    a, b = _u(1, 21, seed=3), _u(1, 30, seed=4)
    packed, _ = m(torch.cat([a, b], 1), cu_seqlens=torch.tensor([0, 21, 51]))
    assert_close(packed, torch.cat([m(a)[0], m(b)[0]], 1), 1e-5)


def test_sparse_mixer_rejects_bad_arguments():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        SparseMixer(HIDDEN, 4, 3, D)
    with pytest.raises(TypeError, match="SparseConfig"):
        SparseMixer(HIDDEN, 4, 2, D, sparse_config={"topk": 2})


def test_mixer_sizes_are_checked_at_construction():
    """Sizes are positive ints: num_kv_heads=0 failed with a bare ZeroDivisionError, num_heads=0 built a sparse
    layer whose output is its o_proj bias (zeros) silently, a float or negative size failed inside nn.Linear,
    and LightningMixer truncated a float rotary_dim (6.5 -> 6) with int()."""
    for bad, err in (((HIDDEN, 4, 0, D), ValueError), ((HIDDEN, 0, 2, D), ValueError), ((HIDDEN, 4, 2, 0), ValueError),
                     ((HIDDEN, 4.0, 2, D), TypeError), ((HIDDEN, 4, -2, D), ValueError), ((0, 4, 2, D), ValueError)):
        with pytest.raises(err, match="sala_ops.SparseMixer: (hidden_size|num_heads|num_kv_heads|head_dim)"):
            SparseMixer(*bad)
    for bad, kw, err in (((HIDDEN, 0, D), {}, ValueError), ((HIDDEN, H, 0), {}, ValueError),
                         ((HIDDEN, 4.5, D), {}, TypeError), ((-1, H, D), {}, ValueError),
                         ((HIDDEN, H, D), {"rotary_dim": 6.5}, TypeError), ((HIDDEN, H, D), {"rotary_dim": 7}, ValueError),
                         ((HIDDEN, H, D), {"rotary_dim": 2 * D}, ValueError), ((HIDDEN, H, D), {"rotary_dim": 0}, ValueError),
                         # rope_theta: 10**400 made float() raise a bare OverflowError
                         ((HIDDEN, H, D), {"rope_theta": 10**400}, ValueError), ((HIDDEN, H, D), {"rope_theta": "x"}, TypeError),
                         ((HIDDEN, H, D), {"rope_theta": -1.0}, ValueError),
                         ((HIDDEN, H, D), {"rope_theta": float("nan")}, ValueError)):
        with pytest.raises(err, match="sala_ops.LightningMixer: (hidden_size|num_heads|head_dim|rotary_dim|rope_theta)"):
            LightningMixer(*bad, **kw)
    assert LightningMixer(HIDDEN, H, D, rotary_dim=4).rotary_dim == 4


@pytest.mark.parametrize("make", [sparse_mixer, lightning_mixer])
def test_mixer_input_is_checked_naming_the_mixer(make):
    """hidden_states [B, T, hidden] is checked before anything runs: a 2-D input failed with a bare 'not enough
    values to unpack', a wrong width with nn.Linear's 'mat1 and mat2 shapes cannot be multiplied', a list with an
    AttributeError, integer ids with a dtype RuntimeError, an empty sequence was reported as the op's q."""
    m = make()
    op = type(m).__name__
    cache = SalaCache(mixer_types=[m.mixer_type])
    for bad, err in ((torch.randn(5, HIDDEN), ValueError), (torch.randn(1, 5, HIDDEN // 2), ValueError),
                     ([[0.0] * HIDDEN], TypeError), (torch.ones(1, 5, HIDDEN, dtype=torch.long), TypeError),
                     (torch.randn(1, 0, HIDDEN), ValueError)):
        with pytest.raises(err, match=f"sala_ops.{op}: hidden_states"):
            m(bad, cache=cache)
    assert cache.get_seq_length() == 0 and not cache.is_initialized
    out, _ = m(_u(2, 3), cache=cache)
    assert out.shape == (2, 3, HIDDEN) and cache.get_seq_length() == 3
    with torch.autocast("cpu", dtype=torch.bfloat16):  # an input dtype other than the weights' stays allowed
        assert m(_u(1, 4).bfloat16())[0].shape == (1, 4, HIDDEN)


def test_lightning_position_ids_are_checked_naming_the_mixer():
    """position_ids ([T], [1, T] or [B, T] integers) failed with a list's AttributeError ('list' object has no
    attribute 'dim'), a 3-D tensor with torch's expand RuntimeError, and a wrong length or batch with hype_embed's
    error about its 'positions', an argument the caller never passed; the cache is left untouched."""
    m, u = lightning_mixer(), _u(2, 5)
    cache = SalaCache(mixer_types=[MIXER_LIGHTNING])
    for bad, err in (([0, 1, 2, 3, 4], TypeError), (torch.arange(5.0)[None], TypeError),
                     (torch.arange(10).view(1, 2, 5), ValueError), (torch.arange(4)[None], ValueError),
                     (torch.arange(15).view(3, 5), ValueError), (torch.arange(4), ValueError)):
        with pytest.raises(err, match="sala_ops.LightningMixer: position_ids"):
            m(u, position_ids=bad, cache=cache)
    assert cache.get_seq_length() == 0 and not cache.is_initialized
    want, _ = m(u)
    for good in (torch.arange(5), torch.arange(5)[None], torch.arange(5).expand(2, -1), torch.arange(5, dtype=torch.int32)):
        assert_close(m(u, position_ids=good)[0], want, 1e-6)


# --------------------------------------------------------------------------------------- lightning

def lightning_by_hand(m: LightningMixer, u, positions):
    """The spec (section 3) written out: per-head RMSNorm, RoPE, the recurrence, o_norm, the z gate."""
    B, T, _ = u.shape
    q = m.q_proj(u).view(B, T, H, D)
    k = m.k_proj(u).view(B, T, H, D)
    v = m.v_proj(u).view(B, T, H, D)
    q = ref_rope.apply_rope(ref_rope.rms_norm(q, m.q_norm.weight, m.eps), positions, m.rope_theta, m.rotary_dim)
    k = ref_rope.apply_rope(ref_rope.rms_norm(k, m.k_norm.weight, m.eps), positions, m.rope_theta, m.rotary_dim)
    slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)])
    o, _ = ref_lightning.lightning_recurrent(q, k, v, slopes, 1 / math.sqrt(D))
    o = ref_rope.rms_norm(o.reshape(B, T, -1), m.o_norm.weight, m.eps)
    return m.o_proj(o * torch.sigmoid(m.z_proj(u)))


@pytest.mark.parametrize("rotary_dim", [None, 4])
def test_lightning_mixer_matches_spec(rotary_dim):
    m, u = lightning_mixer(rotary_dim=rotary_dim, rope_theta=500.0), _u(2, 19)
    pos = torch.arange(19)[None].expand(2, -1)
    out, none = m(u)
    assert none is None
    assert_close(out, lightning_by_hand(m, u, pos), 1e-5)
    # explicit position_ids are honoured (RoPE)
    out7, _ = m(u, position_ids=torch.arange(7, 26)[None])
    assert_close(out7, lightning_by_hand(m, u, pos + 7), 1e-5)


@pytest.mark.parametrize("prefill", [1, 6])
def test_lightning_decode_through_cache_matches_full_pass(prefill, monkeypatch):
    import sala_ops.layers as layers
    steps = []
    real = layers.lightning_attention_step
    monkeypatch.setattr(layers, "lightning_attention_step", lambda *a, **k: steps.append(1) or real(*a, **k))
    m, u = lightning_mixer(), _u(2, 20)
    full, _ = m(u)
    cache = SalaCache(mixer_types=[MIXER_LIGHTNING])
    outs = [m(u[:, :prefill], cache=cache)[0]]
    for t in range(prefill, 20):
        outs.append(m(u[:, t:t + 1], cache=cache)[0])
    assert len(steps) == 20 - prefill  # decode went through lightning_attention_step
    st = cache.layers[0].state
    assert st.dtype == torch.float32 and st.shape == (2, H, D, D)
    assert cache.get_seq_length() == 20
    assert_close(torch.cat(outs, 1), full, 1e-5)


def test_lightning_chunked_prefill_and_bf16_state():
    m, u = lightning_mixer(), _u(1, 30)
    full, _ = m(u)
    cache = SalaCache(mixer_types=[MIXER_LIGHTNING])
    parts = [m(u[:, a:b], cache=cache)[0] for a, b in ((0, 11), (11, 12), (12, 30))]
    assert_close(torch.cat(parts, 1), full, 1e-5)
    mb = m.to(torch.bfloat16)
    cache = SalaCache(mixer_types=[MIXER_LIGHTNING])
    mb(u[:, :5].bfloat16(), cache=cache)
    mb(u[:, 5:6].bfloat16(), cache=cache)
    assert cache.layers[0].state.dtype == torch.float32  # the state stays fp32 under a bf16 model
    assert mb.decay(u.device).dtype == torch.float32


@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16])
def test_lightning_cache_under_autocast(amp_dtype):
    # AMP (torch.autocast) runs the projections in 16 bits; the lightning op's reference backend (the CPU one)
    # then ran its own fp32 einsums under autocast too: the final state came back in bf16/fp16 (the cache
    # refused it with a TypeError, so generate() under autocast failed) and the math lost its fp32 accumulation
    m, u = lightning_mixer(), _u(2, 20)
    with torch.no_grad(), torch.autocast("cpu", dtype=amp_dtype):
        cache = SalaCache(mixer_types=[MIXER_LIGHTNING])
        outs = [m(u[:, :6], cache=cache)[0]] + [m(u[:, t:t + 1], cache=cache)[0] for t in range(6, 20)]
        full, _ = m(u)
    assert cache.layers[0].state.dtype == torch.float32
    assert_close(torch.cat(outs, 1).float(), full.float(), 1e-2)
    # the op itself: fp32 inputs under autocast give the fp32 result and an fp32 state, as without autocast
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 12, H, D, generator=g) for _ in range(3))
    decay = sala_decay_slopes(H)
    want = lightning_attention(q, k, v, decay, output_final_state=True)
    want_step = lightning_attention_step(q[:, 0], k[:, 0], v[:, 0], want.final_state, decay)
    with torch.autocast("cpu", dtype=amp_dtype):
        got = lightning_attention(q, k, v, decay, output_final_state=True)
        got_step = lightning_attention_step(q[:, 0], k[:, 0], v[:, 0], want.final_state, decay)
    assert got.final_state.dtype == torch.float32 and got_step[1].dtype == torch.float32
    assert_close(got.output, want.output, 1e-6)
    assert_close(got.final_state, want.final_state, 1e-6)
    assert_close(got_step[0], want_step[0], 1e-6)
    assert_close(got_step[1], want_step[1], 1e-6)


def test_lightning_packed_equals_separate():
    m = lightning_mixer()
    a, b = _u(1, 9, seed=5), _u(1, 14, seed=6)
    packed, _ = m(torch.cat([a, b], 1), cu_seqlens=torch.tensor([0, 9, 23]))
    assert_close(packed, torch.cat([m(a)[0], m(b)[0]], 1), 1e-5)


def test_lightning_weight_names_match_release():
    names = {n for n, _ in lightning_mixer().named_parameters()}
    assert names == {f"{p}.weight" for p in ("q_proj", "k_proj", "v_proj", "o_proj", "z_proj", "q_norm", "k_norm", "o_norm")}
    names = {n for n, _ in sparse_mixer().named_parameters()}
    assert names == {f"{p}.weight" for p in ("q_proj", "k_proj", "v_proj", "o_proj", "o_gate")}
    assert not list(lightning_mixer().buffers())  # decay slopes are computed, never stored


# ------------------------------------------------------------------------------------------- cache

def test_cache_errors_are_clear():
    from transformers import DynamicCache
    m, u = lightning_mixer(), _u(1, 4)
    with pytest.raises(TypeError, match="SalaCache"):
        m(u, cache=DynamicCache())
    cache = SalaCache(mixer_types=[MIXER_SPARSE])
    with pytest.raises(ValueError, match="cached as"):
        m(u, cache=cache)
    with pytest.raises(ValueError, match="mixer_types"):
        SalaCache(mixer_types=["attention"])
    mixed = SalaCache(mixer_types=[MIXER_SPARSE, MIXER_LIGHTNING])
    assert not mixed.is_croppable and cache.is_croppable
    with pytest.raises(NotImplementedError, match="crop"):
        mixed.crop(2)
    with pytest.raises(ValueError, match="max_length"):
        SalaCache(mixer_types=[MIXER_SPARSE], max_length=0)


def test_cache_reorder_and_repeat():
    m, u = sparse_mixer(), _u(2, 8)
    cache = SalaCache(mixer_types=[MIXER_SPARSE])
    m(u, cache=cache)
    k0 = cache.layers[0].keys.clone()
    cache.reorder_cache(torch.tensor([1, 0]))
    assert torch.equal(cache.layers[0].keys, k0.flip(0))
    cache.batch_repeat_interleave(2)
    assert cache.layers[0].keys.shape[0] == 4 and cache.batch_size == 4
    cache.reset()
    assert cache.get_seq_length() == 0 and not cache.is_initialized


# ------------------------------------------------- sparse layers on the incremental decode path (SparseLayerCache)

def _spy(monkeypatch, module, name):
    calls = []
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    return calls


def _assert_compressed_from_scratch(entry):
    """The SparseLayerCache's incrementally built C1/C2 == compress_keys over the cached keys from scratch."""
    from sala_ops.sparse import compress_keys
    cfg = entry.cache.config
    keys = entry.keys
    assert_close(entry.compressed_k1, compress_keys(keys, cfg.kernel_size, cfg.kernel_stride), 1e-6, what="C1")
    assert_close(entry.compressed_k2, compress_keys(keys, *cfg.c2), 1e-6, what="C2")
    assert entry.compressed_k1.shape[1] == (keys.shape[1] - cfg.kernel_size) // cfg.kernel_stride + 1
    for b in range(keys.shape[0]):  # the decode kernels read the per-row views at the device-side length
        c1, _ = entry.cache.compressed_keys(b)
        assert torch.equal(c1, entry.compressed_k1[b])


def test_sparse_cache_decode_uses_sparse_decode_and_grows(monkeypatch):
    """Decode steps go through sparse_decode_step (one query, cached C1/C2), the prompt through
    sparse_prefill; a capacity of 4 reallocates (4 -> 8 -> 16 -> 32 -> 64) without changing any output."""
    import sala_ops.cache as cache_mod
    decode = _spy(monkeypatch, cache_mod, "sparse_decode_step")
    prefill = _spy(monkeypatch, cache_mod, "sparse_prefill")
    m, u = sparse_mixer(), _u(2, 36)
    full, _ = m(u)
    cache = SalaCache(mixer_types=[MIXER_SPARSE], max_length=4)
    entry = cache.layers[0]
    outs = [m(u[:, :3], cache=cache)[0]]
    assert entry.capacity == 4
    caps = set()
    with torch.no_grad():  # as in generate(); under autograd a step takes the differentiable path (below)
        for t in range(3, 36):
            outs.append(m(u[:, t:t + 1], cache=cache)[0])
            caps.add(entry.capacity)
    assert caps == {4, 8, 16, 32, 64}
    assert len(prefill) == 1 and len(decode) == 33 and all(s[1] == 1 for s in decode)
    assert cache.get_seq_length() == 36 and entry.keys.shape == (2, 36, HKV, D)
    assert entry.cache.lengths.tolist() == [36, 36]
    assert_close(torch.cat(outs, 1), full, 1e-5)
    q, k, v = m.qkv(u)
    assert_close(entry.keys, k, 1e-6)
    assert_close(entry.values, v, 1e-6)
    _assert_compressed_from_scratch(entry)


def test_sparse_cache_step_under_autograd_keeps_gradients(monkeypatch):
    """The decode kernels have no backward: with autograd on, a one-token step through the cache takes
    the differentiable prefill path, and its parameter gradients equal those of the full pass."""
    import sala_ops.cache as cache_mod
    decode = _spy(monkeypatch, cache_mod, "sparse_decode_step")
    m, u = sparse_mixer(), _u(1, 20)
    full, _ = m(u)
    # q_proj: only the last query feeds the last output in both passes, so the gradients must agree
    # (k_proj would differ: the cached keys were made under no_grad)
    g_full = torch.autograd.grad(full[:, -1].sum(), [m.q_proj.weight])
    cache = SalaCache(mixer_types=[MIXER_SPARSE])
    with torch.no_grad():
        m(u[:, :19], cache=cache)
    last, _ = m(u[:, 19:], cache=cache)
    assert not decode and last.requires_grad
    assert_close(last, full[:, -1:], 1e-5)
    g_step = torch.autograd.grad(last.sum(), [m.q_proj.weight], retain_graph=True)
    assert_close(g_step[0], g_full[0], 1e-4)
    gk = torch.autograd.grad(last.sum(), [m.k_proj.weight])[0]  # through the new token's key
    assert torch.isfinite(gk).all() and gk.abs().sum() > 0


def test_sparse_cache_chunked_prefill_after_decode():
    """A prefill chunk on a non-empty cache (after decode steps, across a reallocation) continues it."""
    m, u = sparse_mixer(), _u(1, 44)
    full, _ = m(u)
    cache = SalaCache(mixer_types=[MIXER_SPARSE], max_length=20)
    outs = [m(u[:, :17], cache=cache)[0]]
    outs += [m(u[:, t:t + 1], cache=cache)[0] for t in (17, 18, 19)]
    outs.append(m(u[:, 20:41], cache=cache)[0])  # 21 tokens: 20 + 21 > 2 x 20, reallocated to 41
    assert cache.layers[0].capacity == 41
    outs += [m(u[:, t:t + 1], cache=cache)[0] for t in (41, 42, 43)]
    assert_close(torch.cat(outs, 1), full, 1e-5)
    _assert_compressed_from_scratch(cache.layers[0])


def test_sparse_cache_reorder_select_repeat_then_decode():
    """Beam-search reshuffles of a filled cache, then decode: each row equals one full pass of the
    sequence it now holds."""
    m, u = sparse_mixer(), _u(3, 34, seed=2)
    full, _ = m(u)
    cache = SalaCache(mixer_types=[MIXER_SPARSE])
    m(u[:, :20], cache=cache)
    m(u[:, 20:21], cache=cache)
    cache.reorder_cache(torch.tensor([2, 0, 1]))
    rows = [2, 0, 1]
    m(u[rows, 21:22], cache=cache)
    cache.batch_select_indices(torch.tensor([0, 2]))
    rows = [rows[0], rows[2]]
    cache.batch_repeat_interleave(2)
    rows = [r for r in rows for _ in range(2)]
    assert cache.batch_size == 4 and cache.layers[0].cache.lengths.tolist() == [22] * 4
    for t in range(22, 34):
        out = m(u[rows, t:t + 1], cache=cache)[0]
        assert_close(out, full[rows, t:t + 1], 1e-5, what=f"step {t}")
    _assert_compressed_from_scratch(cache.layers[0])


def test_sparse_cache_crop_then_decode():
    """crop rolls the sparse cache back (HF semantics, negative = drop that many); decoding other tokens
    from there equals a full pass over the kept prefix + the new tokens; C1/C2 stay exact."""
    m, u, w = sparse_mixer(), _u(2, 40, seed=3), _u(2, 40, seed=4)
    cache = SalaCache(mixer_types=[MIXER_SPARSE])
    m(u[:, :25], cache=cache)
    for t in range(25, 31):
        m(u[:, t:t + 1], cache=cache)
    cache.crop(31)  # no-op (absolute form, as older transformers releases call it)
    cache.crop(0)  # no-op (relative form: nothing to drop)
    assert cache.get_seq_length() == 31
    cache.crop(-8)  # -> 23 tokens: inside a compression window and a block
    assert cache.get_seq_length() == 23 and cache.layers[0].cache.lengths.tolist() == [23, 23]
    _assert_compressed_from_scratch(cache.layers[0])
    x = torch.cat([u[:, :23], w[:, 23:36]], 1)
    full, _ = m(x)
    outs = [m(x[:, t:t + 1], cache=cache)[0] for t in range(23, 30)]
    outs.append(m(x[:, 30:36], cache=cache)[0])
    assert_close(torch.cat(outs, 1), full[:, 23:36], 1e-5)
    _assert_compressed_from_scratch(cache.layers[0])
    cache.crop(-100)  # more than cached: empty
    assert cache.get_seq_length() == 0 and cache.layers[0].cache.lengths.tolist() == [0, 0]
    assert_close(m(x[:, :18], cache=cache)[0], full[:, :18], 1e-5)


def test_sparse_cache_triton_kernels_grow_and_reorder():
    """The CUDA path (Triton decode kernels, default 3-launch kernel; interpreter on CPU): a reallocation
    and a row reorder rebuild the kernels' workspace; every step equals the reference full pass."""
    from sala_ops import use_backend
    m, u = sparse_mixer(), _u(2, 24, seed=5)
    full, _ = m(u)
    cache = SalaCache(mixer_types=[MIXER_SPARSE], max_length=18)
    rows = [0, 1]
    with use_backend("triton"):
        assert_close(m(u[:, :17], cache=cache)[0], full[:, :17], 1e-5, what="prefill")
        for t in range(17, 24):
            if t == 20:
                cache.reorder_cache(torch.tensor([1, 0]))
                rows = [1, 0]
            out = m(u[rows, t:t + 1], cache=cache)[0]
            assert_close(out, full[rows, t:t + 1], 1e-5, what=f"step {t}")
    assert cache.layers[0].capacity == 36
    _assert_compressed_from_scratch(cache.layers[0])
