"""Every torch.library op of the package passes torch.library.opcheck: its schema matches what it
does (no undeclared mutation, no aliasing of inputs), its fake implementation gives the real
outputs' shapes, dtypes and strides (what torch.compile traces with), and it runs under AOT dispatch
with dynamic shapes. The arguments are the ones the public API really passes, recorded from a call
on the triton backend (so the opcheck sees the same None / flag combinations users hit)."""
import pytest
import torch
from torch.library import opcheck

import sala_ops
import sala_ops.hype as HY
import sala_ops.lightning as LI
import sala_ops.sparse as SP
from conftest import KERNEL_DEVICE as DEV
from helpers import seeded_randn

CHECKS = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")


def _record(monkeypatch, module, name, calls):
    impl = getattr(module, name)

    def recorder(*args):
        calls.append(tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args))
        return impl(*args)
    monkeypatch.setattr(module, name, recorder)


def _opcheck(op, calls):
    assert calls, "the public call did not reach the op's implementation"
    for args in list(calls):  # a snapshot: opcheck's own runs of the op are recorded too
        result = opcheck(op, args, test_utils=CHECKS)
        assert all(v == "SUCCESS" for v in result.values()), result


def _grad_inputs(*shapes, seed=0):
    return [seeded_randn(seed + i, *s).to(DEV).requires_grad_() for i, s in enumerate(shapes)]


@pytest.mark.parametrize("with_state", [False, True])
def test_lightning_ops(monkeypatch, with_state):
    fwd, bwd = [], []
    _record(monkeypatch, LI, "_chunk_fwd_impl", fwd)
    _record(monkeypatch, LI, "_chunk_bwd_impl", bwd)
    q, k, v = _grad_inputs((1, 37, 4, 16), (1, 37, 2, 16), (1, 37, 2, 24))
    decay = sala_ops.sala_decay_slopes(4).to(DEV)
    init = seeded_randn(9, 1, 4, 16, 24).to(DEV).requires_grad_() if with_state else None
    cu = torch.tensor([0, 15, 37], device=DEV) if not with_state else None
    with sala_ops.use_backend("triton"):
        out = sala_ops.lightning_attention(q, k, v, decay, initial_state=init, output_final_state=with_state,
                                           cu_seqlens=cu)
        loss = out.output.float().square().sum() + (out.final_state.sum() if with_state else 0)
        loss.backward()
    _opcheck(torch.ops.sala_ops.lightning_chunk_fwd, fwd)
    _opcheck(torch.ops.sala_ops.lightning_chunk_bwd, bwd)


def test_lightning_step_ops():
    q, k, v = (seeded_randn(i, 2, 4, 16).to(DEV) for i in range(3))
    state = seeded_randn(3, 2, 4, 16, 16).to(DEV)
    decay = sala_ops.sala_decay_slopes(4).to(DEV)
    _opcheck(torch.ops.sala_ops.lightning_step, [(q, k, v, state, decay, 0.25)])
    _opcheck(torch.ops.sala_ops.lightning_step_inplace, [(q, k, v, state.clone(), decay, 0.25)])


def test_lightning_ops_with_strided_inputs(monkeypatch):
    """The fakes must give the real outputs' strides for strided inputs too: the step's fake new state copied the
    strides of a non-contiguous state (the kernel writes a contiguous one) and the backward's fake dq / dk / dv
    those of a non-contiguous q / k / v, so torch.compile(backend="inductor") of a decode step with a transposed
    state view failed its stride assertion ('incorrect fake kernel for a custom op')."""
    q, k = (seeded_randn(i, 2, 4, 16).to(DEV) for i in range(2))
    v = seeded_randn(2, 2, 4, 24).to(DEV)
    state_t = seeded_randn(3, 2, 4, 24, 16).to(DEV).transpose(-1, -2)  # [B, H, K, V] as a transposed view
    decay = sala_ops.sala_decay_slopes(4).to(DEV)
    _opcheck(torch.ops.sala_ops.lightning_step, [(q, k, v, state_t, decay, 0.25)])
    _opcheck(torch.ops.sala_ops.lightning_step_inplace, [(q, k, v, state_t.clone().mT.contiguous().mT, decay, 0.25)])
    fwd, bwd = [], []
    _record(monkeypatch, LI, "_chunk_fwd_impl", fwd)
    _record(monkeypatch, LI, "_chunk_bwd_impl", bwd)
    qt, kt, vt = _grad_inputs((1, 4, 37, 16), (1, 2, 37, 16), (1, 2, 37, 24))
    with sala_ops.use_backend("triton"):
        out = sala_ops.lightning_attention(qt.transpose(1, 2), kt.transpose(1, 2), vt.transpose(1, 2), decay,
                                           output_final_state=True)
        (out.output.float().square().sum() + out.final_state.sum()).backward()
    _opcheck(torch.ops.sala_ops.lightning_chunk_fwd, fwd)
    _opcheck(torch.ops.sala_ops.lightning_chunk_bwd, bwd)


def test_sparse_ops(monkeypatch):
    sel, fwd, bwd = [], [], []
    _record(monkeypatch, SP, "_select_impl", sel)
    _record(monkeypatch, SP, "_attn_fwd_impl", fwd)
    _record(monkeypatch, SP, "_attn_bwd_impl", bwd)
    cfg = sala_ops.SparseConfig(kernel_size=8, kernel_stride=4, lse_kernel_size=16, lse_kernel_stride=8,
                                block_size=16, topk=3, init_blocks=1, window_size=16, dense_len=32)
    q, k, v = _grad_inputs((1, 70, 4, 16), (1, 70, 2, 16), (1, 70, 2, 16))
    with sala_ops.use_backend("triton"):
        sala_ops.sparse_attention(q, k, v, config=cfg).float().square().sum().backward()
    _opcheck(torch.ops.sala_ops.sparse_select, sel)
    _opcheck(torch.ops.sala_ops.sparse_attn_fwd, fwd)
    _opcheck(torch.ops.sala_ops.sparse_attn_bwd, bwd)


@pytest.mark.parametrize("layer_type", ["lightning", "sparse"])
def test_hype_ops(monkeypatch, layer_type):
    fwd, bwd = [], []
    _record(monkeypatch, HY, "_fwd_impl", fwd)
    _record(monkeypatch, HY, "_bwd_impl", bwd)
    q, k, w = _grad_inputs((1, 20, 4, 16), (1, 20, 2, 16), (16,))
    with sala_ops.use_backend("triton"):
        yq, yk = sala_ops.hype_embed(q, k, layer_type=layer_type, q_norm_weight=w, k_norm_weight=w)
        (yq.float().square().sum() + yk.float().sum()).backward()
    # the custom ops wrap these impls; opcheck the ops with the recorded arguments
    _opcheck(torch.ops.sala_ops.hype_embed_fwd, fwd)
    _opcheck(torch.ops.sala_ops.hype_embed_bwd, bwd)
