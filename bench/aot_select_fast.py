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
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def stats(kernel, cubin_tool):
    md = kernel.metadata
    regs = getattr(md, "n_regs", None) if not isinstance(md, dict) else md.get("n_regs")
    spills = getattr(md, "n_spills", None) if not isinstance(md, dict) else md.get("n_spills")
    smem = md.shared if not isinstance(md, dict) else md.get("shared")
    res = {}
    if cubin_tool:
        with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
            f.write(kernel.asm["cubin"])
        out = subprocess.run([cubin_tool, "-res-usage", f.name], capture_output=True, text=True).stdout
        os.unlink(f.name)
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
        if m:
            res = dict(zip(("cubin_regs", "stack", "shared_static", "local"), map(int, m.groups())))
    ptx = kernel.asm.get("ptx", "")
    return dict(regs=regs, spills=spills, shared=smem, wgmma="wgmma" in ptx, mma_sync="mma.sync" in ptx, **res)


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
    import shutil
    tool = shutil.which("cuobjdump")
    if tool is None:
        cand = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        tool = cand if os.path.exists(cand) else None
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
        sig, const, attrs = {}, {}, {}
        names = K.arg_names
        for i, nme in enumerate(names):
            if nme in ptrs:
                sig[nme] = ptrs[nme]
                attrs[(i,)] = [["tt.divisibility", 16]]
            elif nme == "qk_scale":
                sig[nme] = "fp32"
            elif nme in ints:
                val = ints[nme]
                if val == 1:
                    sig[nme] = "constexpr"
                    const[nme] = 1
                else:
                    sig[nme] = "i32"
                    if val % 16 == 0:
                        attrs[(i,)] = [["tt.divisibility", 16]]
            else:
                sig[nme] = "constexpr"
        from sala_ops.triton.sparse_select_fast import FAST_CFG
        const.update(TQ=TQ, GP=16, ROWS=TQ * 16, BD=128, SB=SB, R=4, E=1, NBP=NBP, TSEL=TSEL, CH=256, WP=128, BN2=64,
                     PREC="tf32", SCH=min(NBP, FAST_CFG["nbp_reg"]))
        src = ASTSource(K, sig, const, attrs)
        try:
            k = triton.compile(src, target=GPUTarget("cuda", 90, 64), options=dict(num_warps=nw, num_stages=ns))
            print(f"TQ={TQ} SB={SB} NBP={NBP} TSEL={TSEL} warps={nw} stages={ns}: {stats(k, tool)}", flush=True)
        except Exception as e:  # report and go on
            print(f"TQ={TQ} SB={SB} NBP={NBP} warps={nw} stages={ns}: FAILED {type(e).__name__}: {str(e)[:400]}")


if __name__ == "__main__":
    main()
