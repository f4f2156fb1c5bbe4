#!/usr/bin/env bash
# The device runs behind docs/BENCHMARKS.md "Scale". Part "multi" needs 2 GPUs (nvidia-h100-x2).
#   bash benchmarks/run_scale_gpu.sh multi   # DDP 1 vs 2 GPUs, then FSDP of a Qwen3-4B shape
#   bash benchmarks/run_scale_gpu.sh single  # cached vs uncached, 16,384 pairs, largest batches
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="${PYTHONPATH:-}:$PWD/src"
TOK=.bench/tokenizer
if ls .whl/*.whl >/dev/null 2>&1; then  # datasets (and its pure-Python needs) for `embedtune train` there
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
if [ "$1" = multi ] || [ "$1" = all ]; then
  for n in 1 2; do
    torchrun --nproc-per-node $n benchmarks/bench_scale_gpu.py ddp --tokenizer $TOK --steps 10 2>&1 | grep '^{' | tee -a "$OUT/ddp.jsonl"
  done
  if [ -n "${BENCH_PROFILE:-}" ]; then
    torchrun --nproc-per-node 2 benchmarks/bench_scale_gpu.py ddp --tokenizer $TOK --steps 3 > "$OUT/ddp_profile.log" 2>&1
  fi
  python3 benchmarks/bench_scale_gpu.py qwen3-4b --tokenizer $TOK --out /tmp/qwen3-4b
  python3 -c "from embedtune.data.stdlib import build_stdlib_pairs, write_jsonl; write_jsonl(build_stdlib_pairs(seed=0), '/tmp/pairs.jsonl')"
  timeout ${FSDP_TIMEOUT:-600} torchrun --nproc-per-node 2 -m embedtune train /tmp/pairs.jsonl --model /tmp/qwen3-4b --full --fsdp \
    --max-steps 4 --batch-size 32 --max-seq-length 256 --no-eval --output /tmp/fsdp-run > "$OUT/fsdp.log" 2>&1
  grep -v -i warn "$OUT/fsdp.log" | grep -E "Error|error|Traceback|trained|peak" | head -20
  python3 - <<'PY' | tee "$OUT/fsdp.json"
import json
m = json.load(open("/tmp/fsdp-run/metrics.json"))
print(json.dumps({k: m.get(k) for k in ("steps", "world_size", "train_time_s", "tokens_per_s", "peak_gpu_gb")}))
from sentence_transformers import SentenceTransformer
st = SentenceTransformer("/tmp/fsdp-run/model", device="cuda")
e = st.encode(["def f(x): return x", "sort a list"], convert_to_tensor=True)
print("reloaded with stock sentence-transformers:", tuple(e.shape), "finite:", bool(e.isfinite().all()))
PY
fi
if [ "$1" = single ] || [ "$1" = all ]; then
  timeout ${SINGLE_TIMEOUT:-900} python3 benchmarks/bench_scale_gpu.py single --tokenizer $TOK --out "$OUT/scale.json" 2>&1 | grep -v -i warn
fi
