#!/usr/bin/env bash
# The device runs behind docs/BENCHMARKS.md "Scale". Part "multi" needs 2 GPUs (nvidia-h100-x2).
#   bash benchmarks/run_scale_gpu.sh multi   # DDP: 1 vs 2 GPUs at the same per-GPU batch
#   bash benchmarks/run_scale_gpu.sh single  # cached vs uncached, 16,384 pairs, largest batches
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="${PYTHONPATH:-}:$PWD/src"
TOK=.bench/tokenizer
if [ "$1" = multi ] || [ "$1" = all ]; then  # 1 GPU and 2 GPUs alternating in one launch
  torchrun --nproc-per-node 2 benchmarks/bench_scale_gpu.py ddp --tokenizer $TOK --steps 20 --rounds 3 2>&1 \
    | grep '^{' | tee -a "$OUT/ddp.jsonl"
fi
if [ "$1" = single ] || [ "$1" = all ]; then
  timeout ${SINGLE_TIMEOUT:-900} python3 benchmarks/bench_scale_gpu.py single --tokenizer $TOK --out "$OUT/scale.json" \
    --largest-models ${LARGEST_MODELS:-bert-large,qwen3-0.6b} --parts ${PARTS:-cached,checkpointing,16k,largest} ${TOKEN_BUDGET:+--token-budget $TOKEN_BUDGET} 2>&1 \
    | grep -v -i warn
fi
