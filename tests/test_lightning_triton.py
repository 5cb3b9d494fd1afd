"""lightning_attention / lightning_attention_step on the Triton backend (sala_ops/triton/lightning_*.py)
against reference/lightning.py.

On CPU the kernels run through the Triton interpreter (tiny shapes, fp32 and fp16, small chunk
lengths forced through CHUNK_OVERRIDE so that the multi-chunk scan and partial blocks are exercised);
on a GPU the `gpu` tests run bf16 at real sizes (B=1, H=32, D=128, up to 1M tokens).

Ground truth: the reference with fp64 inputs (its math is fp32), gradients by autograd through it.
Tolerances: 1e-5 in fp32; in fp16/bf16 twice the error PyTorch makes computing the same function with
low-precision matmuls (`_torch_lowp`: the quadratic form, scores and products in the input dtype).
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, strategies as st

import sala_ops
from sala_ops.reference import lightning as ref
from sala_ops.triton import lightning_chunk as LC

from conftest import HAS_CUDA, KERNEL_DEVICE
from helpers import assert_close, gqa_heads, nan_like, rel_err, seeded_randn, varlen_splits

DEV = KERNEL_DEVICE
FP32_TOL = 1e-5
# (chunk length L, block BT). Under the interpreter small blocks keep the tests fast and still cross many
# chunk and block boundaries; compiled on a GPU the kernels keep 64-token blocks (the tile shapes they
# are built for), with longer sequences to cross as many boundaries.
if HAS_CUDA:
    CHUNKINGS = [(64, 64), (128, 64), (192, 64), (320, 64), (160, 64)]
    MAX_T = 400
else:
    CHUNKINGS = [(16, 16), (32, 16), (48, 16), (64, 32), (40, 16)]
    MAX_T = 96
DIMS = [8, 12, 16, 24, 32]


@pytest.fixture(autouse=True)
def _reset_override():
    yield
    LC.CHUNK_OVERRIDE = None


def _lightning(*args, **kw):
    with sala_ops.use_backend("triton"):
        return sala_ops.lightning_attention(*args, **kw)


def _step(*args, **kw):
    with sala_ops.use_backend("triton"):
        return sala_ops.lightning_attention_step(*args, **kw)


def _torch_lowp(q, k, v, decay, scale, S0, dtype):
    """The function computed by PyTorch in `dtype`: quadratic form with low-precision matmuls (single
    sequence batch, any GQA). Used only to size the low-precision tolerance."""
    B, T, H, K = q.shape
    qd, kd, vd = q.to(dtype), ref._expand_kv(k.to(dtype), H), ref._expand_kv(v.to(dtype), H)
    pos = torch.arange(T, device=q.device, dtype=torch.float32)
    diff = pos[:, None] - pos[None, :]
    s = decay.float().to(q.device)
    w = torch.where(diff[None] >= 0, torch.exp(-s[:, None, None] * diff.clamp(min=0)[None]), 0.0).to(dtype)
    outs = []
    for b in range(B):
        sc = torch.einsum("thk,shk->hts", qd[b], kd[b]) * w
        o = torch.einsum("hts,shv->thv", sc, vd[b])
        if S0 is not None:
            lam_t = torch.exp(-s[None, :] * (pos[:, None] + 1)).to(dtype)
            o = o + lam_t[:, :, None] * torch.einsum("thk,hkv->thv", qd[b], S0[b].to(dtype))
        outs.append(o * scale)
    return torch.stack(outs)


def _ref_all(q, k, v, decay, scale, S0, want_final, cu, do, dfin, dtype=torch.float64):
    """Reference output, final state and grads (q, k, v, S0) with inputs cast to `dtype`."""
    leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
    s0 = None if S0 is None else S0.detach().to(dtype).requires_grad_()
    o, f = ref.lightning_parallel(*leaves, decay, scale, s0, want_final, cu)
    outs, grads_in = [o], [do.to(o.dtype)]
    if want_final:
        outs.append(f)
        grads_in.append(dfin.to(f.dtype))
    ins = leaves + ([s0] if s0 is not None else [])
    grads = torch.autograd.grad(outs, ins, grads_in)
    return o.detach(), (None if f is None else f.detach()), grads


@st.composite
def _case(draw, max_T=MAX_T):
    B = draw(st.integers(1, 2))
    T = draw(st.one_of(st.integers(1, max_T), st.sampled_from([1, 15, 16, 17, 31, 32, 33, 64, 65])))
    H, Hkv = draw(gqa_heads(max_kv=2, max_group=2))
    K = draw(st.sampled_from(DIMS))
    V = draw(st.sampled_from(DIMS))
    chunk = draw(st.sampled_from(CHUNKINGS))
    has_init = draw(st.booleans())
    want_final = draw(st.booleans())
    scale = draw(st.sampled_from([None, 0.3]))
    strong = draw(st.booleans())  # also strong decays (exp(-s) tiny): masks must not make inf * 0
    seed = draw(st.integers(0, 2**16))
    return B, T, H, Hkv, K, V, chunk, has_init, want_final, scale, strong, seed


def _inputs(B, T, H, Hkv, K, V, has_init, strong, seed, dtype=torch.float32, N=None):
    q = seeded_randn(seed, B, T, H, K, dtype=dtype, device=DEV)
    k = seeded_randn(seed + 1, B, T, Hkv, K, dtype=dtype, device=DEV)
    v = seeded_randn(seed + 2, B, T, Hkv, V, dtype=dtype, device=DEV)
    decay = ref.sala_decay_slopes(H).to(DEV)
    if strong:
        decay = decay * torch.linspace(0.5, 30.0, H)[torch.randperm(H, generator=torch.Generator().manual_seed(seed))].to(DEV)
    S0 = seeded_randn(seed + 3, N or B, H, K, V, device=DEV) if has_init else None
    return q, k, v, decay, S0


# ----------------------------------------------------------------------------------------------------------------
# CPU (interpreter) and GPU: fp32 against the reference, outputs and every gradient

@given(_case())
def test_fwd_bwd_fp32_matches_reference(case):
    B, T, H, Hkv, K, V, chunk, has_init, want_final, scale, strong, seed = case
    LC.CHUNK_OVERRIDE = chunk
    q, k, v, decay, S0 = _inputs(B, T, H, Hkv, K, V, has_init, strong, seed)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    s0 = None if S0 is None else S0.clone().requires_grad_()
    out = _lightning(*leaves, decay, scale=scale, initial_state=s0, output_final_state=want_final)
    do = seeded_randn(seed + 4, B, T, H, V, device=DEV)
    dfin = seeded_randn(seed + 5, B, H, K, V, device=DEV) if want_final else None
    o_ref, f_ref, g_ref = _ref_all(q, k, v, decay, scale, S0, want_final, None, do, dfin)
    assert out.output.dtype == torch.float32
    assert_close(out.output, o_ref, FP32_TOL, "output")
    if want_final:
        assert out.final_state.dtype == torch.float32
        assert_close(out.final_state, f_ref, FP32_TOL, "final_state")
    else:
        assert out.final_state is None
    outs = [out.output] + ([out.final_state] if want_final else [])
    grads_in = [do] + ([dfin] if want_final else [])
    ins = leaves + ([s0] if s0 is not None else [])
    grads = torch.autograd.grad(outs, ins, grads_in)
    for name, g, r in zip(("dq", "dk", "dv", "d_initial_state"), grads, g_ref):
        assert g.dtype == (torch.float32 if name == "d_initial_state" else q.dtype)
        assert_close(g, r, FP32_TOL, name)


@given(_case(max_T=2 * MAX_T // 3))
def test_fwd_bwd_fp16_within_low_precision_bound(case):
    B, T, H, Hkv, K, V, chunk, has_init, want_final, scale, strong, seed = case
    LC.CHUNK_OVERRIDE = chunk
    q, k, v, decay, S0 = _inputs(B, T, H, Hkv, K, V, has_init, strong, seed)
    sc = K ** -0.5 if scale is None else scale
    # exact values of the fp16-rounded inputs
    q16, k16, v16 = (x.half() for x in (q, k, v))
    do = seeded_randn(seed + 4, B, T, H, V, device=DEV)
    o_ref, _, g_ref = _ref_all(q16, k16, v16, decay, scale, S0, False, None, do, None)
    leaves = [x.clone().requires_grad_() for x in (q16, k16, v16)]
    out = _lightning(*leaves, decay, scale=scale, initial_state=S0)
    assert out.output.dtype == torch.float16
    # PyTorch's own fp16 computation of the same function, forward and backward
    lp = [x.clone().float().requires_grad_() for x in (q16, k16, v16)]
    o_lp = _torch_lowp(*[x.half() for x in lp], decay, sc, S0, torch.float16)
    g_lp = torch.autograd.grad(o_lp, lp, do.half())
    tol_o = max(2 * rel_err(o_lp, o_ref), 1e-5)
    assert_close(out.output, o_ref, tol_o, "fp16 output")
    grads = torch.autograd.grad(out.output, leaves, do.half())
    for name, g, r, lo in zip(("dq", "dk", "dv"), grads, g_ref, g_lp):
        assert g.dtype == torch.float16
        assert_close(g, r, max(2 * rel_err(lo, r), 1e-5), f"fp16 {name}")


@pytest.mark.parametrize("mag", [1.0, 1e5, 1e-6])
@pytest.mark.parametrize("case", [(1, 70, 2, 1, 64, 64, (32, 16), None), (1, 61, 4, 2, 24, 40, (16, 16), [20, 1, 40])])
def test_fp32_f16s_products_within_tf32_bound(case, mag, monkeypatch):
    """SALA_LIGHTNING_F32_DOT=f16s (fp32 inputs, every product on fp16 tiles scaled by a power of two from the tile's
    largest entry): outputs, final state and all gradients within 4 TF32 ulps (2^-11 relative) of each entry's sum
    of |terms| (the reference run on |q|, |k|, |v|, |S0|, |dO|), at magnitudes fp16 alone could not hold (1e5
    overflows it, 1e-6 is subnormal there)."""
    B, T, H, Hkv, K, V, chunk, lens = case
    monkeypatch.setenv("SALA_LIGHTNING_F32_DOT", "f16s")
    LC.CHUNK_OVERRIDE = chunk
    N = B if lens is None else len(lens)
    cu = None if lens is None else torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), device=DEV)
    q, k, v, decay, _ = _inputs(B, T, H, Hkv, K, V, False, False, 11)
    q, k, v = q * mag, k * mag, v * mag
    S0 = seeded_randn(14, N, H, K, V, device=DEV) * mag * mag
    do = seeded_randn(15, B, T, H, V, device=DEV)
    dfin = seeded_randn(16, N, H, K, V, device=DEV)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, S0)]
    out = _lightning(*leaves[:3], decay, initial_state=leaves[3], output_final_state=True, cu_seqlens=cu)
    got = [out.output, out.final_state, *torch.autograd.grad([out.output, out.final_state], leaves, [do, dfin])]
    o_ref, f_ref, g_ref = _ref_all(q, k, v, decay, None, S0, True, cu, do, dfin)
    o_abs, f_abs, g_abs = _ref_all(q.abs(), k.abs(), v.abs(), decay, None, S0.abs(), True, cu, do.abs(), dfin.abs())
    for name, g, r, a in zip(("o", "final_state", "dq", "dk", "dv", "d_initial_state"), got, [o_ref, f_ref, *g_ref],
                             [o_abs, f_abs, *g_abs]):
        assert g.dtype == torch.float32 and torch.isfinite(g).all(), name
        worst = ((g.double() - r).abs() / a.clamp_min(1e-300)).max().item()
        assert worst <= 4 * 2 ** -11, f"f16s {name}: error {worst:.2e} of the |terms| sum (mag {mag:g})"
        if not HAS_CUDA and name == "o":  # the interpreter's TF32 is exact fp32: fp16 rounding shows f16s ran
            assert worst > 2 ** -16, f"f16s o: error {worst:.2e}, no fp16 rounding seen"


def test_fp32_f16s_refused_by_other_kernels(monkeypatch):
    monkeypatch.setenv("SALA_LIGHTNING_F32_DOT", "f16s")
    monkeypatch.setenv("SALA_LIGHTNING_OUT", "v0")
    q = seeded_randn(1, 1, 8, 2, 8, device=DEV)
    with pytest.raises(ValueError, match="f16s"):
        _lightning(q, q, q, torch.full((2,), 0.1, device=DEV))


# (B, T, H, Hkv, K, V, chunk, lens): GQA, several chunks and blocks, a partial tail block; varlen
_SPLIT_CASES = [(1, 150, 2, 1, 32, 32, (48, 16), None), (1, 170, 2, 2, 32, 64, (32, 16), [60, 1, 109])]
if HAS_CUDA:
    _SPLIT_CASES = [(1, 1000, 4, 2, 128, 128, (256, 64), None), (1, 700, 2, 2, 128, 128, (192, 64), [300, 1, 399])]


@pytest.mark.parametrize("case", _SPLIT_CASES)
def test_16bit_split_products_reach_the_output_rounding_floor(case, monkeypatch):
    """SALA_LIGHTNING_16BIT_DOT=split (16-bit inputs; the score tile, the state and the weighted v as hi + lo pairs):
    each 16-bit result (o, dq, dk, dv) is as far from the fp64 reference as the reference rounded to the input dtype
    (within 5%), and the fp32 ones (final state, initial-state gradient) within 2^-14; the plain 16-bit path misses
    both bounds on the same inputs, so the test sees which one ran. bf16 on a GPU, fp16 in the interpreter (its
    bf16 dot is broken)."""
    B, T, H, Hkv, K, V, chunk, lens = case
    dt = torch.bfloat16 if HAS_CUDA else torch.float16
    LC.CHUNK_OVERRIDE = chunk
    N = B if lens is None else len(lens)
    cu = None if lens is None else torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), device=DEV)
    q, k, v, decay, S0 = _inputs(B, T, H, Hkv, K, V, True, False, 21, N=N)
    # unit-norm-ish q, k as the SALA layers give them (RMSNorm); the model's 16-bit activations
    q, k, v = (q / K ** 0.25).to(dt), (k / K ** 0.25).to(dt), v.to(dt)
    do = seeded_randn(25, B, T, H, V, device=DEV).to(dt)
    dfin = seeded_randn(26, N, H, K, V, device=DEV)
    o_ref, f_ref, g_ref = _ref_all(q, k, v, decay, None, S0, True, cu, do, dfin)
    refs = [o_ref, f_ref, *g_ref]
    names = ("o", "final_state", "dq", "dk", "dv", "d_initial_state")

    def errors(mode):
        monkeypatch.setenv("SALA_LIGHTNING_16BIT_DOT", mode)
        leaves = [x.clone().requires_grad_() for x in (q, k, v, S0)]
        out = _lightning(*leaves[:3], decay, initial_state=leaves[3], output_final_state=True, cu_seqlens=cu)
        got = [out.output, out.final_state,
               *torch.autograd.grad([out.output, out.final_state], leaves, [do, dfin])]
        return {n: (rel_err(g, r), rel_err(r.to(g.dtype), r), g.dtype) for n, g, r in zip(names, got, refs)}

    split, plain = errors("split"), errors("default")
    for n in names:
        err, floor, gdt = split[n]
        if gdt == torch.float32:
            assert err <= 2 ** -14, f"split {n}: error {err:.2e} (fp32 result)"
            assert plain[n][0] > 2 ** -14, f"plain 16-bit {n}: error {plain[n][0]:.2e}, the bound does not discriminate"
        else:
            assert err <= 1.05 * floor, f"split {n}: error {err:.2e}, rounding floor {floor:.2e}"
            assert plain[n][0] > 1.05 * floor, f"plain 16-bit {n}: {plain[n][0]:.2e} within the floor {floor:.2e}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_split_hi_lo_keeps_sixteen_bits(dtype):
    """lightning_chunk.split_hi_lo on its own (the interpreter cannot run bf16 products, so the bf16 branch is
    checked here): hi + lo within 2^-15 of x (each 16-bit part alone: 2^-9 for bf16), across 40 decades for bf16."""
    import triton
    import triton.language as tl

    @triton.jit
    def split_kernel(x_ptr, hi_ptr, lo_ptr, DT: tl.constexpr):
        i = tl.arange(0, 256)
        hi, lo = LC.split_hi_lo(tl.load(x_ptr + i), DT)
        tl.store(hi_ptr + i, hi)
        tl.store(lo_ptr + i, lo)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, generator=g)
    if dtype == torch.bfloat16:
        x = x * torch.logspace(-20, 20, 256)
    x = x.to(DEV)
    hi, lo = torch.empty(256, dtype=dtype, device=DEV), torch.empty(256, dtype=dtype, device=DEV)
    split_kernel[(1,)](x, hi, lo, tl.bfloat16 if dtype == torch.bfloat16 else tl.float16)
    rel = ((hi.double() + lo.double() - x.double()).abs() / x.double().abs()).max().item()
    assert rel <= 2 ** -15, f"hi + lo off by {rel:.2e} of x"
    assert ((hi.double() - x.double()).abs() / x.double().abs()).max().item() > 2 ** -12  # lo carries bits


def test_16bit_split_checked_and_refused_by_other_kernels(monkeypatch):
    q = seeded_randn(1, 1, 8, 2, 16, device=DEV).to(torch.float16)
    monkeypatch.setenv("SALA_LIGHTNING_16BIT_DOT", "bf16x9")
    with pytest.raises(ValueError, match="SALA_LIGHTNING_16BIT_DOT"):
        _lightning(q, q, q, torch.full((2,), 0.1, device=DEV))
    monkeypatch.setenv("SALA_LIGHTNING_16BIT_DOT", "split")
    monkeypatch.setenv("SALA_LIGHTNING_OUT", "v0")
    with pytest.raises(ValueError, match="split runs with the default chunk-output kernel only"):
        _lightning(q, q, q, torch.full((2,), 0.1, device=DEV))


# ----------------------------------------------------------------------------------------------------------------
# equivalences

@given(varlen_splits(total_min=1, total_max=MAX_T, max_seqs=4), st.sampled_from(CHUNKINGS), gqa_heads(max_kv=2, max_group=2),
       st.booleans(), st.integers(0, 2**16))
def test_packed_varlen_equals_separate_calls(split, chunk, heads, has_init, seed):
    lens, cu = split
    LC.CHUNK_OVERRIDE = chunk
    H, Hkv = heads
    T, N, K, V = sum(lens), len(lens), 16, 24
    q, k, v, decay, S0 = _inputs(1, T, H, Hkv, K, V, has_init, False, seed, N=N)
    cu = cu.to(DEV)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    s0 = None if S0 is None else S0.clone().requires_grad_()
    out = _lightning(*leaves, decay, initial_state=s0, output_final_state=True, cu_seqlens=cu)
    do = seeded_randn(seed + 4, 1, T, H, V, device=DEV)
    dfin = seeded_randn(seed + 5, N, H, K, V, device=DEV)
    ins = leaves + ([s0] if s0 is not None else [])
    grads = torch.autograd.grad([out.output, out.final_state], ins, [do, dfin])
    bounds = [0] + torch.tensor(lens).cumsum(0).tolist()
    for n in range(N):
        a, b = bounds[n], bounds[n + 1]
        sl = [x[:, a:b].clone().requires_grad_() for x in (q, k, v)]
        sn = None if S0 is None else S0[n:n + 1].clone().requires_grad_()
        one = _lightning(*sl, decay, initial_state=sn, output_final_state=True)
        assert_close(out.output[:, a:b], one.output, FP32_TOL, f"output of sequence {n}")
        assert_close(out.final_state[n:n + 1], one.final_state, FP32_TOL, f"final state of sequence {n}")
        ins_n = sl + ([sn] if sn is not None else [])
        g_n = torch.autograd.grad([one.output, one.final_state], ins_n, [do[:, a:b], dfin[n:n + 1]])
        for name, g, gn in zip(("dq", "dk", "dv"), grads, g_n):
            assert_close(g[:, a:b], gn, FP32_TOL, f"{name} of sequence {n}")
        if S0 is not None:
            assert_close(grads[3][n:n + 1], g_n[3], FP32_TOL, f"d_initial_state of sequence {n}")
    # and the whole packed call against the reference
    o_ref, f_ref = ref.lightning_parallel(q.double(), k.double(), v.double(), decay, None,
                                          None if S0 is None else S0.double(), True, cu)
    assert_close(out.output, o_ref, FP32_TOL, "packed output")
    assert_close(out.final_state, f_ref, FP32_TOL, "packed final state")


@given(st.integers(1, 40), gqa_heads(max_kv=2, max_group=2), st.sampled_from(CHUNKINGS), st.booleans(),
       st.integers(0, 2**16))
def test_chunked_equals_step_by_step_decode(T, heads, chunk, inplace, seed):
    LC.CHUNK_OVERRIDE = chunk
    H, Hkv = heads
    B, K, V = 2, 16, 16
    q, k, v, decay, S0 = _inputs(B, T, H, Hkv, K, V, True, False, seed)
    out = _lightning(q, k, v, decay, initial_state=S0, output_final_state=True)
    state = S0.clone()
    for t in range(T):
        o_t, new = _step(q[:, t], k[:, t], v[:, t], state, decay, inplace=inplace)
        if inplace:
            assert new is state
        state = new
        assert_close(o_t, out.output[:, t], FP32_TOL, f"decode output at t={t}")
    assert_close(state, out.final_state, FP32_TOL, "decoded state")


@given(st.lists(st.integers(1, 40), min_size=2, max_size=4), st.sampled_from(CHUNKINGS), st.integers(0, 2**16))
def test_segments_carrying_state_equal_one_call(seg_lens, chunk, seed):
    LC.CHUNK_OVERRIDE = chunk
    B, H, Hkv, K, V = 1, 2, 1, 16, 32
    T = sum(seg_lens)
    q, k, v, decay, S0 = _inputs(B, T, H, Hkv, K, V, True, False, seed)
    whole = _lightning(q, k, v, decay, initial_state=S0, output_final_state=True)
    state, a = S0, 0
    for L in seg_lens:
        part = _lightning(q[:, a:a + L], k[:, a:a + L], v[:, a:a + L], decay, initial_state=state,
                          output_final_state=True)
        assert_close(part.output, whole.output[:, a:a + L], FP32_TOL, f"segment at {a}")
        state, a = part.final_state, a + L
    assert_close(state, whole.final_state, FP32_TOL, "carried final state")


@given(gqa_heads(max_kv=2, max_group=4), st.sampled_from(DIMS), st.booleans(), st.integers(0, 2**16))
def test_single_token(heads, D, has_init, seed):
    H, Hkv = heads
    q, k, v, decay, S0 = _inputs(3, 1, H, Hkv, D, D, has_init, False, seed)
    out = _lightning(q, k, v, decay, initial_state=S0, output_final_state=True)
    o_ref, f_ref = ref.lightning_recurrent(q.double(), k.double(), v.double(), decay, None,
                                           None if S0 is None else S0.double(), True)
    assert_close(out.output, o_ref, FP32_TOL, "T=1 output")
    assert_close(out.final_state, f_ref, FP32_TOL, "T=1 final state")


@given(gqa_heads(max_kv=2, max_group=2), st.sampled_from(DIMS), st.sampled_from(DIMS),
       st.sampled_from([torch.float32, torch.float16]), st.integers(0, 2**16))
def test_decode_step_matches_reference(heads, K, V, dtype, seed):
    H, Hkv = heads
    B = 3
    q = seeded_randn(seed, B, H, K, dtype=dtype, device=DEV)
    k = seeded_randn(seed + 1, B, Hkv, K, dtype=dtype, device=DEV)
    v = seeded_randn(seed + 2, B, Hkv, V, dtype=dtype, device=DEV)
    state = seeded_randn(seed + 3, B, H, K, V, device=DEV)
    decay = ref.sala_decay_slopes(H).to(DEV)
    o, s = _step(q, k, v, state, decay)
    o_ref, s_ref = ref.lightning_step(q.double(), k.double(), v.double(), state.double(), decay)
    assert o.dtype == dtype and s.dtype == torch.float32
    tol = FP32_TOL if dtype == torch.float32 else 2 * rel_err(o_ref.to(dtype), o_ref) + 1e-5
    assert_close(o, o_ref, tol, "step output")
    assert_close(s, s_ref, FP32_TOL, "step state")
    # 4-D form and in-place update
    st_copy = state.clone()
    o4, s4 = _step(q[:, None], k[:, None], v[:, None], st_copy, decay, inplace=True)
    assert s4 is st_copy and o4.shape == (B, 1, H, V)
    assert_close(o4[:, 0], o, 0.0, "4-D step output")
    assert_close(s4, s, 0.0, "in-place state")


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("squeeze", [False, True])
def test_decode_step_under_autograd_has_gradients(inplace, squeeze):
    """lightning_attention_step with q/k/v/state that require grad: the output carries the gradients the
    reference backend gives (the Triton step kernel has no backward; its output used to come back detached,
    so a LightningMixer decoding one token under autograd silently gave its q/k/v projections no gradient)."""
    H, Hkv, K, V, B = 4, 2, 12, 8, 2
    q0 = seeded_randn(1, B, H, K, device=DEV)
    k0, v0 = seeded_randn(2, B, Hkv, K, device=DEV), seeded_randn(3, B, Hkv, V, device=DEV)
    s0 = seeded_randn(4, B, H, K, V, device=DEV)
    decay = ref.sala_decay_slopes(H).to(DEV)
    do = seeded_randn(5, B, H, V, device=DEV)
    res = {}
    for backend in ("reference", "triton"):
        leaves = [x.clone().requires_grad_() for x in (q0, k0, v0, s0)]
        q, k, v, s = leaves
        state = s * 1.0  # a non-leaf state (the in-place update writes into it)
        if squeeze:
            q, k, v = q[:, None], k[:, None], v[:, None]
        with sala_ops.use_backend(backend):
            o, new_state = sala_ops.lightning_attention_step(q, k, v, state, decay, inplace=inplace)
        assert o.shape == ((B, 1, H, V) if squeeze else (B, H, V)) and o.requires_grad and new_state.requires_grad
        assert (new_state is state) == inplace
        loss = (o.reshape(B, H, V) * do).sum() + (new_state * new_state).sum()
        res[backend] = (o.detach(), new_state.detach(), torch.autograd.grad(loss, leaves))
    (o_r, s_r, g_r), (o_t, s_t, g_t) = res["reference"], res["triton"]
    assert_close(o_t, o_r, FP32_TOL, "step output")
    assert_close(s_t, s_r, FP32_TOL, "step state")
    for name, a, b in zip(("dq", "dk", "dv", "dstate"), g_t, g_r):
        assert_close(a, b, FP32_TOL, name)


def test_decode_step_under_autograd_compiled():
    """The same under torch.compile(fullgraph=True): the step's custom ops have no backward, so with inputs that
    require grad the compiled step also takes the differentiable chunk op (gradients equal the eager reference's)."""
    H, K, V, B = 2, 8, 8, 2
    q0, k0 = seeded_randn(1, B, 1, H, K, device=DEV), seeded_randn(2, B, 1, H, K, device=DEV)
    v0, s0 = seeded_randn(3, B, 1, H, V, device=DEV), seeded_randn(4, B, H, K, V, device=DEV)
    decay = ref.sala_decay_slopes(H).to(DEV)

    def step(q, k, v, s):
        with sala_ops.use_backend("triton"):
            o, new_state = sala_ops.lightning_attention_step(q, k, v, s * 1.0, decay)
        return o.square().sum() + new_state.sum()

    res = []
    for fn in (torch.compile(step, fullgraph=True, backend="aot_eager" if DEV == "cpu" else "inductor"), None):
        leaves = [x.clone().requires_grad_() for x in (q0, k0, v0, s0)]
        if fn is None:  # the eager reference
            with sala_ops.use_backend("reference"):
                o, new_state = sala_ops.lightning_attention_step(*leaves[:3], leaves[3] * 1.0, decay)
            loss = o.square().sum() + new_state.sum()
        else:
            loss = fn(*leaves)
        res.append((loss.detach(), torch.autograd.grad(loss, leaves)))
    assert_close(res[0][0], res[1][0], FP32_TOL, "loss")
    for name, a, b in zip(("dq", "dk", "dv", "dstate"), res[0][1], res[1][1]):
        assert_close(a, b, FP32_TOL, name)


def test_outputs_fully_written_nan_poisoned(monkeypatch):
    """Every buffer the kernels allocate (outputs, chunk states, gradients) starts as NaN: an element
    a kernel never writes makes the comparison fail. Varlen with empty chunk slots, GQA, odd dims."""
    LC.CHUNK_OVERRIDE = CHUNKINGS[1]
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def nan_empty(*a, **kw):
        x = real_empty(*a, **kw)
        return x.fill_(float("nan")) if x.is_floating_point() else x

    def nan_empty_like(*a, **kw):
        return nan_like(real_empty_like(*a, **kw)) if a[0].is_floating_point() else real_empty_like(*a, **kw)

    monkeypatch.setattr(torch, "empty", nan_empty)
    monkeypatch.setattr(torch, "empty_like", nan_empty_like)
    lens = [5, 40, 1, 33]
    cu = torch.tensor([0, 5, 45, 46, 79], device=DEV)
    q, k, v, decay, S0 = _inputs(1, sum(lens), 4, 2, 12, 20, True, False, 7, N=len(lens))
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    s0 = S0.clone().requires_grad_()
    out = _lightning(*leaves, decay, initial_state=s0, output_final_state=True, cu_seqlens=cu)
    do = seeded_randn(11, *out.output.shape, device=DEV)
    dfin = seeded_randn(12, *out.final_state.shape, device=DEV)
    grads = torch.autograd.grad([out.output, out.final_state], leaves + [s0], [do, dfin])
    o_ref, f_ref, g_ref = _ref_all(q, k, v, decay, None, S0, True, cu, do, dfin)
    assert_close(out.output, o_ref, FP32_TOL, "output")
    assert_close(out.final_state, f_ref, FP32_TOL, "final_state")
    for name, g, r in zip(("dq", "dk", "dv", "d_initial_state"), grads, g_ref):
        assert_close(g, r, FP32_TOL, name)
    st0 = seeded_randn(3, 2, 4, 12, 20, device=DEV)
    o, s = _step(q[0, :2], k[0, :2], v[0, :2], st0, decay)
    o_ref, s_ref = ref.lightning_step(q[0, :2].double(), k[0, :2].double(), v[0, :2].double(), st0.double(), decay)
    assert_close(o, o_ref, FP32_TOL, "step output")
    assert_close(s, s_ref, FP32_TOL, "step state")


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("has_init", [False, True])
def test_empty_batch_with_final_state(backend, has_init):
    """B = 0 with output_final_state: an empty output and an empty fp32 final state [0, H, K, V] on both
    backends (the reference's torch.stack of no states raised a bare RuntimeError)."""
    q, k, v = (torch.randn(0, 6, 2, d, device=DEV) for d in (16, 16, 8))
    S0 = torch.randn(0, 2, 16, 8, device=DEV) if has_init else None
    with sala_ops.use_backend(backend):
        out = sala_ops.lightning_attention(q, k, v, ref.sala_decay_slopes(2).to(DEV), initial_state=S0,
                                           output_final_state=True)
    assert out.output.shape == (0, 6, 2, 8)
    assert out.final_state.shape == (0, 2, 16, 8) and out.final_state.dtype == torch.float32
    _, fin = ref.lightning_recurrent(q, k, v, ref.sala_decay_slopes(2).to(DEV), None, S0, True)
    assert fin.shape == (0, 2, 16, 8)


def test_decay_gets_no_gradient():
    """decay is a fixed schedule: no gradient. One that requires grad is refused (it used to get None silently
    here and a gradient on the reference backend; test_bad_input checks both backends), a plain one runs."""
    q, k, v, decay, _ = _inputs(1, 8, 2, 2, 16, 16, False, False, 0)
    qq = q.clone().requires_grad_()
    with pytest.raises(ValueError, match="decay requires grad"):
        _lightning(qq, k, v, decay.clone().requires_grad_())
    out = _lightning(qq, k, v, decay)
    dq, = torch.autograd.grad(out.output.sum(), [qq])
    assert dq is not None and not decay.requires_grad


def test_torch_compile_fullgraph():
    LC.CHUNK_OVERRIDE = CHUNKINGS[0]
    q, k, v, decay, S0 = _inputs(1, 20, 2, 1, 16, 16, True, False, 3)

    def f(q, k, v, S0):
        with sala_ops.use_backend("triton"):
            return sala_ops.lightning_attention(q, k, v, decay, initial_state=S0, output_final_state=True)

    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    cf = torch.compile(f, fullgraph=True, backend="aot_eager" if DEV == "cpu" else "inductor")
    o, fin = cf(*leaves, S0)
    o_ref, f_ref = ref.lightning_parallel(q.double(), k.double(), v.double(), decay, None, S0.double(), True)
    assert_close(o, o_ref, FP32_TOL, "compiled output")
    assert_close(fin, f_ref, FP32_TOL, "compiled final state")
    g = torch.autograd.grad(o.sum(), leaves)
    g_ref = torch.autograd.grad(f(*leaves, S0).output.sum(), leaves)
    for name, a, b in zip(("dq", "dk", "dv"), g, g_ref):
        assert_close(a, b, FP32_TOL, f"compiled {name}")


def test_torch_compile_fullgraph_varlen():
    """torch.compile(fullgraph=True) of a packed (cu_seqlens) call: the offsets' host checks (values read with
    .tolist(), compared in Python) could not be traced ('Could not guard on data-dependent expression'); under
    compile they become runtime assertions of the graph, and a bad offset still fails instead of running."""
    LC.CHUNK_OVERRIDE = CHUNKINGS[0]
    q, k, v, decay, S0 = _inputs(1, 30, 2, 1, 16, 16, True, False, 5, N=3)
    cu = torch.tensor([0, 1, 12, 30], dtype=torch.int32, device=DEV)

    def f(q, k, v, S0, cu):
        with sala_ops.use_backend("triton"):
            return sala_ops.lightning_attention(q, k, v, decay, initial_state=S0, output_final_state=True,
                                                cu_seqlens=cu)

    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    cf = torch.compile(f, fullgraph=True, backend="aot_eager" if DEV == "cpu" else "inductor")
    o, fin = cf(*leaves, S0, cu)
    o_ref, f_ref = ref.lightning_parallel(q.double(), k.double(), v.double(), decay, None, S0.double(), True, cu)
    assert_close(o, o_ref, FP32_TOL, "compiled output")
    assert_close(fin, f_ref, FP32_TOL, "compiled final state")
    g = torch.autograd.grad(o.sum(), leaves)
    g_ref = torch.autograd.grad(f(*leaves, S0, cu).output.sum(), leaves)
    for name, a, b in zip(("dq", "dk", "dv"), g, g_ref):
        assert_close(a, b, FP32_TOL, f"compiled {name}")
    for bad in ([0, 12, 1, 30], [0, 1, 12, 29], [1, 2, 12, 30]):
        with pytest.raises(RuntimeError):  # a runtime assertion of the compiled graph
            cf(*leaves, S0, torch.tensor(bad, dtype=torch.int32, device=DEV))


# ----------------------------------------------------------------------------------------------------------------
# GPU, bf16, real sizes

def _bf16_tol(q, k, v, decay, scale, S0, o_ref):
    o_lp = _torch_lowp(q, k, v, decay, scale, S0, torch.bfloat16)
    return max(2 * rel_err(o_lp, o_ref), 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("T,Hkv", [(2048, 32), (3000, 8)])
def test_gpu_bf16_fwd_bwd_real_heads(T, Hkv):
    LC.CHUNK_OVERRIDE = None
    H, D = 32, 128
    q, k, v, decay, S0 = _inputs(1, T, H, Hkv, D, D, True, False, 1, dtype=torch.bfloat16)
    scale = D ** -0.5
    do = seeded_randn(9, 1, T, H, D, device=DEV, dtype=torch.bfloat16)
    o_ref, _, g_ref = _ref_all(q, k, v, decay, scale, S0, False, None, do, None, dtype=torch.float32)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    s0 = S0.clone().requires_grad_()
    out = _lightning(*leaves, decay, initial_state=s0)
    assert_close(out.output, o_ref, _bf16_tol(q, k, v, decay, scale, S0, o_ref), "bf16 output")
    grads = torch.autograd.grad(out.output, leaves + [s0], do)
    lp = [x.clone().float().requires_grad_() for x in (q, k, v)]
    s0lp = S0.clone().requires_grad_()
    o_lp = _torch_lowp(*[x.bfloat16() for x in lp], decay, scale, s0lp, torch.bfloat16)
    g_lp = torch.autograd.grad(o_lp, lp + [s0lp], do)
    for name, g, r, lo in zip(("dq", "dk", "dv", "d_initial_state"), grads, g_ref, g_lp):
        assert_close(g, r, max(2 * rel_err(lo, r), 1e-5), f"bf16 {name}")


@pytest.mark.gpu
@pytest.mark.parametrize("T", [131072, 1048576])
def test_gpu_bf16_long_sequence_checked_segment(T):
    """B=1, H=32, D=128 bf16 at up to 1M tokens: the output is finite everywhere, and its last CHECK
    tokens equal the fp32 reference run from the state the kernel itself produced at T - CHECK."""
    LC.CHUNK_OVERRIDE = None
    H, D, CHECK = 32, 128, 4096
    q, k, v, decay, _ = _inputs(1, T, H, H, D, D, False, False, 5, dtype=torch.bfloat16)
    out = _lightning(q, k, v, decay, output_final_state=True)
    assert torch.isfinite(out.output).all()
    assert torch.isfinite(out.final_state).all()
    head = _lightning(q[:, :T - CHECK], k[:, :T - CHECK], v[:, :T - CHECK], decay, output_final_state=True)
    S = head.final_state
    tail = [x[:, T - CHECK:] for x in (q, k, v)]
    o_ref, f_ref = ref.lightning_parallel(*[x.float() for x in tail], decay, None, S, True)
    tol = _bf16_tol(*tail, decay, D ** -0.5, S, o_ref)
    assert_close(out.output[:, T - CHECK:], o_ref, tol, f"bf16 output, last {CHECK} of {T} tokens")
    # final state: 2x the error of the same sum computed by PyTorch with bf16 matmuls
    pos = torch.arange(CHECK, device=DEV, dtype=torch.float32)
    w = torch.exp(-decay[None, :] * (CHECK - 1 - pos[:, None]))  # [CHECK, H]
    kw = (tail[1][0].float() * w[:, :, None]).bfloat16()
    f_lp = torch.exp(-decay * CHECK)[:, None, None] * S + torch.einsum("shk,shv->hkv", kw, tail[2][0]).float()
    assert_close(out.final_state, f_ref, max(2 * rel_err(f_lp[None], f_ref), 1e-5), "final state after the checked segment")
    assert_close(head.output, out.output[:, :T - CHECK], 1e-6, "prefix call equals the prefix of the full call")


@pytest.mark.gpu
def test_gpu_decode_step_cuda_graph():
    H, D = 32, 128
    q, k, v = (seeded_randn(i, 1, H, D, dtype=torch.bfloat16, device=DEV) for i in range(3))
    state = seeded_randn(4, 1, H, D, D, device=DEV)
    decay = ref.sala_decay_slopes(H).to(DEV)
    o_ref, s_ref = ref.lightning_step(q, k, v, state, decay)
    st_ = state.clone()
    _step(q, k, v, st_.clone(), decay, inplace=True)  # compile outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        o, _ = _step(q, k, v, st_, decay, inplace=True)
    g.replay()
    torch.cuda.synchronize()
    o64, _ = ref.lightning_step(q.double(), k.double(), v.double(), state.double(), decay)
    assert_close(o, o64, 2 * rel_err(o64.to(torch.bfloat16), o64) + 1e-5, "graph step output")
    assert_close(st_, s_ref, 1e-5, "graph step state")


# ----------------------------------------------------------------------------------------------------------------
# experimental forward variants (lightning_fwd_variants.py, SALA_LIGHTNING_FWD): same results as the reference,
# including the chunk states they hand to the (unchanged) backward

# (B, T, H, Hkv, K, V, chunking, fused sub-chunk length, has_init, varlen lens or None, strong decay)
_VARIANT_CASES = [
    (1, 70, 2, 1, 16, 24, (32, 16), 16, True, None, False),     # GQA, sub-chunks inside chunks, tail blocks
    (2, 45, 2, 2, 12, 20, (48, 16), 16, False, None, True),     # batch, L not a multiple of LF, strong decay
    (1, 1, 4, 2, 8, 8, (16, 16), 16, True, None, False),        # T = 1
    (1, 79, 4, 2, 12, 20, (32, 16), 16, True, [5, 40, 1, 33], False),  # varlen (empty chunk slots), GQA
    (1, 66, 2, 1, 32, 16, (64, 32), 32, True, None, False),     # BT = 32, one sub-chunk per chunk at the end
]


@pytest.mark.parametrize("name", ["walk2", "fused"])
@pytest.mark.parametrize("case", range(len(_VARIANT_CASES)))
def test_fwd_variants_match_reference(name, case, monkeypatch):
    from sala_ops.triton import lightning_fwd_variants as FV
    B, T, H, Hkv, K, V, chunk, lf, has_init, lens, strong = _VARIANT_CASES[case]
    monkeypatch.setenv("SALA_LIGHTNING_FWD", name)
    monkeypatch.setattr(FV, "FUSED_L", lf)
    LC.CHUNK_OVERRIDE = chunk
    cu = None
    if lens is not None:
        cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), device=DEV)
    N = B if cu is None else len(lens)
    q, k, v, decay, S0 = _inputs(B, T, H, Hkv, K, V, has_init, strong, 100 + case, N=N)
    # every buffer the forward allocates starts as NaN: an output element a variant never writes fails
    real_empty = torch.empty

    def nan_empty(*a, **kw):
        x = real_empty(*a, **kw)
        return x.fill_(float("nan")) if x.is_floating_point() else x

    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    s0 = None if S0 is None else S0.clone().requires_grad_()
    with monkeypatch.context() as m:
        m.setattr(torch, "empty", nan_empty)
        out = _lightning(*leaves, decay, initial_state=s0, output_final_state=True, cu_seqlens=cu)
    do = seeded_randn(7, B, T, H, V, device=DEV)
    dfin = seeded_randn(8, N, H, K, V, device=DEV)
    o_ref, f_ref, g_ref = _ref_all(q, k, v, decay, None, S0, True, cu, do, dfin)
    assert_close(out.output, o_ref, FP32_TOL, f"{name} output")
    assert_close(out.final_state, f_ref, FP32_TOL, f"{name} final_state")
    ins = leaves + ([s0] if s0 is not None else [])
    grads = torch.autograd.grad([out.output, out.final_state], ins, [do, dfin])
    for gname, g, r in zip(("dq", "dk", "dv", "d_initial_state"), grads, g_ref):
        assert_close(g, r, FP32_TOL, f"{name} {gname} (backward from the variant's chunk states)")


def test_fwd_variant_name_checked(monkeypatch):
    monkeypatch.setenv("SALA_LIGHTNING_FWD", "nope")
    q, k, v, decay, _ = _inputs(1, 4, 2, 2, 8, 8, False, False, 0)
    with pytest.raises(ValueError, match="SALA_LIGHTNING_FWD"):
        _lightning(q, k, v, decay)
