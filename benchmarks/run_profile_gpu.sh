#!/usr/bin/env bash
# Where a training step's time goes on one GPU, and the flash-kernel exactness checks first.
#   bash benchmarks/run_profile_gpu.sh            (env CONFIGS: lines of profile_step.py arguments;
#                                                  SKIP_EXACTNESS=1 skips the checks)
# Full logs with profiler tables go to $OUT/profile.log; a summary is printed last.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
LOG="$OUT/profile.log"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD/src:$PWD/tests:$PWD/benchmarks"
if [ -z "${SKIP_EXACTNESS:-}" ]; then
  python3 benchmarks/check_exactness_gpu.py --tokenizer .bench/tokenizer > "$OUT/exactness.log" 2>&1
  echo "exactness rc=$?"
fi
CONFIGS=${CONFIGS:-"--model bert-base --mode lora --compile default
--model bert-base --mode lora --compile default --no-dropout
--model bert-base --mode full --compile default"}
while IFS= read -r config; do
  [ -z "$config" ] && continue
  echo "=== profile_step.py $config" >> "$LOG"
  timeout ${CONFIG_TIMEOUT:-240} python3 benchmarks/profile_step.py --tokenizer .bench/tokenizer $config >> "$LOG" 2>&1 \
    || echo "FAILED (rc=$?): $config" | tee -a "$LOG"
done <<< "$CONFIGS"
[ -f "$OUT/exactness.log" ] && sed -n '/flash kernel with/,$p' "$OUT/exactness.log" && tail -5 "$OUT/exactness.log" | grep -i error
grep -E "^(===|embedtune|stock|GPU busy|device time|warm-up|FAILED|Traceback|[A-Za-z]*Error)" "$LOG"
