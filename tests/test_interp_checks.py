"""The interpreter's launch checks (tests/interp_checks.py) must catch what they are there to catch:
accesses one element past a tensor argument, inside the storage but outside the view, atomics, TMA
descriptors larger than their base tensor, and elements that two programs of one launch store, or
one stores and another reads; and let masked, in-bounds, program-private and atomic accesses through."""
import os

import pytest
import torch
import triton
import triton.language as tl

import interp_checks

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" or
                                os.environ.get("SALA_INTERP_CHECKS", "1") == "0",
                                reason="the checker runs under the Triton interpreter only")


@triton.jit
def _copy_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)


@triton.jit
def _store_kernel(y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, offs.to(tl.float32), mask=offs < n)


@triton.jit
def _atomic_kernel(y_ptr, i):
    tl.atomic_add(y_ptr + i, 1.0)


@triton.jit
def _desc_kernel(x_desc, y_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(y_ptr + offs[:, None] * BLOCK + offs[None, :], x_desc.load([0, 0]))


@triton.jit
def _shift_kernel(x_ptr, y_ptr, SHIFT: tl.constexpr, BLOCK: tl.constexpr):
    """Program p reads block p + SHIFT of x and writes block p of y."""
    p = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    tl.store(y_ptr + p * BLOCK + offs, tl.load(x_ptr + (p + SHIFT) * BLOCK + offs))


@triton.jit
def _sum_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
    """Every program adds its block into y[0:BLOCK] (atomic) -- or, with a plain store, races."""
    p = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    tl.atomic_add(y_ptr + offs, tl.load(x_ptr + p * BLOCK + offs))


@triton.jit
def _last_wins_kernel(y_ptr, BLOCK: tl.constexpr):
    p = tl.program_id(0)
    tl.store(y_ptr + tl.arange(0, BLOCK), tl.full([BLOCK], 1.0, tl.float32) * p)


def _raises(fn):
    with pytest.raises(Exception) as info:
        fn()
    msg = str(info.value)
    assert any(m in msg for m in ("outside every tensor argument", "past its base tensor", "both store",
                                  "on the GPU it may see either value")), msg


def test_in_bounds_and_masked_accesses_pass():
    x, y = torch.randn(10), torch.empty(10)
    _copy_kernel[(1,)](x, y, 10, BLOCK=16)  # lanes 10..15 masked off
    assert torch.equal(x, y)


def test_one_past_the_end_is_caught():
    x, y = torch.randn(10), torch.empty(11)
    _raises(lambda: _copy_kernel[(1,)](x, y, 11, BLOCK=16))  # load of x[10]
    _raises(lambda: _store_kernel[(1,)](torch.empty(10), 11, BLOCK=16))  # store of y[10]


def test_outside_the_view_inside_the_storage_is_caught():
    buf = torch.zeros(32)
    _store_kernel[(1,)](buf[8:16], 8, BLOCK=8)
    assert torch.equal(buf[8:16], torch.arange(8.0)) and buf[16:].abs().sum() == 0
    _raises(lambda: _store_kernel[(1,)](buf[8:16], 9, BLOCK=16))  # buf[16]: allocated, not the argument's


def test_atomics_are_checked():
    y = torch.zeros(4)
    _atomic_kernel[(1,)](y, 3)
    assert y[3] == 1
    _raises(lambda: _atomic_kernel[(1,)](y, 4))


def test_descriptor_past_its_base_is_caught():
    from triton.tools.tensor_descriptor import TensorDescriptor
    x = torch.randn(16, 16)
    y = torch.empty(16, 16)
    _desc_kernel[(1,)](TensorDescriptor(x, [16, 16], [16, 1], [16, 16]), y, BLOCK=16)
    assert torch.equal(x, y)
    _raises(lambda: _desc_kernel[(1,)](TensorDescriptor(x, [17, 16], [16, 1], [16, 16]), y, BLOCK=16))


def test_private_and_atomic_accesses_pass():
    x = torch.randn(4, 8)
    y = torch.empty(4, 8)
    _shift_kernel[(4,)](x, y, SHIFT=0, BLOCK=8)  # each program reads and writes its own block
    assert torch.equal(x, y)
    s = torch.zeros(8)
    _sum_kernel[(4,)](x, s, BLOCK=8)
    assert torch.allclose(s, x.sum(0))


def test_two_programs_storing_one_element_is_caught():
    _raises(lambda: _last_wins_kernel[(3,)](torch.empty(8), BLOCK=8))


def test_reading_another_programs_store_is_caught():
    buf = torch.randn(5, 8)
    # in place, program p reads block p + 1, which program p + 1 writes: in grid order the interpreter
    # always reads the old value, the GPU may not
    _raises(lambda: _shift_kernel[(4,)](buf, buf, SHIFT=1, BLOCK=8))


def test_installed_for_the_test_session():
    from triton.runtime import interpreter
    assert getattr(interpreter, "_sala_checks_installed", False)
    assert interp_checks.install()
