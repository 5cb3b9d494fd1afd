"""Checks on every kernel launch run by the Triton interpreter (TRITON_INTERPRET=1): bounds and races.

Bounds. On the GPU an access past a tensor's end usually lands in memory the caching allocator owns
and goes unnoticed, until a shape puts the tensor at the end of a segment and the process dies with an
illegal memory access (the lightning chunk-output kernel was seen to do that at two tile widths,
bench/NOTES_lightning.md). The interpreter does not catch it either: it reads and writes through raw
host pointers. So every launch records the byte ranges of its tensor arguments (the views' extents, not
their storages), and every unmasked load, store and atomic must fall inside one of them, element and
all; a TMA descriptor must describe memory inside its base tensor. (Checked against the union of the
launch's arguments: the interpreter's pointers do not say which argument they came from, so a read past
one tensor that lands inside another argument would pass; separate host allocations make that unlikely.)

Races. The interpreter runs a launch's programs one after another, in grid order, so a kernel whose
programs touch each other's data gets one fixed, lucky order; on the GPU the programs run concurrently
and the result changes from run to run. So every plain (non-atomic) store is recorded with its program,
and at the end of the launch an element written by one program must not be written, or read, by
another. Atomics are left out (they are how programs are meant to share an element). Kernels that
synchronise their programs on purpose (a last-arriving program merging the others' partials, grid
barriers, ticketed look-back) are listed in SYNCHRONISING_KERNELS with the reason, and only
bounds-checked.

A violation raises OutOfBounds or Race, naming the kernel, which fails the test that launched it.
`install()` patches the interpreter once (conftest.py does it for every test session on a CPU machine);
`SALA_INTERP_CHECKS=0` turns both checks off.
"""
from __future__ import annotations

import functools
import threading

import numpy as np


class OutOfBounds(AssertionError):
    pass


class Race(AssertionError):
    pass


# kernel name -> why its programs may read each other's stores within one launch
SYNCHRONISING_KERNELS = {
    # sparse_decode_fast.py: after a barrier and an atomic counter, the last program of a row selects from / merges
    # what the row's other programs stored (block scores; attention partials)
    "_score_select_kernel": "SELECT_MODE tail: the last-arriving program of a row selects from its block scores",
    "_attend_combine_kernel": "the last-arriving program of a row merges the row's attention partials",
    # sparse_decode_fused.py: the whole decode step in one launch, phases separated by grid barriers
    "_fused_step_kernel": "grid barriers (acquire / release counters) between its phases",
    # lightning_fwd_variants.py (SALA_LIGHTNING_FWD=fused): a chunk waits on a flag for its predecessor's state
    "_fused_kernel": "ticketed look-back: a chunk reads the state its predecessor published behind a flag",
}

_state = threading.local()


def _launch():
    return getattr(_state, "launch", None)


class _Launch:
    def __init__(self, name, starts, ends, check_races):
        self.name, self.starts, self.ends = name, starts, ends
        self.check_races = check_races
        self.loads, self.stores = [], []  # (unique addresses, flat program id)


def _extent(t):
    """[start, end) bytes that a strided view may touch (empty views: nothing)."""
    if t.numel() == 0 or any(s < 0 for s in t.stride()):
        return None
    start = t.data_ptr()
    span = sum((n - 1) * s for n, s in zip(t.shape, t.stride()) if n > 1)
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


def _active(ptrs, mask):
    addr = np.asarray(ptrs, dtype=np.uint64).reshape(-1)
    if mask is not None:
        addr = addr[np.asarray(mask, dtype=bool).reshape(-1)]
    return addr


def _check_bounds(launch, kind, addr, itemsize):
    i = np.searchsorted(launch.starts, addr, side="right") - 1
    ok = i >= 0
    ok &= addr + np.uint64(itemsize) <= launch.ends[np.where(ok, i, 0)]
    if not ok.all():
        bad = int(addr[~ok][0])
        near = ", ".join(f"[{s:#x}, {e:#x})" for s, e in zip(launch.starts.tolist(), launch.ends.tolist()))
        raise OutOfBounds(f"{launch.name}: {kind} of {int((~ok).sum())} element(s) outside every tensor argument, "
                          f"first at {bad:#x} (argument ranges: {near})")


def _pid(builder):
    x, y, z = builder.grid_idx
    gx, gy, _ = builder.grid_dim
    return x + gx * (y + gy * z)


def _access(builder, kind, ptrs, mask, itemsize):
    launch = _launch()
    if launch is None:
        return
    addr = _active(ptrs, mask)
    if addr.size == 0:
        return
    _check_bounds(launch, kind, addr, itemsize)
    if launch.check_races and kind in ("load", "store"):
        (launch.stores if kind == "store" else launch.loads).append((np.unique(addr), _pid(builder)))


def _check_races(launch):
    if not launch.stores:
        return
    s_addr = np.concatenate([a for a, _ in launch.stores])
    s_pid = np.concatenate([np.full(a.size, p, dtype=np.int64) for a, p in launch.stores])
    order = np.lexsort((s_pid, s_addr))
    s_addr, s_pid = s_addr[order], s_pid[order]
    # write-write: one element stored by two programs
    same = (s_addr[1:] == s_addr[:-1]) & (s_pid[1:] != s_pid[:-1])
    if same.any():
        j = int(np.argmax(same))
        raise Race(f"{launch.name}: programs {int(s_pid[j])} and {int(s_pid[j + 1])} both store the element at "
                   f"{int(s_addr[j]):#x} ({int(same.sum())} such pairs): the result depends on their order on the GPU")
    if not launch.loads:
        return
    # read-write: an element stored by one program and read by another (same launch)
    l_addr = np.concatenate([a for a, _ in launch.loads])
    l_pid = np.concatenate([np.full(a.size, p, dtype=np.int64) for a, p in launch.loads])
    k = np.searchsorted(s_addr, l_addr)
    kc = np.minimum(k, s_addr.size - 1)
    hit = (k < s_addr.size) & (s_addr[kc] == l_addr) & (s_pid[kc] != l_pid)
    if hit.any():
        j = int(np.argmax(hit))
        raise Race(f"{launch.name}: program {int(l_pid[j])} reads the element at {int(l_addr[j]):#x} that program "
                   f"{int(s_pid[kc[j]])} stores ({int(hit.sum())} such reads): on the GPU it may see either value")


def _check_descriptor(name, desc):
    r = _extent(desc.base)
    if r is None:
        return
    span = sum((n - 1) * s for n, s in zip(desc.shape, desc.strides) if n > 1)
    end = desc.base.data_ptr() + (span + 1) * desc.base.element_size()
    if end > r[1]:
        raise OutOfBounds(f"{name}: TensorDescriptor shape {list(desc.shape)} strides {list(desc.strides)} "
                          f"reaches {end - r[1]} bytes past its base tensor {tuple(desc.base.shape)}")


def install():
    """Patch the interpreter (idempotent)."""
    from triton.runtime import interpreter as I
    if getattr(I, "_sala_checks_installed", False):
        return True
    B = I.InterpreterBuilder
    orig_load, orig_store = B.create_masked_load, B.create_masked_store
    orig_rmw, orig_cas = B.create_atomic_rmw, B.create_atomic_cas

    def itemsize(handle):
        return np.dtype(I._get_np_dtype(handle.get_element_ty())).itemsize

    @functools.wraps(orig_load)
    def create_masked_load(self, ptrs, mask, other, cache_policy, is_volatile):
        _access(self, "load", ptrs.data, mask.data, itemsize(ptrs))
        return orig_load(self, ptrs, mask, other, cache_policy, is_volatile)

    @functools.wraps(orig_store)
    def create_masked_store(self, ptrs, value, mask, cache_policy):
        _access(self, "store", ptrs.data, mask.data, itemsize(ptrs))
        return orig_store(self, ptrs, value, mask, cache_policy)

    @functools.wraps(orig_rmw)
    def create_atomic_rmw(self, rmwOp, ptr, val, mask, sem, scope):
        _access(self, "atomic", ptr.data, mask.data, itemsize(ptr))
        return orig_rmw(self, rmwOp, ptr, val, mask, sem, scope)

    @functools.wraps(orig_cas)
    def create_atomic_cas(self, ptr, cmp, val, sem, scope):
        _access(self, "atomic_cas", ptr.data, None, itemsize(ptr))
        return orig_cas(self, ptr, cmp, val, sem, scope)

    B.create_masked_load, B.create_masked_store = create_masked_load, create_masked_store
    B.create_atomic_rmw, B.create_atomic_cas = create_atomic_rmw, create_atomic_cas

    orig_init, orig_restore = I.GridExecutor._init_args_hst, I.GridExecutor._restore_args_dev

    @functools.wraps(orig_init)
    def _init_args_hst(self, args_dev, kwargs):
        args_hst, kwargs_hst = orig_init(self, args_dev, kwargs)
        ranges, descriptors = [], []
        _collect(list(args_hst) + list(kwargs_hst.values()), ranges, descriptors)
        name = getattr(self.fn, "__name__", "kernel")
        for d in descriptors:
            _check_descriptor(name, d)
        ranges.sort()  # overlapping views (two slices of one buffer) merge into one allowed range
        merged = []
        for s, e in ranges:
            if merged and s <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], e)
            else:
                merged.append([s, e])
        arr = np.array(merged, dtype=np.uint64).reshape(-1, 2)
        _state.launch = _Launch(name, arr[:, 0].copy(), arr[:, 1].copy(), name not in SYNCHRONISING_KERNELS)
        return args_hst, kwargs_hst

    @functools.wraps(orig_restore)
    def _restore_args_dev(self, *a, **k):
        launch, _state.launch = _launch(), None  # host code between launches is not checked
        if launch is not None and launch.check_races:
            _check_races(launch)
        return orig_restore(self, *a, **k)

    I.GridExecutor._init_args_hst = _init_args_hst
    I.GridExecutor._restore_args_dev = _restore_args_dev
    I._sala_checks_installed = True
    return True
