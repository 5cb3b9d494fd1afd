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


class _Counting:
    """Stands in for a Triton kernel (kernel[grid](...)) and counts its launches."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls += 1
            return self.kernel[grid](*args, **kwargs)
        return launch


# head dims equal to their tile width (64, 128: a TMA tile is whole heads), GQA, varlen, chunk starts off the
# block grid
# (D = 128 runs two V-blocks of 64: the column offset of the second and the autotune pre-hook's tile widths)
_TMA_CASES = [(1, 70, 2, 1, 64, (32, 16), None, True, 0.1), (1, 79, 4, 2, 64, (32, 16), [5, 40, 1, 33], True, 0.1),
              (2, 37, 2, 1, 128, (32, 16), None, True, 0.1)]
if HAS_CUDA:
    _TMA_CASES = _CASES


@pytest.mark.skipif(HAS_CUDA and torch.cuda.get_device_capability()[0] < 9, reason="TMA needs sm_90+")
@pytest.mark.parametrize("case", _TMA_CASES)
def test_tma_variant_equals_v1(case, monkeypatch):
    """SALA_LIGHTNING_OUT=tma (q, k, v, o tiles moved by TMA descriptors) computes what v1 computes, forward and
    all three backward uses, and really runs (launch count); 16-bit inputs (fp16: the interpreter's bf16 dot is
    broken). Same products in the same order, so equal up to fp32 rounding of the accumulation."""
    from sala_ops.triton import lightning_chunk_out as CO
    dt = torch.float16
    want = _run("v1", case, monkeypatch, dt)
    counter = _Counting(CO._chunk_out_tma_kernel)
    monkeypatch.setattr(CO, "_chunk_out_tma_kernel", counter)
    got = _run("tma", case, monkeypatch, dt)
    assert counter.calls == 4  # forward, dq, dk, dv
    for what, g, w in zip(("o", "final_state", "dq", "dk", "dv", "d_initial_state"), got, want):
        assert_close(g, w, 1e-5, f"tma {what}")


def test_tma_variant_falls_back_to_v1(monkeypatch):
    """Head dims TMA cannot tile per head (24) and fp32 inputs run the v1 kernel under SALA_LIGHTNING_OUT=tma."""
    from sala_ops.triton import lightning_chunk_out as CO
    counter = _Counting(CO._chunk_out_tma_kernel)
    monkeypatch.setattr(CO, "_chunk_out_tma_kernel", counter)
    case = ((1, 40, 2, 2, 24, (32, 16), None, True, 0.1) if not HAS_CUDA
            else (1, 100, 2, 2, 96, (64, 64), None, True, 0.1))
    want = _run("v1", case, monkeypatch, torch.float16)
    got = _run("tma", case, monkeypatch, torch.float16)
    got32 = _run("tma", _CASES[0], monkeypatch)
    # a device without TMA copies (before sm_90) takes v1 for inputs TMA could address
    monkeypatch.setattr(CO, "_has_tma", lambda device: False)
    no_tma = _run("tma", _TMA_CASES[0], monkeypatch, torch.float16)
    assert counter.calls == 0
    assert all(torch.equal(g, w) for g, w in zip(no_tma, _run("v1", _TMA_CASES[0], monkeypatch, torch.float16)))
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    assert all(torch.isfinite(g).all() for g in got32)


def test_tma_is_the_default(monkeypatch):
    """Unset or empty SALA_LIGHTNING_OUT selects the TMA kernel (measured fastest on the H200, session 12)."""
    from sala_ops.triton import lightning_chunk_out as CO
    for val in (None, ""):
        if val is None:
            monkeypatch.delenv("SALA_LIGHTNING_OUT", raising=False)
        else:
            monkeypatch.setenv("SALA_LIGHTNING_OUT", val)
        assert CO.variant() == "tma"


def test_out_variant_name_checked(monkeypatch):
    LC.CHUNK_OVERRIDE = (16, 16)
    monkeypatch.setenv("SALA_LIGHTNING_OUT", "nope")
    q = seeded_randn(1, 1, 8, 2, 8, device=DEV)
    with pytest.raises(ValueError, match="SALA_LIGHTNING_OUT"):
        with sala_ops.use_backend("triton"):
            sala_ops.lightning_attention(q, q, q, torch.full((2,), 0.1, device=DEV))
