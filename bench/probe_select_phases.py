"""Where the fast selection's time goes (sala_ops/triton/sparse_select_fast.py), on the GPU.

Times the kernel as shipped and copies of it with one phase cut out of the source (written to a temporary
module, so the shipped kernel carries no debug switch):
  no_topk  - the walk and the LSE, no top-k / compaction (the scores are still stored to the scratch)
  no_walk  - the LSE and the top-k over an unwritten scratch (no C1 walk)
  no_lse   - the walk and the top-k with lse = 0 (no C2 pass)
The cut copies compute wrong indices: only their times mean something. Compression (C1, C2) is timed apart.
The selection's cost does not depend on the values (random inputs, as bench_sparse.py).

    python bench/probe_select_phases.py --seqlens 131072 32768 [--out DIR]
"""
from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

CUTS = {
    "no_topk": [("for r0 in tl.static_range(0, TQ, TSEL):", "for r0 in tl.static_range(0, 0, TSEL):")],
    "no_walk": [("for b0 in range(0, walk_end, SB):", "for b0 in range(0, 0, SB):")],
    "no_lse": [("lse = S.c2_lse(q, C2, c20, n2v, sc2_t, sc2_h, g, d, dm, t_row, qk_scale, ROWS, BN2, KS2, ST2, PREC)",
                "lse = tl.zeros([ROWS], dtype=tl.float32)")],
}


def cut_module(name, edits):
    """A copy of sparse_select_fast with the edits applied, imported from a temporary file."""
    from sala_ops.triton import sparse_select_fast as F
    src = inspect.getsource(F)
    for old, new in edits:
        assert src.count(old) == 1, f"probe_select_phases: the kernel source changed, cannot cut {old!r}"
        src = src.replace(old, new)
    src = src.replace("from . import sparse_select as S", "from sala_ops.triton import sparse_select as S")
    d = tempfile.mkdtemp(prefix="selcut_")
    path = os.path.join(d, f"select_cut_{name}.py")
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location(f"select_cut_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqlens", type=int, nargs="+", default=[131072, 32768])
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    import sala_ops
    from sala_ops.triton import sparse_select as S
    from sala_ops.triton import sparse_select_fast as F
    from bench_sparse import _bench, random_inputs
    cfg = sala_ops.SparseConfig()
    mods = {"full": F, **{n: cut_module(n, e) for n, e in CUTS.items()}}
    rows = []
    for T in a.seqlens:
        q, k, _, _ = random_inputs(T, 32, 2, 128)
        qp, kp = q[0], k[0]
        cu = torch.tensor([0, T], device=qp.device, dtype=torch.int64)
        ks2, st2 = cfg.c2  # the C2 (LSE) window, 4x C1 by default
        args = (qp, kp, cu, cu, 128 ** -0.5, cfg.kernel_size, cfg.kernel_stride, ks2, st2, cfg.block_size, cfg.init_blocks, cfg.window_size, cfg.topk, cfg.dense_len)
        row = {"T": T}
        row["compress_ms"] = _bench(lambda: (S.compress(kp, cu, cfg.kernel_size, cfg.kernel_stride, qp.dtype),
                                             S.compress(kp, cu, ks2, st2, qp.dtype)))
        for name, mod in mods.items():
            row[f"{name}_ms"] = _bench(lambda mod=mod: mod.select(*args))
        # the online kernel (sparse_select.select) picks the same blocks in fp32; in bf16 the two sum the window
        # scores in other orders, so near-ties may flip (H200, session 15: not equal at 32K nor 128K)
        row["equals_online_kernel"] = bool(torch.equal(F.select(*args), S.select(*args)))
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"{'T':>8} | {'compress':>9} | {'full':>8} | {'no_topk':>8} | {'no_walk':>8} | {'no_lse':>8}")
    for r in rows:
        print(f"{r['T']:>8} | {r['compress_ms']:>9.2f} | {r['full_ms']:>8.2f} | {r['no_topk_ms']:>8.2f} | "
              f"{r['no_walk_ms']:>8.2f} | {r['no_lse_ms']:>8.2f}")
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "select_phases.json"), "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
