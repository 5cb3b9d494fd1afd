"""Carry Triton's compile and autotune cache between device calls (each GPU machine starts bare).

On the H200 a fresh process spends minutes compiling and autotuning (fla's kernels, our fp32 configs):
2026-11-30, one bench_lightning step spent >150 s before its first 128K fwd+bwd row. The GPU scripts
(bench/gpu_env.sh) therefore run with

    TRITON_CACHE_DIR=/tmp/triton_cache  TRITON_STORE_BINARY_ONLY=1  TRITON_CACHE_AUTOTUNING=1

(binaries + metadata only, and the autotuner's timings on disk), unpack `.triton_cache/` (carried) into
it first, and pack it into $OUT at the end. Files come back from the device in at most 8 files of
16 MiB, so the archive is written in parts of 15 MiB, newest kernels first, up to --max-mb.

    python bench/triton_cache.py pack CACHE_DIR OUT_DIR [--max-mb 45]
    python bench/triton_cache.py unpack CARRY_DIR CACHE_DIR

After a call: `mkdir -p .triton_cache && cp FILES_AT/triton_cache.part* .triton_cache/` and name
`.triton_cache` in the next call's `carry` (it is in .git/info/exclude). The cache keys include the
Triton version, the GPU target and ptxas, and the kernel source, so a stale entry is never used: it
is just a miss.
"""
import argparse
import glob
import io
import os
import sys
import tarfile

PART = 15 * 1024 * 1024


def pack(cache_dir, out_dir, max_mb):
    # one cache entry = one hash directory (kernel binary + metadata, or an autotune timing file)
    entries = []
    for d in glob.glob(os.path.join(cache_dir, "*")):
        if os.path.isdir(d):
            files = [f for f in glob.glob(os.path.join(d, "*")) if os.path.isfile(f) and ".tmp." not in f]
            if files:
                size = sum(os.path.getsize(f) for f in files)
                entries.append((max(os.path.getmtime(f) for f in files), size, d, files))
    entries.sort(reverse=True)  # newest first: what the last call used
    buf = io.BytesIO()
    kept = skipped = 0
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for _, size, d, files in entries:
            if buf.tell() + size // 2 > max_mb * 1024 * 1024:
                skipped += 1
                continue
            for f in files:
                tar.add(f, arcname=os.path.relpath(f, cache_dir))
            kept += 1
    data = buf.getvalue()
    os.makedirs(out_dir, exist_ok=True)
    for old in glob.glob(os.path.join(out_dir, "triton_cache.part*")):
        os.remove(old)
    for i in range(0, len(data), PART):
        with open(os.path.join(out_dir, f"triton_cache.part{i // PART:02d}"), "wb") as f:
            f.write(data[i:i + PART])
    print(f"triton cache: {kept} entries packed ({len(data) / 2**20:.1f} MiB in {(len(data) + PART - 1) // PART} "
          f"parts), {skipped} left out (over {max_mb} MiB)")


def unpack(carry_dir, cache_dir):
    parts = sorted(glob.glob(os.path.join(carry_dir, "triton_cache.part*")))
    if not parts:
        print("triton cache: nothing carried")
        return
    data = b"".join(open(p, "rb").read() for p in parts)
    os.makedirs(cache_dir, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        members = [m for m in tar.getmembers() if m.isfile() and not m.name.startswith(("/", ".."))]
        tar.extractall(cache_dir, members=members)
    print(f"triton cache: {len(members)} files unpacked from {len(parts)} parts")


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("cache_dir")
    p.add_argument("out_dir")
    p.add_argument("--max-mb", type=float, default=45)
    u = sub.add_parser("unpack")
    u.add_argument("carry_dir")
    u.add_argument("cache_dir")
    a = ap.parse_args()
    if a.cmd == "pack":
        pack(a.cache_dir, a.out_dir, a.max_mb)
    else:
        unpack(a.carry_dir, a.cache_dir)


if __name__ == "__main__":
    sys.exit(main())
