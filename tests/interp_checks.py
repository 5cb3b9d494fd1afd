"""A bounds checker for kernels run by the Triton interpreter (TRITON_INTERPRET=1).

On the GPU an access past a tensor's end usually lands in memory the caching allocator owns and
goes unnoticed, until a shape puts the tensor at the end of a segment and the process dies with an
illegal memory access (the lightning chunk-output kernel was seen to do that at two tile widths,
bench/NOTES_lightning.md, cause never found). The interpreter does not catch it either: it reads and
writes through raw host pointers. So under the interpreter every launch records the byte ranges of
its tensor arguments (the views' extents, not their storages), and every unmasked load, store and
atomic must fall inside one of them, element and all; a TMA descriptor must describe memory inside
its base tensor. (The check is against the union of the launch's arguments: the interpreter's pointers
do not say which argument they came from, so a read past one tensor that lands inside another argument
would pass; separate host allocations make that unlikely.) A violation raises OutOfBounds naming the kernel, the access and the first bad
address, which fails the test that launched the kernel.

`install()` patches the interpreter once (conftest.py does it for every test session on a CPU
machine); `SALA_INTERP_BOUNDS=0` turns it off.
"""
from __future__ import annotations

import functools
import threading

import numpy as np


class OutOfBounds(AssertionError):
    pass


_state = threading.local()


def _ranges():
    return getattr(_state, "ranges", None)


def _extent(t):
    """[start, end) bytes that a strided view may touch (empty views: nothing)."""
    if t.numel() == 0:
        return None
    start = t.data_ptr()
    span = sum((n - 1) * s for n, s in zip(t.shape, t.stride()) if n > 1)
    if any(s < 0 for s in t.stride()):  # not produced by torch today, but keep the rule honest
        return None
    return start, start + (span + 1) * t.element_size()


def _collect(arg, out, descriptors):
    from triton.tools.tensor_descriptor import TensorDescriptor
    if isinstance(arg, (tuple, list)):
        for a in arg:
            _collect(a, out, descriptors)
    elif isinstance(arg, TensorDescriptor):
        descriptors.append(arg)
        _collect(arg.base, out, descriptors)
    elif hasattr(arg, "data_ptr") and hasattr(arg, "stride"):
        r = _extent(arg)
        if r is not None:
            out.append(r)


def _check(kind, ptrs, mask, itemsize):
    rng = _ranges()
    if rng is None:
        return
    addr = np.asarray(ptrs, dtype=np.uint64).reshape(-1)
    if mask is not None:
        addr = addr[np.asarray(mask, dtype=bool).reshape(-1)]
    if addr.size == 0:
        return
    starts, ends, name = rng
    i = np.searchsorted(starts, addr, side="right") - 1
    ok = i >= 0
    ic = np.where(ok, i, 0)
    ok &= addr + np.uint64(itemsize) <= ends[ic]
    if not ok.all():
        bad = int(addr[~ok][0])
        near = ", ".join(f"[{s:#x}, {e:#x})" for s, e in zip(starts.tolist(), ends.tolist()))
        raise OutOfBounds(f"{name}: {kind} of {int((~ok).sum())} element(s) outside every tensor argument, "
                          f"first at {bad:#x} (argument ranges: {near})")


def _check_descriptor(name, desc):
    base = desc.base
    r = _extent(base)
    if r is None:
        return
    span = sum((n - 1) * s for n, s in zip(desc.shape, desc.strides) if n > 1)
    end = base.data_ptr() + (span + 1) * base.element_size()
    if end > r[1]:
        raise OutOfBounds(f"{name}: TensorDescriptor shape {list(desc.shape)} strides {list(desc.strides)} "
                          f"reaches {end - r[1]} bytes past its base tensor {tuple(base.shape)}")


def install():
    """Patch the interpreter (idempotent). Returns False when triton is not interpreting."""
    from triton.runtime import interpreter as I
    if getattr(I, "_sala_bounds_installed", False):
        return True
    B = I.InterpreterBuilder

    orig_load, orig_store = B.create_masked_load, B.create_masked_store
    orig_rmw, orig_cas = B.create_atomic_rmw, B.create_atomic_cas

    def itemsize(handle):
        return np.dtype(I._get_np_dtype(handle.get_element_ty())).itemsize

    @functools.wraps(orig_load)
    def create_masked_load(self, ptrs, mask, other, cache_policy, is_volatile):
        _check("load", ptrs.data, mask.data, itemsize(ptrs))
        return orig_load(self, ptrs, mask, other, cache_policy, is_volatile)

    @functools.wraps(orig_store)
    def create_masked_store(self, ptrs, value, mask, cache_policy):
        _check("store", ptrs.data, mask.data, itemsize(ptrs))
        return orig_store(self, ptrs, value, mask, cache_policy)

    @functools.wraps(orig_rmw)
    def create_atomic_rmw(self, rmwOp, ptr, val, mask, sem, scope):
        _check("atomic", ptr.data, mask.data, itemsize(ptr))
        return orig_rmw(self, rmwOp, ptr, val, mask, sem, scope)

    @functools.wraps(orig_cas)
    def create_atomic_cas(self, ptr, cmp, val, sem, scope):
        _check("atomic_cas", ptr.data, None, itemsize(ptr))
        return orig_cas(self, ptr, cmp, val, sem, scope)

    B.create_masked_load, B.create_masked_store = create_masked_load, create_masked_store
    B.create_atomic_rmw, B.create_atomic_cas = create_atomic_rmw, create_atomic_cas

    orig_init = I.GridExecutor._init_args_hst

    @functools.wraps(orig_init)
    def _init_args_hst(self, args_dev, kwargs):
        args_hst, kwargs_hst = orig_init(self, args_dev, kwargs)
        ranges, descriptors = [], []
        _collect(list(args_hst) + list(kwargs_hst.values()), ranges, descriptors)
        name = getattr(self.fn, "__name__", "kernel")
        for d in descriptors:
            _check_descriptor(name, d)
        # overlapping views (e.g. two slices of one buffer) merge into one allowed range
        ranges.sort()
        merged = []
        for s, e in ranges:
            if merged and s <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], e)
            else:
                merged.append([s, e])
        arr = np.array(merged, dtype=np.uint64).reshape(-1, 2)
        _state.ranges = (arr[:, 0].copy(), arr[:, 1].copy(), name)
        return args_hst, kwargs_hst

    orig_restore = I.GridExecutor._restore_args_dev

    @functools.wraps(orig_restore)
    def _restore_args_dev(self, *a, **k):
        _state.ranges = None  # host code between launches is not checked
        return orig_restore(self, *a, **k)

    I.GridExecutor._init_args_hst = _init_args_hst
    I.GridExecutor._restore_args_dev = _restore_args_dev
    I._sala_bounds_installed = True
    return True
