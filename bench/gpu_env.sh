# Sourced by the GPU scripts (bench/gpu.sh, gpu_sweeps.sh, gpu_diag.sh) on the device machine, from the
# repository root: peers' wheels (.whl/, carried), the editable install (so `sala_ops.reference` maps
# to reference/), and a Triton compile + autotune cache that travels between calls (bench/triton_cache.py:
# carry `.triton_cache`, copy FILES_AT/triton_cache.part* back into it after each call).
# At exit the results (json, png) are packed into $OUT/results.tar.gz: only 8 files come back per call.
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-gpu}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl 2>/dev/null \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || export PYTHONPATH=$PWD:${PYTHONPATH:-}
python3 -c "import sala_ops.reference" || { echo "sala_ops is not importable: stop"; exit 3; }
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton_cache} TRITON_STORE_BINARY_ONLY=1 TRITON_CACHE_AUTOTUNING=1
GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)  # autotune timings are per card
python3 bench/triton_cache.py unpack .triton_cache "$TRITON_CACHE_DIR" --gpu "$GPU_NAME"

step() {  # step SECONDS NAME COMMAND...: run with a time guard, log everything into $log, report the exit code
  local limit=$1 name=$2; shift 2
  local t0=$(date +%s)
  echo "== $name (limit ${limit}s)" | tee -a "$log"
  timeout "$limit" "$@" >>"$log" 2>&1
  local rc=$?
  echo "== $name: exit $rc in $(( $(date +%s) - t0 )) s" | tee -a "$log"
  return $rc
}

step_unless_0() {  # step_unless_0 SECONDS NAME COMMAND...: step, or nothing (success) when SECONDS is 0
  [ "$1" -gt 0 ] || return 0
  step "$@"
}

gpu_env_finish() {
  python3 bench/triton_cache.py pack "$TRITON_CACHE_DIR" "$OUT" --max-mb 40 --gpu "$GPU_NAME"
  ( cd "$OUT" && files=$(ls | grep -v -E '^(triton_cache\.part[0-9]+|results\.tar\.gz|[a-z_]*log\.txt)$') \
      && [ -n "$files" ] && tar -czf results.tar.gz $files && rm -rf $files )
}
trap gpu_env_finish EXIT
