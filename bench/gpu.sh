#!/usr/bin/env bash
# The GPU loop, one call on the H200 (device tool), from the repository root:
#   bash bench/gpu.sh
# installs the peers carried as wheels (.whl/, e.g. fla-core), runs the gpu-marked tests, then the
# benchmarks (most decisive first, each under a time guard so one slow step cannot eat the lease),
# and prints a short table last. Logs and JSON go to $OUT (device tool) or bench/results.
set -uo pipefail
source bench/gpu_env.sh
log="$OUT/gpu_log.txt"
{
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  python3 -c "import fla; print('fla', fla.__version__)" 2>/dev/null || echo "fla not installed: peer columns will be empty"
} 2>&1 | tee "$log"


step "${T_TESTS:-240}" "gpu tests" python3 -m pytest -q -m gpu tests -p no:cacheprovider -rfE
tests_rc=$?
grep -E "passed|failed|error" "$log" | tail -n 3
step "${T_HYPE:-60}" bench_hype python3 bench/bench_hype.py --out "$OUT"
step "${T_LIGHTNING:-120}" bench_lightning python3 bench/bench_lightning.py --out "$OUT"
step "${T_DECODE:-90}" bench_sparse_decode python3 bench/bench_sparse_decode.py --quick --out "$OUT"
step "${T_SPARSE:-150}" bench_sparse python3 bench/bench_sparse.py --out "$OUT"
# the CPU-tier property tests again, now compiled on the GPU at tiny shapes (GPU-only faults show here)
HYPOTHESIS_PROFILE=ci step "${T_PROPS:-120}" "kernel property tests on cuda" python3 -m pytest -q -m "not gpu" \
  tests/test_lightning_triton.py tests/test_hype_triton.py tests/test_sparse_triton.py tests/test_sparse_decode.py \
  -p no:cacheprovider -rfE
python3 bench/summary.py "$OUT" | tee -a "$log"
echo "gpu tests exit code: $tests_rc"
exit "$tests_rc"
