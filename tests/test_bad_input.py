"""Malformed inputs at every public op: each must raise ValueError/TypeError naming the op and the
argument, never crash, never return. Hypothesis picks the op and one corruption of a valid call."""
import pytest
import torch
from hypothesis import given, strategies as st

import sala_ops

SMALL = dict(kernel_size=8, kernel_stride=4, block_size=16, window_size=32, topk=2)


def _valid_call(op):
    """A valid (function, kwargs) for each public op, on tiny CPU tensors."""
    B, T, H, Hkv, D = 1, 20, 4, 2, 8
    q, k, v = torch.randn(B, T, H, D), torch.randn(B, T, Hkv, D), torch.randn(B, T, Hkv, D)
    decay = sala_ops.sala_decay_slopes(H)
    if op == "lightning_attention":
        return sala_ops.lightning_attention, dict(q=q, k=k, v=v, decay=decay,
                                                  initial_state=torch.zeros(B, H, D, D))
    if op == "lightning_attention_step":
        return sala_ops.lightning_attention_step, dict(q=q[:, 0], k=k[:, 0], v=v[:, 0],
                                                       state=torch.zeros(B, H, D, D), decay=decay)
    if op == "sparse_attention":
        return sala_ops.sparse_attention, dict(q=q, k=k, v=v, **SMALL)
    if op == "select_blocks":
        return sala_ops.select_blocks, dict(q=q, k=k, **SMALL)
    if op == "block_sparse_attention":
        return sala_ops.block_sparse_attention, dict(q=q, k=k, v=v, block_size=16,
                                                     block_indices=torch.zeros(B, T, Hkv, 2, dtype=torch.int32))
    if op == "compress_keys":
        return sala_ops.compress_keys, dict(k=k, kernel_size=8, kernel_stride=4)
    if op == "hype_embed":
        return sala_ops.hype_embed, dict(q=q, k=k, positions=torch.arange(T),
                                         q_norm_weight=torch.ones(D), k_norm_weight=torch.ones(D))
    raise AssertionError(op)


OPS = ["lightning_attention", "lightning_attention_step", "sparse_attention", "select_blocks",
       "block_sparse_attention", "compress_keys", "hype_embed"]


def _bad_cu(kind, total):
    return {
        "non_monotone": torch.tensor([0, 12, 8, total], dtype=torch.int32),
        "empty_sequence": torch.tensor([0, 8, 8, total], dtype=torch.int32),
        "not_from_zero": torch.tensor([2, 8, total], dtype=torch.int32),
        "wrong_total": torch.tensor([0, 8, total + 3], dtype=torch.int64),
        "float": torch.tensor([0.0, 8.0, float(total)]),
        "two_d": torch.tensor([[0, total]], dtype=torch.int32),
        "too_short": torch.tensor([0], dtype=torch.int32),
        "negative_length": torch.tensor([0, 9, -1, total], dtype=torch.int32),
    }[kind]


# Each corruption: (name, function(op, kwargs) -> kwargs or None when it does not apply to op).
def _corrupt(name, op, kw, draw):
    kw = dict(kw)
    tensors = [n for n in ("q", "k", "v") if n in kw]
    if name == "wrong_rank":
        n = draw(st.sampled_from(tensors))
        kw[n] = kw[n].reshape(-1)
    elif name == "not_a_tensor":
        n = draw(st.sampled_from(tensors))
        kw[n] = kw[n].tolist()
    elif name == "int_dtype":
        n = draw(st.sampled_from(tensors))
        kw[n] = kw[n].to(torch.int32)
    elif name == "mixed_dtypes":
        if len(tensors) < 2:
            return None
        kw[tensors[1]] = kw[tensors[1]].to(torch.float16)
    elif name == "mixed_devices":
        if len(tensors) < 2:
            return None
        kw[tensors[1]] = kw[tensors[1]].to("meta")
    elif name == "heads_do_not_divide":
        if "k" not in kw or "q" not in kw or op == "hype_embed":  # RoPE treats q and k heads independently
            return None
        k = kw["k"]
        kw["k"] = torch.randn(*k.shape[:-2], 3, k.shape[-1])
        if "v" in kw:
            kw["v"] = torch.randn(*kw["v"].shape[:-2], 3, kw["v"].shape[-1])
    elif name == "head_dim_mismatch":
        if "k" not in kw or "q" not in kw:
            return None
        kw["k"] = kw["k"][..., :-1]
    elif name == "empty_sequence":
        if op in ("lightning_attention_step", "compress_keys", "hype_embed"):
            return None
        kw["q"] = kw["q"][:, :0]
    elif name.startswith("cu_"):
        if op in ("lightning_attention_step", "compress_keys"):
            return None
        kw["cu_seqlens"] = _bad_cu(name[3:], kw["q"].shape[1])
    elif name == "batch_with_cu_seqlens":
        if op in ("lightning_attention_step", "compress_keys"):
            return None
        T = kw["q"].shape[1]
        for n in tensors:
            kw[n] = torch.cat([kw[n], kw[n]])
        if "block_indices" in kw:
            kw["block_indices"] = torch.cat([kw["block_indices"]] * 2)
        if "initial_state" in kw:
            kw["initial_state"] = torch.cat([kw["initial_state"]] * 2)
        kw["cu_seqlens"] = torch.tensor([0, T], dtype=torch.int32)
    elif name == "negative_size_param":
        params = [p for p in ("kernel_size", "kernel_stride", "block_size", "topk", "window_size", "rotary_dim")
                  if p in kw or (op in ("sparse_attention", "select_blocks") and p != "rotary_dim")
                  or (op == "hype_embed" and p == "rotary_dim")]
        if not params:
            return None
        kw[draw(st.sampled_from(params))] = draw(st.sampled_from([-1, 0, -64]))
    elif name == "bad_scale":
        if op in ("compress_keys", "hype_embed"):
            return None
        kw["scale"] = draw(st.sampled_from([float("nan"), float("inf"), "x", 10**400]))  # 10**400: float() overflows
    elif name == "bad_decay":
        if "decay" not in kw:
            return None
        kw["decay"] = draw(st.sampled_from([kw["decay"][:-1], kw["decay"][None], kw["decay"].to(torch.int64)]))
    elif name == "bad_state":
        n = "initial_state" if "initial_state" in kw else "state" if "state" in kw else None
        if n is None:
            return None
        s = kw[n]
        kw[n] = draw(st.sampled_from([s.to(torch.bfloat16), s[..., :-1], s[None]]))
    elif name == "bad_block_indices":
        if "block_indices" not in kw:
            return None
        b = kw["block_indices"]
        kw["block_indices"] = draw(st.sampled_from([b.float(), b[:, :-1], b[..., 0]]))
    elif name == "bad_positions":
        if op != "hype_embed":
            return None
        p = kw["positions"]
        kw["positions"] = draw(st.sampled_from([p.float(), p[:-1], p[None, None]]))
    elif name == "bad_norm_weight":
        if op != "hype_embed":
            return None
        kw["q_norm_weight"] = torch.ones(kw["q"].shape[-1] + 1)
    elif name == "bad_theta":
        if op != "hype_embed":
            return None
        # 10**400 does not fit a float (a bare OverflowError before); too small a theta: test_hype_triton
        kw["theta"] = draw(st.sampled_from([0.0, -1.0, float("nan"), 10**400]))
    elif name == "bad_layer_type":
        if op != "hype_embed":
            return None
        kw["layer_type"] = "mamba"
    elif name == "q_longer_than_k":
        if op not in ("sparse_attention", "select_blocks", "block_sparse_attention"):
            return None
        kw["q"] = torch.cat([kw["q"], kw["q"]], dim=1)
        if "block_indices" in kw:
            kw["block_indices"] = torch.cat([kw["block_indices"]] * 2, dim=1)
    else:
        raise AssertionError(name)
    return kw


CORRUPTIONS = ["wrong_rank", "not_a_tensor", "int_dtype", "mixed_dtypes", "mixed_devices", "heads_do_not_divide",
               "head_dim_mismatch", "empty_sequence", "cu_non_monotone", "cu_empty_sequence", "cu_not_from_zero",
               "cu_wrong_total", "cu_float", "cu_two_d", "cu_too_short", "cu_negative_length",
               "batch_with_cu_seqlens", "negative_size_param", "bad_scale", "bad_decay", "bad_state",
               "bad_block_indices", "bad_positions", "bad_norm_weight", "bad_theta", "bad_layer_type", "q_longer_than_k"]


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("op", OPS)
@given(data=st.data())
def test_malformed_input_raises_naming_op(backend, op, data):
    fn, kw = _valid_call(op)
    name = data.draw(st.sampled_from(CORRUPTIONS))
    bad = _corrupt(name, op, kw, data.draw)
    if bad is None:
        return
    with sala_ops.use_backend(backend):
        with pytest.raises((ValueError, TypeError)) as info:
            fn(**bad)
    assert f"sala_ops.{op}" in str(info.value), f"{name}: error does not name the op: {info.value}"


def _first(strategy):
    return strategy.elements[0]  # every draw in _corrupt is a sampled_from


APPLICABLE = [(op, name) for op in OPS for name in CORRUPTIONS
              if _corrupt(name, op, _valid_call(op)[1], _first) is not None]


def _last(strategy):
    return strategy.elements[-1]


@pytest.mark.parametrize("pick", [_first, _last], ids=["first", "last"])
@pytest.mark.parametrize("op,name", APPLICABLE)
def test_every_corruption_raises(op, name, pick):
    """The same, exhaustively over the (op, corruption) pairs that apply, first and last choice of each draw."""
    fn, kw = _valid_call(op)
    bad = _corrupt(name, op, kw, pick)
    with pytest.raises((ValueError, TypeError)) as info:
        fn(**bad)
    assert f"sala_ops.{op}" in str(info.value), f"{name}: error does not name the op: {info.value}"


@pytest.mark.parametrize("op", OPS)
def test_valid_call_succeeds(op):
    """The unmutated call works, so the failures above come from the corruption."""
    fn, kw = _valid_call(op)
    out = fn(**kw)
    first = out[0] if isinstance(out, tuple) else out
    assert torch.isfinite(first.float()).all()


def test_unknown_backend_rejected(monkeypatch):
    with pytest.raises(ValueError, match="use_backend"):
        with sala_ops.use_backend("cuda"):
            pass
    monkeypatch.setenv("SALA_OPS_BACKEND", "fast")
    with pytest.raises(ValueError, match="SALA_OPS_BACKEND"):
        sala_ops.backend_for(torch.zeros(1))


def test_backend_is_visible(monkeypatch):
    monkeypatch.delenv("SALA_OPS_BACKEND", raising=False)
    assert sala_ops.backend_for(torch.zeros(1)) == "reference"
    with sala_ops.use_backend("triton"):
        assert sala_ops.backend_for(torch.zeros(1)) == "triton"
    monkeypatch.setenv("SALA_OPS_BACKEND", "triton")
    assert sala_ops.backend_for(torch.zeros(1)) == "triton"


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("op", ["lightning_attention", "lightning_attention_step", "sparse_attention", "select_blocks",
                                "block_sparse_attention"])
def test_zero_head_dim_default_scale_raises_naming_op(backend, op):
    """q and k with head dim 0 and scale=None (1/sqrt(0)): a ValueError naming the op, not a bare
    ZeroDivisionError from 0 ** -0.5. (With a given scale the result is defined, and both backends agree.)"""
    fn, kw = _valid_call(op)
    for n in ("q", "k"):
        kw[n] = kw[n][..., :0]
    if op.startswith("lightning"):
        n = "initial_state" if "initial_state" in kw else "state"
        kw[n] = kw[n][..., :0, :]
    with sala_ops.use_backend(backend):
        with pytest.raises(ValueError, match=f"sala_ops.{op}: .*head dim"):
            fn(scale=None, **kw)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("op", ["lightning_attention", "lightning_attention_step"])
def test_decay_that_requires_grad_is_refused_on_both_backends(backend, op):
    """decay gets no gradient (a fixed schedule). A decay that required grad got one on the reference backend and
    None, silently, on the Triton backend (a learnable decay froze on the GPU): both refuse it under autograd,
    on every call (the step's cached call signatures included), and take it under torch.no_grad()."""
    fn, kw = _valid_call(op)
    kw["q"] = kw["q"].clone().requires_grad_()
    plain = dict(kw, decay=kw["decay"].clone())
    kw["decay"] = kw["decay"].clone().requires_grad_()
    with sala_ops.use_backend(backend):
        fn(**plain)  # a valid call first: the step caches its signature
        for _ in range(2):
            with pytest.raises(ValueError, match=f"sala_ops.{op}: decay requires grad"):
                fn(**kw)
        with torch.no_grad():
            out = fn(**kw)
    assert torch.isfinite(out[0]).all()
