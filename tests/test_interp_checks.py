"""The interpreter's bounds checker (tests/interp_bounds.py) must catch what it is there to catch:
accesses one element past a tensor argument, inside the storage but outside the view, atomics, and
TMA descriptors larger than their base tensor; and let masked and in-bounds accesses through."""
import os

import pytest
import torch
import triton
import triton.language as tl

import interp_bounds

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" or
                                os.environ.get("SALA_INTERP_BOUNDS", "1") == "0",
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


def _raises(fn):
    with pytest.raises(Exception) as info:
        fn()
    assert "outside every tensor argument" in str(info.value) or "past its base tensor" in str(info.value), \
        str(info.value)


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


def test_installed_for_the_test_session():
    from triton.runtime import interpreter
    assert getattr(interpreter, "_sala_bounds_installed", False)
    assert interp_bounds.install()
