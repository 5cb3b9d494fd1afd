"""sm_90 AOT compile of the tiled dq kernel (sala_ops/triton/sparse_attn_tiled.py::_bwd_dq_tiled_kernel)
and, for comparison, the one-token dq kernel (sparse_attn._bwd_dq_kernel) at the 9B configuration: bf16,
D = 128, G = 16 (32 / 2 heads), block 64, 96 blocks, launch-time specialisation (divisibility by 16 of
pointers and of the ints that are; nseq = 1 as a constexpr, as Triton specialises it). Prints
registers, spills, shared memory. No GPU needed.

    python bench/aot_tiled_dq.py                    # the installed triton
    python bench/aot_tiled_dq.py --triton /tmp/t36  # another triton (prepended to sys.path)
    python bench/aot_tiled_dq.py --configs 4,4,2,1 8,8,2,1   # TQ,warps,stages,HAS_INIT
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--triton", default=None, help="directory prepended to sys.path before importing triton")
    ap.add_argument("--configs", nargs="*", default=None, help="TQ,warps,stages,HAS_INIT ...")
    a = ap.parse_args()
    if a.triton:
        sys.path.insert(0, a.triton)
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from aot_common import cubin_tool, fingerprint, signature as _signature, stats
    from sala_ops.triton import sparse_attn as A, sparse_attn_tiled as TT
    tool = cubin_tool(triton)
    target = GPUTarget("cuda", 90, 64)
    H, Hkv, D, S = 32, 2, 128, 96
    strides = dict(sq_t=H * D, sq_h=D, sk_t=Hkv * D, sk_h=D, sv_t=Hkv * D, sv_h=D, sdo_t=H * D, sdo_h=D,
                   sdq_t=H * D, sdq_h=D, sdp_t=H * D, sdp_h=D, sl_t=H, D=D, DV=D, G=H // Hkv, BS=64)
    floats = ("qk_scale", "scale")
    print(f"triton {triton.__version__}, sm_90, bf16, D=128, G=16 (regs/thread, spill bytes, shared bytes)")
    # the one-token dq kernel (sparse_attn.DQ_CFG) for reference
    ptrs = dict(Q="*bf16", K="*bf16", V="*bf16", DO="*bf16", DQ="*bf16", LSE="*fp32", DELTA="*fp32", IDX="*i32",
                tok_seq="*i32", cu_q="*i64", cu_k="*i64")
    ints = dict(strides, si_t=Hkv * S, si_h=S, S=S)
    sig, const, attrs = _signature(A._bwd_dq_kernel, ptrs, ints, floats)
    const.update(ROWS=16, BLOCK_D=128, BLOCK_DV=128, BLOCK_N=64, BLOCK_S=128, PREC="tf32")
    for nw, ns in ((A.DQ_CFG["num_warps"], A.DQ_CFG["num_stages"]),):
        k = triton.compile(ASTSource(A._bwd_dq_kernel, sig, const, attrs), target=target,
                           options=dict(num_warps=nw, num_stages=ns))
        print(f"one-token _bwd_dq_kernel warps={nw} stages={ns}: {stats(k, tool)} ptx {fingerprint(k)}", flush=True)
    configs = a.configs or ["4,4,2,1", "4,4,3,1", "4,8,2,1", "4,8,3,1", "4,4,2,0", "4,8,2,0", "8,8,2,1"]
    for c in configs:
        TQ, nw, ns, init = (int(x) for x in c.split(","))
        ptrs = dict(Q="*bf16", K="*bf16", V="*bf16", DO="*bf16", DQ="*bf16", DQP="*fp32", LSE="*fp32",
                    DELTA="*fp32", UNI="*i64", UCNT="*i32", tile_seq="*i32", tile_start="*i32", cu_q="*i64",
                    cu_k="*i64")
        ints = dict(strides, nseq=1, su_t=Hkv * TQ * S, su_h=TQ * S)
        sig, const, attrs = _signature(TT._bwd_dq_tiled_kernel, ptrs, ints, floats)
        const.update(TQ=TQ, GP=16, ROWS=TQ * 16, BLOCK_D=128, BLOCK_DV=128, BLOCK_N=64, HAS_INIT=bool(init),
                     PREC="tf32")
        try:
            k = triton.compile(ASTSource(TT._bwd_dq_tiled_kernel, sig, const, attrs), target=target,
                               options=dict(num_warps=nw, num_stages=ns))
            print(f"tiled dq TQ={TQ} warps={nw} stages={ns} HAS_INIT={init}: {stats(k, tool)} ptx {fingerprint(k)}",
                  flush=True)
        except Exception as e:  # report and go on
            print(f"tiled dq TQ={TQ} warps={nw} stages={ns} HAS_INIT={init}: FAILED {type(e).__name__}: {str(e)[:400]}")


if __name__ == "__main__":
    main()
