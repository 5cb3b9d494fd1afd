"""Is lightning_attention host-bound at small T? Session 14 (H100) measured fwd+bwd at 8K in 1.4-1.9 ms against
2.0 ms at 32K (fla: 1.1 / 4.4 ms), and the 8K forward moving 0.18 -> 0.33 ms between calls while fla's stayed put.

Per T (B=1, H=32, D=128, bf16, SALA slopes), for the forward and the fwd+bwd:
- `wall_ms`: do_bench median (what bench_lightning.py reports);
- `host_ms`: the Python side alone, the time for the call to return (no synchronisation), median of 50 calls
  issued back to back after a synchronisation (the GPU queue absorbs them while it is not full);
- `gpu_ms`: the sum of the kernel times of one call (torch.profiler, CUDA activity), and the kernel count.
host_ms close to or above gpu_ms means the launches, not the kernels, set the time at that T.
--profile: where the host time of the fwd+bwd goes, at the first T: cProfile of 30 calls (top functions by own
time) and torch.profiler's CPU-side op table of one call (cudaLaunchKernel, cuTensorMapEncode*, allocations...).

    python bench/probe_lightning_host.py [--T 8192,32768] [--profile] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import sala_ops  # noqa: E402

H, D = 32, 128


def _host_ms(fn, n=50):
    fn()
    torch.cuda.synchronize()
    per = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        per.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    return statistics.median(per)


def _gpu_ms(fn):
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    evs = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum(e.device_time for e in evs) / 1e3, len(evs), sorted({e.name[:60] for e in evs})


def _host_profiles(fn, calls=30):
    import cProfile
    import io
    import pstats
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(calls):
        fn()
    pr.disable()
    torch.cuda.synchronize()
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(25)
    print(f"cProfile, {calls} fwd+bwd calls (per-call = tottime / {calls}):\n" + buf.getvalue(), flush=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", default="8192,32768")
    ap.add_argument("--out", default=None)
    ap.add_argument("--profile", action="store_true", help="host-side profiles of the fwd+bwd at the first T")
    args = ap.parse_args()
    import triton
    rows = []
    decay = sala_ops.sala_decay_slopes(H).cuda()
    for T in (int(t) for t in args.T.split(",")):
        q, k, v = (torch.randn(1, T, H, D, device="cuda", dtype=torch.bfloat16) / (D ** 0.25 if i < 2 else 1)
                   for i in range(3))
        q, k, v = (x.requires_grad_() for x in (q, k, v))
        do = torch.randn_like(q)

        def fwd():
            with torch.no_grad():
                return sala_ops.lightning_attention(q, k, v, decay).output

        def fb():
            q.grad = k.grad = v.grad = None
            sala_ops.lightning_attention(q, k, v, decay).output.backward(do)
        for name, fn in (("fwd", fwd), ("fwd+bwd", fb)):
            gpu, n, kernels = _gpu_ms(fn)
            row = dict(T=T, op=name, wall_ms=triton.testing.do_bench(fn, warmup=50, rep=200, return_mode="median"),
                       host_ms=_host_ms(fn), gpu_ms=gpu, kernels=n, kernel_names=kernels)
            rows.append(row)
            print(f"T={T:>6} {name:8} wall {row['wall_ms']:.3f} ms  host {row['host_ms']:.3f} ms  "
                  f"gpu {row['gpu_ms']:.3f} ms in {n} kernels", flush=True)
        if args.profile:
            _host_profiles(fb)
            args.profile = False
        del q, k, v, do
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "lightning_host.json"), "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), rows=rows), f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
