"""A target for Nsight Compute: the one-launch sparse decode step (B = 1, 32K cached tokens unless --L, 9B config,
bf16) run --steps times, so `ncu -k regex:_fused_step_kernel -s 5 -c 1 ...` can profile one warm launch (stall
reasons per SASS instruction: where the 16 us of a 32K step go). bench/gpu.sh ncu runs it.

    python bench/ncu_decode_fused.py [--L 32768] [--steps 10]
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402

from bench_sparse_decode import H, D, DTYPE, make_cache  # noqa: E402
from sala_ops.sparse_decode import sparse_decode  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--L", type=int, default=32768)
    ap.add_argument("--steps", type=int, default=10)
    a = ap.parse_args()
    cache = make_cache(1, a.L)
    q = torch.randn(1, H, D, device="cuda", dtype=DTYPE)
    for _ in range(a.steps):
        sparse_decode(q, cache)
    torch.cuda.synchronize()
    print("fused plan:", [v["cx"] for k, v in cache._ws.items() if isinstance(k, tuple) and k[0] == "fused" and v])


if __name__ == "__main__":
    main()
