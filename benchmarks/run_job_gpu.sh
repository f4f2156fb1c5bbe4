#!/usr/bin/env bash
# Whole training jobs on one GPU, stock sentence-transformers vs `embedtune train` (bench_job_gpu.py);
# one call per model, carry [".bench", ".whl"]:
#   bash benchmarks/run_job_gpu.sh bert-base            (or bert-large; extra args go to bench_job_gpu.py)
#   JOB_TAG=curves bash benchmarks/run_job_gpu.sh bert-base --check-curves
# Writes $OUT/job_MODEL[_TAG].jsonl (rows as they finish) and $OUT/job_MODEL[_TAG].log (table last).
set -uo pipefail
OUT=${OUT:-/tmp/out}
MODEL=${1:-bert-base}
shift || true
NAME="job_${MODEL}${JOB_TAG:+_$JOB_TAG}"
mkdir -p "$OUT"
python3 -c "import datasets" 2>/dev/null || { python3 -c "import pyarrow,sys; sys.exit(int(pyarrow.__version__.split('.')[0]) < 24)" && ls .whl/*.whl | grep -v pyarrow | xargs python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl; }
export PYTHONPATH=/tmp/site:$PWD/src
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
# The image ships torch & co. without .pyc files and its site-packages is read-only to the cache: without
# a writable prefix every job would compile them at import (~10 s), which no user's install does.
export PYTHONPYCACHEPREFIX=${PYTHONPYCACHEPREFIX:-/tmp/pycache}
# The image may also set PYTHONDONTWRITEBYTECODE: then every job would compile them again. Unset, the
# first import below (and the fixtures' warm-up import) writes them into the prefix for every job alike.
env | grep -E '^PYTHON(DONTWRITEBYTECODE|PYCACHEPREFIX)=' || true
unset PYTHONDONTWRITEBYTECODE
# Bytecode for everything a job may import, as pip writes it at install (a few seconds on 16 cores): no
# job then compiles what the import below does not load (the trainer's, matplotlib's, triton's modules).
# Every folder on sys.path, the standard library's too: under the prefix its own __pycache__ is not read,
# so without this a call's first job would compile the standard library modules the warm-up did not load.
START=$SECONDS
python3 -c 'import os, sys; print("\n".join(p for p in sys.path if p and os.path.isdir(p)))' | grep -v "^$PWD$" \
  | xargs python3 -m compileall -q -j 0 > /dev/null 2>&1 || true
echo "bytecode compiled in $((SECONDS - START)) s"
# what the CLI imports: the console script defers scikit-learn first (embedtune.deferred_imports) and
# serves transformers' scans from the memo an earlier run wrote (embedtune.import_memo; one run writes it)
PROFILE_IMPORTS="from embedtune.deferred_imports import defer_imports as d; d(); from embedtune.import_memo import remember_import_scans as r; r(); import embedtune.cli, embedtune.train"
EMBEDTUNE_IMPORT_MEMO_DIR=/tmp/import-scans-profile python3 -c "$PROFILE_IMPORTS"
EMBEDTUNE_IMPORT_MEMO_DIR=/tmp/import-scans-profile python3 -X importtime -c "$PROFILE_IMPORTS" 2> "$OUT/importtime_$NAME.txt"
echo "slowest imports (cumulative us):"; sort -t'|' -k2 -n "$OUT/importtime_$NAME.txt" | tail -12
{
  nvidia-smi -L
  python3 -c "import sys, torch, transformers, sentence_transformers, peft, datasets; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'sentence-transformers', sentence_transformers.__version__, 'peft', peft.__version__, 'datasets', datasets.__version__)"
  git log -1 --format='embedtune %h %s' 2>/dev/null | cut -c1-120
  # the code that ran (a copied work tree may carry stale git metadata): the same line run in a checkout names it
  echo "embedtune src sha1 $(find src -type f -name '*.py' | LC_ALL=C sort | xargs cat | sha1sum | cut -c1-12)"
  python3 benchmarks/bench_job_gpu.py "$MODEL" --tokenizer .bench/tokenizer --out "$OUT/$NAME.jsonl" "$@"
} 2>&1 | tee "$OUT/$NAME.log" | grep -v -i "warn"
