"""Carry Triton's compile and autotune cache between device calls (each GPU machine starts bare).

On the H200 a fresh process spends minutes compiling and autotuning (fla's kernels, our fp32 configs):
2026-11-30, one bench_lightning step spent >150 s before its first 128K fwd+bwd row. The GPU scripts
(bench/gpu_env.sh) therefore run with

    TRITON_CACHE_DIR=/tmp/triton_cache  TRITON_STORE_BINARY_ONLY=1  TRITON_CACHE_AUTOTUNING=1

(binaries + metadata only, and the autotuner's timings on disk), unpack `.triton_cache/` (carried) into
it first, and pack it into $OUT at the end. Files come back from the device in at most 8 files of
16 MiB, so the archive is written in parts of 15 MiB, newest kernels first, up to --max-mb.

    python bench/triton_cache.py pack CACHE_DIR OUT_DIR [--max-mb 45] [--gpu NAME]
    python bench/triton_cache.py unpack CARRY_DIR CACHE_DIR [--gpu NAME]

After a call: `mkdir -p .triton_cache && cp FILES_AT/triton_cache.part* .triton_cache/` and name
`.triton_cache` in the next call's `carry` (it is in .git/info/exclude). The cache keys include the
Triton version, the GPU target and ptxas, and the kernel source, so a stale entry is never used: it
is just a miss.

Autotune timings are kept per GPU model (`--gpu`, the device name): Triton's autotune cache key has the
compile target (cuda:90 for both the H100 and the H200) but not the card, so an H100's choice would be
replayed on the H200 (2026-12-05: our bf16 lightning forward ran 0.559 ms at 32K on the H200 with the
H100's picks, 0.50 ms with its own in session 12). Pack stores them as autotune/<gpu>/<hash>/...;
unpack puts the current GPU's into the cache, parks the others under _other_gpus/ (packed again) and
drops untagged ones (older archives, GPU unknown).
"""
import argparse
import glob
import io
import os
import re
import sys
import tarfile

PART = 15 * 1024 * 1024
OTHER = "_other_gpus"


def gpu_slug(name):
    return re.sub(r"[^A-Za-z0-9]+", "-", name or "").strip("-").lower() or "unknown"


def _is_autotune(files):
    return all(f.endswith(".autotune.json") for f in files)


def _entries(cache_dir, gpu):
    """(mtime, size, arcname prefix, files) per cache entry = one hash directory (kernel binary + metadata, or an
    autotune timing file); autotune entries are filed under autotune/<gpu>/, parked ones under their own GPU."""
    out = []

    def add(d, prefix=None):  # prefix None: this run's cache, autotune entries filed under this GPU
        files = [f for f in glob.glob(os.path.join(d, "*")) if os.path.isfile(f) and ".tmp." not in f]
        if files:
            if prefix is None:
                prefix = f"autotune/{gpu}/" if _is_autotune(files) else ""
            out.append((max(os.path.getmtime(f) for f in files), sum(os.path.getsize(f) for f in files),
                        prefix, files))
    for d in glob.glob(os.path.join(cache_dir, "*")):
        if os.path.isdir(d) and os.path.basename(d) != OTHER:
            add(d)
    for d in glob.glob(os.path.join(cache_dir, OTHER, "*", "*")):
        if os.path.isdir(d):
            add(d, f"autotune/{os.path.basename(os.path.dirname(d))}/")
    return out


def pack(cache_dir, out_dir, max_mb, gpu=""):
    gpu = gpu_slug(gpu)
    entries = _entries(cache_dir, gpu)
    entries.sort(key=lambda e: e[0], reverse=True)  # newest first: what the last call used
    buf = io.BytesIO()
    kept = skipped = 0
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for _, size, prefix, files in entries:
            if buf.tell() + size // 2 > max_mb * 1024 * 1024:
                skipped += 1
                continue
            for f in files:
                tar.add(f, arcname=prefix + os.path.join(os.path.basename(os.path.dirname(f)), os.path.basename(f)))
            kept += 1
    data = buf.getvalue()
    os.makedirs(out_dir, exist_ok=True)
    for old in glob.glob(os.path.join(out_dir, "triton_cache.part*")):
        os.remove(old)
    for i in range(0, len(data), PART):
        with open(os.path.join(out_dir, f"triton_cache.part{i // PART:02d}"), "wb") as f:
            f.write(data[i:i + PART])
    print(f"triton cache: {kept} entries packed ({len(data) / 2**20:.1f} MiB in {(len(data) + PART - 1) // PART} "
          f"parts; autotune timings of {gpu} filed as theirs), {skipped} left out (over {max_mb} MiB)")


def unpack(carry_dir, cache_dir, gpu=""):
    gpu = gpu_slug(gpu)
    parts = sorted(glob.glob(os.path.join(carry_dir, "triton_cache.part*")))
    if not parts:
        print("triton cache: nothing carried")
        return
    data = b"".join(open(p, "rb").read() for p in parts)
    os.makedirs(cache_dir, exist_ok=True)
    mine = parked = dropped = 0
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        members = []
        for m in tar.getmembers():
            if not m.isfile() or m.name.startswith(("/", "..")) or ".." in m.name.split("/"):
                continue
            parts_ = m.name.split("/")
            if parts_[0] == "autotune" and len(parts_) == 4:
                if parts_[1] == gpu:
                    m.name = "/".join(parts_[2:])
                    mine += 1
                else:
                    m.name = "/".join([OTHER] + parts_[1:])
                    parked += 1
            elif m.name.endswith(".autotune.json"):  # untagged: tuned on an unknown card
                dropped += 1
                continue
            members.append(m)
        tar.extractall(cache_dir, members=members)
    print(f"triton cache: {len(members)} files unpacked from {len(parts)} parts; autotune timings: {mine} of {gpu} "
          f"used, {parked} of other GPUs kept aside, {dropped} untagged dropped")


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("cache_dir")
    p.add_argument("out_dir")
    p.add_argument("--max-mb", type=float, default=45)
    p.add_argument("--gpu", default="", help="device name: this run's autotune timings are filed under it")
    u = sub.add_parser("unpack")
    u.add_argument("carry_dir")
    u.add_argument("cache_dir")
    u.add_argument("--gpu", default="", help="device name: only its autotune timings go into the cache")
    a = ap.parse_args()
    if a.cmd == "pack":
        pack(a.cache_dir, a.out_dir, a.max_mb, a.gpu)
    else:
        unpack(a.carry_dir, a.cache_dir, a.gpu)


if __name__ == "__main__":
    sys.exit(main())
