#!/usr/bin/env bash
# Tile groups (`packing.tile_groups`) on one GPU, one call, carry [".bench", ".whl"]:
#   TAG=a bash benchmarks/run_tile_groups_gpu.sh [bert-base|bert-large]
# 1. the grouped attention op against the plain flash op (check_tile_groups_gpu.py: exactness, dropout, time);
# 2. loss curves, 100 steps, dropout 0.1: eager (the reference), eager with groups, default flags with groups;
# 3. whole jobs: default flags, the same with --short-groups, and the stock trainer.
# Writes $OUT/check_tile_groups[_TAG].{jsonl,log} and the job bench's files (JOB_TAG tg-curves[-TAG], tg[-TAG]).
set -uo pipefail
MODEL=${1:-bert-base}
. benchmarks/gpu_env.sh
SUFFIX=${TAG:+_$TAG}
logged_run "check_tile_groups$SUFFIX" timeout 150 python3 benchmarks/check_tile_groups_gpu.py \
  --tokenizer .bench/tokenizer --out "$OUT/check_tile_groups$SUFFIX.jsonl"
JOB_TAG="tg-curves${TAG:+-$TAG}" bash benchmarks/run_job_gpu.sh "$MODEL" --check-curves \
  --curve-modes eager,eager_grouped,grouped
if [ "$MODEL" = bert-large ]; then STEPS=60,180; else STEPS=150,600; fi
JOB_TAG="tg${TAG:+-$TAG}" bash benchmarks/run_job_gpu.sh "$MODEL" --steps "$STEPS" --budget-s "${JOB_BUDGET_S:-300}" \
  --jobs full:embedtune_grouped:N2,full:embedtune:N2,full:stock:N2
