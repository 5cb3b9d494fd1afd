"""Assertions and hypothesis strategies shared by the tests."""
from __future__ import annotations

import torch
from hypothesis import strategies as st

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in fp64; NaN/inf in `out` (an unwritten or broken element) gives inf."""
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(out64).all():
        return float("inf")
    denom = ref64.norm().item()
    num = (out64 - ref64).norm().item()
    return num / denom if denom > 0 else num


def assert_close(out, ref, tol, what="output"):
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    err = rel_err(out, ref)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def low_precision_tol(fn, inputs, dtype, floor=1e-5):
    """2x the error PyTorch itself makes computing `fn` in `dtype` (vs fp64): the DESIGN's bound for
    fp16/bf16 kernels. `fn` maps a list of tensors to one tensor; inputs are fp32 tensors."""
    exact = fn([x.double() for x in inputs])
    low = fn([x.to(dtype) for x in inputs])
    return max(2 * rel_err(low, exact), floor)


def nan_like(x: torch.Tensor) -> torch.Tensor:
    """An output buffer poisoned with NaN, so an element a kernel never writes fails the check."""
    return torch.full_like(x, float("nan"))


@st.composite
def gqa_heads(draw, max_kv=2, max_group=4):
    """(query heads, kv heads) with kv dividing query, any group size."""
    hkv = draw(st.integers(1, max_kv))
    group = draw(st.integers(1, max_group))
    return hkv * group, hkv


@st.composite
def varlen_splits(draw, total_min=1, total_max=64, max_seqs=4):
    """Lengths of packed sequences (each >= 1) and their cu_seqlens as int32/int64."""
    n = draw(st.integers(1, max_seqs))
    lens = [draw(st.integers(1, max(1, total_max // n))) for _ in range(n)]
    dtype = draw(st.sampled_from([torch.int32, torch.int64]))
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=dtype)
    return lens, cu


def seeded_randn(seed, *shape, dtype=torch.float32, device="cpu", scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype=dtype, device=device)
