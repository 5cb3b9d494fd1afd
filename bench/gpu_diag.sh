#!/usr/bin/env bash
# Short diagnostic call (device tool): where the fp32 lightning path stops on the GPU, the sparse
# decode kernel split, and the lightning bench (bf16 fwd, fwd+bwd, decode vs fla). Logs in $OUT.
set -uo pipefail
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || export PYTHONPATH=$PWD:${PYTHONPATH:-}
log="$OUT/diag_log.txt"
: >"$log"
step() {
  local limit=$1 name=$2; shift 2
  local t0=$(date +%s)
  echo "== $name (limit ${limit}s)" | tee -a "$log"
  timeout "$limit" "$@" >>"$log" 2>&1
  echo "== $name: exit $? in $(( $(date +%s) - t0 )) s" | tee -a "$log"
}
for prec in tf32 ieee tf32x3; do
  SALA_LIGHTNING_F32_DOT=$prec CUDA_LAUNCH_BLOCKING=1 DIAG_TIMEOUT=20 step 30 "lightning diag fp32 $prec" python3 bench/diag_lightning.py fp32
done
CUDA_LAUNCH_BLOCKING=1 DIAG_TIMEOUT=20 step 30 "lightning diag bf16" python3 bench/diag_lightning.py bf16
SALA_LIGHTNING_PIN_CONFIG=1 SALA_LIGHTNING_F32_DOT=tf32 CUDA_LAUNCH_BLOCKING=1 DIAG_TIMEOUT=20 step 30 "lightning diag fp32 tf32 pinned config" python3 bench/diag_lightning.py fp32
step 60 "sparse decode profile (default, fast)" python3 bench/bench_sparse_decode.py --quick --variant fast --profile --no-graphs
step 150 "bench_lightning" python3 bench/bench_lightning.py --out "$OUT"
grep -E "^== |start|done|ok |File|line|Error|error" "$log" | head -n 120
