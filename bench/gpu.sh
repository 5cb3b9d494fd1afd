#!/usr/bin/env bash
# The GPU loop, one call on the H200 (device tool), from the repository root:
#   bash bench/gpu.sh [quick]
# installs the peers carried as wheels (.whl/, e.g. fla-core), runs the gpu-marked tests, then every
# benchmark, and prints a short table last. Logs and JSON go to $OUT (device tool) or bench/results.
set -uo pipefail
OUT=${OUT:-bench/results}
mkdir -p "$OUT" bench/results
export PYTHONUNBUFFERED=1 HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-gpu}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || export PYTHONPATH=$PWD:${PYTHONPATH:-}
log="$OUT/gpu_log.txt"
{
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  python3 -c "import fla; print('fla', fla.__version__)" 2>/dev/null || echo "fla not installed: peer columns will be empty"
} 2>&1 | tee "$log"

start=$(date +%s)
python3 -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tee -a "$log" | tail -n 25
tests_rc=${PIPESTATUS[0]}
echo "gpu tests: exit $tests_rc, $(( $(date +%s) - start )) s" | tee -a "$log"

for b in bench/bench_*.py; do
  [ -e "$b" ] || continue
  echo "== $b" | tee -a "$log"
  python3 "$b" --out "$OUT" ${1:+--quick} >>"$log" 2>&1 || echo "$b failed (see log)" | tee -a "$log"
done
cp "$OUT"/*.json bench/results/ 2>/dev/null || true
python3 bench/summary.py "$OUT" | tee -a "$log"
echo "gpu tests exit code: $tests_rc"
exit "$tests_rc"
