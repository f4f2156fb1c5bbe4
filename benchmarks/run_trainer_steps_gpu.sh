#!/usr/bin/env bash
# A stock SentenceTransformerTrainer over a FastModel on one GPU, correctness before timing, in one call
# (about 8 minutes; carry [".bench", ".whl"]):
#   TAG=xy bash benchmarks/run_trainer_steps_gpu.sh [bert-large] [extra args for bench_guide_gpu.py]
# First check_trainer_graphs_gpu.py (the graphed step and the one-forward eager step against the
# trainer's fp32 step; dropout's new masks), then the guide's program as whole jobs: stock, embedtune
# (graphs where they pay), embedtune_eager (cuda_graphs=False: one forward) and embedtune_stock_step
# (the trainer's stock step), a 61-step epoch by default, with the graphed and eager runs' loss curves
# compared. Each part writes its files to $OUT as it ends; a short table last.
set -uo pipefail
MODEL=${1:-bert-large}
shift || true
OUT=${OUT:-/tmp/out}
TAG=${TAG:-steps}
CHECK_MODEL=${CHECK_MODEL:-bert-base}  # the check's shape (tiny-bert for a CPU smoke run)
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
. benchmarks/gpu_env.sh
timeout 200 python3 benchmarks/check_trainer_graphs_gpu.py --tokenizer .bench/tokenizer --model "$CHECK_MODEL" \
  > "$OUT/check_trainer_graphs_$TAG.log" 2>&1
echo "check_trainer_graphs_gpu.py: rc $?"
NAME="guide_${MODEL}_$TAG"
logged_run "$NAME" python3 benchmarks/bench_guide_gpu.py "$MODEL" --tokenizer .bench/tokenizer --out "$OUT/$NAME.jsonl" \
  --impls stock,embedtune,embedtune_eager,embedtune_stock_step --pairs 1000 --budget-s 400 "$@"
echo "=== trainer steps, $TAG"
grep -E "ok$|FAIL|^PASS|^dropout" "$OUT/check_trainer_graphs_$TAG.log" | cut -c1-160 | tail -8
grep -A 8 "=== the guide's program" "$OUT/$NAME.log" | cut -c1-170
