#!/usr/bin/env bash
# Tuning sweeps and variant checks on the H200, one device call each:
#   bash bench/gpu_sweeps.sh lightning     (~6 min)
#   bash bench/gpu_sweeps.sh sparse        (~8 min)
#   bash bench/gpu_sweeps.sh all           (~9.5 min: the decisive parts of both, tighter guards)
#   bash bench/gpu_sweeps.sh adopt         (~9 min: fast selection + tiled forward through the GPU tests and
#                                           the full sparse bench; lightning bench with the pruned fp32 configs)
#   bash bench/gpu_sweeps.sh dq            (~6 min: GPU tests with the tiled dq, then the tiled dq vs the
#                                           one-token dq at 128K / 32K with its sweep)
# Each step is time-guarded; results go to $OUT (or bench/results). 'all' and 'adopt' are the calls of the
# H200 run 2 (bench/NOTES_*.md), kept to reproduce them. Variant switches (read at each call):
#   SALA_LIGHTNING_FWD=walk2|fused   lightning forward variants (measured slower; bench/NOTES_lightning.md)
#   SALA_SPARSE_SELECT=online        the older selection kernel (default: fast)
#   SALA_SPARSE_FWD=onetoken         the older block-sparse forward (default: tiled)
#   SALA_SPARSE_BWD_DQ=tiled         block-sparse dq sharing K/V across token tiles (not measured yet; off)
#   SALA_SPARSE_DECODE=sort          the 5-launch sparse decode step (default: the 3-launch kernel)
set -uo pipefail
source bench/gpu_env.sh
log="$OUT/sweeps_log.txt"
: >"$log"
what=${1:-lightning}
if [ "$what" = all ]; then
CUDA_LAUNCH_BLOCKING=1 step 40 "lightning small fp32 cases (illegal-access check)" python3 bench/diag_lightning.py fp32
step 150 "lightning variants vs fla" python3 bench/bench_lightning.py --variants --out "$OUT"
step 50 "sparse decode gpu tests (both variants)" python3 -m pytest -q -m gpu tests/test_sparse_decode.py
step 80 "sparse decode: default vs fast" python3 bench/bench_sparse_decode.py --quick --variant fast --out "$OUT"
step 170 "sparse tiled sweep 128K" python3 bench/bench_sparse.py --seqlens 131072 --tiled-only --tiled-sweep --smooth 64 --out "$OUT"
step 60 "lightning variants, property tests on cuda" python3 -m pytest -q -x tests/test_lightning_triton.py -k variant
elif [ "$what" = adopt ]; then
step 100 "sparse selection: default vs fast" python3 bench/bench_sparse.py --seqlens 131072 32768 --select-only --out "$OUT/select"
SALA_SPARSE_SELECT=fast SALA_SPARSE_FWD=tiled step 130 "sparse gpu tests, fast select + tiled fwd" python3 -m pytest -q -m gpu tests/test_sparse_triton.py -p no:cacheprovider -rfE
SALA_SPARSE_SELECT=fast SALA_SPARSE_FWD=tiled step 170 "bench_sparse, fast select + tiled fwd" python3 bench/bench_sparse.py --seqlens 32768 131072 65536 --out "$OUT"
step 150 "bench_lightning" python3 bench/bench_lightning.py --out "$OUT"
elif [ "$what" = dq ]; then
SALA_SPARSE_BWD_DQ=tiled step 150 "sparse gpu tests, tiled dq" python3 -m pytest -q -m gpu tests/test_sparse_triton.py -p no:cacheprovider -rfE
step 300 "tiled dq vs one-token dq, sweep" python3 bench/bench_sparse.py --seqlens 131072 32768 --dq-only --dq-sweep --out "$OUT/dq"
elif [ "$what" = lightning ]; then
# correctness of the variants, compiled (the fused lightning forward spins on flags: guard it)
step 120 "lightning variants, property tests on cuda" python3 -m pytest -q -x tests/test_lightning_triton.py -k variant
SALA_LIGHTNING_FWD=walk2 step 60 "walk2 gpu tests" python3 -m pytest -q -m gpu tests/test_lightning_triton.py -k real_heads
SALA_LIGHTNING_FWD=fused step 60 "fused gpu tests" python3 -m pytest -q -m gpu tests/test_lightning_triton.py -k real_heads
step 180 "lightning variants vs fla" python3 bench/bench_lightning.py --variants --out "$OUT"
else
step 300 "sparse tiled sweep" python3 bench/bench_sparse.py --seqlens 131072 32768 --tiled-only --tiled-sweep --smooth 64 --out "$OUT"
step 60 "sparse decode gpu tests (both variants)" python3 -m pytest -q -m gpu tests/test_sparse_decode.py
step 100 "sparse decode: default vs fast" python3 bench/bench_sparse_decode.py --quick --variant fast --profile --out "$OUT"
fi
grep -E "^== |BEST|ratio|speedup" "$log" | tail -n 60
