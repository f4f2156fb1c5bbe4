#!/usr/bin/env bash
# The guide's program as whole jobs on one GPU (bench_guide_gpu.py): embedtune, stock, stock + compile;
# one call, carry [".bench", ".whl"]:
#   TAG=xy bash benchmarks/run_guide_gpu.sh bert-large      (extra args go to bench_guide_gpu.py)
# Writes $OUT/guide_MODEL[_TAG].jsonl (rows as they finish) and $OUT/guide_MODEL[_TAG].log (table last).
set -uo pipefail
MODEL=${1:-bert-large}
shift || true
cd "$(dirname "$0")/.."
. benchmarks/gpu_env.sh
NAME="guide_${MODEL}${TAG:+_$TAG}"
logged_run "$NAME" python3 benchmarks/bench_guide_gpu.py "$MODEL" --tokenizer .bench/tokenizer --out "$OUT/$NAME.jsonl" "$@"
