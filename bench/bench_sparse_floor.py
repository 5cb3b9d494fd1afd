"""How fast could block-sparse attention over our selection be at all? A load-only floor, measured.

For the 9B config (B=1, 32/2 heads, D=128, bf16, 96 blocks of 64) and the benchmark's inputs (random q/k/v,
or --inputs smooth: neighbouring tokens alike), this script selects blocks with sala_ops, builds the union of
the selected blocks per tile of tq consecutive tokens (tq = 1 is every token on its own, the one-token kernel's
traffic; tq = 4 the tiled kernel's), and times a kernel that only *loads* each union block's K and V once per
(tile, KV head) and adds them up: no dot products, no softmax, no stores but one number per program. Any
attention kernel that keeps a tile's K/V traffic at one load per union block needs at least this long, so

    floor ratio = SDPA forward (same process) / (selection + this load time)

is an upper bound on what "forward x SDPA" such a design can reach. Prints one line per (T, inputs, tq) and a
JSON list to --out/sparse_floor.json.

    python bench/bench_sparse_floor.py --seqlens 32768 131072 [--inputs random smooth]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


@triton.jit
def _load_union_kernel(K, V, UNI, UCNT, OUT, HKV, sk_t, sk_h, sv_t, sv_h, su_t, su_h,
                       BS: tl.constexpr, D: tl.constexpr):
    tile = tl.program_id(0)
    g = tl.program_id(1)
    n = tl.load(UCNT + tile * HKV + g)
    rows = tl.arange(0, BS)
    d = tl.arange(0, D)
    acc = tl.zeros([BS, D], dtype=tl.float32)
    ub = UNI + tile.to(tl.int64) * su_t + g * su_h
    for s in range(n):
        b = (tl.load(ub + s) >> 32).to(tl.int64)
        kk = tl.load(K + (b * BS + rows)[:, None] * sk_t + g * sk_h + d[None, :])
        vv = tl.load(V + (b * BS + rows)[:, None] * sv_t + g * sv_h + d[None, :])
        acc += kk.to(tl.float32) + vv.to(tl.float32)
    tl.store(OUT + tile * HKV + g, tl.sum(tl.sum(acc, 1), 0))


def _smooth(x, w):
    # the same locally correlated inputs as bench_sparse.py --inputs smooth
    from bench_sparse import _smooth as sm
    return sm(x, w)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqlens", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--inputs", nargs="+", default=["random"], choices=["random", "smooth"])
    ap.add_argument("--smooth", type=int, default=64)
    ap.add_argument("--tq", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    a = ap.parse_args()
    import sala_ops
    from sala_ops.triton import sparse_attn_tiled as TT
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    H, Hkv, D, dev = 32, 2, 128, "cuda"
    cfg = sala_ops.SparseConfig()
    rows = []
    for T in a.seqlens:
        for inp in a.inputs:
            torch.manual_seed(0)
            q = torch.randn(1, T, H, D, device=dev, dtype=torch.bfloat16)
            k = torch.randn(1, T, Hkv, D, device=dev, dtype=torch.bfloat16)
            v = torch.randn(1, T, Hkv, D, device=dev, dtype=torch.bfloat16)
            if inp == "smooth":
                q, k = _smooth(q[0], a.smooth)[None], _smooth(k[0], a.smooth)[None]
            with torch.no_grad():
                sdpa = triton.testing.do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True))
                sel = triton.testing.do_bench(lambda: sala_ops.select_blocks(q, k, config=cfg))
                fwd = triton.testing.do_bench(lambda: sala_ops.sparse_attention(q, k, v, config=cfg))
                idx = sala_ops.select_blocks(q, k, config=cfg).reshape(T, Hkv, -1).contiguous()
            cu = torch.tensor([0, T], device=dev, dtype=torch.int64)
            kp, vp = k[0].contiguous(), v[0].contiguous()
            for tq in a.tq:
                u = TT.tile_union(idx, cu, tq, 1)
                out = torch.empty(u["ucnt"].shape, device=dev, dtype=torch.float32)
                grid = (u["uni"].shape[0], Hkv)

                def load():
                    _load_union_kernel[grid](kp, vp, u["uni"], u["ucnt"], out, Hkv, kp.stride(0), kp.stride(1),
                                             vp.stride(0), vp.stride(1), u["uni"].stride(0), u["uni"].stride(1),
                                             BS=cfg.block_size, D=D, num_warps=4, num_stages=3)
                ms = triton.testing.do_bench(load)
                nblk = int(u["ucnt"].long().sum())
                gb = nblk * 2 * cfg.block_size * D * 2 / 1e9
                r = dict(T=T, inputs=inp, tq=tq, union_blocks=nblk, gbytes=round(gb, 1), load_ms=round(ms, 2),
                         TBps=round(gb / ms, 2), select_ms=round(sel, 2), ours_fwd_ms=round(fwd, 2),
                         sdpa_fwd_ms=round(sdpa, 2), ours_x_sdpa=round(sdpa / fwd, 2),
                         floor_x_sdpa=round(sdpa / (sel + ms), 2), floor_x_sdpa_free_select=round(sdpa / ms, 2))
                rows.append(r)
                print(json.dumps(r), flush=True)
            del q, k, v, idx
            torch.cuda.empty_cache()
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "sparse_floor.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print(f"{'T':>7} {'inputs':>7} {'tq':>3} {'GB':>6} {'load ms':>8} {'TB/s':>5} {'select':>7} {'ours fwd':>9} "
          f"{'sdpa':>7} {'ours x':>6} {'floor x':>7} {'floor x, free select':>20}")
    for r in rows:
        print(f"{r['T']:>7} {r['inputs']:>7} {r['tq']:>3} {r['gbytes']:>6} {r['load_ms']:>8} {r['TBps']:>5} "
              f"{r['select_ms']:>7} {r['ours_fwd_ms']:>9} {r['sdpa_fwd_ms']:>7} {r['ours_x_sdpa']:>6} "
              f"{r['floor_x_sdpa']:>7} {r['floor_x_sdpa_free_select']:>20}")


if __name__ == "__main__":
    main()
