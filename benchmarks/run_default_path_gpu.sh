#!/usr/bin/env bash
# The default path's checks and whole jobs in one GPU call (about 8 minutes; carry [".bench", ".whl"]):
#   TAG=xy bash benchmarks/run_default_path_gpu.sh
# In order, correctness before timing: the graph step across the recipe's switch to the fused norm
# (check_graphs_gpu.py --switch), the loss curves of eager and default flags, the whole BERT-base full
# jobs (the machine's first, 150 and 600 steps, stock at 600), and a run's first start in an
# environment with and without the import memo's warming child. Each part writes its files to $OUT as it
# ends (a timeout keeps what ended); a short table last.
set -uo pipefail
OUT=${OUT:-/tmp/out}
TAG=${TAG:-default}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
# the jobs first, on a fresh machine: their 'first' job is the machine's first run of embedtune
JOB_TAG=$TAG bash benchmarks/run_job_gpu.sh bert-base --steps 150,600 --budget-s 270 \
  --jobs full:embedtune:first,full:embedtune:N1,full:embedtune:N2,full:stock:N2 > "$OUT/run_jobs_$TAG.txt" 2>&1
JOB_TAG=curves_$TAG bash benchmarks/run_job_gpu.sh bert-base --check-curves --curve-modes eager,default \
  > "$OUT/run_curves_$TAG.txt" 2>&1
# run_job_gpu.sh has installed datasets into /tmp/site and compiled the bytecode into /tmp/pycache
unset PYTHONDONTWRITEBYTECODE
export PYTHONPYCACHEPREFIX=/tmp/pycache PYTHONPATH=/tmp/site:$PWD/src
timeout 200 python3 benchmarks/check_graphs_gpu.py --tokenizer .bench/tokenizer --models bert-base --layers eager \
  --dropout off --switch > "$OUT/check_graphs_switch_$TAG.log" 2>&1
timeout 120 python3 benchmarks/probe_first_run_imports.py --rounds 2 --out "$OUT/first_run_imports_$TAG.json" \
  > "$OUT/first_run_imports_$TAG.log" 2>&1
echo "=== default path, $TAG"
grep -E "^embedtune |^stock |whole-job wall|fixed cost" "$OUT/job_bert-base_$TAG.log" | cut -c1-160
grep -E "vs eager, steps|verdict" "$OUT/job_bert-base_curves_$TAG.log"
grep -E "^bert-base" "$OUT/check_graphs_switch_$TAG.log" | cut -c1-150
tail -4 "$OUT/first_run_imports_$TAG.log"
