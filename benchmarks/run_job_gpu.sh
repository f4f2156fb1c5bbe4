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
# Byte-compile what the jobs import, once, into that prefix (the image may also set PYTHONDONTWRITEBYTECODE).
env | grep -E '^PYTHON(DONTWRITEBYTECODE|PYCACHEPREFIX)=' || true
unset PYTHONDONTWRITEBYTECODE
python3 - <<'PY'
import compileall, importlib.util, os, time
t = time.time()
for name in ("torch", "transformers", "sentence_transformers", "peft", "datasets", "accelerate", "huggingface_hub",
             "safetensors", "tokenizers", "typer", "rich", "click", "numpy", "scipy", "sklearn", "pandas", "pyarrow",
             "triton", "sympy", "networkx", "jinja2", "yaml", "tqdm", "regex", "fsspec", "dill", "multiprocess", "xxhash"):
    spec = importlib.util.find_spec(name)
    if spec and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            compileall.compile_dir(folder, quiet=2, workers=os.cpu_count() or 1)
compileall.compile_dir("src", quiet=2)
print(f"byte-compiled the imported packages in {time.time() - t:.0f} s")
PY
python3 -X importtime -c "import embedtune.cli, embedtune.train" 2> "$OUT/importtime_$NAME.txt"
echo "slowest imports (cumulative us):"; sort -t'|' -k2 -n "$OUT/importtime_$NAME.txt" | tail -12
{
  nvidia-smi -L
  python3 -c "import sys, torch, transformers, sentence_transformers, peft, datasets; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'sentence-transformers', sentence_transformers.__version__, 'peft', peft.__version__, 'datasets', datasets.__version__)"
  git log -1 --format='embedtune %h %s' 2>/dev/null | cut -c1-120
  python3 benchmarks/bench_job_gpu.py "$MODEL" --tokenizer .bench/tokenizer --out "$OUT/$NAME.jsonl" "$@"
} 2>&1 | tee "$OUT/$NAME.log" | grep -v -i "warn"
