"""Where the one-launch sparse decode step (sala_ops/triton/sparse_decode_fused.py) spends its time: every program
stamps its SM cycle counter at the phase boundaries (TIMES), and this prints, per phase, the median and the max over
the programs in microseconds (B = 1 at 32K and 128K cached tokens, B = 8 at 32K; 9B config, bf16). The barrier rows are
the waits for the row's slowest program; 'launch skew' is the spread of the programs' start times.

    python bench/diag_decode_fused.py [--programs 64] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402

from bench_sparse_decode import H, D, DTYPE, make_cache  # noqa: E402

# with FUSED_TAGGED there is no barrier 2: its row is ~0 and the select includes the wait for this step's scores
PHASES = [("lse", 1, 2), ("barrier 1", 2, 3), ("score", 3, 4), ("barrier 2", 4, 5), ("select", 5, 6),
          ("attend", 6, 7), ("barrier 3", 7, 8), ("combine", 8, 10)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--programs", type=int, default=None)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    from sala_ops.triton import sparse_decode_fused as FUSED
    if a.programs:
        FUSED.FUSED_PROGRAMS = a.programs
    rows_out = []
    for B, L in ((1, 32768), (1, 131072), (8, 32768)):
        cache = make_cache(B, L)
        q = torch.randn(B, H, D, device="cuda", dtype=DTYPE)
        ws = FUSED.plan(cache, H)
        scale = 1 / math.sqrt(D)
        for _ in range(5):
            FUSED.decode(q, cache, scale, ws, times=True)
        acc = {name: [0.0, 0.0] for name, _, _ in PHASES}
        span = skew = 0.0
        for _ in range(a.reps):
            FUSED.decode(q, cache, scale, ws, times=True)
            torch.cuda.synchronize()
            t = ws["tbuf"].double().reshape(-1, 16)
            ns_per_cycle = ((t[:, 9] - t[:, 0]) / (t[:, 10] - t[:, 1]).clamp(min=1)).median()
            for name, i, j in PHASES:
                us = (t[:, j] - t[:, i]) * ns_per_cycle / 1e3
                acc[name][0] += us.median().item() / a.reps
                acc[name][1] += us.max().item() / a.reps
            span += (t[:, 9].max() - t[:, 0].min()).item() / 1e3 / a.reps
            skew += (t[:, 0].max() - t[:, 0].min()).item() / 1e3 / a.reps
        row = dict(B=B, L=L, local=ws["cx"]["LOCAL"], tagged=ws["cx"]["TAG"], programs=ws["grid"][2], span_us=round(span, 2), launch_skew_us=round(skew, 2),
                   **{f"{k} median/max us": [round(v[0], 2), round(v[1], 2)] for k, v in acc.items()})
        rows_out.append(row)
        print(json.dumps(row), flush=True)
        del cache
        torch.cuda.empty_cache()
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "decode_fused_phases.json"), "w") as f:
            json.dump(rows_out, f, indent=1)


if __name__ == "__main__":
    main()
