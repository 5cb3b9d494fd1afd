"""sm_90 AOT compile of the one-launch sparse decode step (sala_ops/triton/sparse_decode_fused.py) at the 9B
configuration (bf16 q / K / V, fp32 compressed keys, D = 128, G = 16) for 32K and 256K-token caches, fused
(PHASE 0, with the row barriers) and per phase: registers, spills, shared memory. No GPU needed.

    python bench/aot_decode_fused.py --triton /tmp/t36
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--triton", default=None, help="directory prepended to sys.path before importing triton")
    a = ap.parse_args()
    if a.triton:
        sys.path.insert(0, a.triton)
    os.environ.pop("TRITON_INTERPRET", None)
    from sala_ops.triton import sparse_decode_fused as F
    from sala_ops.triton.sparse_decode_fast import search_steps
    from aot_common import sm90_compiler
    comp = sm90_compiler()
    ptrs = dict(q="*bf16", c1="*fp32", c2="*fp32", kc="*bf16", vc="*bf16", lens="*i32", m2="*fp32", l2="*fp32",
                bscore="*fp32", sel="*i32", o="*bf16", o_part="*fp32", m_part="*fp32", l_part="*fp32", cnt="*i64",
                tbuf="*i64")
    for nbp, np_, nsub in ((512, 64, 1), (4096, 64, 4)):
        ints = dict(s_qb=4096, s_qh=128, s_1b=256 * 4096, s_1t=256, s_1h=128, s_2b=256 * 1024, s_2t=256, s_2h=128,
                    s_cb=256 * 65536, s_ct=256, s_ch=128, s_ob=4096, s_oh=128, D=128, DENSE_LEN=8192, NBMAX=nbp,
                    CH2=16, NSLOT=128, SPB=2)
        cx = dict(G=16, KS=32, ST=16, BS=64, KS2=128, ST2=64, INIT=1, WB=32, R=4, E=1, SB=16, NSUB=nsub, KSEL=96,
                  KSP=128, NBP=nbp, NP=np_, NSP=64, BG=16, BD=128, BJ=16, BN=64, PREC="split2", KEYS_M=True,
                  IEEE=False, K=4, NIT=search_steps(4), EARLY=nsub == 1, SORT=True, TB=2)
        for nw, ns in ((8, 3), (4, 1), (4, 2), (8, 1)):
            comp(f"fused NBP {nbp} early={nsub == 1} sort", F._fused_step_kernel, ptrs, ints, ("scale",),
                 dict(cx, PHASE=0), nw, ns)
        for sort in (False, True):
            comp(f"fused NBP {nbp} early={nsub == 1} sort={sort}", F._fused_step_kernel, ptrs, ints, ("scale",),
                 dict(cx, PHASE=0, SORT=sort), F.FUSED_WARPS)
        comp(f"fused NBP {nbp} timed", F._fused_step_kernel, ptrs, ints, ("scale",), dict(cx, PHASE=0, TIMES=True),
             F.FUSED_WARPS)
        for phase in (0, 1, 2, 3, 4):
            comp(f"fused NBP {nbp} phase {phase}", F._fused_step_kernel, ptrs, ints, ("scale",), dict(cx, PHASE=phase),
                 F.FUSED_WARPS)


if __name__ == "__main__":
    main()
