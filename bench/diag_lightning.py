"""GPU diagnostics for the lightning kernels: small fp32/bf16 cases, one synchronised call each, so an
illegal memory access names its case. Usage: python bench/diag_lightning.py [fp32|bf16]
(SALA_LIGHTNING_F32_DOT picks the fp32 tensor-core precision)."""
import argparse
import faulthandler
import os

_ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
_ap.add_argument("dtype", nargs="?", default="fp32", choices=["fp32", "bf16"])
_args = _ap.parse_args()

import torch

import sala_ops
from sala_ops.reference import lightning as R
from sala_ops.triton import lightning_chunk as LC

dtype = torch.float32 if _args.dtype == "fp32" else torch.bfloat16
prec = os.environ.get("SALA_LIGHTNING_F32_DOT", "default")
cases = [(1, 1, 2, 1, 16, None), (3, 1, 2, 1, 8, None), (1, 100, 2, 2, 16, None), (1, 100, 2, 2, 32, (32, 64)),
         (1, 300, 4, 2, 128, None), (1, 100, 2, 1, 12, (48, 64)), (1, 1000, 2, 2, 64, (256, 64))]
# A hang (seen on the H200 in fp32) prints the Python stack of the launch it is stuck in, then exits.
faulthandler.dump_traceback_later(int(os.environ.get("DIAG_TIMEOUT", "20")), exit=True)
for (B, T, H, Hkv, D, chunk) in cases:
    LC.CHUNK_OVERRIDE = chunk
    name = f"{str(dtype)[6:]} prec={prec} B={B} T={T} H={H}/{Hkv} D={D} chunk={chunk}"
    print("start", name, flush=True)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, T, h, D, generator=g).to(dtype).cuda() for h in (H, Hkv, Hkv))
    S0 = torch.randn(B, H, D, D, generator=g).cuda()
    decay = R.sala_decay_slopes(H).cuda()
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = sala_ops.lightning_attention(*leaves, decay, initial_state=S0, output_final_state=True)
    torch.cuda.synchronize()
    print("  fwd done", flush=True)
    print("  bwd start", flush=True)
    grads = torch.autograd.grad(out.output.float().sum(), leaves)
    torch.cuda.synchronize()
    ref = R.lightning_parallel(q.double(), k.double(), v.double(), decay, None, S0.double(), True)
    e = lambda a, b: ((a.double() - b.double()).norm() / b.double().norm()).item()  # noqa: E731
    print(f"  ok {name}: o {e(out.output, ref[0]):.2e} final {e(out.final_state, ref[1]):.2e}", flush=True)
    st = S0.clone()
    o1, _ = sala_ops.lightning_attention_step(q[:, 0], k[:, 0], v[:, 0], st, decay, inplace=True)
    torch.cuda.synchronize()
    print(f"  step ok {e(o1, ref[0][:, 0]) if T == 1 else 0:.2e}", flush=True)
