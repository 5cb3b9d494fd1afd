"""hype_embed on the Triton backend (sala_ops/triton/rope_qknorm.py) against reference/rope.py.

On CPU the kernels run through the Triton interpreter (tiny shapes, fp32 and fp16); on a GPU the
`gpu` tests run bf16 at 128K tokens x 32 heads x 128. Ground truth: the reference in fp64 inputs
(fp32 math inside), gradients by autograd through the reference. Tolerances: 1e-5 in fp32, and in
fp16/bf16 twice the error the reference itself makes when run in that dtype (DESIGN.md).
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import sala_ops
from sala_ops.hype import varlen_positions
from sala_ops.reference import rope as ref
from sala_ops.triton import rope_qknorm as K

from conftest import KERNEL_DEVICE
from helpers import assert_close, gqa_heads, nan_like, rel_err, seeded_randn, varlen_splits

DEV = KERNEL_DEVICE
FP32_TOL = 1e-5
# the kernels run fast enough under the interpreter for more examples than the default profile's
MORE = settings(max_examples=max(30, settings.default.max_examples))


# ----------------------------------------------------------------------------------------------------------------
# helpers

def _ref_outputs_and_grads(q, k, pos, layer_type, r, wq, wk, gq, gk, dtype, wdtype, eps=1e-6):
    """Reference outputs and grads (dq, dk, dwq, dwk) with inputs cast to `dtype` (weights to
    `wdtype`; fp64 means the exact run)."""
    qq = q.detach().to(dtype).requires_grad_()
    kk = k.detach().to(dtype).requires_grad_()
    wq_ = None if wq is None else wq.detach().to(wdtype).requires_grad_()
    wk_ = None if wk is None else wk.detach().to(wdtype).requires_grad_()
    yq, yk = ref.hype_embed(qq, kk, pos, layer_type, 10000.0, r, wq_, wk_, eps)
    leaves = [x for x in (qq, kk, wq_, wk_) if x is not None]
    grads = torch.autograd.grad((yq * gq.to(dtype)).sum() + (yk * gk.to(dtype)).sum(), leaves)
    it = iter(grads)
    dq, dk = next(it), next(it)
    dwq = next(it) if wq is not None else None
    dwk = next(it) if wk is not None else None
    return (yq.detach(), yk.detach()), (dq, dk, dwq, dwk)


def _tols(exact, low, dtype):
    """Per-tensor tolerance: 1e-5 in fp32, else 2x the reference's own low-precision error."""
    if dtype == torch.float32:
        return [FP32_TOL for _ in exact]
    return [None if e is None else max(2 * rel_err(lo, e), 1e-5) for e, lo in zip(exact, low)]


def _positions(draw, B, T):
    kind = draw(st.sampled_from(["none", "offset", "random", "per_batch"]))
    dtype = draw(st.sampled_from([torch.int32, torch.int64]))
    if kind == "none":
        return None
    if kind == "offset":  # [T], not starting at 0
        start = draw(st.integers(0, 2_000_000))
        return (torch.arange(T) + start).to(dtype)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    if kind == "random":  # [T], any integers (repeats, negatives, unsorted)
        return torch.randint(-5000, 500_000, (T,), generator=g).to(dtype)
    return torch.randint(0, 1_000_000, (B, T), generator=g).to(dtype)  # [B, T]


@st.composite
def problems(draw, dtypes=(torch.float32, torch.float16)):
    dtype = draw(st.sampled_from(dtypes))
    B = draw(st.integers(1, 2))
    T = draw(st.sampled_from([1, 2, 3, 5, 8, 17]))
    H, HK = draw(gqa_heads(max_kv=3, max_group=3))
    D = draw(st.sampled_from([2, 4, 6, 8, 10, 16, 24, 32]))
    r = draw(st.sampled_from([D] + [x for x in range(2, D, 2)]))
    layer_type = draw(st.sampled_from(["lightning", "lightning", "sparse"]))
    weights = draw(st.sampled_from(["both", "none", "q", "k"]))
    wdtype = draw(st.sampled_from([torch.float32, dtype]))
    strided = draw(st.booleans())  # q, k as views of one fused qkv buffer
    pos = _positions(draw, B, T)
    seed = draw(st.integers(0, 2**16))
    return dict(dtype=dtype, B=B, T=T, H=H, HK=HK, D=D, r=r, layer_type=layer_type, weights=weights,
                wdtype=wdtype, strided=strided, pos=pos, seed=seed)


def _make(p):
    B, T, H, HK, D, seed = p["B"], p["T"], p["H"], p["HK"], p["D"], p["seed"]
    scale = 3.0
    if p["strided"]:
        qkv = seeded_randn(seed, B, T, H + 2 * HK, D, scale=scale)
        q, k = qkv[:, :, :H], qkv[:, :, H:H + HK]
    else:
        q = seeded_randn(seed, B, T, H, D, scale=scale)
        k = seeded_randn(seed + 1, B, T, HK, D, scale=scale)
    wq = seeded_randn(seed + 2, D) * 0.5 + 1.0 if p["weights"] in ("both", "q") else None
    wk = seeded_randn(seed + 3, D) * 0.5 + 1.0 if p["weights"] in ("both", "k") else None
    gq = seeded_randn(seed + 4, B, T, H, D)
    gk = seeded_randn(seed + 5, B, T, HK, D)
    return q, k, wq, wk, gq, gk


def _ref_pos(pos, B, T):
    if pos is None:
        return torch.arange(T)[None].expand(B, -1)
    return pos[None].expand(B, -1) if pos.dim() == 1 else pos


def _run_triton(q, k, pos, p, wq, wk, cu_seqlens=None):
    with sala_ops.use_backend("triton"):
        return sala_ops.hype_embed(q, k, pos, p["layer_type"], rotary_dim=p["r"], q_norm_weight=wq,
                                   k_norm_weight=wk, cu_seqlens=cu_seqlens)


# ----------------------------------------------------------------------------------------------------------------
# forward + backward against the reference

@MORE
@given(problems())
def test_forward_backward_matches_reference(p):
    dtype, wdtype = p["dtype"], p["wdtype"]
    q32, k32, wq32, wk32, gq32, gk32 = _make(p)
    # the low-precision inputs everyone starts from (so the exact run sees the same rounded values)
    q, k = q32.to(dtype), k32.to(dtype)
    wq = None if wq32 is None else wq32.to(wdtype)
    wk = None if wk32 is None else wk32.to(wdtype)
    gq, gk = gq32.to(dtype), gk32.to(dtype)
    rpos = _ref_pos(p["pos"], p["B"], p["T"])
    args = (q, k, rpos, p["layer_type"], p["r"], wq, wk, gq, gk)

    (eyq, eyk), eg = _ref_outputs_and_grads(*args, dtype=torch.float64, wdtype=torch.float64)
    (lyq, lyk), lg = _ref_outputs_and_grads(*args, dtype=dtype, wdtype=wdtype)

    qd = q.to(DEV).requires_grad_()
    kd = k.to(DEV).requires_grad_()
    wqd = None if wq is None else wq.to(DEV).requires_grad_()
    wkd = None if wk is None else wk.to(DEV).requires_grad_()
    if p["strided"]:  # same values, as non-contiguous views of one fused buffer
        H, HK = p["H"], p["HK"]
        buf = torch.cat([q, k, k], dim=2).to(DEV).requires_grad_()
        qd, kd = buf[:, :, :H], buf[:, :, H:H + HK]
    pos = None if p["pos"] is None else p["pos"].to(DEV)
    yq, yk = _run_triton(qd, kd, pos, p, wqd, wkd)
    assert yq.dtype == dtype and yk.dtype == dtype
    tq, tk = _tols([eyq, eyk], [lyq, lyk], dtype)
    assert_close(yq.cpu(), eyq, tq, "q out")
    assert_close(yk.cpu(), eyk, tk, "k out")

    gd = (gq.to(DEV), gk.to(DEV))
    if p["strided"]:
        leaves = [buf] + [w for w in (wqd, wkd) if w is not None]
    else:
        leaves = [qd, kd] + [w for w in (wqd, wkd) if w is not None]
    grads = torch.autograd.grad((yq * gd[0]).sum() + (yk * gd[1]).sum(), leaves)
    it = iter(grads)
    if p["strided"]:
        gb = next(it)
        dq, dk = gb[:, :, :p["H"]], gb[:, :, p["H"]:p["H"] + p["HK"]]
        assert torch.all(gb[:, :, p["H"] + p["HK"]:] == 0)
    else:
        dq, dk = next(it), next(it)
    dwq = next(it) if wq is not None else None
    dwk = next(it) if wk is not None else None
    tols = _tols(eg, lg, dtype)
    for name, got, exact, tol in zip(("dq", "dk", "dwq", "dwk"), (dq, dk, dwq, dwk), eg, tols):
        if exact is None:
            assert got is None
            continue
        assert got.dtype == (dtype if name in ("dq", "dk") else wdtype)
        assert_close(got.cpu(), exact, tol, name)


# ----------------------------------------------------------------------------------------------------------------
# the kernels themselves, with NaN-poisoned outputs (an element left unwritten fails)

@MORE
@given(problems(), st.booleans())
def test_kernels_write_every_element(p, rope):
    q32, k32, wq32, wk32, gq32, gk32 = _make(p)
    dtype = p["dtype"]
    q, k, gq, gk = (x.to(dtype).to(DEV) for x in (q32, k32, gq32, gk32))
    wq = None if wq32 is None else wq32.to(DEV)
    wk = None if wk32 is None else wk32.to(DEV)
    B, T = p["B"], p["T"]
    pos = _ref_pos(p["pos"], B, T).to(DEV)
    yq, yk = K.hype_fwd(q, k, pos, wq, wk, rotary_dim=p["r"], rope=rope, q_out=nan_like(q), k_out=nan_like(k))
    lt = "lightning" if rope else "sparse"
    # the references run on the CPU: the CPU weights (wq32 / wk32, not the DEV copies: a device mismatch on a GPU)
    (eyq, eyk), eg = _ref_outputs_and_grads(q.cpu(), k.cpu(), pos.cpu(), lt, p["r"], wq32, wk32, gq.cpu(), gk.cpu(),
                                            dtype=torch.float64, wdtype=torch.float64)
    (lyq, lyk), lg = _ref_outputs_and_grads(q.cpu(), k.cpu(), pos.cpu(), lt, p["r"], wq32, wk32, gq.cpu(), gk.cpu(),
                                            dtype=dtype, wdtype=torch.float32)
    tols = _tols([eyq, eyk, *eg], [lyq, lyk, *lg], dtype)
    assert_close(yq.cpu(), eyq, tols[0], "q out")
    assert_close(yk.cpu(), eyk, tols[1], "k out")
    dq, dk, dwq, dwk = K.hype_bwd(q, k, gq, gk, pos, wq, wk, rotary_dim=p["r"], rope=rope,
                                  dq_out=nan_like(q), dk_out=nan_like(k))
    for name, got, exact, tol in zip(("dq", "dk", "dwq", "dwk"), (dq, dk, dwq, dwk), eg, tols[2:]):
        if exact is None:
            assert got is None
        else:
            assert_close(got.cpu(), exact, tol, name)


# ----------------------------------------------------------------------------------------------------------------
# varlen: positions restart per sequence; packed == separate calls

@MORE
@given(varlen_splits(total_max=24, max_seqs=4), gqa_heads(max_kv=2, max_group=2),
       st.sampled_from([(8, 8), (8, 4), (6, 2), (16, 10)]), st.booleans(), st.integers(0, 2**16))
def test_varlen_matches_reference_and_separate_calls(split, heads, dims, norm, seed):
    lens, cu = split
    H, HK = heads
    D, r = dims
    total = sum(lens)
    q = seeded_randn(seed, 1, total, H, D)
    k = seeded_randn(seed + 1, 1, total, HK, D)
    wq = seeded_randn(seed + 2, D) + 1.0 if norm else None
    wk = seeded_randn(seed + 3, D) + 1.0 if norm else None
    dev = lambda x: None if x is None else x.to(DEV)  # noqa: E731
    assert torch.equal(varlen_positions(cu, total), ref.positions_from_cu_seqlens(cu, total))
    with sala_ops.use_backend("triton"):
        yq, yk = sala_ops.hype_embed(dev(q), dev(k), rotary_dim=r, q_norm_weight=dev(wq), k_norm_weight=dev(wk),
                                     cu_seqlens=dev(cu))
        pos = ref.positions_from_cu_seqlens(cu, total)[None]
        eq, ek = ref.hype_embed(q.double(), k.double(), pos, "lightning", 10000.0, r, wq, wk)
        assert_close(yq.cpu(), eq, FP32_TOL, "q out")
        assert_close(yk.cpu(), ek, FP32_TOL, "k out")
        bounds = cu.tolist()
        for a, b in zip(bounds, bounds[1:]):
            # the packed call passes the kernel positions (varlen_positions): so do the separate calls, so that both
            # run the same compiled variant and autotune pick (on a GPU, positions=None is another variant whose
            # pick may reduce the norm's sum in another order: 1-ulp differences, seen on an H200), hence bitwise
            pos_s = dev(torch.arange(b - a))
            sq, sk = sala_ops.hype_embed(dev(q[:, a:b]), dev(k[:, a:b]), positions=pos_s, rotary_dim=r,
                                         q_norm_weight=dev(wq), k_norm_weight=dev(wk))
            torch.testing.assert_close(yq[:, a:b], sq, rtol=0, atol=0)
            torch.testing.assert_close(yk[:, a:b], sk, rtol=0, atol=0)
            # and without positions (the in-kernel default 0 .. T-1) the same values within fp32 rounding
            nq, nk = sala_ops.hype_embed(dev(q[:, a:b]), dev(k[:, a:b]), rotary_dim=r, q_norm_weight=dev(wq),
                                         k_norm_weight=dev(wk))
            assert_close(nq.cpu(), eq[:, a:b], FP32_TOL, "q out, separate call")
            assert_close(nk.cpu(), ek[:, a:b], FP32_TOL, "k out, separate call")


# ----------------------------------------------------------------------------------------------------------------
# properties of RoPE itself (reference and kernel): norms preserved, q.k depends on position difference only

def _rope(backend, x, y, pos_x, pos_y, r):
    if backend == "reference":
        return ref.apply_rope(x, pos_x, 10000.0, r), ref.apply_rope(y, pos_y, 10000.0, r)
    with sala_ops.use_backend("triton"):
        ax, _ = sala_ops.hype_embed(x.to(DEV), x.to(DEV), pos_x.to(DEV), rotary_dim=r)
        _, ay = sala_ops.hype_embed(y.to(DEV), y.to(DEV), pos_y.to(DEV), rotary_dim=r)
    return ax.cpu(), ay.cpu()


@pytest.mark.parametrize("backend", ["reference", "triton"])
@given(st.sampled_from([(8, 8), (16, 16), (16, 6), (32, 32)]), st.integers(0, 1_000_000),
       st.integers(-100_000, 100_000), st.integers(0, 2**16))
def test_rope_preserves_norms_and_is_relative(backend, dims, p0, shift, seed):
    D, r = dims
    T = 6
    q = seeded_randn(seed, 1, T, 2, D)
    k = seeded_randn(seed + 1, 1, T, 2, D)
    pq = torch.arange(T) * 37 + p0
    pk = torch.arange(T) * 11 + p0 // 3
    rq, rk = _rope(backend, q, k, pq, pk, r)
    # norm per (token, head) unchanged
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1), rtol=1e-5, atol=1e-5)
    # q_i . k_j depends only on pos_i - pos_j: shift every position by the same amount
    sq, sk = _rope(backend, q, k, pq + abs(shift), pk + abs(shift), r)
    s1 = torch.einsum("bihd,bjhd->bhij", rq, rk)
    s2 = torch.einsum("bihd,bjhd->bhij", sq, sk)
    torch.testing.assert_close(s1, s2, rtol=1e-4, atol=1e-4 * math.sqrt(D))


# ----------------------------------------------------------------------------------------------------------------
# the public function's contract on the triton path

def test_sparse_layers_are_nope():
    q = seeded_randn(0, 1, 5, 2, 8)
    k = seeded_randn(1, 1, 5, 1, 8)
    w = seeded_randn(2, 8) + 1
    with sala_ops.use_backend("triton"):
        yq, yk = sala_ops.hype_embed(q.to(DEV), k.to(DEV), layer_type="sparse")
        assert yq is not None and torch.equal(yq.cpu(), q) and torch.equal(yk.cpu(), k)
        # a norm on q only: k passes through untouched, with its gradient
        qd, kd = q.to(DEV).requires_grad_(), k.to(DEV).requires_grad_()
        yq, yk = sala_ops.hype_embed(qd, kd, torch.arange(5, device=DEV) + 100, layer_type="sparse",
                                     q_norm_weight=w.to(DEV))
    assert_close(yq.detach().cpu(), ref.rms_norm(q.double(), w.double()), FP32_TOL, "q")
    assert torch.equal(yk.detach().cpu(), k)
    (yq.sum() + (2 * yk).sum()).backward()
    assert torch.equal(kd.grad.cpu(), torch.full_like(k, 2.0))
    assert qd.grad is not None and torch.isfinite(qd.grad).all()


def test_triton_path_keeps_the_checks():
    q = torch.randn(1, 4, 2, 8, device=DEV)
    k = torch.randn(1, 4, 1, 8, device=DEV)
    with sala_ops.use_backend("triton"):
        with pytest.raises(ValueError, match="rotary_dim"):
            sala_ops.hype_embed(q, k, rotary_dim=5)
        with pytest.raises(ValueError, match="positions"):
            sala_ops.hype_embed(q, k, torch.arange(3, device=DEV))
        with pytest.raises(TypeError, match="positions"):
            sala_ops.hype_embed(q, k, torch.arange(4, device=DEV).float())
        with pytest.raises(ValueError, match="k must be"):
            sala_ops.hype_embed(q, k[:, :3])
        with pytest.raises(ValueError, match="layer_type"):
            sala_ops.hype_embed(q, k, layer_type="dense")
        with pytest.raises(ValueError, match="q_norm_weight"):
            sala_ops.hype_embed(q, k, q_norm_weight=torch.ones(7, device=DEV))
        with pytest.raises(ValueError, match="cu_seqlens"):
            sala_ops.hype_embed(q, k, cu_seqlens=torch.tensor([0, 2, 2, 4], device=DEV))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_bad_eps_and_layer_type_name_the_op(backend):
    """eps must be a finite number >= 0: a negative eps made the RMSNorm's mean(x^2) + eps negative for small
    rows and returned NaN silently (a NaN eps: NaN everywhere); a string or None failed with Python's bare
    TypeError / float() ValueError. An unhashable layer_type (a list) failed with 'unhashable type'."""
    q = torch.zeros(1, 4, 2, 8, device=DEV)
    k = torch.zeros(1, 4, 1, 8, device=DEV)
    w = torch.ones(8, device=DEV)
    with sala_ops.use_backend(backend):
        for eps in (-1.0, float("nan"), float("inf")):
            with pytest.raises(ValueError, match="hype_embed.*eps"):
                sala_ops.hype_embed(q, k, q_norm_weight=w, k_norm_weight=w, eps=eps)
        for eps in ("x", None, True):
            with pytest.raises(TypeError, match="hype_embed.*eps"):
                sala_ops.hype_embed(q, k, q_norm_weight=w, eps=eps)
        with pytest.raises(ValueError, match="hype_embed.*layer_type"):
            sala_ops.hype_embed(q, k, layer_type=["sparse"])
        # eps = 0 and integer eps are numbers like any other
        for eps in (0.0, 1):
            yq, yk = sala_ops.hype_embed(q + 1, k + 1, q_norm_weight=w, k_norm_weight=w, eps=eps)
            assert torch.isfinite(yq).all() and torch.isfinite(yk).all()


def test_torch_compile_fullgraph():
    q = torch.randn(1, 6, 2, 8, device=DEV, requires_grad=True)
    k = torch.randn(1, 6, 1, 8, device=DEV, requires_grad=True)
    w = torch.rand(8, device=DEV, requires_grad=True)
    pos = torch.arange(6, device=DEV) + 3

    def f(q, k, pos, w):
        with sala_ops.use_backend("triton"):
            return sala_ops.hype_embed(q, k, pos, q_norm_weight=w, k_norm_weight=w)

    eager = f(q, k, pos, w)  # (also emits the one-time backend log line, which dynamo cannot trace)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, pos, w)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    ge = torch.autograd.grad(sum(x.sum() for x in eager), (q, k, w))
    gc = torch.autograd.grad(sum(x.sum() for x in compiled), (q, k, w))
    for a, b in zip(ge, gc):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_torch_compile_fullgraph_varlen():
    """torch.compile(fullgraph=True) with cu_seqlens (positions restarting per packed sequence): the offsets' host
    checks could not be traced ('Could not guard on data-dependent expression'); now runtime assertions."""
    q = torch.randn(1, 9, 2, 8, device=DEV, requires_grad=True)
    k = torch.randn(1, 9, 1, 8, device=DEV, requires_grad=True)
    cu = torch.tensor([0, 1, 5, 9], device=DEV)

    def f(q, k, cu):
        with sala_ops.use_backend("triton"):
            return sala_ops.hype_embed(q, k, cu_seqlens=cu)

    eager = f(q, k, cu)
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    compiled = cf(q, k, cu)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(RuntimeError):  # a runtime assertion of the compiled graph
        cf(q, k, torch.tensor([0, 5, 1, 9], device=DEV))


# ----------------------------------------------------------------------------------------------------------------
# GPU, bf16, real size: 128K tokens x 32 heads x 128 (MiniCPM-SALA lightning layers: 32/32 heads)

def _dev_rel_err(out, ref_):
    out, ref_ = out.double(), ref_.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref_).norm() / ref_.norm()).item()


@pytest.mark.gpu
@pytest.mark.parametrize("heads,positions", [((32, 32), "default"), ((32, 32), "offset"), ((32, 2), "varlen")])
def test_gpu_bf16_128k(heads, positions):
    torch.manual_seed(0)
    T, (H, HK), D = 131072, heads, 128
    dt = torch.bfloat16
    q = torch.randn(1, T, H, D, device="cuda", dtype=dt)
    k = torch.randn(1, T, HK, D, device="cuda", dtype=dt)
    wq = (torch.rand(D, device="cuda") + 0.5).to(dt)
    wk = (torch.rand(D, device="cuda") + 0.5).to(dt)
    gq = torch.randn_like(q)
    gk = torch.randn_like(k)
    cu = None
    if positions == "default":
        pos, rpos = None, torch.arange(T, device="cuda")[None]
    elif positions == "offset":
        pos = torch.arange(T, device="cuda") + 1_000_000
        rpos = pos[None]
    else:
        cu = torch.tensor([0, 1, 4097, 70000, T], device="cuda", dtype=torch.int32)
        pos, rpos = None, ref.positions_from_cu_seqlens(cu, T)[None]

    def run(backend, dtype, wdtype):
        qq, kk = q.to(dtype).requires_grad_(), k.to(dtype).requires_grad_()
        wq_, wk_ = wq.to(wdtype).requires_grad_(), wk.to(wdtype).requires_grad_()
        if backend == "triton":
            with sala_ops.use_backend("triton"):
                yq, yk = sala_ops.hype_embed(qq, kk, pos, q_norm_weight=wq_, k_norm_weight=wk_, cu_seqlens=cu)
        else:
            yq, yk = ref.hype_embed(qq, kk, rpos, "lightning", 10000.0, D, wq_, wk_)
        grads = torch.autograd.grad((yq * gq.to(dtype)).float().sum() + (yk * gk.to(dtype)).float().sum(),
                                    (qq, kk, wq_, wk_))
        return [yq.detach(), yk.detach(), *grads]

    ours = run("triton", dt, dt)
    exact = run("reference", torch.float32, torch.float32)
    low = run("reference", dt, dt)
    for name, o, e, lo in zip(("yq", "yk", "dq", "dk", "dwq", "dwk"), ours, exact, low):
        err, ref_err = _dev_rel_err(o, e), _dev_rel_err(lo, e)
        assert err <= max(2 * ref_err, 1e-5), f"{name}: relative error {err:.3e} > 2 x reference bf16 error {ref_err:.3e}"


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_tiny_theta_stays_finite_or_is_refused(backend):
    """theta < 1 makes the rotary frequencies theta ** (-2i / r) grow with i. At theta 1e-40 and D 128 the kernel's
    angles reach 1e39 turns, past int64: its fraction-of-a-turn reduction returned NaN (now: whole turns). Where the
    largest frequency would overflow even fp64 (theta 1e-310 at r 128), the op refuses theta by name."""
    q = seeded_randn(0, 1, 3, 2, 128).to(DEV)
    k = seeded_randn(1, 1, 3, 1, 128).to(DEV)
    pos = torch.tensor([0, 5, 2**31 - 1], device=DEV)
    with sala_ops.use_backend(backend):
        yq, yk = sala_ops.hype_embed(q, k, positions=pos, theta=1e-40)
        assert torch.isfinite(yq).all() and torch.isfinite(yk).all()
        with pytest.raises(ValueError, match=r"sala_ops\.hype_embed: theta"):
            sala_ops.hype_embed(q, k, positions=pos, theta=1e-310)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_int_theta_past_int64_acts_as_its_float(backend):
    """An int theta past the int64 range (2**70) is a valid positive number: the result is theta=float(2**70)'s
    (the reference's theta ** tensor raised a bare OverflowError converting it to int64)."""
    q = seeded_randn(2, 1, 5, 2, 16).to(DEV)
    k = seeded_randn(3, 1, 5, 1, 16).to(DEV)
    with sala_ops.use_backend(backend):
        got = sala_ops.hype_embed(q, k, theta=2**70)
        want = sala_ops.hype_embed(q, k, theta=float(2**70))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
