"""The decode wrappers' host fast paths: a call whose metadata signature matches one that passed every
check before skips the checks; anything else is checked again (right error, right result).

lightning_attention_step: sala_ops.lightning._step_sigs. Each test runs on the reference backend and on
the triton backend (the interpreter on CPU, the GPU when there is one)."""
import pytest
import torch

import sala_ops
import sala_ops.lightning as L
import sala_ops.reference as R
from conftest import KERNEL_DEVICE
from helpers import assert_close, seeded_randn
from sala_ops import use_backend

OP = "lightning_attention_step"
BACKENDS = ["reference", "triton"]


def _dev(backend):
    return KERNEL_DEVICE if backend == "triton" else "cpu"


def _inputs(dev, B=2, H=4, Hkv=2, D=16, dtype=torch.float32, seed=0):
    q = seeded_randn(seed, B, H, D, dtype=dtype, device=dev)
    k = seeded_randn(seed + 1, B, Hkv, D, dtype=dtype, device=dev)
    v = seeded_randn(seed + 2, B, Hkv, D, dtype=dtype, device=dev)
    state = seeded_randn(seed + 3, B, H, D, D, device=dev)
    decay = sala_ops.sala_decay_slopes(H).to(dev)
    return q, k, v, state, decay


def _expect(q, k, v, state, decay, scale=None):
    o, s = R.lightning_step(q.double(), k.double(), v.double(), state.double(), decay.double(), scale)
    return o, s


@pytest.fixture(autouse=True)
def _fresh_cache():
    L._step_sigs.clear()
    yield
    L._step_sigs.clear()


@pytest.fixture
def count_checks(monkeypatch):
    calls = []
    real = L._check_step

    def spy(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(L, "_check_step", spy)
    return calls


def _run(backend, *args, **kw):
    with use_backend(backend):
        return sala_ops.lightning_attention_step(*args, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_repeat_call_skips_checks_and_stays_right(backend, count_checks):
    q, k, v, state, decay = _inputs(_dev(backend))
    eo, es = _expect(q, k, v, state, decay)
    for i in range(3):
        o, s = _run(backend, q, k, v, state.clone(), decay)
        assert_close(o, eo, 1e-5, f"call {i}")
        assert_close(s, es, 1e-5, f"state {i}")
    assert len(count_checks) == 1
    assert len(L._step_sigs) == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_calls_after_a_cached_good_one_still_raise(backend):
    dev = _dev(backend)
    q, k, v, state, decay = _inputs(dev)
    _run(backend, q, k, v, state, decay)  # cache the good signature
    bad = {
        "state shape": (dict(state=state[:, :, :8]), ValueError),
        "state dtype": (dict(state=state.to(torch.bfloat16)), TypeError),
        "state device": (dict(state=state.to("meta")), ValueError),
        "state rank": (dict(state=state[0]), ValueError),
        "decay device": (dict(decay=decay.to("meta")), ValueError),
        "decay length": (dict(decay=decay[:3]), ValueError),
        "decay int": (dict(decay=decay.to(torch.int32)), TypeError),
        "decay 2-d": (dict(decay=decay[None]), ValueError),
        "q device": (dict(q=q.to("meta")), ValueError),
        "k dtype": (dict(k=k.to(torch.float16)), TypeError),
        "q int": (dict(q=q.to(torch.int32)), TypeError),
        "k heads": (dict(k=torch.randn(2, 3, 16, device=dev), v=torch.randn(2, 3, 16, device=dev)), ValueError),
        "v batch": (dict(v=v[:1]), ValueError),
        "q not a tensor": (dict(q=q.tolist()), TypeError),
        "state not a tensor": (dict(state=state.tolist()), TypeError),
        "scale nan": (dict(scale=float("nan")), ValueError),
        "scale inf": (dict(scale=float("inf")), ValueError),
        "scale bool": (dict(scale=True), TypeError),
        "scale str": (dict(scale="0.5"), TypeError),
    }
    for what, (change, exc) in bad.items():
        args = dict(q=q, k=k, v=v, state=state, decay=decay)
        args.update(change)
        with pytest.raises(exc, match=OP):
            _run(backend, **args)
        # and again, now that the bad call went by (nothing bad gets cached)
        with pytest.raises(exc, match=OP):
            _run(backend, **args)
    assert len(L._step_sigs) == 1, "only the good signature is cached"


@pytest.mark.parametrize("backend", BACKENDS)
def test_other_valid_metadata_is_revalidated_and_right(backend, count_checks):
    dev = _dev(backend)
    q, k, v, state, decay = _inputs(dev)
    _run(backend, q, k, v, state.clone(), decay)
    n = len(count_checks)

    def check(what, q, k, v, state, decay, **kw):
        nonlocal n
        eo, es = _expect(q.reshape(q.shape[0], -1, q.shape[-1]) if q.dim() == 4 else q,
                         k[:, 0] if k.dim() == 4 else k, v[:, 0] if v.dim() == 4 else v, state, decay,
                         kw.get("scale"))
        st0 = state.clone()
        o, s = _run(backend, q, k, v, state, decay, **kw)
        assert len(count_checks) == n + 1, f"{what}: not re-validated"
        n += 1
        assert o.dtype == q.dtype, what
        assert_close(o.reshape(eo.shape), eo, 1e-5 if q.dtype == torch.float32 else 2e-3, what)
        assert_close(s, es, 1e-5, what + " state")
        if kw.get("inplace"):
            assert s is state
        else:
            assert torch.equal(state, st0), what + ": the input state changed"

    # another shape: batch, heads, head dim
    check("shape", *_inputs(dev, B=3, H=8, Hkv=4, D=32))
    # another dtype
    q16, k16, v16 = q.half(), k.half(), v.half()
    check("fp16", q16, k16, v16, state.clone(), decay)
    # non-contiguous state (inplace writes through the strided view)
    big = torch.zeros(2, 4, 16, 32, device=dev)
    st_nc = big[..., :16]
    st_nc.copy_(state)
    check("non-contiguous state", q, k, v, st_nc, decay, inplace=True)
    check("non-contiguous state, out of place", q, k, v, st_nc, decay)
    # non-contiguous q / k (head dim strided) and a strided decay
    qt = torch.zeros(2, 16, 4, device=dev).transpose(1, 2)
    qt.copy_(q)
    check("strided q", qt, k, v, state.clone(), decay)
    dec_s = torch.zeros(8, device=dev)[::2]
    dec_s.copy_(decay)
    check("strided decay", q, k, v, state.clone(), dec_s)
    check("bf16 decay", q, k, v, state.clone(), decay.to(torch.bfloat16).float().to(torch.bfloat16))
    # 4-D inputs, another scale, inplace
    check("4-D", q[:, None], k[:, None], v[:, None], state.clone(), decay)
    check("scale", q, k, v, state.clone(), decay, scale=0.3)
    check("int scale", q, k, v, state.clone(), decay, scale=1)
    check("inplace", q, k, v, state.clone(), decay, inplace=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_tensor_objects_with_changed_metadata(backend, count_checks):
    """The cache is keyed on metadata, not on the tensor objects: an in-place transpose or resize of
    the very same tensor is a new signature."""
    q, k, v, state, decay = _inputs(_dev(backend))
    _run(backend, q, k, v, state, decay, inplace=True)
    n = len(count_checks)
    ref = state.clone()
    state.transpose_(2, 3)  # same object, now non-contiguous (and a valid [B, H, K, V] for K == V)
    eo, es = _expect(q, k, v, state, decay)
    o, s = _run(backend, q, k, v, state, decay, inplace=True)
    assert len(count_checks) == n + 1 and s is state
    assert_close(o, eo, 1e-5, "after transpose_")
    assert_close(state, es, 1e-5, "state after transpose_")
    assert not torch.equal(ref, state)
    state.resize_(2, 4, 16, 8)  # same object, wrong shape now
    with pytest.raises(ValueError, match=OP):
        _run(backend, q, k, v, state, decay, inplace=True)


def test_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(L, "_STEP_SIGS_MAX", 3)
    for D in (4, 8, 12, 16, 20, 24, 28):
        sala_ops.lightning_attention_step(*_inputs("cpu", B=1, H=2, Hkv=1, D=D))
        assert len(L._step_sigs) <= 3


# ---------------------------------------------------------------- sparse_decode / append_token
SD = __import__("sys").modules["sala_ops.sparse_decode"]
SMALL = dict(kernel_size=8, kernel_stride=4, block_size=16, window_size=32, init_blocks=1, topk=2, dense_len=16)


def _sd_setup(backend, B=2, H=4, Hkv=2, D=16, L=40, max_len=64, dtype=torch.float32, seed=0):
    dev = _dev(backend)
    k = seeded_randn(seed, B, L, Hkv, D, dtype=dtype, device=dev)
    v = seeded_randn(seed + 1, B, L, Hkv, D, dtype=dtype, device=dev)
    cache = sala_ops.SparseLayerCache(B, max_len, Hkv, D, dtype=dtype, device=dev, **SMALL)
    cache.append(k, v)
    q = seeded_randn(seed + 2, B, H, D, dtype=dtype, device=dev)
    return cache, q


@pytest.fixture
def count_sd_checks(monkeypatch):
    SD._decode_sigs.clear()
    SD._append_sigs.clear()
    calls = {"q": 0, "kv": 0}
    real_q, real_kv = SD._check_q, SD.SparseLayerCache._check_kv

    def spy_q(*a, **kw):
        calls["q"] += 1
        return real_q(*a, **kw)

    def spy_kv(self, *a, **kw):
        calls["kv"] += 1
        return real_kv(self, *a, **kw)

    monkeypatch.setattr(SD, "_check_q", spy_q)
    monkeypatch.setattr(SD.SparseLayerCache, "_check_kv", spy_kv)
    yield calls
    SD._decode_sigs.clear()
    SD._append_sigs.clear()


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_decode_repeat_skips_checks_other_metadata_rechecked(backend, count_sd_checks):
    cache, q = _sd_setup(backend)
    with use_backend("reference"):
        want = sala_ops.sparse_decode(q.cpu(), _sd_setup("reference")[0])
    with use_backend(backend):
        for _ in range(3):
            assert_close(sala_ops.sparse_decode(q, cache).cpu(), want, 1e-5, "repeat")
        assert count_sd_checks["q"] == 1
        # 4-D q, another scale, another cache of another batch: checked again, right results
        assert_close(sala_ops.sparse_decode(q[:, None], cache)[:, 0].cpu(), want, 1e-5, "4-D")
        assert count_sd_checks["q"] == 2
        sala_ops.sparse_decode(q, cache, scale=0.2)
        assert count_sd_checks["q"] == 3
        cache3, q3 = _sd_setup(backend, B=3, seed=5)
        with use_backend("reference"):
            want3 = sala_ops.sparse_decode(q3.cpu(), _sd_setup("reference", B=3, seed=5)[0])
        assert_close(sala_ops.sparse_decode(q3, cache3).cpu(), want3, 1e-5, "other cache")
        assert count_sd_checks["q"] == 4
        # the batch-2 q against the batch-3 cache: same q metadata, other cache metadata
        with pytest.raises(ValueError, match="sparse_decode.*batch"):
            sala_ops.sparse_decode(q, cache3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_decode_bad_calls_after_a_cached_good_one_still_raise(backend, count_sd_checks):
    cache, q = _sd_setup(backend)
    with use_backend(backend):
        sala_ops.sparse_decode(q, cache)
        bad = [
            (q.half(), cache, None, TypeError),
            (q.to("meta"), cache, None, ValueError),
            (q[:1], cache, None, ValueError),
            (q[..., :8], cache, None, ValueError),
            (q[:, :3], cache, None, ValueError),
            (q[:, None].expand(2, 2, 4, 16), cache, None, ValueError),
            (q.to(torch.int32), cache, None, TypeError),
            (q.tolist(), cache, None, TypeError),
            (q, "cache", None, TypeError),
            (q, cache, float("nan"), ValueError),
            (q, cache, True, TypeError),
        ]
        other = sala_ops.SparseLayerCache(2, 64, 2, 16, dtype=torch.float16, device=cache.device, **SMALL)
        bad.append((q, other, None, TypeError))
        for qq, cc, sc, exc in bad:
            for _ in range(2):
                with pytest.raises(exc, match="sparse_decode"):
                    sala_ops.sparse_decode(qq, cc, scale=sc)
    assert len(SD._decode_sigs) == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_append_token_repeat_skips_checks_bad_still_raise(backend, count_sd_checks):
    cache, _ = _sd_setup(backend)
    ref_cache, _ = _sd_setup("reference")
    dev = cache.device
    k1 = seeded_randn(9, 2, 2, 16, device=dev)
    v1 = seeded_randn(10, 2, 2, 16, device=dev)
    n = count_sd_checks["kv"]  # the prefills
    with use_backend(backend):
        cache.append_token(k1, v1)
        cache.append_token(k1, v1)
        assert count_sd_checks["kv"] == n + 1
        # non-contiguous k (other strides, same key fields) is fine: the kernel path copies it
        kt = torch.zeros(2, 16, 2, device=dev).transpose(1, 2)
        kt.copy_(k1)
        cache.append_token(kt, v1)
        bad = [
            (k1.half(), v1.half(), TypeError), (k1.to("meta"), v1, ValueError), (k1[:1], v1[:1], ValueError),
            (k1, v1[..., :8], ValueError), (k1[:, :1], v1[:, :1], ValueError), (k1.tolist(), v1, TypeError),
            (k1.to(torch.int32), v1, TypeError),
        ]
        for kk, vv, exc in bad:
            for _ in range(2):
                with pytest.raises(exc, match="append_token"):
                    cache.append_token(kk, vv)
    with use_backend("reference"):
        for _ in range(3):
            ref_cache.append_token(k1.cpu(), v1.cpu())
    assert cache.lengths_host() == ref_cache.lengths_host() == [43, 43]
    assert_close(cache.k.cpu(), ref_cache.k, 1e-6, "K cache")
    assert_close(cache.c1.cpu(), ref_cache.c1, 1e-6, "C1")
    assert len(SD._append_sigs) == 1
