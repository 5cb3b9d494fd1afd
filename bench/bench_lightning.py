"""Benchmark: sala_ops lightning_attention / lightning_attention_step vs fla on an H200.

Peers (same inputs, same process): fla `chunk_simple_gla`, timed both with g = -decay broadcast per token ([B, T, H] fp32 log-decay)
and with g_gamma = -decay ([H], its constant-decay form); the ratio is against the faster of the two
(fwd+bwd: g_gamma only, fla refuses the per-token-g backward on Hopper with triton 3.4-3.7.0), and
`fused_recurrent_simple_gla` for the decode step.
B=1, H=32, D=128, SALA decay slopes; T = 8K, 32K, 128K; bf16 and fp32 inputs; fwd and fwd+bwd.
fp32 inputs: fla's kernels use TF32 tensor-core products (triton's default), so the equal-work
comparison runs ours with torch.set_float32_matmul_precision("high") (TF32 too); the "fp32x3" rows
show ours at torch's default "highest" (TF32x3, near-fp32 accuracy).

Timing: triton.testing.do_bench medians after a warm-up; achieved bandwidth counts the compulsory
traffic only (fwd: read q, k, v + write o; fwd+bwd: that + read q, k, v, dO + write dq, dk, dv),
against the 4.2 TB/s copy ceiling. A numeric check (relative error of our output vs fla's) makes
sure both do the same work.

    python bench/bench_lightning.py --out bench/results
    python bench/bench_lightning.py --variants --out DIR     # forward variants only (bench/NOTES_lightning.md)
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import sala_ops  # noqa: E402
from sala_ops.triton import lightning_chunk as LC  # noqa: E402
from graph_capture import capture  # noqa: E402  (bench/ is sys.path[0])

CEIL = 4.2e12
H, D = 32, 128


def _bench(fn, grad_to_none=None):
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=50, rep=200, grad_to_none=grad_to_none, return_mode="median")


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def _inputs(T, dtype, grad):
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, T, H, D, device="cuda", dtype=dtype, generator=g) for _ in range(3))
    # unit-norm-ish q, k (the SALA layers RMS-normalise q and k)
    q, k = q / D ** 0.25, k / D ** 0.25
    if grad:
        q, k, v = (x.requires_grad_() for x in (q, k, v))
    return q, k, v


def run_chunk(T, dtype, mode, fla, precision, rows, check=True):
    """The released model's call is fla on fp32 copies of the bf16 activations with TF32 products (the model casts
    q, k, v to fp32 before calling fla). Two precisions put ours against it, on the bf16 tensors themselves:
    "released" = our default 16-bit path (what a user of the op gets), "split" = SALA_LIGHTNING_16BIT_DOT=split
    (intermediates kept to ~16 bits: the fp32 call's precision)."""
    released = precision in ("split", "released")
    torch.set_float32_matmul_precision("high" if released else precision)
    decay = sala_ops.sala_decay_slopes(H).cuda()
    scale = D ** -0.5
    grad = mode == "fwd+bwd"
    q, k, v = _inputs(T, dtype, grad)
    do = torch.randn(1, T, H, D, device="cuda", dtype=dtype) if grad else None
    g = (-decay).view(1, 1, H).expand(1, T, H).contiguous()
    g_gamma = (-decay).contiguous()
    pq, pk, pv, pdo = q, k, v, do  # the peer's inputs
    if released:
        pq, pk, pv = (x.detach().float().requires_grad_(grad) for x in (q, k, v))
        pdo = None if do is None else do.float()
        if precision == "split":
            os.environ["SALA_LIGHTNING_16BIT_DOT"] = "split"

    def ours():
        o = sala_ops.lightning_attention(q, k, v, decay, scale=scale).output
        if grad:
            o.backward(do)
        return o

    def peer():  # per-token g (fla's general form); its backward refuses triton 3.4-3.7.0 on Hopper
        o = fla(pq, pk, pv, g=g, scale=scale)[0]
        if grad:
            o.backward(pdo)
        return o

    def peer_gamma():  # fla's constant per-head decay form (g_gamma [H])
        o = fla(pq, pk, pv, g_gamma=g_gamma, scale=scale)[0]
        if grad:
            o.backward(pdo)
        return o

    esz = torch.finfo(dtype).bits // 8
    nbytes = (4 if not grad else 11) * T * H * D * esz
    row = dict(T=T, dtype=str(dtype).split(".")[-1], mode=mode, precision=precision)
    with torch.no_grad() if not grad else torch.enable_grad():
        if check:
            o1 = ours().detach()
            if fla is not None:
                o2 = peer_gamma().detach()
                row["rel_err_vs_fla"] = _rel(o1, o2)
                del o2
            ref_err = _ref_check(q, k, v, decay, scale, o1, peer_dtype=torch.float32 if released else None)
            if ref_err is not None:
                row["ours_rel_err_vs_fp32_ref_first2k"], row["fla_rel_err_vs_fp32_ref_first2k"] = ref_err[:2]
                if released:  # the model rounds the layer's output to bf16 after o_norm: fla's error at that point
                    row["fla_bf16_rounded_rel_err_vs_fp32_ref_first2k"] = ref_err[2]
            del o1
        gtn = [q, k, v] if grad else None
        row["ours_ms"] = _bench(ours, gtn)
        if fla is not None:
            row["fla_gamma_ms"] = _bench(peer_gamma, [pq, pk, pv] if grad else None)
            if not grad and os.environ.get("BENCH_FLA_PER_TOKEN_G") == "1":  # off: minutes of fla autotuning
                row["fla_g_ms"] = _bench(peer, gtn)
            row["fla_ms"] = min(row["fla_gamma_ms"], row.get("fla_g_ms", float("inf")))
            row["speedup"] = row["fla_ms"] / row["ours_ms"]
    row["ours_TBps"] = nbytes / row["ours_ms"] / 1e9
    row["ours_bw_frac"] = row["ours_TBps"] * 1e12 / CEIL
    rows.append(row)
    print({k_: (round(v_, 4) if isinstance(v_, float) else v_) for k_, v_ in row.items()}, flush=True)
    torch.set_float32_matmul_precision("highest")
    if released:
        os.environ.pop("SALA_LIGHTNING_16BIT_DOT", None)
    del q, k, v, do, g
    torch.cuda.empty_cache()


def _ref_check(q, k, v, decay, scale, o, n=2048, peer_dtype=None):
    """Relative error vs the fp32 reference on the first n tokens (zero initial state; the reference is quadratic in
    n), ours and fla's (fla on its inputs cast to peer_dtype if given; then also fla's output rounded to q's dtype)."""
    from sala_ops.reference import lightning as R
    qs, ks, vs = (x.detach()[:, :n].float() for x in (q, k, v))
    ref = R.lightning_parallel(qs, ks, vs, decay, scale)[0]
    out = [_rel(o[:, :n], ref)]
    try:
        from fla.ops.simple_gla import chunk_simple_gla
        cast = (lambda x: x.to(peer_dtype)) if peer_dtype is not None else (lambda x: x)
        with torch.no_grad():
            of = chunk_simple_gla(cast(q.detach()[:, :n].contiguous()), cast(k.detach()[:, :n].contiguous()),
                                  cast(v.detach()[:, :n].contiguous()), g_gamma=-decay, scale=scale)[0]
        out += [_rel(of, ref), _rel(of.to(q.dtype), ref)]
    except Exception:  # noqa: BLE001
        out += [None, None]
    return out


def breakdown(rows, T=131072, dtype=torch.bfloat16):
    """Time of each pass of our forward (local states, scan, chunk outputs) and of the backward."""
    decay = sala_ops.sala_decay_slopes(H).cuda()
    q, k, v = _inputs(T, dtype, False)
    ch = LC.Chunks(1, T, H, D, None, q.device)
    st = LC.local_states(k, v, 1, 1, H, decay, 1.0, False, ch)
    o = torch.empty_like(q)
    row = dict(breakdown=True, T=T, dtype=str(dtype).split(".")[-1], L=ch.L, NS=ch.NS)
    row["local_states_ms"] = _bench(lambda: LC.local_states(k, v, 1, 1, H, decay, 1.0, False, ch))
    st2 = st.clone()
    row["scan_ms"] = _bench(lambda: LC.scan_states(st2, decay, None, True, False, ch))
    row["chunk_outputs_ms"] = _bench(lambda: LC.chunk_outputs(q, k, v, 1, 1, 1, H, o, st, False, decay, D ** -0.5,
                                                                1.0, False, ch))
    do = torch.randn_like(q)
    row["backward_ms"] = _bench(lambda: LC.lightning_chunk_bwd(do, None, q, k, v, decay, st, D ** -0.5, False))
    print(row, flush=True)
    rows.append(row)


def run_step(fla_rec, rows):
    decay = sala_ops.sala_decay_slopes(H).cuda()
    q, k, v = (torch.randn(1, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    state = torch.randn(1, H, D, D, device="cuda", dtype=torch.float32)
    g = (-decay).view(1, 1, H).contiguous()

    def ours():
        return sala_ops.lightning_attention_step(q, k, v, state, decay, inplace=True)[0]

    def peer():
        return fla_rec(q[:, None], k[:, None], v[:, None], g=g, initial_state=state, output_final_state=True)[0]

    row = dict(T=1, dtype="bfloat16", mode="decode", precision="-")
    s0 = state.clone()
    o1 = ours()
    state.copy_(s0)
    if fla_rec is not None:
        o2 = peer()[:, 0]
        row["rel_err_vs_fla"] = _rel(o1, o2)
    row["ours_ms"] = _bench(ours)
    if fla_rec is not None:
        row["fla_ms"] = _bench(peer)
        row["speedup"] = row["fla_ms"] / row["ours_ms"]
    for name, fn in (("ours", ours), ("fla", peer if fla_rec is not None else None)):
        if fn is None:
            continue
        row[f"{name}_graph_ms"] = _bench(capture(fn).replay)
    if "fla_graph_ms" in row:
        row["graph_speedup"] = row["fla_graph_ms"] / row["ours_graph_ms"]
    rows.append(row)
    print({k_: (round(v_, 4) if isinstance(v_, float) else v_) for k_, v_ in row.items()}, flush=True)


def sweep(rows):
    """Chunk length L / block BT sweep for our op alone (tuning aid)."""
    decay = sala_ops.sala_decay_slopes(H).cuda()
    for T in (32768, 131072):
        for dtype in (torch.bfloat16,):
            q, k, v = _inputs(T, dtype, True)
            do = torch.randn_like(q)
            for L, BT in ((512, 64), (1024, 64), (2048, 64), (4096, 64), (8192, 64), (2048, 128), (4096, 128)):
                LC.CHUNK_OVERRIDE = (L, BT)
                try:
                    with torch.no_grad():
                        f = _bench(lambda: sala_ops.lightning_attention(q, k, v, decay))

                    def fb():
                        sala_ops.lightning_attention(q, k, v, decay).output.backward(do)
                    fbm = _bench(fb, [q, k, v])
                    row = dict(sweep=True, T=T, L=L, BT=BT, fwd_ms=f, fwdbwd_ms=fbm)
                except Exception as e:  # noqa: BLE001
                    row = dict(sweep=True, T=T, L=L, BT=BT, error=repr(e)[:200])
                print(row, flush=True)
                rows.append(row)
            LC.CHUNK_OVERRIDE = None
            del q, k, v, do
            torch.cuda.empty_cache()


def variants(rows, fla, names=("default", "walk2", "fused"), Ts=(32768, 131072), fused_ls=(512, 1024)):
    """Forward variants (SALA_LIGHTNING_FWD, sala_ops/triton/lightning_fwd_variants.py) vs fla, bf16 and fp32
    (fp32 at matmul precision "high": TF32 products like fla). Each variant is checked against the default
    forward's output and final state; fused also runs with each sub-chunk length in `fused_ls`."""
    runs = [(n, None) for n in names if n != "fused"] + [("fused", lf) for lf in fused_ls if "fused" in names]
    decay = sala_ops.sala_decay_slopes(H).cuda()
    scale = D ** -0.5
    for dtype, prec in ((torch.bfloat16, "highest"), (torch.float32, "high")):
        torch.set_float32_matmul_precision(prec)
        for T in Ts:
            q, k, v = _inputs(T, dtype, False)
            base = dict(variants=True, T=T, dtype=str(dtype).split(".")[-1], precision=prec)
            fla_ms = None
            if fla is not None:
                g_gamma = (-decay).contiguous()
                with torch.no_grad():
                    fla_ms = _bench(lambda: fla(q, k, v, g_gamma=g_gamma, scale=scale)[0])
            os.environ.pop("SALA_LIGHTNING_FWD", None)
            with torch.no_grad():
                o0, f0 = sala_ops.lightning_attention(q, k, v, decay, scale=scale, output_final_state=True)
            for name, lf in runs:
                os.environ["SALA_LIGHTNING_FWD"] = name
                if lf is not None:
                    os.environ["SALA_LIGHTNING_FUSED_L"] = str(lf)
                row = dict(base, variant=name + ("" if lf is None else f"/LF={lf}"), fla_gamma_ms=fla_ms)
                try:
                    with torch.no_grad():
                        o1, f1 = sala_ops.lightning_attention(q, k, v, decay, scale=scale, output_final_state=True)
                        row["rel_err_vs_default"] = _rel(o1, o0)
                        row["final_rel_err_vs_default"] = _rel(f1, f0)
                        del o1, f1
                        row["ours_ms"] = _bench(lambda: sala_ops.lightning_attention(q, k, v, decay, scale=scale))
                    if fla_ms is not None:
                        row["speedup_vs_fla"] = fla_ms / row["ours_ms"]
                    row["ours_TBps"] = 4 * T * H * D * (torch.finfo(dtype).bits // 8) / row["ours_ms"] / 1e9
                except Exception as e:  # noqa: BLE001
                    row["error"] = repr(e)[:300]
                finally:
                    os.environ.pop("SALA_LIGHTNING_FWD", None)
                    os.environ.pop("SALA_LIGHTNING_FUSED_L", None)
                print({k_: (round(v_, 4) if isinstance(v_, float) else v_) for k_, v_ in row.items()}, flush=True)
                rows.append(row)
            del q, k, v, o0, f0
            torch.cuda.empty_cache()
        torch.set_float32_matmul_precision("highest")
    print()
    print(f"{'variant':16} {'dtype':9} {'T':>7} {'ours ms':>9} {'fla ms':>9} {'x fla':>6} {'TB/s':>6} {'err vs default':>14}")
    for r in rows:
        if r.get("variants"):
            print(f"{r['variant']:16} {r['dtype']:9} {r['T']:>7} {r.get('ours_ms', float('nan')):9.4f} "
                  f"{(r['fla_gamma_ms'] or float('nan')):9.4f} {r.get('speedup_vs_fla', float('nan')):6.2f} "
                  f"{r.get('ours_TBps', float('nan')):6.2f} {r.get('rel_err_vs_default', float('nan')):14.2e}"
                  + (f"  ERROR {r['error'][:80]}" if "error" in r else ""))


class _Rows(list):
    """Rows, saved to OUT/lightning.json after every append (a killed run keeps what it measured)."""

    def __init__(self, out):
        super().__init__()
        self.out = out

    def append(self, row):
        super().append(row)
        if self.out:
            os.makedirs(self.out, exist_ok=True)
            with open(os.path.join(self.out, "lightning.json"), "w") as f:
                json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                               triton=triton.__version__, rows=list(self)), f, indent=1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--T", default="8192,32768,131072")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--no-fla", action="store_true")
    ap.add_argument("--sweep-only", action="store_true")
    ap.add_argument("--variants", action="store_true",
                    help="only time the forward variants (SALA_LIGHTNING_FWD) vs fla at 32K and 128K, bf16 and fp32")
    ap.add_argument("--cases", default=None,
                    help="only these chunked cases, no decode/breakdown: DTYPE:MODE:PRECISION,... "
                         "e.g. bfloat16:fwd+bwd:highest,float32:fwd:high; bfloat16:fwd:released = ours (default "
                         "16-bit path) vs fla on fp32 copies (the released model's call); bfloat16:fwd:split = the "
                         "same with SALA_LIGHTNING_16BIT_DOT=split")
    args = ap.parse_args()
    fla = fla_rec = None
    if not args.no_fla:
        try:
            from fla.ops.simple_gla import chunk_simple_gla as fla
            from fla.ops.simple_gla import fused_recurrent_simple_gla as fla_rec
        except Exception as e:  # noqa: BLE001
            print(f"fla not available: {e!r}")
    rows = _Rows(args.out)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    if args.variants:
        variants(rows, fla)
        return
    if args.sweep_only:
        sweep(rows)
        return
    Ts = [int(t) for t in args.T.split(",")]
    if args.cases:
        for case in args.cases.split(","):
            dt, mode, prec = case.split(":")
            dtype = getattr(torch, dt)
            for T in Ts:
                peer = fla if prec != "highest" or dtype != torch.float32 else None
                run_chunk(T, dtype, mode, peer, prec, rows, check=mode == "fwd")
        _table(rows)
        return
    run_step(fla_rec, rows)
    breakdown(rows)
    for dtype, precisions in ((torch.bfloat16, ["highest"]), (torch.float32, ["high", "highest"])):
        for mode in ("fwd", "fwd+bwd"):
            for T in Ts:
                for prec in precisions:
                    if dtype == torch.float32 and prec == "highest" and mode != "fwd":
                        continue
                    peer = fla if prec != "highest" or dtype != torch.float32 else None
                    run_chunk(T, dtype, mode, peer, prec, rows)
    if args.sweep:
        sweep(rows)
    _table(rows)


def _table(rows):
    print()
    hdr = f"{'op':8} {'dtype':9} {'prec':8} {'T':>7} {'ours ms':>9} {'fla ms':>9} {'ratio':>6} {'TB/s':>6} {'%ceil':>6} {'rel err':>9}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        if r.get("sweep") or r.get("breakdown"):
            continue
        fla_ms = r.get("fla_ms")
        print(f"{r['mode']:8} {r['dtype']:9} {r['precision']:8} {r['T']:>7} {r['ours_ms']:9.4f} "
              f"{(fla_ms if fla_ms is not None else float('nan')):9.4f} {r.get('speedup', float('nan')):6.2f} "
              f"{r.get('ours_TBps', float('nan')):6.2f} {100 * r.get('ours_bw_frac', float('nan')):6.1f} "
              f"{r.get('rel_err_vs_fla', float('nan')):9.2e}")
        if r.get("ours_rel_err_vs_fp32_ref_first2k") is not None:  # precision side by side
            fla_in = "fp32" if r["precision"] in ("split", "released") else r["dtype"]
            line = f"{'  vs fp32 ref (2K tokens): ours':40} {r['ours_rel_err_vs_fp32_ref_first2k']:.2e}"
            if r.get("fla_rel_err_vs_fp32_ref_first2k") is not None:
                line += f", fla {fla_in} {r['fla_rel_err_vs_fp32_ref_first2k']:.2e}"
            if r.get("fla_bf16_rounded_rel_err_vs_fp32_ref_first2k") is not None:
                line += f", fla rounded to {r['dtype']} {r['fla_bf16_rounded_rel_err_vs_fp32_ref_first2k']:.2e}"
            print(line)
        if r["mode"] == "decode":
            print(f"{'  graph':8} {'':9} {'':8} {'':>7} {r['ours_graph_ms']:9.4f} "
                  f"{r.get('fla_graph_ms', float('nan')):9.4f} {r.get('graph_speedup', float('nan')):6.2f}")


if __name__ == "__main__":
    main()
