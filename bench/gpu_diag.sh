#!/usr/bin/env bash
# Short diagnostic call (device tool): where the fp32 lightning path stops on the GPU, the sparse
# decode kernel split, and the lightning bench (bf16 fwd, fwd+bwd, decode vs fla). Logs in $OUT.
set -uo pipefail
source bench/gpu_env.sh
log="$OUT/diag_log.txt"
: >"$log"
for prec in tf32 ieee tf32x3; do
  SALA_LIGHTNING_F32_DOT=$prec CUDA_LAUNCH_BLOCKING=1 DIAG_TIMEOUT=20 step 30 "lightning diag fp32 $prec" python3 bench/diag_lightning.py fp32
done
CUDA_LAUNCH_BLOCKING=1 DIAG_TIMEOUT=20 step 30 "lightning diag bf16" python3 bench/diag_lightning.py bf16
SALA_LIGHTNING_PIN_CONFIG=1 SALA_LIGHTNING_F32_DOT=tf32 CUDA_LAUNCH_BLOCKING=1 DIAG_TIMEOUT=20 step 30 "lightning diag fp32 tf32 pinned config" python3 bench/diag_lightning.py fp32
step 60 "sparse decode profile (default, fast)" python3 bench/bench_sparse_decode.py --quick --variant fast --profile --no-graphs
step 150 "bench_lightning" python3 bench/bench_lightning.py --out "$OUT"
grep -E "^== |start|done|ok |File|line|Error|error" "$log" | head -n 120
