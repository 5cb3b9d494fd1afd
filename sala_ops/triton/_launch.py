"""Lower-overhead launches of @triton.jit kernels on the decode hot path.

`kernel[grid](*args, **constexprs)` goes through JITFunction.run every time: it reads the knobs,
binds the arguments, specialises each one (native_specialize_impl), builds the cache key (a str() of
the options dict), looks the CompiledKernel up, checks the kernel's globals and finally calls
`kernel.run(...)`. On a slow host that is 10-30 us per launch, more than the decode kernels take.

`launch(kernel, grid, ptrs, scalars, constexprs)` keeps the CompiledKernel that the normal launch
returned and, when a later call has the same key, makes the very call JITFunction.run ends with
(identical in triton 3.6 and 3.9):

    launch_metadata = kernel.launch_metadata(grid, stream, *bound_args.values())
    kernel.run(grid_0, grid_1, grid_2, stream, kernel.function, kernel.packed_metadata, launch_metadata,
               knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *bound_args.values())

Why that is safe: triton picks the CompiledKernel by (specialisation of every argument, options).
Our key is finer than triton's, so the kernel it finds is the one triton would have picked:
  - the kernel object (a JITFunction; anything else, e.g. the interpreter's function or a stub,
    never gets a cache entry) and the current CUDA device (triton's caches are per device);
  - each pointer argument's dtype and whether data_ptr() % 16 == 0 (triton's 'D' attribute);
  - the exact value and the Python type of every scalar (triton specialises ints on == 1,
    % 16 == 0 and i32/i64/u64 range, bools as u1, floats as fp32: all functions of (type, value));
  - the constexpr values and launch options (num_warps, ...) as passed;
  - what JITFunction.run adds to the options from outside: the kernel's own `debug`,
    knobs.runtime.debug, knobs.compilation.instrumentation_mode and knobs.compilation.
    fpsan_homomorphic_casts (3.9); with knobs.runtime.add_stages_inspection_hook set (3.9: called on
    every launch, its answer joins the key) there is no fast path.
Per call it still asks the driver for the current device and stream (CUDA-graph capture runs on a
side stream), skips the fast path when the kernel has pre-run hooks, and repeats JITFunction.run's
check that the kernel's global values did not change (falling back to the normal launch, which
raises). The fast path turns itself off (everything goes through kernel[grid]) unless
JITFunction.run's source still contains the lines above and the option lines we mirror
(`_run_contract_ok`), i.e. on a triton whose launch sequence we have not read.
Off by default until it has run on a GPU (it is tested on the CPU against a faked CompiledKernel only):
SALA_OPS_FAST_LAUNCH=1 (read at import) turns it on.

The bound-argument list is `ptrs + scalars + constexpr values` in the kernel's parameter order
(defaults filled in): the cache entry is only made when the kernel's signature binds the call that
way (positional pointers then scalars, then only constexpr parameters).
"""
from __future__ import annotations

import inspect
import os

try:  # pragma: no cover - import shapes differ between triton versions
    import triton
    from triton import knobs
    from triton.compiler import CompiledKernel
    from triton.runtime.jit import JITFunction
    from triton.runtime.driver import driver as _driver
except Exception:  # pragma: no cover
    triton = knobs = CompiledKernel = JITFunction = _driver = None

ENABLED = os.environ.get("SALA_OPS_FAST_LAUNCH", "0") == "1" and JITFunction is not None
MAX_ENTRIES = 256  # cache entries (kernel, device, metadata); cleared when full

_cache: dict = {}
_contract: list = []  # [bool] once checked
_HAS_FPSAN = knobs is not None and "fpsan_homomorphic_casts" in dir(type(knobs.compilation))
_HAS_STAGES_HOOK = knobs is not None and "add_stages_inspection_hook" in dir(type(knobs.runtime))

# the lines of JITFunction.run whose work launch() reproduces or keys on (same text in triton 3.6 and 3.9)
_RUN_CONTRACT = (
    'kwargs["debug"] = kwargs.get("debug", self.debug) or knobs.runtime.debug',
    'kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode',
    "device = driver.active.get_current_device()",
    "stream = driver.active.get_current_stream(device)",
    "for hook in self.pre_run_hooks:",
    "bound_args, specialization, options = binder(*args, **kwargs)",
    "key = compute_cache_key(kernel_key_cache, specialization, options)",
    "for (name, _), (val, globals_dict) in self.used_global_vals.items():",
    "launch_metadata = kernel.launch_metadata(grid, stream, *bound_args.values())",
    "kernel.run(grid_0, grid_1, grid_2, stream, kernel.function, kernel.packed_metadata, launch_metadata,",
    "knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *bound_args.values())",
)
# kwargs lines JITFunction.run may add on top of the two above: each must be one we key on
_KNOWN_OPTION_LINES = {
    'kwargs["debug"] = kwargs.get("debug", self.debug) or knobs.runtime.debug',
    'kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode',
    'kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts',
}


def run_contract_ok(run_fn=None) -> bool:
    """Whether JITFunction.run (or `run_fn`) is the launch sequence launch() mirrors."""
    if run_fn is None and JITFunction is None:
        return False
    try:
        src = inspect.getsource(run_fn or JITFunction.run)
    except (OSError, TypeError):
        return False
    lines = {ln.strip() for ln in src.splitlines()}
    if not all(c in lines for c in _RUN_CONTRACT):
        return False
    extra = {ln for ln in lines if ln.startswith("kwargs[")} - _KNOWN_OPTION_LINES
    if extra:
        return False
    # stage-inspection hook: keyed on below; anything else that edits the specialisation is unknown
    spec_edits = {ln for ln in lines if ln.startswith("specialization.")}
    return spec_edits <= {'specialization.append(f\'("custom_pipeline", {inspect_stages_hash})\')'}


def _fast_ok() -> bool:
    if not _contract:
        _contract.append(ENABLED and run_contract_ok())
    return _contract[0]


def _knob_state(kernel):
    rt = knobs.runtime
    if _HAS_STAGES_HOOK and rt.add_stages_inspection_hook is not None:
        # the hook is called on every launch and may answer differently each time: no fast path
        raise RuntimeError("stage inspection hook set")
    return (kernel.debug, rt.debug, knobs.compilation.instrumentation_mode,
            knobs.compilation.fpsan_homomorphic_casts if _HAS_FPSAN else None)


def _device_and_stream():
    active = _driver.active
    device = active.get_current_device()
    return device, active.get_current_stream(device)


def cache_key(kernel, device, ptrs, scalars, constexprs):
    """The fast-path key (see the module docstring). Raises AttributeError when a pointer is not a tensor."""
    return (kernel, device, tuple([(p.dtype, p.data_ptr() & 15 == 0) for p in ptrs]),
            scalars, tuple(map(type, scalars)), tuple(constexprs.items()), _knob_state(kernel))


def _bound_tail(kernel, ptrs, scalars, constexprs):
    """The constexpr values (defaults filled in) that follow ptrs + scalars in the bound argument list,
    or None when the signature does not bind the call that way."""
    params = list(kernel.signature.parameters.values())
    n = len(ptrs) + len(scalars)
    if len(params) < n or any(p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params):
        return None
    if any(kp.is_constexpr for kp in kernel.params[:n]) or not all(kp.is_constexpr for kp in kernel.params[n:]):
        return None
    names = [p.name for p in params]
    bound = kernel.signature.bind(*ptrs, *scalars, **{k: v for k, v in constexprs.items() if k in names})
    bound.apply_defaults()
    vals = list(bound.arguments.values())
    if len(vals) != len(params):
        return None
    return tuple(vals[n:])


def _globals_unchanged(kernel) -> bool:
    missing = object()
    for (name, _), (val, globals_dict) in kernel.used_global_vals.items():
        if globals_dict.get(name, missing) != val:
            return False
    return True


def launch(kernel, grid, ptrs, scalars, constexprs):
    """`kernel[grid](*ptrs, *scalars, **constexprs)` (constexprs also holds num_warps & co), through the
    cached CompiledKernel when this exact specialisation was launched before. `ptrs` are the kernel's
    leading tensor arguments, `scalars` (a tuple) the int/float arguments that follow them; every
    parameter after those must be a constexpr. Returns what the launch returned (None on the fast path)."""
    if ENABLED and type(kernel) is JITFunction and not kernel.pre_run_hooks and _fast_ok():
        try:
            device, stream = _device_and_stream()
            key = cache_key(kernel, device, ptrs, scalars, constexprs)
            hit = _cache.get(key)
        except (AttributeError, TypeError, RuntimeError):
            key = hit = None
        if hit is not None and _globals_unchanged(kernel):
            ck, tail = hit
            args = (*ptrs, *scalars, *tail)
            g1 = grid[1] if len(grid) > 1 else 1
            g2 = grid[2] if len(grid) > 2 else 1
            rt = knobs.runtime
            ck.run(grid[0], g1, g2, stream, ck.function, ck.packed_metadata,
                   ck.launch_metadata(grid, stream, *args), rt.launch_enter_hook, rt.launch_exit_hook, *args)
            return None
        ret = kernel[grid](*ptrs, *scalars, **constexprs)
        if key is not None and isinstance(ret, CompiledKernel):
            tail = _bound_tail(kernel, ptrs, scalars, constexprs)
            if tail is not None:
                if len(_cache) >= MAX_ENTRIES:
                    _cache.clear()
                _cache[key] = (ret, tail)
        return ret
    return kernel[grid](*ptrs, *scalars, **constexprs)


def clear():
    _cache.clear()
    _contract.clear()


__all__ = ["launch", "cache_key", "run_contract_ok", "clear", "ENABLED", "MAX_ENTRIES"]
