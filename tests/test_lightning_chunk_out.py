"""The chunk-output kernel (sala_ops/triton/lightning_chunk_out.py, the default) against the previous one
(SALA_LIGHTNING_OUT=v0): outputs and all gradients equal (the kernel serves the forward and all three
backward uses). tests/test_lightning_triton.py checks the default against the reference."""
from __future__ import annotations

import pytest
import torch

import sala_ops
from sala_ops.triton import lightning_chunk as LC

from conftest import HAS_CUDA, KERNEL_DEVICE
from helpers import assert_close, seeded_randn

DEV = KERNEL_DEVICE

# (B, T, H, Hkv, D, chunking, varlen lens or None, has_init, decay scale); T not a multiple of the block
_CASES = [
    (1, 70, 2, 1, 16, (32, 16), None, True, 0.1),
    (2, 45, 2, 2, 12, (48, 16), None, False, 1.0),
    (1, 79, 4, 2, 24, (32, 16), [5, 40, 1, 33], True, 0.1),
    (1, 66, 2, 2, 32, (64, 32), None, True, 0.05),
]
if HAS_CUDA:  # compiled: 64-token blocks, D = 128 (the tile shapes the kernels are built for)
    _CASES = [(1, 300, 2, 1, 128, (128, 64), None, True, 0.1), (1, 333, 4, 2, 128, (128, 64), [70, 200, 63], True, 0.1)]


def _run(name, case, monkeypatch, dtype=torch.float32):
    B, T, H, Hkv, D, chunk, lens, has_init, dscale = case
    LC.CHUNK_OVERRIDE = chunk
    monkeypatch.setenv("SALA_LIGHTNING_OUT", name)
    N = B if lens is None else len(lens)
    cu = None if lens is None else torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), device=DEV)
    q = seeded_randn(1, B, T, H, D, device=DEV).to(dtype)
    k = (seeded_randn(2, B, T, Hkv, D, device=DEV) / D ** 0.5).to(dtype)
    v = seeded_randn(3, B, T, Hkv, D, device=DEV).to(dtype)
    decay = torch.rand(H, generator=torch.Generator().manual_seed(4)).to(DEV) * dscale
    s0 = seeded_randn(5, N, H, D, D, device=DEV).requires_grad_() if has_init else None
    leaves = [x.requires_grad_() for x in (q, k, v)]
    with sala_ops.use_backend("triton"):
        out = sala_ops.lightning_attention(*leaves, decay, initial_state=s0, output_final_state=True,
                                           cu_seqlens=cu)
    do = seeded_randn(7, B, T, H, D, device=DEV).to(dtype)
    dfin = seeded_randn(8, N, H, D, D, device=DEV)
    ins = leaves + ([s0] if s0 is not None else [])
    grads = torch.autograd.grad([out.output, out.final_state], ins, [do, dfin])
    return [x.float() for x in (out.output.detach(), out.final_state.detach(), *grads)]


@pytest.fixture(autouse=True)
def _reset_override():
    yield
    LC.CHUNK_OVERRIDE = None


@pytest.mark.parametrize("name", ["v1"])
@pytest.mark.parametrize("case", range(len(_CASES)))
def test_out_variant_equals_default(name, case, monkeypatch):
    want = _run("v0", _CASES[case], monkeypatch)
    got = _run(name, _CASES[case], monkeypatch)
    # fp32 inputs: only the order of the scale multiplications differs (TF32x3 products on a GPU)
    for what, g, w in zip(("o", "final_state", "dq", "dk", "dv", "d_initial_state"), got, want):
        assert_close(g, w, 1e-5, f"{name} {what}")


# 16-bit inputs (the only ones the MMA weighting runs for; fp16 because the interpreter's bf16 dot is broken)
_WMMA_CASES = [0, 2] if not HAS_CUDA else [0, 1]


@pytest.mark.parametrize("case", _WMMA_CASES)
def test_update_weights_by_products(case, monkeypatch):
    """v1mma applies the update weights diag(wk) v as two products (hi + lo split of wk) instead of scaling v
    in registers: equal to v1 up to the fp32 summation order, i.e. far below one fp16 ulp of a weight
    (2^-11 = 4.9e-4; dropping the lo product fails here). v1mma1 (hi only) is off by about that much."""
    dt = torch.float16
    want = _run("v1", _CASES[case], monkeypatch, dt)
    exact = _run("v1mma", _CASES[case], monkeypatch, dt)
    rounded = _run("v1mma1", _CASES[case], monkeypatch, dt)
    for what, g, w in zip(("o", "final_state", "dq", "dk", "dv", "d_initial_state"), exact, want):
        assert_close(g, w, 5e-5, f"v1mma {what}")
    for what, g, w in zip(("o", "final_state", "dq", "dk", "dv", "d_initial_state"), rounded, want):
        assert_close(g, w, 1e-3, f"v1mma1 {what}")


def test_out_variant_name_checked(monkeypatch):
    LC.CHUNK_OVERRIDE = (16, 16)
    monkeypatch.setenv("SALA_LIGHTNING_OUT", "nope")
    q = seeded_randn(1, 1, 8, 2, 8, device=DEV)
    with pytest.raises(ValueError, match="SALA_LIGHTNING_OUT"):
        with sala_ops.use_backend("triton"):
            sala_ops.lightning_attention(q, q, q, torch.full((2,), 0.1, device=DEV))
