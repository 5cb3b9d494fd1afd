"""Host overhead of the decode-step wrappers (lightning_attention_step, sparse_decode / sparse_decode_step).

    python bench/bench_host_overhead.py                                # CPU: wrapper cost, launches stubbed
    SALA_OPS_ROOT=/tmp/old python bench/bench_host_overhead.py         # the same for another checkout
    python bench/bench_host_overhead.py --cuda                         # GPU: plain call vs CUDA-graph replay

CPU mode replaces the Triton kernels by no-op stubs (`kernel[grid](...)` returns at once) and forces the
triton backend, so what is timed is the Python wrapper alone: argument checks, dispatch, derived launch
constants, output allocation. Each case is timed over --calls calls, --reps times; the median per-call
time is printed (and the min/max across repetitions).

CUDA mode (when a GPU is there) times the real calls, plain (synchronising once per batch of calls, so
the host cost shows when it is larger than the kernel), next to the same call replayed from a CUDA graph.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

if "--cuda" not in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

# SALA_OPS_ROOT: time another checkout's sala_ops (e.g. `git archive <commit> sala_ops | tar -x -C DIR`)
sys.path.insert(0, os.environ.get("SALA_OPS_ROOT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import sala_ops  # noqa: E402
from sala_ops import _dispatch  # noqa: E402
from graph_capture import capture  # noqa: E402  (bench/ is sys.path[0])


class _Stub:
    """Stands for a @triton.jit kernel: `stub[grid](*args, **kw)` does nothing."""

    def __getitem__(self, grid):
        return _noop


def _noop(*args, **kwargs):
    return None


@contextlib.contextmanager
def stubbed_kernels():
    """Replace every decode kernel by a stub (restored on exit)."""
    from sala_ops.triton import lightning_step as LS, sparse_decode_fast as FAST, sparse_decode_kernels as SK
    # the kernels a decode step launches (the fast path's, in every select / merge mode), as the decode modules
    # see them
    names = [(LS, "_lightning_step_kernel"), (SK, "_append_token_kernel")] + [
        (FAST, n) for n in ("_lse_partial_kernel", "_score_select_kernel", "_select_kernel", "_select_local_kernel",
                            "_select_merge_kernel", "_attend_kernel", "_combine_kernel", "_attend_combine_kernel")]
    saved = [(m, n, getattr(m, n)) for m, n in names]
    try:
        for m, n in names:
            setattr(m, n, _Stub())
        yield
    finally:
        for m, n, f in saved:
            setattr(m, n, f)


def time_calls(fn, calls, reps, sync=None):
    """Median / min / max over `reps` of the mean per-call time (us) of `calls` calls."""
    for _ in range(min(calls, 200)):
        fn()
    if sync:
        sync()
    per = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        if sync:
            sync()
        per.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(per), min(per), max(per)


def cases(device):
    B, H, Hkv, D = 1, 32, 2, 128
    dt = torch.bfloat16
    q, k, v = (torch.randn(B, H, D, dtype=dt, device=device) for _ in range(3))
    state = torch.randn(B, H, D, D, device=device)
    decay = sala_ops.sala_decay_slopes(H).to(device)
    out = {
        "lightning_attention_step(inplace=True)":
            lambda: sala_ops.lightning_attention_step(q, k, v, state, decay, inplace=True),
        "lightning_attention_step(inplace=False)":
            lambda: sala_ops.lightning_attention_step(q, k, v, state, decay),
    }
    cache = sala_ops.SparseLayerCache(B, 8192, Hkv, D, dtype=dt, device=device)
    cache.append(torch.randn(B, 4096, Hkv, D, dtype=dt, device=device),
                 torch.randn(B, 4096, Hkv, D, dtype=dt, device=device))
    qs = torch.randn(B, H, D, dtype=dt, device=device)
    ks, vs = (torch.randn(B, Hkv, D, dtype=dt, device=device) for _ in range(2))

    def sparse_step():
        cache.lengths.fill_(4096)  # a graph replays the same step; stay far from max_len
        return sala_ops.sparse_decode_step(qs, ks, vs, cache)

    out["sparse_decode"] = lambda: sala_ops.sparse_decode(qs, cache)
    if device == "cuda":  # the real kernels advance lengths: reset them (one more small launch)
        out["sparse_decode_step (+ lengths.fill_)"] = sparse_step
    else:
        out["sparse_decode_step"] = lambda: sala_ops.sparse_decode_step(qs, ks, vs, cache)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cuda", action="store_true", help="time real launches on the GPU (plain vs CUDA graph)")
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--only", default=None, help="substring filter on the case names")
    args = ap.parse_args()

    if args.cuda:
        if not torch.cuda.is_available():
            sys.exit("--cuda: no CUDA device")
        print(f"# {torch.cuda.get_device_name()} torch {torch.__version__}, triton "
              f"{__import__('triton').__version__}")
        print(f"{'case':44s} {'plain us':>10s} {'graph us':>10s}")
        for name, fn in cases("cuda").items():
            if args.only and args.only not in name:
                continue
            plain = time_calls(fn, args.calls, args.reps, torch.cuda.synchronize)
            g = capture(fn)
            graph = time_calls(g.replay, args.calls, args.reps, torch.cuda.synchronize)
            print(f"{name:44s} {plain[0]:10.1f} {graph[0]:10.1f}")
        return

    print(f"# CPU wrapper cost, kernels stubbed (TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}), "
          f"torch {torch.__version__}, {args.calls} calls x {args.reps} reps; us per call: median [min, max]")
    with stubbed_kernels(), _dispatch.use_backend("triton"):
        for name, fn in cases("cpu").items():
            if args.only and args.only not in name:
                continue
            med, lo, hi = time_calls(fn, args.calls, args.reps)
            print(f"{name:44s} {med:7.2f}  [{lo:.2f}, {hi:.2f}]")


if __name__ == "__main__":
    main()
