#!/usr/bin/env bash
# The device runs behind docs/BENCHMARKS.md "Scale". Part "multi" needs 2 GPUs (nvidia-h100-x2).
#   bash benchmarks/run_scale_gpu.sh multi   # DDP 1 vs 2 GPUs, then FSDP of a Qwen3-4B shape
#   bash benchmarks/run_scale_gpu.sh single  # cached vs uncached, 16,384 pairs, largest batches
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="${PYTHONPATH:-}:$PWD/src"
TOK=.bench/tokenizer
if [ "$1" = multi ]; then
  for n in 1 2; do
    torchrun --nproc-per-node $n benchmarks/bench_scale_gpu.py ddp --tokenizer $TOK --steps 5 2>&1 | grep '^{' | tee -a "$OUT/ddp.jsonl"
  done
  python3 benchmarks/bench_scale_gpu.py qwen3-4b --tokenizer $TOK --out /tmp/qwen3-4b
  python3 -c "from embedtune.data.stdlib import build_stdlib_pairs, write_jsonl; write_jsonl(build_stdlib_pairs(seed=0), '/tmp/pairs.jsonl')"
  torchrun --nproc-per-node 2 -m embedtune train /tmp/pairs.jsonl --model /tmp/qwen3-4b --full --fsdp \
    --max-steps 4 --batch-size 32 --max-seq-length 256 --no-eval --output /tmp/fsdp-run 2>&1 \
    | grep -v -i warn | tail -25
  python3 - <<'PY' | tee "$OUT/fsdp.json"
import json
m = json.load(open("/tmp/fsdp-run/metrics.json"))
print(json.dumps({k: m.get(k) for k in ("steps", "world_size", "train_time_s", "tokens_per_s", "peak_gpu_gb")}))
from sentence_transformers import SentenceTransformer
st = SentenceTransformer("/tmp/fsdp-run/model", device="cuda")
e = st.encode(["def f(x): return x", "sort a list"], convert_to_tensor=True)
print("reloaded with stock sentence-transformers:", tuple(e.shape), "finite:", bool(e.isfinite().all()))
PY
else
  python3 benchmarks/bench_scale_gpu.py single --tokenizer $TOK --out "$OUT/scale.json" 2>&1 | grep -v -i warn
fi
