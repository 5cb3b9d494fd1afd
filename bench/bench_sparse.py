"""InfLLM-V2 sparse attention (sala_ops, selection included) vs dense SDPA and fla's parallel_nsa.

One process, one GPU: B=1, 32 query / 2 KV heads, D=128, bf16, the 9B sparse configuration (96 blocks
of 64 = top-64 + 32-block local window, C1 32/16, C2 128/64). For every T in --seqlens:
  ours      sala_ops.sparse_attention (compression + selection + block-sparse attention)
  select    sala_ops.select_blocks alone (its share of `ours` fwd)
  sdpa      torch.nn.functional.scaled_dot_product_attention(causal, enable_gqa=True)
  nsa64     fla.ops.nsa.parallel_nsa given 64 block indices per token (no selection cost; the
            anchors say 96 blocks do not compile in its backward)
fwd and fwd+bwd medians with triton.testing.do_bench (warm-up first), ratios vs SDPA, and peak extra
memory (torch.cuda.max_memory_allocated minus the memory held before the call).

    python bench/bench_sparse.py [--seqlens 32768 65536 131072] [--out DIR] [--sweep]

--sweep also times the attention kernels under a few launch configurations. Writes DIR/sparse.json
(DIR/sparse_smooth.json with --inputs smooth: q and k locally correlated, closer to a trained model).

Tiled forward (sala_ops/triton/sparse_attn_tiled.py, K/V shared across tiles of consecutive tokens):
every run adds `attn96_tiled_fwd_ms` (union build + kernels, TILED_CFG), `tiled_union_ms` (the union
build alone) and the union statistics, next to `attn96_fwd_ms` (the one-token kernel), and checks
that both forwards agree. --tiled-sweep times tq in {4, 8, 16} x hybrid thresholds x warps/stages
(kernels alone, given the union) for random q and for q smoothed over --smooth tokens (neighbouring
queries alike, as in a trained model; random q is the worst case for tile overlap) and prints the
mean union size per tile. --tiled-only skips everything else (ours/SDPA/nsa end to end).

    python bench/bench_sparse.py --seqlens 131072 32768 --tiled-only --tiled-sweep

Tiled dq (sala_ops/triton/sparse_attn_tiled.py::backward_dq, the default since run 8; SALA_SPARSE_BWD_DQ=onetoken: the older kernel): every
run that times the backward adds `attn96_bwd_tiled_dq_ms` (whole backward, union build included) next to
`attn96_bwd_ms`, `max_abs_diff_dq_tiled_vs_onetoken`, and under `tiled_dq` the dq kernels alone (one-token
vs tiled given the union) and the union build. --dq-only skips everything else; --dq-sweep tries tq x
hybrid threshold x warps/stages (TILED_DQ_CFG).

    python bench/bench_sparse.py --seqlens 131072 32768 --dq-only --dq-sweep

Fast selection (sala_ops/triton/sparse_select_fast.py, SALA_SPARSE_SELECT=fast): every full run adds
`select_fast_ms` next to `select_ms` and the fraction of (token, KV head) rows whose indices differ
from the default kernel's (`select_fast_mismatch_rows`); --select-only times just the two selections
(with --sweep: the fast kernel's tq / sb / warps / stages / programs-per-SM).

    python bench/bench_sparse.py --seqlens 131072 32768 65536 --select-only --sweep
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _bench(fn, grad_to_none=None):
    import triton
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=50, rep=300, grad_to_none=grad_to_none, return_mode="median")


def _peak(fn):
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 30


def _try(results, key, fn):
    try:
        results[key] = fn()
    except Exception as e:  # keep going: one failing peer must not hide the other numbers
        results[key] = None
        results[key + "_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        traceback.print_exc()


def random_inputs(T, H, Hkv, D, dev="cuda"):
    """q, k, v, do [1, T, heads, D] bf16, randn with seed 0 (the inputs of every sparse benchmark)."""
    torch.manual_seed(0)
    q = torch.randn(1, T, H, D, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, T, Hkv, D, device=dev, dtype=torch.bfloat16)
    v = torch.randn(1, T, Hkv, D, device=dev, dtype=torch.bfloat16)
    do = torch.randn(1, T, H, D, device=dev, dtype=torch.bfloat16)
    return q, k, v, do


def packed_setup(T, H=32, Hkv=2, D=128, dev="cuda"):
    """The sweeps' common start: random_inputs, the 9B config's selection, one packed sequence ([T, heads, D]
    views qp, kp, vp, dop; cu, tok_seq ts) and the one-token forward's o / lse over the selection, as a namespace
    (also q, k, v, do [1, T, heads, D], cfg, idx [T, Hkv, S], scale)."""
    import types
    import sala_ops
    from sala_ops.triton import sparse_attn as A
    q, k, v, do = random_inputs(T, H, Hkv, D, dev)
    cfg = sala_ops.SparseConfig()
    idx = sala_ops.select_blocks(q, k, config=cfg).reshape(T, Hkv, -1).contiguous()
    cu = torch.tensor([0, T], device=dev, dtype=torch.int64)
    ts = A.token_seq(cu, T)
    qp, kp, vp, dop = (x.reshape(T, x.shape[2], D) for x in (q, k, v, do))
    scale = D ** -0.5
    o, lse = A.forward(qp, kp, vp, idx, cu, cu, ts, scale, 64)
    return types.SimpleNamespace(q=q, k=k, v=v, do=do, cfg=cfg, idx=idx, cu=cu, ts=ts, qp=qp, kp=kp, vp=vp, dop=dop,
                                 scale=scale, o=o, lse=lse)


def write_results(out_dir, name, rows, t0):
    """out_dir/name: the rows with the device, versions and wall seconds since t0 (every sparse benchmark's JSON)."""
    import triton
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "seconds": time.time() - t0, "times": "ms, triton.testing.do_bench median", "rows": rows}
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    with open(path, "w") as f:
        json.dump(meta, f, indent=1)
    return path


def fwdbwd_fns(q, k, v, do, cfg):
    """One fwd+bwd of sala_ops.sparse_attention (selection included) and one of causal GQA SDPA, on the same leaf
    tensors q, k, v [1, T, heads, D] (requires_grad) and do; time them as _bench(fn, [q, k, v])."""
    import sala_ops

    def ours_fb():
        sala_ops.sparse_attention(q, k, v, config=cfg).backward(do)

    def sdpa_fb():
        torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
            enable_gqa=True).backward(do.transpose(1, 2))
    return ours_fb, sdpa_fb


def run_one(T, args, out_rows):
    import sala_ops
    from sala_ops.triton import sparse_attn as A
    H, Hkv, D = 32, 2, 128
    dev = "cuda"
    q, k, v, do = random_inputs(T, H, Hkv, D, dev)
    if args.inputs == "smooth":  # neighbouring queries and keys alike, as in a trained model (see _smooth)
        q, k = _smooth(q[0], args.smooth)[None], _smooth(k[0], args.smooth)[None]
    q, k, v = (x.contiguous().requires_grad_(True) for x in (q, k, v))
    cfg = sala_ops.SparseConfig()
    r = {"T": T, "H": H, "Hkv": Hkv, "D": D, "blocks": cfg.num_selected, "inputs": args.inputs}
    grads = [q, k, v]

    def ours_fwd():
        with torch.no_grad():
            return sala_ops.sparse_attention(q, k, v, config=cfg)

    ours_fb, sdpa_fb = fwdbwd_fns(q, k, v, do, cfg)

    def select():
        return sala_ops.select_blocks(q, k, config=cfg)

    def sdpa_fwd():
        with torch.no_grad():
            return torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True)

    def select_fast():  # SALA_SPARSE_SELECT=fast is read per call
        saved = os.environ.get("SALA_SPARSE_SELECT")
        os.environ["SALA_SPARSE_SELECT"] = "fast"
        try:
            return sala_ops.select_blocks(q, k, config=cfg)
        finally:
            if saved is None:
                os.environ.pop("SALA_SPARSE_SELECT", None)
            else:
                os.environ["SALA_SPARSE_SELECT"] = saved

    if args.select_only:
        _try(r, "fast_select", lambda: fast_select_bench(T, select, select_fast, args))
        r.update(r.pop("fast_select", None) or {})
        out_rows.append(r)
        print(json.dumps(r), flush=True)
        del q, k, v, do
        torch.cuda.empty_cache()
        return
    if not (args.tiled_only or args.dq_only):
        _try(r, "ours_fwd_ms", lambda: _bench(ours_fwd))
        _try(r, "select_ms", lambda: _bench(select))
        _try(r, "fast_select", lambda: fast_select_bench(T, select, select_fast, args, time_default=False))
        r.update(r.pop("fast_select", None) or {})
        if r.get("select_ms") and r.get("select_fast_ms"):
            r["select_fast_speedup"] = r["select_ms"] / r["select_fast_ms"]
        _try(r, "ours_fwdbwd_ms", lambda: _bench(ours_fb, grads))
        _try(r, "ours_fwd_peak_gib", lambda: _peak(ours_fwd))
        _try(r, "ours_fwdbwd_peak_gib", lambda: _peak(ours_fb))
        for x in grads:
            x.grad = None
        _try(r, "sdpa_fwd_ms", lambda: _bench(sdpa_fwd))
        _try(r, "sdpa_fwdbwd_ms", lambda: _bench(sdpa_fb, grads))
        _try(r, "sdpa_fwd_peak_gib", lambda: _peak(sdpa_fwd))
        _try(r, "sdpa_fwdbwd_peak_gib", lambda: _peak(sdpa_fb))
        for x in grads:
            x.grad = None

    # attention alone, given our indices (to compare with nsa on equal terms and for --sweep)
    idx96 = select().reshape(T, Hkv, -1).contiguous()
    cu = torch.tensor([0, T], device=dev, dtype=torch.int64)
    ts = A.token_seq(cu, T)
    qp, kp, vp = (x.detach().reshape(T, x.shape[2], D) for x in (q, k, v))
    scale = D ** -0.5

    def attn96():
        return A.forward(qp, kp, vp, idx96, cu, cu, ts, scale, 64)
    _try(r, "attn96_fwd_ms", lambda: _bench(attn96))
    o96, lse96 = attn96()
    if not args.tiled_only:
        _try(r, "attn96_bwd_ms", lambda: _bench(lambda: A.backward(do.reshape(T, H, D), qp, kp, vp, o96, lse96, idx96,
                                                                     cu, cu, ts, scale, 64)))
        _try(r, "tiled_dq", lambda: tiled_dq_bench(T, qp, kp, vp, do.reshape(T, H, D), o96, lse96, idx96, cu, ts,
                                                   scale, args))
        for key in ("attn96_bwd_tiled_dq_ms", "max_abs_diff_dq_tiled_vs_onetoken"):
            r[key] = (r.get("tiled_dq") or {}).pop(key, None)
    if not args.dq_only:
        _try(r, "tiled", lambda: tiled_bench(T, qp, kp, vp, idx96, cu, ts, scale, o96, lse96, args))
    if r.get("tiled"):
        for key in ("attn96_tiled_fwd_ms", "tiled_union_ms"):
            r[key] = r["tiled"].pop(key, None)
    if args.sweep:
        sweep = {}
        saved = dict(A.FWD_CFG)
        for w, s in ((4, 2), (4, 3), (4, 4), (8, 3), (2, 3)):
            A.FWD_CFG.update(num_warps=w, num_stages=s)
            _try(sweep, f"fwd_w{w}_s{s}", lambda: _bench(attn96))
        A.FWD_CFG.update(saved)
        saved = dict(A.DKDV_CFG)
        for w, rows, ch in ((8, 64, 256), (4, 64, 256), (8, 128, 256), (4, 32, 256), (8, 64, 1024)):
            A.DKDV_CFG.update(num_warps=w, rows=rows, chunk=ch)
            _try(sweep, f"bwd_dkdv_w{w}_r{rows}_c{ch}", lambda: _bench(
                lambda: A.backward(do.reshape(T, H, D), qp, kp, vp, o96, lse96, idx96, cu, cu, ts, scale, 64)))
        A.DKDV_CFG.update(saved)
        from sala_ops.triton import sparse_select as S
        saved = dict(S.SELECT_CFG)
        for w, rows in ((8, 64), (4, 64), (8, 128), (4, 32)):
            S.SELECT_CFG.update(num_warps=w, rows=rows)
            _try(sweep, f"select_w{w}_r{rows}", lambda: _bench(select))
        S.SELECT_CFG.update(saved)
        r["sweep"] = sweep
        print(json.dumps(sweep, indent=1), flush=True)

    if args.tiled_only or args.dq_only:
        out_rows.append(r)
        print(json.dumps(r), flush=True)
        del q, k, v, do
        torch.cuda.empty_cache()
        return

    # fla parallel_nsa, 64 given blocks (top-32 + the 32-block window from our own selector)
    def nsa_setup():
        from fla.ops.nsa import parallel_nsa
        idx64 = sala_ops.select_blocks(q, k, config=sala_ops.SparseConfig(topk=32)).long()
        return parallel_nsa, idx64
    try:
        parallel_nsa, idx64 = nsa_setup()

        def nsa_fwd():
            with torch.no_grad():
                return parallel_nsa(q, k, v, block_indices=idx64, block_counts=64, block_size=64)

        def nsa_fb():
            parallel_nsa(q, k, v, block_indices=idx64, block_counts=64, block_size=64).backward(do)
        _try(r, "nsa64_fwd_ms", lambda: _bench(nsa_fwd))
        _try(r, "nsa64_fwdbwd_ms", lambda: _bench(nsa_fb, grads))
        _try(r, "nsa64_fwd_peak_gib", lambda: _peak(nsa_fwd))
    except Exception as e:
        r["nsa64_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        traceback.print_exc()

    def ratio(a, b):
        return None if r.get(a) is None or r.get(b) is None else r[a] / r[b]
    r["speedup_fwd_vs_sdpa"] = ratio("sdpa_fwd_ms", "ours_fwd_ms")
    r["speedup_fwdbwd_vs_sdpa"] = ratio("sdpa_fwdbwd_ms", "ours_fwdbwd_ms")
    r["speedup_fwd_vs_nsa64"] = ratio("nsa64_fwd_ms", "ours_fwd_ms")
    r["speedup_fwdbwd_vs_nsa64"] = ratio("nsa64_fwdbwd_ms", "ours_fwdbwd_ms")
    r["select_share_of_fwd"] = ratio("select_ms", "ours_fwd_ms")
    out_rows.append(r)
    print(json.dumps(r), flush=True)
    del q, k, v, do
    torch.cuda.empty_cache()


def fast_select_bench(T, select, select_fast, args, time_default=True):
    """The fast selection (sala_ops/triton/sparse_select_fast.py) next to the default kernel: time, and
    the fraction of (token, KV head) rows / index entries where the two differ (bf16: near-ties may
    reorder if the two kernels' dot products round differently; the fp32 interpreter tests are exact)."""
    from sala_ops.triton import sparse_select_fast as F
    res = {}
    nbp = 1 << max(0, -(-T // 64) - 1).bit_length()
    res["select_fast_fallback"] = nbp > F.FAST_CFG["nbp_max"]  # True: the default kernel ran instead
    res["select_fast_cfg"] = dict(F.FAST_CFG)
    if time_default:
        _try(res, "select_ms", lambda: _bench(select))
    a, b = select(), select_fast()
    rows = (a != b).any(-1)
    res["select_fast_mismatch_rows"] = float(rows.float().mean())
    res["select_fast_mismatch_entries"] = float((a != b).float().mean())
    # blocks chosen by one and not the other, per row, where they differ (set difference / 96)
    if bool(rows.any()):
        ar, br = a[rows].long(), b[rows].long()
        nb = int(max(ar.max(), br.max())) + 2
        ma = torch.zeros(ar.shape[0], nb, device=ar.device).scatter_(1, ar + 1, 1.0)[:, 1:]
        mb = torch.zeros(br.shape[0], nb, device=br.device).scatter_(1, br + 1, 1.0)[:, 1:]
        res["select_fast_set_diff_in_mismatched_rows"] = float((ma != mb).float().sum(1).mean() / 2)
    del a, b
    _try(res, "select_fast_ms", lambda: _bench(select_fast))
    if res.get("select_ms") is not None and res.get("select_fast_ms"):
        res["select_fast_speedup"] = res["select_ms"] / res["select_fast_ms"]
    print(f"T={T} fast select {res}", flush=True)
    if args.sweep and not res["select_fast_fallback"]:
        saved = dict(F.FAST_CFG)
        sweep = {}
        # 8 warps: one program per SM (215-245 registers); 4 warps: two (255 registers, no spill on sm_90).
        # 2026-12-03 (before this list): 4 warps / 3 stages 28.2 ms, 4 / 2 30.1, 8 / 3 44.7, tq 8 8 / 3 34.1
        for tq, sb, w, st, pps, se in ((4, 16, 4, 3, 2, 8192), (4, 16, 4, 4, 2, 8192), (4, 16, 4, 3, 2, 4096),
                                      (4, 16, 4, 3, 4, 8192), (4, 8, 4, 3, 2, 8192), (4, 16, 8, 3, 2, 8192),
                                      (8, 16, 8, 3, 2, 8192)):
            F.FAST_CFG.update(tq=tq, sb=sb, num_warps=w, num_stages=st, programs_per_sm=pps, sel_elems=se)
            key = f"fast_tq{tq}_sb{sb}_w{w}_s{st}_pps{pps}_sel{se}"
            _try(sweep, key, lambda: _bench(select_fast))
            print(f"T={T} {key}: {_fmt(sweep.get(key))} ms", flush=True)
        F.FAST_CFG.clear()
        F.FAST_CFG.update(saved)
        res["select_fast_sweep"] = sweep
    return res


def _smooth(x, w):
    """Moving sum over the last w tokens / sqrt(w) (dim 0): unit variance, neighbours share (w - d) / w
    of their noise - a stand-in for the similar neighbouring queries of a trained model."""
    if w <= 1:
        return x
    c = torch.cumsum(x.float(), 0)
    c = torch.cat([torch.zeros_like(c[:1]), c])
    i = torch.arange(x.shape[0], device=x.device)
    lo = (i + 1 - w).clamp(min=0)
    return ((c[i + 1] - c[lo]) / (i + 1 - lo).float().sqrt()[:, None, None]).to(x.dtype)


def tiled_bench(T, qp, kp, vp, idx96, cu, ts, scale, o96, lse96, args):
    """The tiled forward next to the one-token kernel (given indices); --tiled-sweep: its configurations."""
    import sala_ops
    from sala_ops.triton import sparse_attn as A, sparse_attn_tiled as TT
    res = {"cfg": dict(TT.TILED_CFG)}
    o, lse = TT.forward(qp, kp, vp, idx96, cu, cu, ts, scale, 64)
    fin = torch.isfinite(lse96)
    res["max_abs_diff_o_vs_onetoken"] = float((o.float() - o96.float()).abs().max())
    res["max_abs_diff_lse_vs_onetoken"] = float((lse[fin] - lse96[fin]).abs().max())
    res["lse_inf_pattern_equal"] = bool(torch.equal(torch.isinf(lse), torch.isinf(lse96)))
    del o, lse
    _try(res, "attn96_tiled_fwd_ms", lambda: _bench(lambda: TT.forward(qp, kp, vp, idx96, cu, cu, ts, scale, 64)))
    _try(res, "tiled_union_ms", lambda: _bench(lambda: TT.tile_union(idx96, cu, TT.TILED_CFG["tq"],
                                                                        TT.TILED_CFG["min_share"])))
    res["union"] = TT.union_stats(TT.tile_union(idx96, cu, TT.TILED_CFG["tq"], TT.TILED_CFG["min_share"]))
    print(f"T={T} tiled {res}", flush=True)
    if not args.tiled_sweep:
        return res
    saved = dict(TT.TILED_CFG)
    variants = [("random_q", idx96)]
    if args.smooth > 1:
        qs = _smooth(qp, args.smooth)
        idx_s = sala_ops.select_blocks(qs[None], kp[None], config=sala_ops.SparseConfig())[0].contiguous()
        variants.append((f"smooth{args.smooth}_q", idx_s))
    shares = {4: (1, 2), 8: (1, 2, 3), 16: (1, 3, 5)}
    launch = {4: ((4, 2), (4, 3), (8, 2)), 8: ((8, 2), (8, 3), (4, 2)), 16: ((16, 2), (8, 2), (16, 3))}
    sweep = {}
    for name, idx in variants:
        qv = qp if name == "random_q" else qs
        sw = sweep[name] = {"onetoken_ms": None}
        _try(sw, "onetoken_ms", lambda: _bench(lambda: A.forward(qv, kp, vp, idx, cu, cu, ts, scale, 64)))
        for tq in (4, 8, 16):
            best = None
            for ms in shares[tq]:
                u = TT.tile_union(idx, cu, tq, ms)
                key = f"tq{tq}_share{ms}"
                sw[key] = TT.union_stats(u)
                TT.TILED_CFG.update(num_warps=launch[tq][0][0], num_stages=launch[tq][0][1])
                _try(sw[key], "union_ms", lambda: _bench(lambda: TT.tile_union(idx, cu, tq, ms)))
                _try(sw[key], "kernels_ms", lambda: _bench(
                    lambda: TT.forward(qv, kp, vp, idx, cu, cu, ts, scale, 64, tq=tq, min_share=ms, union=u)))
                t = sw[key].get("kernels_ms")
                if t is not None and (best is None or t < best[1]):
                    best = (ms, t)
                print(f"T={T} {name} {key}: {sw[key]}", flush=True)
            if best is None:
                continue
            u = TT.tile_union(idx, cu, tq, best[0])
            for w, st in launch[tq][1:]:
                TT.TILED_CFG.update(num_warps=w, num_stages=st)
                key = f"tq{tq}_share{best[0]}_w{w}_s{st}"
                _try(sw, key, lambda: _bench(
                    lambda: TT.forward(qv, kp, vp, idx, cu, cu, ts, scale, 64, tq=tq, min_share=best[0], union=u)))
                print(f"T={T} {name} {key}: {sw.get(key)}", flush=True)
            del u
        TT.TILED_CFG.update(saved)
        # best configuration: kernels + union build (the union build is the same for every launch config)
        cands = []
        for key, val in sw.items():
            if isinstance(val, dict) and val.get("kernels_ms") is not None:
                cands.append((val["kernels_ms"] + (val.get("union_ms") or 0), key, val["union_mean"]))
            elif isinstance(val, float) and key != "onetoken_ms":
                base = sw.get(key.rsplit("_w", 1)[0], {})
                cands.append((val + (base.get("union_ms") or 0), key, base.get("union_mean")))
        if cands:
            t, key, um = min(cands)
            sw["best"] = {"config": key, "ms_with_union": t, "union_mean": um, "onetoken_ms": sw.get("onetoken_ms")}
            print(f"T={T} {name} BEST tiled {key}: {t:.2f} ms incl. union build (union {um:.0f} blocks/tile); "
                  f"one-token kernel {_fmt(sw.get('onetoken_ms'))} ms", flush=True)
    res["sweep"] = sweep
    return res


@contextlib.contextmanager
def _env(name, value):
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


def tiled_dq_bench(T, qp, kp, vp, do, o96, lse96, idx96, cu, ts, scale, args):
    """The backward over given indices with the tiled dq (SALA_SPARSE_BWD_DQ=tiled, TILED_DQ_CFG) next to the
    default (one-token dq): whole backward (union build included), the dq kernels alone, dq agreement;
    --dq-sweep: tq x hybrid threshold x warps/stages of the tiled dq (kernels alone, given the union)."""
    from sala_ops.triton import sparse_attn as A, sparse_attn_tiled as TT
    cfg = dict(TT.TILED_DQ_CFG)
    res = {"cfg": cfg}

    def bwd(u=None):
        return A.backward(do, qp, kp, vp, o96, lse96, idx96, cu, cu, ts, scale, 64, dq_union=u)
    dq0 = bwd()[0]
    with _env("SALA_SPARSE_BWD_DQ", "tiled"):
        dq1 = bwd()[0]
        res["max_abs_diff_dq_tiled_vs_onetoken"] = float((dq1.float() - dq0.float()).abs().max())
        res["max_abs_dq"] = float(dq0.float().abs().max())
        res["dq_nan"] = bool(torch.isnan(dq1).any())
        del dq0, dq1
        _try(res, "attn96_bwd_tiled_dq_ms", lambda: _bench(bwd))
        u = TT.tile_union(idx96, cu, cfg["tq"], cfg["min_share"])
        _try(res, "attn96_bwd_tiled_dq_given_union_ms", lambda: _bench(lambda: bwd(u)))
    delta = (o96.float() * do.float()).sum(-1)
    _try(res, "dq_onetoken_ms", lambda: _bench(
        lambda: A.backward_dq(do, qp, kp, vp, lse96, delta, idx96, cu, cu, ts, scale, 64)))
    _try(res, "dq_tiled_given_union_ms", lambda: _bench(
        lambda: TT.backward_dq(do, qp, kp, vp, lse96, delta, idx96, cu, cu, ts, scale, 64, union=u, tq=cfg["tq"])))
    _try(res, "union_ms", lambda: _bench(lambda: TT.tile_union(idx96, cu, cfg["tq"], cfg["min_share"])))
    del u
    print(f"T={T} tiled dq {res}", flush=True)
    if not args.dq_sweep:
        return res
    sweep = res["sweep"] = {}
    launch = {4: ((4, 2), (4, 3), (8, 2), (8, 3)), 8: ((8, 2), (8, 3), (4, 2))}
    best = None
    try:
        for tq, shares in ((4, (1, 2)), (8, (1, 2, 3))):
            for ms in shares:
                u = TT.tile_union(idx96, cu, tq, ms)
                _try(sweep, f"union_tq{tq}_share{ms}_ms", lambda: _bench(lambda: TT.tile_union(idx96, cu, tq, ms)))
                for w, st in launch[tq]:
                    TT.TILED_DQ_CFG.update(tq=tq, min_share=ms, num_warps=w, num_stages=st)
                    key = f"tq{tq}_share{ms}_w{w}_s{st}"
                    _try(sweep, key, lambda: _bench(lambda: TT.backward_dq(
                        do, qp, kp, vp, lse96, delta, idx96, cu, cu, ts, scale, 64, union=u, tq=tq)))
                    t = sweep.get(key)
                    un = sweep.get(f"union_tq{tq}_share{ms}_ms")
                    if t is not None and (best is None or t + (un or 0) < best[0]):
                        best = (t + (un or 0), key)
                    print(f"T={T} tiled dq {key}: {_fmt(t)} ms (+ union {_fmt(un)} ms)", flush=True)
                del u
    finally:
        TT.TILED_DQ_CFG.update(cfg)
    if best:
        sweep["best"] = {"config": best[1], "ms_with_union": best[0], "onetoken_ms": res.get("dq_onetoken_ms")}
        print(f"T={T} BEST tiled dq {best[1]}: {best[0]:.2f} ms incl. union build; one-token dq "
              f"{_fmt(res.get('dq_onetoken_ms'))} ms", flush=True)
    return res


def _fmt(x, p=2):
    return "-" if x is None else f"{x:.{p}f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqlens", type=int, nargs="+", default=[32768, 65536, 131072])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--tiled-sweep", action="store_true", help="sweep the tiled forward (tq, hybrid share, warps)")
    ap.add_argument("--tiled-only", action="store_true", help="only the attention forwards given indices")
    ap.add_argument("--dq-only", action="store_true",
                    help="only the backward over given indices: one-token vs tiled dq (SALA_SPARSE_BWD_DQ=tiled)")
    ap.add_argument("--dq-sweep", action="store_true", help="sweep the tiled dq (tq, hybrid share, warps, stages)")
    ap.add_argument("--smooth", type=int, default=64, help="--tiled-sweep: also q smoothed over this many tokens")
    ap.add_argument("--inputs", choices=["random", "smooth"], default="random",
                    help="main run: i.i.d. randn q/k/v, or q and k smoothed over --smooth tokens (locally correlated)")
    ap.add_argument("--select-only", action="store_true",
                    help="only the selection: default vs fast (SALA_SPARSE_SELECT=fast) kernel, time and agreement; "
                         "with --sweep also the fast kernel's launch configurations")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_sparse: needs a CUDA GPU")
        return 1
    rows = []
    t0 = time.time()
    for T in args.seqlens:
        run_one(T, args, rows)
    hdr = ("T", "ours fwd", "sdpa fwd", "x", "nsa64 fwd", "sel %", "select", "sel fast", "attn fwd", "tiled fwd", "union",
           "attn bwd", "bwd tdq", "ours f+b",
           "sdpa f+b", "x", "nsa64 f+b", "mem ours GiB", "mem sdpa GiB")
    print("\n" + " | ".join(f"{h:>10}" for h in hdr))
    for r in rows:
        vals = (str(r["T"]), _fmt(r.get("ours_fwd_ms")), _fmt(r.get("sdpa_fwd_ms")), _fmt(r.get("speedup_fwd_vs_sdpa")),
                _fmt(r.get("nsa64_fwd_ms")), _fmt(None if r.get("select_share_of_fwd") is None else 100 * r["select_share_of_fwd"], 0),
                _fmt(r.get("select_ms")), _fmt(r.get("select_fast_ms")), _fmt(r.get("attn96_fwd_ms")), _fmt(r.get("attn96_tiled_fwd_ms")),
                _fmt(((r.get("tiled") or {}).get("union") or {}).get("union_mean"), 0),
                _fmt(r.get("attn96_bwd_ms")), _fmt(r.get("attn96_bwd_tiled_dq_ms")),
                _fmt(r.get("ours_fwdbwd_ms")), _fmt(r.get("sdpa_fwdbwd_ms")), _fmt(r.get("speedup_fwdbwd_vs_sdpa")),
                _fmt(r.get("nsa64_fwdbwd_ms")), _fmt(r.get("ours_fwdbwd_peak_gib")), _fmt(r.get("sdpa_fwdbwd_peak_gib")))
        print(" | ".join(f"{x:>10}" for x in vals))
    name = "sparse.json" if args.inputs == "random" else f"sparse_{args.inputs}.json"
    print(f"wrote {write_results(args.out, name, rows, t0)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
