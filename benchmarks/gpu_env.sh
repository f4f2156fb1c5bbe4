# Sourced by the GPU run scripts (run_job_gpu.sh, run_guide_gpu.sh): the device image's Python set up as
# an installed environment is. From the repository root, with .whl carried:
#   . benchmarks/gpu_env.sh
# Results go to $OUT (the device's folder that comes back; /tmp/out elsewhere).
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
# datasets (not in the image) from the carried wheels into /tmp/site; the image's pyarrow where it is
# recent enough, else the carried one
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
GPU_ENV_START=$SECONDS
python3 -c 'import os, sys; print("\n".join(p for p in sys.path if p and os.path.isdir(p)))' | grep -v "^$PWD$" \
  | xargs python3 -m compileall -q -j 0 > /dev/null 2>&1 || true
echo "bytecode compiled in $((SECONDS - GPU_ENV_START)) s"
# the card, the libraries and the code that ran (a copied work tree may carry stale git metadata: the
# same sha1 line run in a checkout names its commit), for the head of a run's log
machine_facts() {
  nvidia-smi -L
  python3 -c "import sys, torch, transformers, sentence_transformers, peft, datasets; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'sentence-transformers', sentence_transformers.__version__, 'peft', peft.__version__, 'datasets', datasets.__version__)"
  git log -1 --format='embedtune %h %s' 2>/dev/null | cut -c1-120
  echo "embedtune src sha1 $(find src -type f -name '*.py' | LC_ALL=C sort | xargs cat | sha1sum | cut -c1-12)"
}
# `logged_run NAME CMD...`: the machine's facts, then CMD, all into $OUT/NAME.log (warnings left off the screen)
logged_run() {
  local name=$1
  shift
  { machine_facts; "$@"; } 2>&1 | tee "$OUT/$name.log" | grep -v -i "warn"
}
