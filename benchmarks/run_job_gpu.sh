#!/usr/bin/env bash
# Whole training jobs on one GPU, stock sentence-transformers vs `embedtune train` (bench_job_gpu.py);
# one call per model, carry [".bench", ".whl"]:
#   bash benchmarks/run_job_gpu.sh bert-base            (or bert-large; extra args go to bench_job_gpu.py)
#   JOB_TAG=curves bash benchmarks/run_job_gpu.sh bert-base --check-curves
# Writes $OUT/job_MODEL[_TAG].jsonl (rows as they finish) and $OUT/job_MODEL[_TAG].log (table last).
set -uo pipefail
MODEL=${1:-bert-base}
shift || true
. benchmarks/gpu_env.sh
NAME="job_${MODEL}${JOB_TAG:+_$JOB_TAG}"
# what the CLI imports: the console script defers scikit-learn first (embedtune.deferred_imports) and
# serves transformers' scans from the memo an earlier run wrote (embedtune.import_memo; one run writes it)
PROFILE_IMPORTS="from embedtune.deferred_imports import defer_imports as d; d(); from embedtune.import_memo import remember_import_scans as r; r(); import embedtune.cli, embedtune.train"
EMBEDTUNE_IMPORT_MEMO_DIR=/tmp/import-scans-profile python3 -c "$PROFILE_IMPORTS"
EMBEDTUNE_IMPORT_MEMO_DIR=/tmp/import-scans-profile python3 -X importtime -c "$PROFILE_IMPORTS" 2> "$OUT/importtime_$NAME.txt"
echo "slowest imports (cumulative us):"; sort -t'|' -k2 -n "$OUT/importtime_$NAME.txt" | tail -12
logged_run "$NAME" python3 benchmarks/bench_job_gpu.py "$MODEL" --tokenizer .bench/tokenizer --out "$OUT/$NAME.jsonl" "$@"
