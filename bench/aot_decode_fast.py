"""sm_90 AOT compile of the fast sparse-decode kernels (sala_ops/triton/sparse_decode_fast.py, and the one-launch
step of sparse_decode_fused.py, fused and per phase, for 32K and 256K-token caches) at the 9B
configuration (bf16 q / K / V, fp32 compressed keys, D = 128, G = 16): registers, spills, shared memory of
the score pass (per score-dot precision), the select launch (32K and 1M) and the attention
+ merge, as a launch would specialise them. No GPU needed; also shows that triton 3.6 compiles them.

    python bench/aot_decode_fast.py --triton /tmp/t36
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
    from sala_ops.triton import sparse_decode_fast as F
    from aot_common import sm90_compiler
    comp = sm90_compiler()

    cfg = dict(KS=32, ST=16, BS=64, INIT=1, WB=32, R=4, E=1, KSEL=96, KSP=128, BG=16, BD=128, G=16)
    for nbp, nsub, s2 in ((512, 1, 32), (16384, 4, 128)):
        for nw in (4, 8):
            for prec in ("ieee", "tf32x3", "split2"):
                for km in (False, True):
                    comp(f"score NBP {nbp} {prec} keys_m={km}", F._score_select_kernel,
                         dict(q="*bf16", c1="*fp32", lens="*i32", m_in="*fp32", l_in="*fp32", bscore="*fp32",
                              sel="*i32", counter="*i32"),
                         dict(s_qb=4096, s_qh=128, s_1b=256 * 4096, s_1t=256, s_1h=128, D=128, DENSE_LEN=8192,
                              NBMAX=nbp),
                         ("scale",), dict(cfg, S2=s2, S2P=s2, SB=16, NSUB=nsub, NBP=nbp, PREC=prec, SELECT=False,
                                          KEYS_M=km), nw)
        for k in (1, 2, 4):
            for nw in sorted({max(4, min(16, nbp // 1024)), 8, 32 if nbp > 4096 else 8}):
                comp(f"select NBP {nbp} K={k}", F._select_kernel,
                     dict(bscore="*fp32", lens="*i32", sel="*i32"), dict(DENSE_LEN=8192, NBMAX=nbp, HKV=2), (),
                     dict(BS=64, INIT=1, WB=32, KSEL=96, KSP=128, NBP=nbp, K=k, NIT=F.search_steps(k)), nw)
    for nr, p_, k in ((1024, 16, 2), (1024, 16, 4), (512, 32, 2), (2048, 8, 2)):  # two-level select at 1M
        comp(f"select_local NR {nr} K={k}", F._select_local_kernel,
             dict(bscore="*fp32", lens="*i32", cand_bits="*i32", cand_idx="*i32"), dict(DENSE_LEN=8192, NBMAX=16384, HKV=2),
             (), dict(BS=64, INIT=1, WB=32, KSEL=96, KSP=128, NR=nr, K=k, NIT=F.search_steps(k)), max(4, min(16, nr // 256)))
        comp(f"select_merge P {p_} K={k}", F._select_merge_kernel,
             dict(cand_bits="*i32", cand_idx="*i32", lens="*i32", sel="*i32"), dict(DENSE_LEN=8192, HKV=2), (),
             dict(BS=64, KSEL=96, KSP=128, NR=nr, P=p_, K=k, NIT=F.search_steps(k)), max(4, min(16, p_ * 128 // 256)))
    from sala_ops.triton import sparse_decode_kernels as K
    for prec in ("ieee", "split2"):
        comp(f"lse_partial {prec}", K._lse_partial_kernel,
             dict(q="*bf16", c2="*fp32", lens="*i32", m_out="*fp32", l_out="*fp32"),
             dict(s_qb=4096, s_qh=128, s_2b=256 * 1024, s_2t=256, s_2h=128, D=128, DENSE_LEN=8192, CH2=64), ("scale",),
             dict(G=16, KS2=128, ST2=64, S2=128, BG=16, BD=128, BJ=64, PREC=prec, KEYS_M=True), 4)
    comp("combine", K._combine_kernel, dict(o="*bf16", o_part="*fp32", m_part="*fp32", l_part="*fp32"),
         dict(s_ob=4096, s_oh=128, D=128), (), dict(NSPLIT=96, NSP=128, BD=128), 8)
    comp("score_chunk (sort path)", K._score_chunk_kernel,
         dict(q="*bf16", c1="*fp32", lens="*i32", m_in="*fp32", l_in="*fp32", pbuf="*fp32", cand="*i64"),
         dict(s_qb=4096, s_qh=128, s_1b=256 * 4096, s_1t=256, s_1h=128, D=128, DENSE_LEN=8192, PW=1024), ("scale",),
         dict(G=16, KS=32, ST=16, BS=64, INIT=1, WB=32, S2=32, S2P=32, CB=128, KP=128, W=5, BG=16, BD=128, BJ=64,
              IEEE=True), 4)
    for spc in (2, 4):
        comp(f"attend_combine SPC {spc}", F._attend_combine_kernel,
             dict(q="*bf16", kc="*bf16", vc="*bf16", lens="*i32", sel="*i32", o="*bf16", o_part="*fp32",
                  m_part="*fp32", l_part="*fp32", counter="*i32"),
             dict(s_qb=4096, s_qh=128, s_cb=256 * 65536, s_ct=256, s_ch=128, s_ob=4096, s_oh=128, D=128,
                  DENSE_LEN=8192, NSLOT=128, SPB=4),
             ("scale",), dict(G=16, BS=64, KSEL=96, NSPLIT=32, SPC=spc, BG=16, BD=128, BN=64, IEEE=False), 8)

    # the one-launch step (sparse_decode_fused.py)
    from sala_ops.triton import sparse_decode_fused as FU
    ptrs = dict(q="*bf16", c1="*fp32", c2="*fp32", kc="*bf16", vc="*bf16", lens="*i32", m2="*fp32", l2="*fp32",
                bscore="*fp32", bcarry="*i64", sel="*i32", o="*bf16", o_part="*fp32", m_part="*fp32", l_part="*fp32", cnt="*i64",
                tbuf="*i64")
    for nbp, np_, nsub in ((512, 64, 1), (4096, 64, 4)):
        ints = dict(s_qb=4096, s_qh=128, s_1b=256 * 4096, s_1t=256, s_1h=128, s_2b=256 * 1024, s_2t=256, s_2h=128,
                    s_cb=256 * 65536, s_ct=256, s_ch=128, s_ob=4096, s_oh=128, D=128, DENSE_LEN=8192, NBMAX=nbp,
                    CH2=16, NSLOT=128, SPB=2, NR=nbp // 16 + 1)
        cx = dict(G=16, KS=32, ST=16, BS=64, KS2=128, ST2=64, INIT=1, WB=32, R=4, E=1, SB=16, NSUB=nsub, KSEL=96,
                  KSP=128, NBP=nbp, NP=np_, NSP=64, BG=16, BD=128, BJ=16, BN=64, PREC="split2", KEYS_M=True,
                  IEEE=False, K=4, NIT=F.search_steps(4), EARLY=nsub == 1, SORT=True, TB=2,
                  LSE_LAST=True, MC=4, LOCAL=False, CB=16 * nsub, TAG=False, NBAR=3, CARRY=False)
        for nw, ns in ((8, 3), (4, 3), (4, 2), (8, 1)):
            comp(f"fused NBP {nbp} early={nsub == 1} sort", FU._fused_step_kernel, ptrs, ints, ("scale",),
                 dict(cx, PHASE=0), nw, ns)
        comp(f"fused NBP {nbp} local", FU._fused_step_kernel, ptrs, ints, ("scale",),
             dict(cx, PHASE=0, LOCAL=True, TB=1), FU.FUSED_WARPS, FU.FUSED_STAGES)
        comp(f"fused NBP {nbp} local timed", FU._fused_step_kernel, ptrs, ints, ("scale",),
             dict(cx, PHASE=0, LOCAL=True, TB=1, TIMES=True), FU.FUSED_WARPS, FU.FUSED_STAGES)
        comp(f"fused NBP {nbp} local phase 3", FU._fused_step_kernel, ptrs, ints, ("scale",),
             dict(cx, PHASE=3, LOCAL=True, TB=1), FU.FUSED_WARPS, FU.FUSED_STAGES)
        if nsub == 1:  # TAG needs the EARLY score ranges
            comp(f"fused NBP {nbp} local tag", FU._fused_step_kernel, dict(ptrs, bscore="*i64"), ints, ("scale",),
                 dict(cx, PHASE=0, LOCAL=True, TB=1, TAG=True, NBAR=2, CARRY=True), FU.FUSED_WARPS, FU.FUSED_STAGES)
            comp(f"fused NBP {nbp} local tag timed", FU._fused_step_kernel, dict(ptrs, bscore="*i64"), ints, ("scale",),
                 dict(cx, PHASE=0, LOCAL=True, TB=1, TAG=True, NBAR=2, CARRY=True, TIMES=True), FU.FUSED_WARPS, FU.FUSED_STAGES)
            for ph in (2, 3, 5):
                comp(f"fused NBP {nbp} local tag phase {ph}", FU._fused_step_kernel, dict(ptrs, bscore="*i64"), ints, ("scale",),
                     dict(cx, PHASE=ph, LOCAL=True, TB=1, TAG=True, NBAR=2, CARRY=True), FU.FUSED_WARPS, FU.FUSED_STAGES)
        for sort in (False, True):
            comp(f"fused NBP {nbp} early={nsub == 1} sort={sort}", FU._fused_step_kernel, ptrs, ints, ("scale",),
                 dict(cx, PHASE=0, SORT=sort), FU.FUSED_WARPS, FU.FUSED_STAGES)
        comp(f"fused NBP {nbp} timed", FU._fused_step_kernel, ptrs, ints, ("scale",), dict(cx, PHASE=0, TIMES=True),
             FU.FUSED_WARPS, FU.FUSED_STAGES)
        for phase in (0, 1, 2, 3, 5):
            comp(f"fused NBP {nbp} phase {phase}", FU._fused_step_kernel, ptrs, ints, ("scale",), dict(cx, PHASE=phase),
                 FU.FUSED_WARPS, FU.FUSED_STAGES)


if __name__ == "__main__":
    main()
