"""Sparse-layer decode step on the GPU: sala_ops.sparse_decode vs SDPA decode over the same cache.

One query token per sequence over L cached tokens (32 query / 2 KV heads, D = 128, bf16, the 9B
sparse-layer config: selection of 96 blocks of 64 from the cached compressed keys + block-sparse
attention). The peer is torch scaled_dot_product_attention with a query of length 1 and
enable_gqa=True over the same K/V (dense: it reads the whole cache); its faster layout of the two
tried (the cache's [B, L, Hkv, D] viewed as [B, Hkv, L, D], or a contiguous [B, Hkv, L, D] copy)
is the baseline. Medians of triton.testing.do_bench, eager and CUDA-graph replay; the append
(K/V row + compressed keys) is timed on its own.

    python bench/bench_sparse_decode.py [--quick] [--out DIR] [--sweep] [--profile] [--variant sort]

"ours" is the default path (SALA_SPARSE_DECODE unset: the fast kernel, sparse_decode_fast.py).
--variant sort|fast also times that path on the same cache, side by side: alt_ms / alt_graph_ms,
alt_ratio / alt_graph_ratio (SDPA / alt), alt_same_idx (its selected blocks equal the default's),
alt_max_diff (max |o_alt - o_default|).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback

if os.environ.get("SALA_BENCH_DRY") == "1":  # before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("SALA_OPS_BACKEND", "triton")

import torch  # noqa: E402
from graph_capture import capture  # noqa: E402  (bench/ is sys.path[0])
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

from sala_ops.sparse_decode import SparseLayerCache, sparse_decode  # noqa: E402

H, HKV, D = 32, 2, 128
DTYPE = torch.bfloat16
DEV = "cuda"
# SALA_BENCH_DRY=1: a CPU dry run of this script's logic (Triton interpreter, tiny sizes, no timing meaning)
DRY = os.environ.get("SALA_BENCH_DRY") == "1"
if DRY:
    H, HKV, D, DTYPE, DEV = 4, 2, 32, torch.float32, "cpu"


def sync():
    if not DRY:
        torch.cuda.synchronize()


def bench(fn, warmup=25, rep=100):
    if DRY:
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def bench_graph(fn, warmup=10, rep=100):
    if DRY:
        return bench(fn)
    return bench(capture(fn).replay, warmup, rep)


def make_cache(B, L, chunk_target=None, headroom=0):
    cache = SparseLayerCache(B, L + headroom, HKV, D, dtype=DTYPE, device=DEV)
    if chunk_target is not None:
        cache.chunk_target = chunk_target
    g = torch.Generator(device=DEV).manual_seed(0)
    k = torch.randn(B, L, HKV, D, device=DEV, dtype=DTYPE, generator=g)
    v = torch.randn(B, L, HKV, D, device=DEV, dtype=DTYPE, generator=g)
    cache.append(k, v)
    del k, v
    sync()
    return cache


def sdpa_fns(cache, q, L):
    qs = q[:, :, None, :]  # [B, H, 1, D]
    kv_view = (cache.k[:, :L].transpose(1, 2), cache.v[:, :L].transpose(1, 2))
    fns = {"view": lambda: F.scaled_dot_product_attention(qs, *kv_view, enable_gqa=True)}
    try:
        kc, vc = (x.contiguous() for x in kv_view)
        fns["contig"] = lambda: F.scaled_dot_product_attention(qs, kc, vc, enable_gqa=True)
    except RuntimeError:  # out of memory: the view alone
        pass
    return fns


def _with_variant(variant, fn):
    """fn run with SALA_SPARSE_DECODE=variant (read at each call; graph capture records the kernels)."""
    def call():
        old = os.environ.get("SALA_SPARSE_DECODE")
        os.environ["SALA_SPARSE_DECODE"] = variant
        try:
            return fn()
        finally:
            if old is None:
                os.environ.pop("SALA_SPARSE_DECODE", None)
            else:
                os.environ["SALA_SPARSE_DECODE"] = old
    return call


def run_case(B, L, chunk_target=None, graphs=True, variant=None):
    cache = make_cache(B, L, chunk_target)
    q = torch.randn(B, H, D, device=DEV, dtype=DTYPE)
    row = dict(B=B, L=L)
    ours = lambda: sparse_decode(q, cache)  # noqa: E731
    ours()
    sync()
    fused = [v for k, v in cache._ws.items() if isinstance(k, tuple) and k[0] == "fused" and v is not None]
    if fused:  # the one-launch step ran (SALA_SPARSE_DECODE_FUSED)
        row["plan"] = dict(fused=True, **{k: v for k, v in fused[0]["cx"].items() if isinstance(v, int)})
    else:
        ws = cache._ws.get(("fast", H)) or cache._ws[H]
        row["plan"] = {k: v for k, v in ws["p"].items() if isinstance(v, int)}
    row["ours_ms"] = bench(ours)
    if variant:
        fast = _with_variant(variant, lambda: sparse_decode(q, cache))
        o_def, i_def = (x.clone() for x in sparse_decode(q, cache, return_indices=True))
        o_fast, i_fast = _with_variant(variant, lambda: sparse_decode(q, cache, return_indices=True))()
        sync()
        row["alt_same_idx"] = bool(torch.equal(i_def, i_fast))
        row["alt_max_diff"] = float((o_fast.float() - o_def.float()).abs().max())
        row["alt"] = variant
        row["alt_ms"] = bench(fast)
    best = None
    for name, fn in sdpa_fns(cache, q, L).items():
        fn()
        t = bench(fn)
        row[f"sdpa_{name}_ms"] = t
        if best is None or t < best[1]:
            best = (name, t, fn)
    row["sdpa_ms"], row["sdpa_layout"] = best[1], best[0]
    row["ratio"] = row["sdpa_ms"] / row["ours_ms"]
    if graphs:
        row["ours_graph_ms"] = bench_graph(ours)
        row["sdpa_graph_ms"] = bench_graph(best[2])
        row["graph_ratio"] = row["sdpa_graph_ms"] / row["ours_graph_ms"]
    if variant:
        row["alt_ratio"] = row["sdpa_ms"] / row["alt_ms"]
        if graphs:
            row["alt_graph_ms"] = bench_graph(fast)
            row["alt_graph_ratio"] = row["sdpa_graph_ms"] / row["alt_graph_ms"]
    # append one token (K/V row + compressed keys + lengths) at position L - 1 (capacity is L), lengths reset
    # each call; L - 1 = 2^k - 1 completes a C1 and a C2 window, the costliest append
    L0 = cache.lengths.clone() - 1
    kn = torch.randn(B, HKV, D, device=DEV, dtype=DTYPE)

    def app():
        cache.lengths.copy_(L0)
        cache.append_token(kn, kn)
    row["append_ms"] = bench(app)
    if graphs:
        row["append_graph_ms"] = bench_graph(app)
    # bytes the step must move at least: selected K/V blocks + compressed keys (fp32)
    sel_bytes = B * HKV * 96 * 64 * D * 2 * 2
    comp_bytes = (cache.c1[:, :(L - 32) // 16 + 1].numel() + cache.c2[:, :(L - 128) // 64 + 1].numel()) * 4
    row["min_bytes"] = sel_bytes + comp_bytes
    row["ours_TBps"] = row["min_bytes"] / (row.get("ours_graph_ms", row["ours_ms"]) * 1e-3) / 1e12
    del cache
    if not DRY:
        torch.cuda.empty_cache()
    return row


def _profiled(step, warmup, steps=20):
    """torch.profiler (CUDA activity) over `steps` calls of step, after `warmup` untimed ones."""
    from torch.profiler import ProfilerActivity, profile
    for _ in range(warmup):
        step()
    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    return prof


def profile_case(B, L, variant=None):
    if variant:
        os.environ["SALA_SPARSE_DECODE"] = variant
    cache = make_cache(B, L)
    q = torch.randn(B, H, D, device=DEV, dtype=DTYPE)
    prof = _profiled(lambda: sparse_decode(q, cache), 5)
    print(f"\nprofile B={B} L={L} variant={variant or 'default'} (20 steps)")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))


# Modes of the fast path for --modes: each entry sets these module knobs of sparse_decode_fast (the rest at
# their defaults); the first entry is the baseline the others' selection and output are compared with.
# SELECT_MODE, SCORE_DOT, KEYS_M, SCORE_WARPS, SELECT_K (0: by size), SELECT_WARPS (0: by size) are read per
# call; CB_BLOCKS (score range), SPB_BLOCKS (attention blocks per split), MERGE_CHUNK shape the workspace,
# which every mode rebuilds.
MODES = [dict(FUSED="0"),  # the multi-launch step
         dict(FUSED="0", PDL=True),  # programmatic dependent launch (H200 run 5: 32K 29.6 vs 32.5 us, 1M 75.3 vs 71.7)
         # the one-launch step (H200 run 5 call 5, 1 stage, 2-block attention tiles: 32K 25.1 us)
         dict(FUSED="1"),
         dict(FUSED="1", FUSED_ATTEND_TILE=0),
         dict(FUSED="1", FUSED_PROGRAMS=32),
         dict(FUSED="1", FUSED_STAGES=2)]
if os.environ.get("SALA_DECODE_MODES"):  # a JSON list of knob dicts instead of the list above
    MODES = json.loads(os.environ["SALA_DECODE_MODES"])
KNOBS = ("SELECT_MODE", "SCORE_DOT", "KEYS_M", "SCORE_WARPS", "SELECT_K", "SELECT_WARPS", "CB_BLOCKS",
         "SPB_BLOCKS", "MERGE_CHUNK", "SELECT_RANGE", "SCORE_PROGRAMS", "ATTEND_MERGE", "PDL", "FUSED",
         "FUSED_PROGRAMS", "FUSED_EARLY", "FUSED_SELECT", "FUSED_ATTEND_TILE", "FUSED_WARPS", "FUSED_STAGES", "FUSED_LSE_LAST",
         "FUSED_MERGE_CHUNKS", "FUSED_LOCAL_EARLY", "FUSED_TAGGED", "FUSED_CARRY", "SB_BLOCKS")  # FUSED_* but FUSED itself: in sparse_decode_fused


def modes_case(B, L, rows):
    """Every MODES entry on one cache and one q: CUDA-graph ms per step, the selection and output against the
    first entry, and the kernel split (torch.profiler, eager)."""
    from sala_ops.triton import sparse_decode_fast as FAST
    from sala_ops.triton import sparse_decode_fused as FUSED
    home = {k: FUSED if k.startswith("FUSED_") else FAST for k in KNOBS}
    cache = make_cache(B, L)
    q = torch.randn(B, H, D, device=DEV, dtype=DTYPE)
    saved = {k: getattr(home[k], k) for k in KNOBS}
    base = None
    try:
        for mode in MODES:
            for k in KNOBS:
                setattr(home[k], k, mode.get(k, saved[k]))
            cache._ws.clear()  # workspace knobs: rebuilt for this mode
            name = ",".join(f"{k}={v}" for k, v in mode.items()) or "default"
            try:
                o, idx = (x.clone() for x in sparse_decode(q, cache, return_indices=True))
                if base is None:
                    base = (o, idx)
                ms = bench_graph(lambda: sparse_decode(q, cache))
                us = {}
                if not DRY:  # the profiler's CUDA activity needs a GPU
                    prof = _profiled(lambda: sparse_decode(q, cache), 3)
                    us = {e.key: e.device_time_total / e.count for e in prof.key_averages() if e.count}
                row = dict(B=B, L=L, mode=name, graph_ms=ms, same_idx=bool(torch.equal(idx, base[1])),
                           max_diff=(o.float() - base[0].float()).abs().max().item(),
                           kernels_us={k: round(v, 1) for k, v in us.items() if k.startswith("_")})
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                row = dict(B=B, L=L, mode=name, error=repr(e))
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        for k, v in saved.items():
            setattr(home[k], k, v)
        cache._ws.clear()
    del cache
    torch.cuda.empty_cache()


def fmt_table(rows):
    cols = ["B", "L", "ours_ms", "sdpa_ms", "ratio", "ours_graph_ms", "sdpa_graph_ms", "graph_ratio", "append_ms",
            "append_graph_ms", "ours_TBps"]
    if any("alt_ms" in r for r in rows):
        cols += ["alt_ms", "alt_ratio", "alt_graph_ms", "alt_graph_ratio", "alt_same_idx"]
    out = [" | ".join(f"{c:>13}" for c in cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            cells.append(f"{v:>13.4f}" if isinstance(v, float) else f"{v!s:>13}")
        out.append(" | ".join(cells))
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="32K and 1M at B=1 only")
    ap.add_argument("--out", default=None, help="write DIR/sparse_decode.json")
    ap.add_argument("--sweep", action="store_true", help="also try selection chunk targets at 1M, B=1")
    ap.add_argument("--profile", action="store_true", help="torch.profiler kernel table at 1M, B=1")
    ap.add_argument("--no-graphs", action="store_true")
    ap.add_argument("--modes", action="store_true",
                    help="only: the fast path's knob modes (MODES) at 1M, 128K and 32K, B=1")
    ap.add_argument("--variant", default=None, choices=["fast", "sort"],
                    help="also time this SALA_SPARSE_DECODE variant side by side with the default")
    args = ap.parse_args()
    sizes = [32 * 1024, 128 * 1024, 1024 * 1024]
    batches = [1] if args.quick else [1, 8]
    if args.quick:
        sizes = [32 * 1024, 1024 * 1024]
    if DRY:
        sizes, batches = [300, 9000], [1, 2]
    info = dict(device="cpu-dry" if DRY else torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                heads=H, kv_heads=HKV, head_dim=D, dtype=str(DTYPE), config="SparseConfig() (9B)")
    print(info, flush=True)
    rows = []
    if args.modes:
        sizes_m = [int(x) for x in os.environ.get("SALA_DECODE_MODES_SIZES", "1048576,131072,32768").split(",")]
        for L in ((9000,) if DRY else sizes_m):
            modes_case(1, L, rows)
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "sparse_decode_modes.json"), "w") as f:
                json.dump(dict(info=info, rows=rows), f, indent=1)
        return

    def save():
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "sparse_decode.json"), "w") as f:
                json.dump(dict(info=info, rows=rows), f, indent=1)

    for B in batches:
        for L in sizes:
            t0 = time.time()
            try:
                r = run_case(B, L, graphs=not args.no_graphs, variant=args.variant)
                rows.append(r)
                print(f"B={B} L={L}: {json.dumps(r)} ({time.time() - t0:.1f}s)", flush=True)
            except Exception as e:  # keep going: report what ran
                traceback.print_exc()
                rows.append(dict(B=B, L=L, error=repr(e)))
                if not DRY:
                    torch.cuda.empty_cache()
            save()
    if args.sweep:
        for ct in (8, 16, 64, 128):
            try:
                r = run_case(1, sizes[-1], chunk_target=ct, graphs=True)
                r["chunk_target"] = ct
                rows.append(r)
                print(f"sweep chunk_target={ct}: {json.dumps(r)}", flush=True)
            except Exception as e:
                traceback.print_exc()
                rows.append(dict(B=1, L=1024 * 1024, chunk_target=ct, error=repr(e)))
            save()
    print()
    print(fmt_table([r for r in rows if "error" not in r]))
    save()
    if args.profile:
        try:
            profile_case(1, sizes[-1])
            profile_case(1, sizes[0])
            if args.variant:
                profile_case(1, sizes[-1], args.variant)
                profile_case(1, sizes[0], args.variant)
        except Exception:
            traceback.print_exc()


if __name__ == "__main__":
    sys.exit(main())
