"""Every Triton entry point runs with its tensors' CUDA device current (sala_ops._dispatch.device_of).

Triton launches on the current device whatever device the pointers belong to, so a model spread over GPUs
(device_map="auto") would run layer kernels on the wrong GPU. This machine has no second GPU: the switch itself
is tested with a stand-in tensor and a recording torch.cuda.device, and the public ops are run on the triton
backend (interpreter on the CPU) with device_of recorded, so removing the guard from any entry point fails here."""
import contextlib
import types

import pytest
import torch

import sala_ops
from sala_ops import _dispatch
from conftest import KERNEL_DEVICE as DEV
from helpers import seeded_randn


def test_device_of_switches_only_to_another_gpu(monkeypatch):
    entered = []

    class Recorder:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", Recorder)
    on_gpu1 = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 1))
    on_gpu0 = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0))
    with _dispatch.device_of(on_gpu1, "test"):
        pass
    with _dispatch.device_of(on_gpu0, "test"):
        pass
    with _dispatch.device_of(torch.zeros(1), "test"):
        pass
    assert entered == [torch.device("cuda", 1)]

    @_dispatch.on_device_of_first_arg
    def entry(t, x=1):
        return x + 1

    assert entry(on_gpu1, x=2) == 3 and entered == [torch.device("cuda", 1)] * 2
    assert entry.__wrapped__.__name__ == "entry"


@pytest.fixture
def guards(monkeypatch):
    """The entry points that asked for a device switch, with the device they asked for."""
    seen = []

    def recording(tensor, where):
        seen.append((where, tensor.device))
        return contextlib.nullcontext()

    monkeypatch.setattr(_dispatch, "device_of", recording)
    return seen


def _names(seen):
    return {w for w, d in seen if d == torch.device(DEV)}


def test_lightning_entry_points_are_guarded(guards):
    q, k, v = (seeded_randn(i, 1, 20, 2, 16).to(DEV).requires_grad_() for i in range(3))
    decay = sala_ops.sala_decay_slopes(2).to(DEV)
    state = seeded_randn(5, 1, 2, 16, 16).to(DEV)
    with sala_ops.use_backend("triton"):
        sala_ops.lightning_attention(q, k, v, decay).output.float().sum().backward()
        with torch.no_grad():
            sala_ops.lightning_attention_step(q[:, 0], k[:, 0], v[:, 0], state, decay)
    assert {"_chunk_fwd_impl", "_chunk_bwd_impl", "lightning_attention_step"} <= _names(guards)


def test_lightning_step_custom_ops_are_guarded(guards):
    q, k, v = (seeded_randn(i, 1, 2, 16).to(DEV) for i in range(3))
    state = seeded_randn(5, 1, 2, 16, 16).to(DEV)
    decay = sala_ops.sala_decay_slopes(2).to(DEV)
    torch.ops.sala_ops.lightning_step(q, k, v, state, decay, 0.25)
    torch.ops.sala_ops.lightning_step_inplace(q, k, v, state, decay, 0.25)
    assert {"_lightning_step_op", "_lightning_step_inplace_op"} <= _names(guards)


def test_hype_entry_points_are_guarded(guards):
    q = seeded_randn(1, 1, 12, 2, 16).to(DEV).requires_grad_()
    k = seeded_randn(2, 1, 12, 1, 16).to(DEV).requires_grad_()
    with sala_ops.use_backend("triton"):
        qo, ko = sala_ops.hype_embed(q, k, layer_type="lightning")
        (qo.float().sum() + ko.float().sum()).backward()
    assert {"_fwd_impl", "_bwd_impl"} <= _names(guards)


def test_sparse_entry_points_are_guarded(guards):
    cfg = sala_ops.SparseConfig(kernel_size=8, kernel_stride=4, lse_kernel_size=16, lse_kernel_stride=8,
                                block_size=16, topk=2, init_blocks=1, window_size=16, dense_len=16)
    q = seeded_randn(1, 1, 40, 2, 16).to(DEV).requires_grad_()
    k, v = (seeded_randn(i, 1, 40, 1, 16).to(DEV).requires_grad_() for i in (2, 3))
    idx = torch.zeros(1, 40, 1, 1, dtype=torch.int32, device=DEV)
    with sala_ops.use_backend("triton"):
        sala_ops.sparse_attention(q, k, v, config=cfg).float().sum().backward()
        sala_ops.select_blocks(q.detach(), k.detach(), config=cfg)
        sala_ops.block_sparse_attention(q.detach(), k.detach(), v.detach(), idx, block_size=16)
        sala_ops.compress_keys(k.detach(), 8, 4)
    assert {"_triton_sparse_attention", "_select_impl", "_attn_fwd_impl", "_attn_bwd_impl", "select_blocks",
            "block_sparse_attention", "compress_keys"} <= _names(guards)


def test_sparse_decode_entry_points_are_guarded(guards):
    cfg = sala_ops.SparseConfig(kernel_size=8, kernel_stride=4, lse_kernel_size=16, lse_kernel_stride=8,
                                block_size=16, topk=2, init_blocks=1, window_size=16, dense_len=16)
    cache = sala_ops.SparseLayerCache(1, 64, 1, 16, dtype=torch.float32, device=DEV, config=cfg)
    q = seeded_randn(1, 1, 2, 16).to(DEV)
    k, v = (seeded_randn(i, 1, 1, 16).to(DEV) for i in (2, 3))
    with sala_ops.use_backend("triton"), torch.no_grad():
        sala_ops.sparse_decode_step(q, k, v, cache)
    assert {"SparseLayerCache.append_token", "_decode_triton"} <= _names(guards)
