"""The public API on CPU: structured results, in-place decode, defaults, logging of the backend."""
import importlib
import logging

import pytest
import torch

import sala_ops
import sala_ops.reference as R
from helpers import assert_close, seeded_randn


def test_lightning_result_is_structured_and_unpacks():
    q, k, v = (seeded_randn(i, 2, 9, 4, 8) for i in range(3))
    decay = sala_ops.sala_decay_slopes(4)
    out = sala_ops.lightning_attention(q, k, v, decay, output_final_state=True)
    o, final = out
    assert o is out.output and final is out.final_state
    ref_o, ref_f = R.lightning_recurrent(q, k, v, decay, output_final_state=True)
    assert_close(out.output, ref_o, 1e-5)
    assert_close(out.final_state, ref_f, 1e-5)
    assert out.final_state.dtype == torch.float32
    assert sala_ops.lightning_attention(q, k, v, decay).final_state is None


def test_lightning_step_inplace_and_4d():
    q, k, v = (seeded_randn(i, 2, 1, 4, 8) for i in range(3))
    decay = sala_ops.sala_decay_slopes(4)
    state = seeded_randn(5, 2, 4, 8, 8)
    expect_o, expect_s = R.lightning_step(q[:, 0], k[:, 0], v[:, 0], state, decay)
    o, s = sala_ops.lightning_attention_step(q, k, v, state, decay, inplace=True)
    assert o.shape == (2, 1, 4, 8) and s is state
    assert_close(o[:, 0], expect_o, 1e-6)
    assert_close(state, expect_s, 1e-6)


def test_default_scale_is_inverse_sqrt_head_dim():
    q, k, v = seeded_randn(1, 1, 30, 2, 16), seeded_randn(2, 1, 30, 1, 16), seeded_randn(3, 1, 30, 1, 16)
    a = sala_ops.sparse_attention(q, k, v)
    b = sala_ops.sparse_attention(q, k, v, scale=16 ** -0.5)
    assert torch.equal(a, b)


def test_config_and_overrides_agree():
    cfg = sala_ops.SparseConfig(kernel_size=8, kernel_stride=4, block_size=16, window_size=32, topk=3, dense_len=0)
    assert cfg.num_selected == 5
    q, k = seeded_randn(1, 1, 70, 2, 8), seeded_randn(2, 1, 70, 1, 8)
    assert torch.equal(sala_ops.select_blocks(q, k, config=cfg),
                       sala_ops.select_blocks(q, k, kernel_size=8, kernel_stride=4, block_size=16, window_size=32,
                                              topk=3, dense_len=0))
    nine_b = sala_ops.SparseConfig()
    assert (nine_b.num_selected, nine_b.c2, nine_b.dense_len) == (96, (128, 64), 8192)


def test_backend_logged_once(caplog):
    sala_ops._dispatch._announced.clear()
    q = seeded_randn(1, 1, 4, 2, 8)
    with caplog.at_level(logging.INFO, logger="sala_ops"):
        sala_ops.hype_embed(q, q)
        sala_ops.hype_embed(q, q)
    lines = [r.getMessage() for r in caplog.records if "hype_embed" in r.getMessage()]
    assert lines == ["sala_ops.hype_embed: using the reference backend"]


def test_hype_norm_weights_as_strided_views():
    """q_norm_weight / k_norm_weight given as strided views (a column of a matrix): the Triton kernels read
    weight[d] at weight_ptr + d and normalised with the wrong entries (rel. error ~1.5, silently)."""
    B, T, H, Hkv, D = 2, 5, 4, 2, 16
    q, k = seeded_randn(1, B, T, H, D), seeded_randn(2, B, T, Hkv, D)
    W = seeded_randn(3, D, 2) * 0.5 + 1.0  # columns: the weights, each a stride-2 view
    wq_ref, wk_ref = W[:, 0].clone().requires_grad_(), W[:, 1].clone().requires_grad_()
    eq, ek = R.hype_embed(q, k, torch.arange(T), "lightning", q_norm_weight=wq_ref, k_norm_weight=wk_ref)
    (eq.pow(2).sum() + ek.pow(3).sum()).backward()
    for backend in ("reference", "triton"):
        Wg = W.clone().requires_grad_()
        with sala_ops.use_backend(backend):
            yq, yk = sala_ops.hype_embed(q, k, q_norm_weight=Wg[:, 0], k_norm_weight=Wg[:, 1])
        assert_close(yq, eq, 1e-5, f"{backend} q")
        assert_close(yk, ek, 1e-5, f"{backend} k")
        (yq.pow(2).sum() + yk.pow(3).sum()).backward()
        assert_close(Wg.grad[:, 0], wq_ref.grad, 1e-5, f"{backend} dwq")
        assert_close(Wg.grad[:, 1], wk_ref.grad, 1e-5, f"{backend} dwk")


def test_sparse_ops_with_zero_or_negative_scale():
    """scale = 0 (uniform weights) or < 0: the Triton kernels fold the scale into the row maxima, valid only for a
    positive scale, and returned NaN everywhere (forward and backward) while the reference was right."""
    small = dict(kernel_size=4, kernel_stride=2, block_size=8, window_size=8, topk=2, dense_len=16)
    B, T, H, Hkv, D = 1, 40, 4, 2, 16
    q, k, v = seeded_randn(1, B, T, H, D), seeded_randn(2, B, T, Hkv, D), seeded_randn(3, B, T, Hkv, D)
    do = seeded_randn(4, B, T, H, D)
    for scale in (0.0, -0.5):
        res = {}
        for backend in ("reference", "triton"):
            qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
            with sala_ops.use_backend(backend):
                o = sala_ops.sparse_attention(qq, kk, vv, scale=scale, **small)
                idx = sala_ops.select_blocks(q, k, scale=scale, **small)
                ob = sala_ops.block_sparse_attention(q, k, v, idx, block_size=8, scale=scale)
            (o * do).sum().backward()
            res[backend] = (o, ob, qq.grad, kk.grad, vv.grad, idx)
        ref, tri = res["reference"], res["triton"]
        assert torch.equal(tri[5], ref[5]), f"scale {scale}: selected blocks"
        for name, a, b in zip(("o", "block-sparse o", "dq", "dk", "dv"), tri, ref):
            assert_close(a, b, 1e-5, f"scale {scale}: {name}")


def test_sparse_nan_in_q_or_k_propagates_on_both_backends():
    """A NaN in q or in a visible key must give NaN in the rows that see it. The reference softmax (the CPU
    backend, also behind CPU decoding) ran nan_to_num over all its probabilities, meant for rows with no allowed
    key: those rows came back as silent zeros, where the Triton kernels return NaN."""
    B, T, H, Hkv, D, bs = 1, 24, 4, 2, 8, 8
    q, k, v = seeded_randn(1, B, T, H, D), seeded_randn(2, B, T, Hkv, D), seeded_randn(3, B, T, Hkv, D)
    q[0, 5, 1, 0] = float("nan")  # query row 5, head 1
    k[0, 13, 0, 2] = float("nan")  # key 13 of KV head 0: query heads 0, 1 of rows 13.. (dense)
    idx = torch.tensor([0, 2, -1], dtype=torch.int32).expand(B, T, Hkv, 3)  # block 1 (keys 8..15) never selected
    nan_rows = {}
    for backend in ("reference", "triton"):
        with sala_ops.use_backend(backend):
            dense = sala_ops.sparse_attention(q, k, v, kernel_size=4, kernel_stride=2, block_size=bs, window_size=8,
                                              topk=2, dense_len=1000)
            sparse = sala_ops.block_sparse_attention(q, k, v, idx, block_size=bs)
        nan_rows[backend] = [torch.isnan(x).any(-1)[0].nonzero().tolist() for x in (dense, sparse)]
        expect_dense = [[5, 1]] + [[t, h] for t in range(13, T) for h in (0, 1)]
        assert nan_rows[backend][0] == expect_dense, backend
        assert nan_rows[backend][1] == [[5, 1]], backend
        finite = torch.isfinite(dense).all(-1)
        assert_close(dense[finite], R.dense_attention(q, k.nan_to_num(0.0), v)[finite], 1e-5, f"{backend} dense")

    cache = sala_ops.SparseLayerCache(1, 32, Hkv, D, dtype=torch.float32, kernel_size=4, kernel_stride=2,
                                      block_size=bs, window_size=8, topk=2, dense_len=1000)
    cache.append(k[:, :12], v[:, :12])  # no NaN key cached
    with torch.no_grad():
        o = sala_ops.sparse_decode(q[:, 5], cache)
    assert torch.isnan(o).any(-1)[0].tolist() == [False, True, False, False]


def test_triton_double_backward_raises_instead_of_dropping_terms():
    """The Triton backward kernels' gradients have no graph. Under create_graph=True a gradient penalty
    (||dL/dq||^2 added to a loss) then lost every contribution through them and came back wrong (rel. error
    ~0.8-1.0) without a word: differentiating them now raises, naming the op; first-order gradients under
    create_graph are unchanged."""
    B, T, H, D = 1, 12, 2, 8
    q, k, v = seeded_randn(1, B, T, H, D), seeded_randn(2, B, T, H, D), seeded_randn(3, B, T, H, D)
    decay = sala_ops.sala_decay_slopes(H)
    small = dict(kernel_size=4, kernel_stride=2, block_size=4, window_size=4, topk=2, dense_len=6)
    ops = {"lightning_attention": lambda a, b, c: sala_ops.lightning_attention(a, b, c, decay)[0],
           "sparse_attention": lambda a, b, c: sala_ops.sparse_attention(a, b, c, **small),
           "hype_embed": lambda a, b, c: sala_ops.hype_embed(a, b, q_norm_weight=torch.ones(D))[0] * c}
    with sala_ops.use_backend("triton"):
        for op, fn in ops.items():
            qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
            o = fn(qq, kk, vv)
            plain, = torch.autograd.grad(o.pow(2).sum(), qq, retain_graph=True)
            g, = torch.autograd.grad(o.pow(2).sum(), qq, create_graph=True)
            assert torch.equal(g.detach(), plain), op
            penalty = g.pow(2).sum() + o.pow(2).sum()
            with pytest.raises(RuntimeError, match=f"sala_ops.{op}: double backward"):
                torch.autograd.grad(penalty, vv, retain_graph=True)
            with pytest.raises(RuntimeError, match=f"sala_ops.{op}: double backward"):
                penalty.backward()


@pytest.mark.parametrize("var", ["SALA_SPARSE_SELECT", "SALA_SPARSE_FWD", "SALA_SPARSE_BWD_DQ", "SALA_SPARSE_DECODE",
                                 "SALA_SPARSE_DECODE_PDL"])
def test_kernel_variant_env_typo_is_refused(monkeypatch, var):
    """README's kernel-variant variables: a value outside the documented ones (a typo) used to run the default
    kernel silently for these five (the others already refused it); now a ValueError names the variable."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    for name in ("SALA_SPARSE_SELECT", "SALA_SPARSE_FWD", "SALA_SPARSE_BWD_DQ", "SALA_SPARSE_DECODE",
                 "SALA_SPARSE_DECODE_PDL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(var, "bogus")
    B, T, H, Hkv, D, bs = 1, 40, 2, 1, 16, 16
    small = dict(kernel_size=8, kernel_stride=4, block_size=bs, window_size=16, topk=2, dense_len=16)
    q, k, v = (seeded_randn(i, B, T, h, D).to(dev) for i, h in ((1, H), (2, Hkv), (3, Hkv)))
    refused = pytest.raises(ValueError, match=f"{var} must be one of")
    with sala_ops.use_backend("triton"):
        if var == "SALA_SPARSE_SELECT":
            with refused:
                sala_ops.sparse_attention(q, k, v, **small)
        elif var in ("SALA_SPARSE_FWD", "SALA_SPARSE_BWD_DQ"):
            idx = torch.tensor([0, 2], dtype=torch.int32, device=dev).expand(B, T, Hkv, 2)
            qq = q.clone().requires_grad_()
            if var == "SALA_SPARSE_FWD":
                with refused:
                    sala_ops.block_sparse_attention(qq, k, v, idx, block_size=bs)
            else:
                o = sala_ops.block_sparse_attention(qq, k, v, idx, block_size=bs)
                with refused:
                    o.sum().backward()
        else:
            if var == "SALA_SPARSE_DECODE_PDL":  # read when the decode kernels are first imported
                monkeypatch.setattr(importlib.import_module("sala_ops.sparse_decode"), "_FAST", None)
            cache = sala_ops.SparseLayerCache(B, 64, Hkv, D, dtype=torch.float32, device=dev, **small)
            cache.append(k, v)
            with refused, torch.no_grad():
                sala_ops.sparse_decode(q[:, -1], cache)


def test_decay_slope_helpers_refuse_bad_counts_and_layers():
    """sala_decay_slopes(2.5) returned 3 rates, (0) none, (-1) / ("4") a bare torch error; minimax_decay_slopes
    with a layer past the last gave negative rates (a state that grows every token). Each names the argument."""
    import numpy as np
    assert torch.equal(sala_ops.sala_decay_slopes(np.int64(4)), sala_ops.sala_decay_slopes(4))
    for bad, err in ((2.5, TypeError), ("4", TypeError), (True, TypeError), (0, ValueError), (-1, ValueError)):
        with pytest.raises(err, match="sala_decay_slopes: num_heads"):
            sala_ops.sala_decay_slopes(bad)
    assert torch.equal(sala_ops.minimax_decay_slopes(4, 0, 1), sala_ops.sala_decay_slopes(4) * (1 + 1e-5))
    assert (sala_ops.minimax_decay_slopes(4, 7, 8) > 0).all()
    for args, name in (((4, 8, 8), "layer_idx"), ((4, -1, 8), "layer_idx"), ((4, 0, 0), "num_layers"),
                       ((0, 0, 8), "num_heads")):
        with pytest.raises(ValueError, match=f"minimax_decay_slopes: {name}"):
            sala_ops.minimax_decay_slopes(*args)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_segment_of_matches_the_packed_layout(dtype):
    """segment_of (the sequence of each packed index, searched in the whole offsets: inductor in torch 2.11 drops a
    sliced boundary tensor's offset, pytorch#182343) against repeat_interleave, past-the-end ids included."""
    from sala_ops._segments import segment_of
    for lens in ([1], [5], [1, 20, 60], [3, 1, 1, 7]):
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=dtype)
        total = int(cu[-1])
        ids = torch.arange(total + 3, dtype=dtype)
        want = torch.cat([torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens)),
                          torch.full((3,), len(lens))])
        assert torch.equal(segment_of(cu, ids), want)
