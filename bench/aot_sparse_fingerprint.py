"""PTX fingerprints (bench/aot_common.fingerprint) of every sparse attention / selection kernel at the
9B configuration (bf16, D 128, 32/2 heads, block 64), sm_90, no GPU needed. A refactor that should not
change the generated code (e.g. moving code into inlined @triton.jit helpers) must leave every line
unchanged:

    python bench/aot_sparse_fingerprint.py [TRITON_DIR]   # TRITON_DIR: another triton, e.g. /tmp/t36
"""
import argparse
import os
import sys

_ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
_ap.add_argument("triton_dir", nargs="?", help="directory prepended to sys.path before importing triton")
_args = _ap.parse_args()
if _args.triton_dir:
    sys.path.insert(0, _args.triton_dir)
os.environ.pop("TRITON_INTERPRET", None)
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from aot_common import signature, fingerprint
from sala_ops.triton import sparse_attn as A, sparse_attn_tiled as TT, sparse_select as S, sparse_select_fast as F
H, Hkv, D, Sn = 32, 2, 128, 96
tgt = GPUTarget("cuda", 90, 64)
st = dict(sq_t=H*D, sq_h=D, sk_t=Hkv*D, sk_h=D, sv_t=Hkv*D, sv_h=D, so_t=H*D, so_h=D, sdo_t=H*D, sdo_h=D,
          sdq_t=H*D, sdq_h=D, sdp_t=H*D, sdp_h=D, sl_t=H, D=D, DV=D, G=16, BS=64, sop_t=H*D, sop_h=D, slp_t=H,
          sdk_t=Hkv*D, sdk_h=D, sdv_t=Hkv*D, sdv_h=D, n_buckets=4096, NBT=4096, CHUNK=256, S=Sn, si_t=Hkv*Sn, si_h=Sn,
          nseq=1, su_t=Hkv*4*Sn, su_h=4*Sn)
fl = ("qk_scale", "scale")
def comp(name, K, ptrs, const, nw, ns):
    sig, c, attrs = signature(K, ptrs, st, fl)
    c.update(const)
    k = triton.compile(ASTSource(K, sig, c, attrs), target=tgt, options=dict(num_warps=nw, num_stages=ns))
    print(f"{name:24s} ptx {fingerprint(k)}  shared {k.metadata.shared} B")
b = "*bf16"
comp("fwd onetoken", A._fwd_kernel, dict(Q=b, K=b, V=b, O=b, LSE="*fp32", IDX="*i32", tok_seq="*i32", cu_q="*i64", cu_k="*i64"),
     dict(ROWS=16, BLOCK_D=128, BLOCK_DV=128, BLOCK_N=64, BLOCK_S=128, PREC="tf32"), 4, 3)
comp("dq onetoken", A._bwd_dq_kernel, dict(Q=b, K=b, V=b, DO=b, DQ=b, LSE="*fp32", DELTA="*fp32", IDX="*i32", tok_seq="*i32", cu_q="*i64", cu_k="*i64"),
     dict(ROWS=16, BLOCK_D=128, BLOCK_DV=128, BLOCK_N=64, BLOCK_S=128, PREC="tf32"), 4, 2)
comp("dkdv", A._bwd_dkdv_kernel, dict(Q=b, K=b, V=b, DO=b, DK="*fp32", DV_="*fp32", LSE="*fp32", DELTA="*fp32", TOK="*i32",
     BUCKET_OFF="*i32", CHUNK_BUCKET="*i32", CHUNK_START="*i32", BLK_SEQ="*i32", BLK_OFF="*i32", cu_q="*i64", cu_k="*i64"),
     dict(BQ=4, ROWS=64, BLOCK_D=128, BLOCK_DV=128, BLOCK_N=64, PREC="tf32"), 4, 2)
for init in (False, True):
    comp(f"fwd tiled init={init}", TT._fwd_tiled_kernel, dict(Q=b, K=b, V=b, O=b, LSE="*fp32", OP="*fp32", LSEP="*fp32", UNI="*i64",
         UCNT="*i32", tile_seq="*i32", tile_start="*i32", cu_q="*i64", cu_k="*i64"),
         dict(TQ=4, GP=16, ROWS=64, BLOCK_D=128, BLOCK_DV=128, BLOCK_N=64, HAS_INIT=init, PREC="tf32"), 4, 3)
    comp(f"dq tiled init={init}", TT._bwd_dq_tiled_kernel, dict(Q=b, K=b, V=b, DO=b, DQ=b, DQP="*fp32", LSE="*fp32", DELTA="*fp32",
         UNI="*i64", UCNT="*i32", tile_seq="*i32", tile_start="*i32", cu_q="*i64", cu_k="*i64"),
         dict(TQ=4, GP=16, ROWS=64, BLOCK_D=128, BLOCK_DV=128, BLOCK_N=64, HAS_INIT=init, PREC="tf32"), 4, 2)
sel_ints = dict(n_items=65536, HKV=2, sc1_t=256, sc1_h=128, sc2_t=256, sc2_h=128, KS1=32, ST1=16, KS2=128, ST2=64, INIT=1, WB=32, KSEL=96, W=128, DENSE_LEN=8192)
st.update(sel_ints); st["so_t"] = 256; st["so_h"] = 128
sp = dict(Q=b, C1=b, C2=b, OUT="*i32", tile_seq="*i32", tile_start="*i32", cu_q="*i64", cu_k="*i64", c1_off="*i64", c2_off="*i64")
comp("select online", S._select_kernel, sp, dict(M=4, GP=16, ROWS=64, BLOCK_D=128, NB=128, BN2=64, NWIN=5, PREC="tf32"), 8, 1)
for nbp in (2048, 16384):
    comp(f"select fast nbp={nbp}", F._select_fast_kernel, dict(sp, SCR="*fp32", order="*i32"),
         dict(TQ=4, GP=16, ROWS=64, BD=128, SB=16, R=4, E=1, NBP=nbp, TSEL=max(1, 8192 // min(nbp, 4096)), CH=256, WP=128, BN2=64, PREC="tf32", SCH=min(nbp, 4096)), 8, 2)
