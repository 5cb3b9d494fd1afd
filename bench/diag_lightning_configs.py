"""Every launch config of the lightning forward kernels, timed one by one on the GPU (no autotuner choice):
per dtype, the chunk-output pass (_chunk_out_kernel) and the local-state pass (_local_state_kernel) at
B=1, H=32, D=128 and T tokens, with the bytes each pass must move and the achieved TB/s; then the whole
forward with the autotuner's pick and with the chunk lengths given. For finding why a dtype is slow
(bench/NOTES_lightning.md: fp32 inputs ran 5.5x slower than bf16 in H200 run 3).

    python bench/diag_lightning_configs.py [--T 131072] [--dtypes bf16,fp32] [--prec high] [--out DIR]

Each config compiles on first use (about a second each on the H200). bf16 is timed with 2 and 3 stages only: in
H200 run 4 a bf16 chunk-output config with 1 stage (BV=32, 4 warps; not one the library uses) was followed by an
illegal memory access that took the process down.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import triton  # noqa: E402

import sala_ops  # noqa: E402
from sala_ops.triton import lightning_chunk as LC  # noqa: E402

H, D = 32, 128
DT = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _bench(fn):
    return triton.testing.do_bench(fn, warmup=5, rep=40, return_mode="median")


def forced(kernel, cfg):
    """Run `kernel` (a triton Autotuner) with only `cfg` from now on."""
    kernel.configs = [cfg]
    kernel.cache = {}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, default=131072)
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--prec", default="high", help="torch float32 matmul precision (high: TF32, highest: 3xTF32)")
    ap.add_argument("--chunks", default="2048,4096,8192", help="chunk lengths L for the whole-forward rows")
    ap.add_argument("--budget", type=float, default=240.0, help="seconds; stop starting new configs after this")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.set_float32_matmul_precision(a.prec)
    t_start = time.time()
    rows = []
    decay = sala_ops.sala_decay_slopes(H).cuda()
    out_cfgs0, loc_cfgs0 = list(LC._chunk_out_kernel.configs), list(LC._local_state_kernel.configs)
    for dts in a.dtypes.split(","):
        dt = DT[dts]
        es = torch.tensor([], dtype=dt).element_size()
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(1, a.T, H, D, device="cuda", dtype=dt, generator=g) * 0.3 for _ in range(3))
        ch = LC.Chunks(1, a.T, H, D, None, q.device)
        st = LC.local_states(k, v, 1, 1, H, decay, 1.0, False, ch)
        LC.scan_states(st, decay, None, False, False, ch)
        o = torch.empty_like(q)
        ref = None
        nbytes_out = 4 * a.T * H * D * es + st.numel() * 4
        nbytes_loc = 2 * a.T * H * D * es + st.numel() * 4
        cands = []
        for bv in (32, 64, 128):
            for w in (4, 8):
                for s in ((1, 2, 3) if dts == "fp32" else (2, 3)):  # bf16 with 1 stage: see below
                    if bv == 128 and w == 4:
                        continue  # spills 0.8-1.3 KB (bench/aot_lightning.py)
                    cands.append(triton.Config({"BV": bv}, num_warps=w, num_stages=s))
        for cfg in cands:
            if time.time() - t_start > a.budget:
                print("budget reached", flush=True)
                break
            forced(LC._chunk_out_kernel, cfg)
            row = dict(pass_="chunk_out", dtype=dts, T=a.T, L=ch.L, BV=cfg.kwargs["BV"], warps=cfg.num_warps,
                       stages=cfg.num_stages)
            try:
                t0 = time.time()
                LC.chunk_outputs(q, k, v, 1, 1, 1, H, o, st, False, decay, D ** -0.5, 1.0, False, ch)
                torch.cuda.synchronize()
                row["compile_s"] = round(time.time() - t0, 1)
                if ref is None:
                    ref = o.float().clone()
                row["rel_diff"] = ((o.float() - ref).norm() / ref.norm()).item()
                ms = _bench(lambda: LC.chunk_outputs(q, k, v, 1, 1, 1, H, o, st, False, decay, D ** -0.5, 1.0,
                                                     False, ch))
                row.update(ms=round(ms, 4), TBps=round(nbytes_out / ms / 1e9, 2))
            except Exception as e:  # noqa: BLE001  (out of shared memory, ...)
                row["error"] = f"{type(e).__name__}: {str(e)[:120]}"
            print(json.dumps(row), flush=True)
            rows.append(row)
        for cfg in [c for c in cands if c.kwargs["BV"] >= 64]:
            if time.time() - t_start > a.budget:
                break
            forced(LC._local_state_kernel, cfg)
            row = dict(pass_="local_state", dtype=dts, T=a.T, L=ch.L, BV=cfg.kwargs["BV"], warps=cfg.num_warps,
                       stages=cfg.num_stages)
            try:
                ms = _bench(lambda: LC.local_states(k, v, 1, 1, H, decay, 1.0, False, ch))
                row.update(ms=round(ms, 4), TBps=round(nbytes_loc / ms / 1e9, 2))
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {str(e)[:120]}"
            print(json.dumps(row), flush=True)
            rows.append(row)
        # the whole forward, autotuned, per chunk length
        LC._chunk_out_kernel.configs, LC._local_state_kernel.configs = out_cfgs0, loc_cfgs0
        LC._chunk_out_kernel.cache, LC._local_state_kernel.cache = {}, {}
        for L in [int(x) for x in a.chunks.split(",") if x]:
            if time.time() - t_start > a.budget:
                break
            LC.CHUNK_OVERRIDE = (L, LC.DEFAULT_BT)
            try:
                ms = _bench(lambda: sala_ops.lightning_attention(q, k, v, decay))
                row = dict(pass_="forward", dtype=dts, T=a.T, L=L, ms=round(ms, 4))
            except Exception as e:  # noqa: BLE001
                row = dict(pass_="forward", dtype=dts, T=a.T, L=L, error=repr(e)[:200])
            LC.CHUNK_OVERRIDE = None
            print(json.dumps(row), flush=True)
            rows.append(row)
        del q, k, v, o, st
        torch.cuda.empty_cache()
    ok = [r for r in rows if "ms" in r]
    print("\npass        dtype  L     BV  w  s   ms       TB/s")
    for r in sorted(ok, key=lambda r: (r["dtype"], r["pass_"], r["ms"])):
        print(f"{r['pass_']:<11} {r['dtype']:<6} {r['L']:<5} {r.get('BV', ''):>3} {r.get('warps', ''):>2} "
              f"{r.get('stages', ''):>2} {r['ms']:8.4f} {r.get('TBps', '')}")
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "lightning_configs.json"), "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
