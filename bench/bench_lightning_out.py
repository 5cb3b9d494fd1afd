"""Chunk-output pass variants (SALA_LIGHTNING_OUT, sala_ops/triton/lightning_chunk_out.py) in one process:
the pass alone and the whole forward per variant, and each variant's output against the default's (bf16,
B=1, H=32, D=128). fla is not timed here: bench_lightning.py --cases bfloat16:fwd:highest does that.

    python bench/bench_lightning_out.py --T 32768,131072 [--variants v1,tma] [--backward]
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import triton.testing  # noqa: E402

import sala_ops  # noqa: E402
from sala_ops.triton import lightning_chunk as LC  # noqa: E402

H, D = 32, 128


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", default="32768,131072")
    ap.add_argument("--variants", default="v0,v1")
    ap.add_argument("--backward", action="store_true", help="also time forward+backward per variant")
    a = ap.parse_args()
    decay = sala_ops.sala_decay_slopes(H).cuda().float()
    scale = D ** -0.5
    for T in map(int, a.T.split(",")):
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(1, T, H, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
        ch = LC.Chunks(1, T, H, D, None, q.device)
        states = LC.local_states(k, v, 1, 1, H, decay, 1.0, False, ch)
        LC.scan_states(states, decay, None, False, False, ch)
        ref = None
        for name in a.variants.split(","):
            os.environ["SALA_LIGHTNING_OUT"] = name
            o = torch.empty_like(q)

            def out_pass():
                LC.chunk_outputs(q, k, v, 1, 1, 1, H, o, states, False, decay, scale, 1.0, False, ch)

            out_pass()
            CO = __import__("sala_ops.triton.lightning_chunk_out", fromlist=["x"])
            fn = {"v0": LC._chunk_out_kernel, "tma": CO._chunk_out_tma_kernel}.get(name, CO._chunk_out_v1_kernel)
            cfg = fn.best_config if hasattr(fn, "best_config") else None
            err = 0.0 if ref is None else ((o.float() - ref).norm() / ref.norm()).item()
            if ref is None:
                ref = o.float()
            t_out = triton.testing.do_bench(out_pass, warmup=25, rep=200, return_mode="median")
            t_fwd = triton.testing.do_bench(lambda: sala_ops.lightning_attention(q, k, v, decay, scale=scale),
                                            warmup=25, rep=200, return_mode="median")
            t_fb = float("nan")
            if a.backward:
                qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
                do = torch.randn_like(q)

                def fwd_bwd():
                    sala_ops.lightning_attention(qg, kg, vg, decay, scale=scale).output.backward(do)
                t_fb = triton.testing.do_bench(fwd_bwd, warmup=10, rep=200, return_mode="median",
                                               grad_to_none=[qg, kg, vg])
            print(f"T {T:7d} {name:8s} chunk_out {t_out:.4f} ms  fwd {t_fwd:.4f} ms  fwd+bwd {t_fb:.4f} ms  "
                  f"rel err vs first {err:.2e}  config {cfg}", flush=True)
        os.environ.pop("SALA_LIGHTNING_OUT", None)


if __name__ == "__main__":
    main()
