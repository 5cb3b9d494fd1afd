"""sm_90 AOT compile of the chunk-output kernel (sala_ops/triton/lightning_chunk_out.py) at the 9B linear-layer
shape (H = 32, D = 128, bf16), with the SASS of its main loop summarised: instructions per 64-token block, and
the order of the global->shared copies (LDGSTS), wgmma (HGMMA), wgmma waits, barriers and shared-memory traffic,
so one can see whether the next block's copies are issued before or after the block's products. No GPU needed.

    python bench/aot_lightning_out.py --triton /tmp/t36 [--configs 64:4:2,64:4:3] [--reverse] [--seq]
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def sass_loops(cubin: bytes, nvdisasm: str):
    """[(start, end, [opcode, ...])] for every loop (a backward branch), innermost first by size."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    txt = subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True).stdout
    os.unlink(f.name)
    ins = []  # (addr, opcode, text)
    for ln in txt.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", ln)
        if m:
            body = re.sub(r"^@!?U?P\w+\s+", "", m.group(2).strip())
            ins.append((int(m.group(1), 16), body.split()[0].split(".")[0], body))
    labels = {}
    for ln in txt.splitlines():
        m = re.match(r"^\.(L_x_\d+):", ln.strip())
        if m:
            labels[m.group(1)] = None
    # label addresses: the instruction following the label line
    cur = None
    for ln in txt.splitlines():
        m = re.match(r"^\.(L_x_\d+):", ln.strip())
        if m:
            cur = m.group(1)
            continue
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/", ln)
        if m and cur:
            labels[cur] = int(m.group(1), 16)
            cur = None
    loops = []
    for addr, op, body in ins:
        if op == "BRA":
            m = re.search(r"`\(\.(L_x_\d+)\)", body)
            if m and labels.get(m.group(1)) is not None and labels[m.group(1)] < addr:
                lo = labels[m.group(1)]
                loops.append((lo, addr, [(a, o, b) for a, o, b in ins if lo <= a <= addr]))
    return sorted(loops, key=lambda L: L[1] - L[0], reverse=True)


KEY = ("LDGSTS", "HGMMA", "WARPGROUP", "BAR", "LDGDEPBAR", "DEPBAR", "STS", "LDS", "STG", "LDSM", "SYNCS", "UTMALDG")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--triton", default=None)
    ap.add_argument("--configs", default="64:4:2,64:4:3,64:8:2")
    ap.add_argument("--reverse", action="store_true")
    ap.add_argument("--seq", action="store_true", help="print the key-opcode sequence of the main loop")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--prec", default="tf32", help="PREC constexpr (fp32 inputs: tf32, tf32x3, f16s)")
    ap.add_argument("--tma", action="store_true", help="the TMA variant (_chunk_out_tma_kernel)")
    ap.add_argument("--hist", action="store_true", help="print the main loop's full opcode histogram")
    a = ap.parse_args()
    if a.triton:
        sys.path.insert(0, a.triton)
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    from sala_ops.triton import lightning_chunk_out as LCO
    from aot_common import sm90_compiler, fingerprint
    comp = sm90_compiler(30)
    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    H, D = 32, 128
    dt = a.dtype
    for cfg in a.configs.split(","):
        bv, nw, ns = map(int, cfg.split(":"))
        ptrs = dict(q_ptr=f"*{dt}", k_ptr=f"*{dt}", v_ptr=f"*{dt}", o_ptr=f"*{dt}", st_ptr="*fp32",
                    decay_ptr="*fp32", chunk_start_ptr="*i64", chunk_end_ptr="*i64")
        kern = LCO._chunk_out_v1_kernel.fn
        if a.tma:
            kern = LCO._chunk_out_tma_kernel.fn
            for nm, cols in (("q_desc", D), ("k_desc", D), ("v_desc", bv), ("o_desc", bv)):
                ptrs[nm] = f"tensordesc<{dt}[64, {cols}]>"
        k = comp(f"chunk_out_{'tma' if a.tma else 'v1'} {dt} BV {bv}", kern, ptrs,
                 dict(T=131072, NSS=16, L=8192, H=H, GQ=1, GK=1, GV=1, stride_q=H * D, stride_k=H * D,
                      stride_v=H * D, stride_o=H * D, st_sk=D, st_sv=1),
                 ("out_scale", "kv_mult"),
                 dict(DK=D, DV=D, BK=D, BV=bv, BT=64, REVERSE=a.reverse, IS_VARLEN=False, PREC=a.prec), nw, ns)
        if k is None:
            continue
        loops = sass_loops(k.asm["cubin"], nvdisasm)
        if not loops:
            print("  no loop found")
            continue
        lo, hi, body = loops[0]
        cnt = collections.Counter(o for _, o, _ in body)
        print(f"  ptx {fingerprint(k)}  main loop {len(body)} instructions: "
              + " ".join(f"{o}={cnt[o]}" for o in KEY if cnt[o]))
        if a.hist:
            print("  " + " ".join(f"{o}={n}" for o, n in cnt.most_common()))
        if a.seq:
            seq, last = [], None
            for _, o, b in body:
                if o in KEY:
                    tag = o if o not in ("WARPGROUP", "BAR", "DEPBAR") else b.split()[0]
                    if seq and seq[-1][0] == tag:
                        seq[-1][1] += 1
                    else:
                        seq.append([tag, 1])
            print("  " + " ".join(f"{t}x{n}" if n > 1 else t for t, n in seq))


if __name__ == "__main__":
    main()
