"""sm_90 AOT compile of the fast selection kernel (sala_ops/triton/sparse_select_fast.py) at the 9B
configuration: bf16, D = 128, G = 16 (32 / 2 heads), launch-time specialisation (divisibility by 16
of pointers and of the ints that are, INIT = 1 as a constexpr). Prints registers, spills, shared
memory for a few (TQ, SB, NBP, warps, stages). No GPU needed.

    python bench/aot_select_fast.py                    # the installed triton
    python bench/aot_select_fast.py --triton /tmp/t36  # another triton (prepended to sys.path)
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--triton", default=None, help="directory prepended to sys.path before importing triton")
    ap.add_argument("--configs", nargs="*", default=None, help="TQ,SB,NBP,warps,stages[,TSEL] ...")
    a = ap.parse_args()
    if a.triton:
        sys.path.insert(0, a.triton)
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from sala_ops.triton.sparse_select_fast import _select_fast_kernel as K
    from aot_common import cubin_tool, fingerprint, signature, stats
    tool = cubin_tool(triton)
    ptrs = dict(Q="*bf16", C1="*bf16", C2="*bf16", OUT="*i32", SCR="*fp32", order="*i32", tile_seq="*i32",
                tile_start="*i32", cu_q="*i64", cu_k="*i64", c1_off="*i64", c2_off="*i64")
    ints = dict(nseq=1, n_items=65536, HKV=2, sq_t=4096, sq_h=128, sc1_t=256, sc1_h=128, sc2_t=256, sc2_h=128,
                so_t=256, so_h=128, D=128, G=16, KS1=32, ST1=16, KS2=128, ST2=64, BS=64, INIT=1, WB=32, KSEL=96,
                W=128, DENSE_LEN=8192)
    configs = a.configs or ["4,16,2048,8,2", "4,16,2048,8,3", "4,32,2048,8,2", "4,16,2048,4,2", "8,16,2048,8,2,4",
                            "4,16,4096,8,2,2", "4,16,8192,8,2,1"]
    print(f"triton {triton.__version__}, sm_90, bf16, D=128, G=16 (regs/thread, spill bytes, shared bytes)")
    for c in configs:
        v = [int(x) for x in c.split(",")]
        TQ, SB, NBP, nw, ns = v[:5]
        TSEL = v[5] if len(v) > 5 else max(1, min(TQ, 8192 // min(NBP, 4096)))
        sig, const, attrs = signature(K, ptrs, ints, ("qk_scale",))
        from sala_ops.triton.sparse_select_fast import FAST_CFG
        const.update(TQ=TQ, GP=16, ROWS=TQ * 16, BD=128, SB=SB, R=4, E=1, NBP=NBP, TSEL=TSEL, CH=256, WP=128, BN2=64,
                     PREC="tf32", SCH=min(NBP, FAST_CFG["nbp_reg"]))
        src = ASTSource(K, sig, const, attrs)
        try:
            k = triton.compile(src, target=GPUTarget("cuda", 90, 64), options=dict(num_warps=nw, num_stages=ns))
            print(f"TQ={TQ} SB={SB} NBP={NBP} TSEL={TSEL} warps={nw} stages={ns}: {stats(k, tool)} "
                  f"ptx {fingerprint(k)}", flush=True)
        except Exception as e:  # report and go on
            print(f"TQ={TQ} SB={SB} NBP={NBP} warps={nw} stages={ns}: FAILED {type(e).__name__}: {str(e)[:400]}")


if __name__ == "__main__":
    main()
