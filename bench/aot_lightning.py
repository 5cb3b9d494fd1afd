"""sm_90 AOT compile of the lightning forward kernels (sala_ops/triton/lightning_chunk.py) at the 9B
linear-layer shape (H = 32, D = 128) for bf16 and fp32 inputs, every autotune config: registers, spills,
shared memory and whether the products became wgmma or mma.sync. No GPU needed.

    python bench/aot_lightning.py --triton /tmp/t36
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--triton", default=None, help="directory prepended to sys.path before importing triton")
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--prec", default="tf32", help="fp32 dot precision (tf32 | tf32x3 | ieee); split: the 16-bit hi + lo products")
    ap.add_argument("--kernels", default="out,local")
    a = ap.parse_args()
    if a.triton:
        sys.path.insert(0, a.triton)
    os.environ.pop("TRITON_INTERPRET", None)
    from sala_ops.triton import lightning_chunk as LC
    from aot_common import sm90_compiler
    comp = sm90_compiler(40)

    H, D = 32, 128
    for dt in a.dtypes.split(","):
        prec = a.prec if dt == "fp32" or a.prec == "split" else "tf32"
        if "out" in a.kernels:
            for bv in (32, 64, 128):
                for nw in (4, 8):
                    for ns in (2, 3):
                        comp(f"chunk_out {dt} BV {bv} {prec}", LC._chunk_out_kernel.fn,
                             dict(q_ptr=f"*{dt}", k_ptr=f"*{dt}", v_ptr=f"*{dt}", o_ptr=f"*{dt}", st_ptr="*fp32",
                                  decay_ptr="*fp32", chunk_start_ptr="*i64", chunk_end_ptr="*i64"),
                             dict(T=131072, NSS=16, L=8192, H=H, GQ=1, GK=1, GV=1, stride_q=H * D, stride_k=H * D,
                                  stride_v=H * D, stride_o=H * D, st_sk=D, st_sv=1, DK=D, DV=D),
                             ("out_scale", "kv_mult"),
                             dict(BK=D, BV=bv, BT=64, REVERSE=False, IS_VARLEN=False, PREC=prec), nw, ns)
        if "local" in a.kernels:
            for bv in (64, 128):
                for nw in (4, 8):
                    for ns in (2, 3):
                        comp(f"local_state {dt} BV {bv} {prec}", LC._local_state_kernel.fn,
                             dict(k_ptr=f"*{dt}", v_ptr=f"*{dt}", ds_ptr="*fp32", decay_ptr="*fp32",
                                  chunk_start_ptr="*i64", chunk_end_ptr="*i64"),
                             dict(T=131072, NSS=16, L=8192, H=H, GK=1, GV=1, stride_k=H * D, stride_v=H * D,
                                  DK=D, DV=D),
                             ("kv_mult",), dict(BK=D, BV=bv, BT=64, REVERSE=False, IS_VARLEN=False, PREC=prec),
                             nw, ns)


if __name__ == "__main__":
    main()
