#!/usr/bin/env bash
# The GPU loop on the H200 (device tool), from the repository root, in calls that fit the 10-minute limit:
#   bash bench/gpu.sh tests    # gpu-marked tests, one time guard per file, then the CPU-tier property
#                              # tests compiled on the GPU, one guard (T_PROPS) per file (from a cold compile
#                              # cache this needs more than one 10-minute call: the carried cache makes the next faster)
#   bash bench/gpu.sh bench    # every benchmark against its peer, table last (~8 min)
#   bash bench/gpu.sh extra    # decode profile, host overhead (normal / cached launch), sparse on locally
#                              # correlated q/k, tiled dq vs one-token dq, 1M fast selection (~9 min)
#   bash bench/gpu.sh diag     # decode host overhead, the small-shape lightning diag, lightning fp32 vs
#                              # fla (~6 min)
#   bash bench/gpu.sh decode   # sparse decode: modes sweep, gpu tests, the benchmark (~8 min)
#   bash bench/gpu.sh fused    # sparse decode: the one-launch step's phases (per FUSED_DIAG_ENVS) and modes, decode +
#                              # layer gpu tests, the bench, the quick bench per FUSED_BENCH_ENVS (~8 min)
#   bash bench/gpu.sh select   # sparse prefill: gpu tests, fast-selection config sweep at 128K, bench_sparse,
#                              # the load-only floor (bench_sparse_floor.py) (~8 min)
#   bash bench/gpu.sh proof    # one call for a scarce device: the sparse hybrid passes' and the dk/dv launch sweeps + f+b
#                              # at 128K, lightning vs fla bf16 and vs the released call (fla on fp32 copies; ours
#                              # default and split; LSPLIT_T, LSPLIT_CASES), the split / f16s / chunk-output tests, the
#                              # sparse gpu tests (guards T_HYBRID, T_DKDV, T_LSPLIT, T_LOUT_TESTS, T_TESTS_FILE; 0 skips
#                              # a step) (~9.5 min with all)
#   bash bench/gpu.sh lightning  # chunk-output variants (LOUT_VARIANTS) timed (fwd, fwd+bwd), the forward vs fla per
#                              # LFWD_ENVS entry (comma-separated env assignments, "none" = defaults), fp32 inputs vs
#                              # fla per LF32_ENVS entry, bf16 with SALA_LIGHTNING_16BIT_DOT=split vs fla on fp32 copies
#                              # (T_LSPLIT=0 skips it), the variants' tests (~8 min)
#   bash bench/gpu.sh lightlong  # lightning gpu tests with the 1M checked segment, fwd and fwd+bwd vs fla at 32K/128K
#                              # (LFB_CASES) (~8 min)
#   bash bench/gpu.sh tune     # sparse decode knob sweep + every lightning forward config timed (~9 min)
#   bash bench/gpu.sh all      # tests, bench, extra (longer per-call limits only)
# Carry [".whl", ".triton_cache"] (bench/gpu_env.sh: peers' wheels, compile + autotune cache); after the
# call copy FILES_AT/triton_cache.part* into .triton_cache/ for the next one. Logs in $OUT/gpu_log.txt,
# JSON and the plot in $OUT/results.tar.gz. Guards are T_* environment variables (seconds).
set -uo pipefail
source bench/gpu_env.sh
what=${1:-all}
log="$OUT/gpu_log.txt"
{
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  python3 -c "import fla; print('fla', fla.__version__)" 2>/dev/null || echo "fla not installed: peer columns will be empty"
} 2>&1 | tee "$log"
tests_rc=0
if [ "$what" = tests ] || [ "$what" = all ]; then
  for f in lightning_triton sparse_triton sparse_decode hype_triton layers examples; do
    step "${T_TESTS_FILE:-150}" "gpu tests: $f" python3 -m pytest -q -m gpu "tests/test_$f.py" -p no:cacheprovider -rfE \
      --durations=5 || { rc=$?; [ $rc -ne 5 ] && tests_rc=$rc; }  # 5 = no gpu test in the file
  done
  grep -E "passed|failed|error" "$log" | tail -n 8
  # the CPU-tier property tests again, compiled on the GPU at tiny shapes (GPU-only faults show here: session 15 found
  # the torch.compile and hype failures this way). One guard per file: in one step, a file compiling from a cold
  # cache used the whole guard and hid the files after it.
  for f in sparse_triton hype_triton sparse_decode lightning_triton api; do
    HYPOTHESIS_PROFILE=ci step "${T_PROPS:-120}" "kernel property tests on cuda: $f" python3 -m pytest -q -m "not gpu" \
      "tests/test_$f.py" -p no:cacheprovider -rfE --tb=short || tests_rc=$?
  done
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  step "${T_HYPE:-45}" bench_hype python3 bench/bench_hype.py --out "$OUT"
  step "${T_LIGHTNING:-150}" bench_lightning python3 bench/bench_lightning.py --out "$OUT"
  # B = 1 then 8, at 32K, 128K and 1M cached tokens (issue 5), the sort path side by side
  step "${T_DECODE:-130}" bench_sparse_decode python3 bench/bench_sparse_decode.py --variant sort --out "$OUT"
  step "${T_SPARSE:-180}" bench_sparse python3 bench/bench_sparse.py --seqlens 32768 131072 65536 --out "$OUT"
  python3 bench/summary.py "$OUT" | tee -a "$log"
fi
if [ "$what" = extra ] || [ "$what" = all ]; then
  step 60 "sparse decode profile (kernel split)" python3 bench/bench_sparse_decode.py --quick --profile --no-graphs
  step 40 "decode host overhead (plain call vs graph)" python3 bench/bench_host_overhead.py --cuda
  SALA_OPS_FAST_LAUNCH=1 step 40 "decode host overhead, cached launch" python3 bench/bench_host_overhead.py --cuda
  step "${T_SPARSE_SMOOTH:-100}" "bench_sparse, locally correlated q/k" python3 bench/bench_sparse.py --seqlens 131072 32768 \
    --inputs smooth --out "$OUT"
  step 150 "sparse backward: tiled dq vs one-token dq" python3 bench/bench_sparse.py --seqlens 131072 32768 --dq-only \
    --out "$OUT/dq"
  SALA_SPARSE_SELECT_MAX_BLOCKS=65536 step 150 "1M-token sparse forward, fast selection with the chunked search" \
    python3 -m pytest -q -m gpu tests/test_sparse_triton.py -k one_million -p no:cacheprovider -rfE --durations=3
fi
if [ "$what" = decode ]; then
  step 200 "sparse decode modes (select / score dot / layout / warps) at 1M and 32K" python3 bench/bench_sparse_decode.py \
    --modes --out "$OUT/modes"
  step 150 "gpu tests: sparse_decode, layers" python3 -m pytest -q -m gpu tests/test_sparse_decode.py tests/test_layers.py -p no:cacheprovider -rfE \
    --durations=5 || tests_rc=$?
  step 150 bench_sparse_decode python3 bench/bench_sparse_decode.py --variant sort --out "$OUT"
  grep -E "^== |mode|passed|failed|Error| \| " "$log" | head -n 80
fi
if [ "$what" = fused ]; then  # the one-launch sparse decode step (SALA_SPARSE_DECODE_FUSED) against the launches
  # FUSED_DIAG_ENVS: one diag run per entry, each a comma-separated list of environment assignments
  for e in ${FUSED_DIAG_ENVS:-SALA_SPARSE_DECODE_FUSED_SELECT=auto}; do
    [ "$e" = none ] && continue
    step 90 "fused step: time per phase ($e)" env ${e//,/ } python3 bench/diag_decode_fused.py --out "$OUT/diag_${e//[^A-Za-z0-9]/_}"
  done
  SALA_DECODE_MODES_SIZES=${SALA_DECODE_MODES_SIZES:-131072,65536,32768} step 150 "sparse decode modes" \
    python3 bench/bench_sparse_decode.py --modes --out "$OUT/modes"
  step 240 "gpu tests: sparse_decode, layers" python3 -m pytest -q -m gpu tests/test_sparse_decode.py tests/test_layers.py \
    -p no:cacheprovider -rfE --durations=5 || tests_rc=$?
  step 150 "bench_sparse_decode (defaults)" python3 bench/bench_sparse_decode.py --out "$OUT"
  for e in ${FUSED_BENCH_ENVS:-}; do  # B = 1 at 32K and 1M with other knobs (as FUSED_DIAG_ENVS), SDPA in the same process
    step 100 "bench_sparse_decode --quick ($e)" env ${e//,/ } python3 bench/bench_sparse_decode.py --quick \
      --out "$OUT/bench_${e//[^A-Za-z0-9]/_}"
  done
  grep -E "^== |\"mode\"|\"span_us\"|passed|failed|Error| \| " "$log" | cut -c1-600 | head -n 80
fi
if [ "$what" = select ]; then  # sparse prefill: GPU tests, the fast selection's config sweep at 128K, the full bench
  step "${T_TESTS_FILE:-200}" "gpu tests: sparse_triton" python3 -m pytest -q -m gpu tests/test_sparse_triton.py \
    -p no:cacheprovider -rfE --durations=5 || tests_rc=$?
  step "${T_SEL_SWEEP:-150}" "sparse selection: configs at 128K" python3 bench/bench_sparse.py --seqlens 131072 \
    --select-only --sweep --out "$OUT/select"
  step "${T_SPARSE:-200}" bench_sparse python3 bench/bench_sparse.py --seqlens 32768 131072 65536 --out "$OUT"
  step "${T_FLOOR:-150}" "sparse attention load-only floor" python3 bench/bench_sparse_floor.py --seqlens 32768 131072 \
    --inputs random smooth --out "$OUT"
  grep -E "^== |passed|failed|Error|fast_tq| \| |^ *[0-9]+ +(random|smooth)|^ +T +inputs" "$log" | cut -c1-300 | head -n 80
fi
if [ "$what" = proof ]; then  # a step whose guard is 0 is skipped (e.g. T_DKDV=0)
  step_unless_0 "${T_HYBRID:-150}" "sparse hybrid passes: launch configurations (128K)" \
    python3 bench/sweep_sparse_hybrid.py --seqlens 131072 --out "$OUT"
  step_unless_0 "${T_DKDV:-170}" "sparse dk/dv configurations (128K)" python3 bench/sweep_sparse_dkdv.py \
    --seqlens 131072 --budget "${DKDV_BUDGET:-100}" --out "$OUT"
  # ours vs fla bf16 (highest), ours (default 16-bit path, then split) vs fla on fp32 copies (the released call)
  step_unless_0 "${T_LSPLIT:-130}" "lightning vs fla bf16 and vs the released call (fla on fp32 copies)" \
    python3 bench/bench_lightning.py --T "${LSPLIT_T:-32768,131072}" \
    --cases "${LSPLIT_CASES:-bfloat16:fwd:released,bfloat16:fwd:split,bfloat16:fwd:highest}" --out "$OUT/split"
  step_unless_0 "${T_LOUT_TESTS:-150}" "lightning chunk-output, f16s and split tests" \
    python3 -m pytest -q tests/test_lightning_chunk_out.py tests/test_lightning_triton.py \
    -k "not gpu_ and (chunk_out or tma or f16s or 16bit or variant)" -p no:cacheprovider -rfE || tests_rc=$?
  step_unless_0 "${T_TESTS_FILE:-110}" "gpu tests: sparse_triton" python3 -m pytest -q -m gpu \
    tests/test_sparse_triton.py -p no:cacheprovider -rfE --durations=5 || tests_rc=$?
  grep -E "^== |^[0-9]+ w|^[0-9]+ [a-z_]+ w[0-9]|^\{|^T \||^[a-z_]+ +\||^f\+b ms|^[0-9]+ \||^(op|fwd|fwd\+bwd) |  vs fp32 ref|passed|failed|Error| \| " \
    "$log" | cut -c1-400 | head -n 110
fi
if [ "$what" = lightning ]; then
  step "${T_LOUT:-200}" "lightning chunk-output variants" python3 bench/bench_lightning_out.py --T 32768,131072 \
    --variants "${LOUT_VARIANTS:-v1,tma}" --backward
  for e in ${LFWD_ENVS:-none}; do
    assign=${e//,/ }; [ "$e" = none ] && assign=
    step "${T_LFWD:-120}" "lightning fwd vs fla ($e)" env $assign python3 bench/bench_lightning.py \
      --T 32768,131072 --cases bfloat16:fwd:highest --out "$OUT/fwd_${e//[^A-Za-z0-9]/_}"
  done
  for e in ${LF32_ENVS:-}; do  # fp32 inputs (TF32 on both sides; SALA_LIGHTNING_F32_DOT=f16s: scaled fp16 tiles)
    assign=${e//,/ }; [ "$e" = none ] && assign=
    step "${T_LF32:-120}" "lightning fp32 fwd vs fla ($e)" env $assign python3 bench/bench_lightning.py \
      --T 32768,131072 --cases float32:fwd:high --out "$OUT/f32_${e//[^A-Za-z0-9]/_}"
  done
  [ "${T_LSPLIT:-120}" -gt 0 ] && step "${T_LSPLIT:-120}" "lightning, the released call: bf16 split vs fla on fp32 copies" \
    python3 bench/bench_lightning.py --T 32768,131072 --cases bfloat16:fwd:split,bfloat16:fwd+bwd:split --out "$OUT/split"
  step "${T_LOUT_TESTS:-150}" "lightning chunk-output, f16s and split tests" python3 -m pytest -q tests/test_lightning_chunk_out.py \
    tests/test_lightning_triton.py -k "not gpu_ and (chunk_out or tma or f16s or 16bit or variant)" -p no:cacheprovider -rfE \
    || tests_rc=$?
  grep -E "^== |^T |^(op|fwd|fwd\+bwd) |  vs fp32 ref|passed|failed|Error| \| " "$log" | cut -c1-300 | head -n 80
fi
if [ "$what" = lightlong ]; then
  step "${T_LTESTS:-300}" "gpu tests: lightning (1M checked segment included)" python3 -m pytest -q -m gpu \
    tests/test_lightning_triton.py -p no:cacheprovider -rfE --durations=5 || tests_rc=$?
  step "${T_LFB:-260}" "lightning fwd and fwd+bwd vs fla" python3 bench/bench_lightning.py --T 32768,131072 \
    --cases "${LFB_CASES:-bfloat16:fwd:highest,bfloat16:fwd+bwd:highest}" --out "$OUT/fwdbwd"
  grep -E "^== |^(op|fwd|fwd\+bwd) |passed|failed|Error| \| " "$log" | cut -c1-300 | head -n 80
fi
if [ "$what" = ncu ]; then  # Nsight Compute on one warm launch of the fused decode step (if the image has ncu)
  NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1)
  echo "ncu: ${NCU:-none}" | tee -a "$log"
  if [ -n "$NCU" ]; then
    step 240 "ncu: sections" "$NCU" -k regex:_fused_step_kernel -s 5 -c 1 --section SpeedOfLight --section LaunchStats \
      --section Occupancy --section WarpStateStats --section SchedulerStats --section InstructionStats \
      --section SourceCounters -o "$OUT/fused32k" python3 bench/ncu_decode_fused.py
    step 120 "ncu: details" "$NCU" --import "$OUT/fused32k.ncu-rep" --print-details all
    step 120 "ncu: sass" sh -c "\"$NCU\" --import \"$OUT/fused32k.ncu-rep\" --page source --csv --print-source sass > \"$OUT/fused32k_sass.csv\""
    ls -la "$OUT" | tee -a "$log"
    rm -f "$OUT/fused32k.ncu-rep"  # the CSV holds what is read back; the report can pass the 16 MB file limit
  fi
  grep -E "^== |ncu|Stall|stall|Warp Cycles|Issued|Duration|Elapsed|Registers|Achieved|Error|ERR" "$log" | cut -c1-300 | head -n 120
fi
if [ "$what" = tune ]; then
  step "${T_MODES:-240}" "sparse decode modes (knob sweep) at 1M and 32K" python3 bench/bench_sparse_decode.py \
    --modes --out "$OUT/modes"
  [ -n "${TUNE_DECODE_FULL:-}" ] && step 150 "gpu tests: sparse_decode, layers" python3 -m pytest -q -m gpu \
    tests/test_sparse_decode.py tests/test_layers.py -p no:cacheprovider -rfE --durations=5
  [ -n "${TUNE_DECODE_FULL:-}" ] && step 150 bench_sparse_decode python3 bench/bench_sparse_decode.py --out "$OUT"
  step "${T_LCFG:-300}" "lightning forward: every kernel config timed" python3 bench/diag_lightning_configs.py \
    --T 131072 --dtypes "${LCFG_DTYPES:-fp32,bf16}" --budget "${LCFG_BUDGET:-260}" --out "$OUT"
  [ -n "${TUNE_LIGHTNING_FLA:-}" ] && step 200 "lightning fwd vs fla (fp32 and bf16)" python3 bench/bench_lightning.py \
    --T 32768,131072 --cases float32:fwd:high,bfloat16:fwd:highest --out "$OUT/lightning_fwd"
  grep -E "^== |\"mode\"|^pass|^chunk_out|^local_state|^forward|Error|passed|failed| \| " "$log" | cut -c1-400 | head -n 150
fi
if [ "$what" = diag ]; then
  step 35 "decode host overhead (plain call vs graph)" python3 bench/bench_host_overhead.py --cuda
  SALA_OPS_FAST_LAUNCH=1 step 35 "decode host overhead, cached launch" python3 bench/bench_host_overhead.py --cuda
  TRITON_PRINT_AUTOTUNING=1 CUDA_LAUNCH_BLOCKING=1 DIAG_TIMEOUT=70 step 80 "lightning diag bf16 (small shapes)" \
    python3 bench/diag_lightning.py bf16
  step 180 "lightning fp32 inputs vs fla" python3 bench/bench_lightning.py --T 32768,131072 \
    --cases float32:fwd:high,float32:fwd+bwd:high --out "$OUT/lightning_fp32"
  grep -E "^== |^profile|same_idx|B=1 L=|ok |start|Error|error|ms|us/call" "$log" | head -n 150
fi
echo "gpu tests exit code: $tests_rc"
exit "$tests_rc"
