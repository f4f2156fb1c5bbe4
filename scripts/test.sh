#!/usr/bin/env bash
# Set up (see setup.sh) and run the whole test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# two workers, one per core, each with one thread for torch; a test file stays on one worker (its module
# fixtures are built once); the slowest tests listed, to keep CI under 30 minutes
OMP_NUM_THREADS=1 python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile --durations=12 "$@"

# The same compat, save and round-trip tests against sentence-transformers 5.x, which
# embedtune also supports (installed beside the venv, not into it).
if [ -z "${EMBEDTUNE_SKIP_ST5:-}" ]; then
  python -m pip install -q --no-deps --upgrade --target .st5 "sentence-transformers>=5.7,<6"
  PYTHONPATH=.st5 OMP_NUM_THREADS=1 python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile \
    tests/test_compat_and_loading.py tests/test_save.py tests/test_architectures.py tests/test_st_pipeline.py \
    -k "roundtrip or compat or save or assigning or wrapper"
  PYTHONPATH=.st5 OMP_NUM_THREADS=1 python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile tests/test_trainer_resume.py \
    tests/test_trainer_steps.py
fi

# sentence-transformers' ONNX backend (optimum-onnx pins transformers < 4.58, so not in the venv): its
# stack installed beside the venv, where tests/test_saves_keep_everything.py loads an export with it.
if [ -z "${EMBEDTUNE_SKIP_ONNX_ST:-}" ]; then
  python -m pip install -q --no-deps --upgrade --target .onnx-st "sentence-transformers>=5.7,<6" \
    "transformers==4.57.*" "tokenizers>=0.22,<=0.23.0" "huggingface-hub>=0.34,<1.0" "datasets>=4,<4.5" \
    "optimum~=2.1.0" "optimum-onnx==0.1.0" requests "urllib3<3" "charset-normalizer<4" idna certifi \
    httpx httpcore h11 anyio sniffio
  python -m pytest -q -p no:cacheprovider tests/test_saves_keep_everything.py -k onnx_backend
fi
