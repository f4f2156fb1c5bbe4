#!/usr/bin/env bash
# Issue "Fast path" on one GPU, one model per call (stock + compile warms up for minutes):
#   bash benchmarks/run_fast_gpu.sh bert-base      (or bert-large, qwen3-0.6b)
# Stock sentence-transformers eager and + torch.compile, embedtune eager and + compile (regional),
# LoRA r8 and full, batch 128, max_seq_length 512, stdlib pairs. Table last; JSON in $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD/src"
MODEL=${1:-bert-base}
# a cold compile cache for this call (a warm machine keeps /tmp/torchinductor_$USER between calls);
# rows after the first compiled one may reuse its kernels, "warm cache" rows by design
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$(mktemp -d)}
python3 benchmarks/bench_train_gpu.py --models "$MODEL" --modes ${MODES:-lora,full} --compile \
  --compile-modes ${COMPILE_MODES:-default,reduce-overhead} ${EXTRA:-} \
  --steps ${STEPS:-20} --warmup ${WARMUP:-3} --tokenizer .bench/tokenizer --out "$OUT/fast_$MODEL.json" 2>&1 \
  | tee "$OUT/fast_$MODEL.log" | grep -v -i "warn"
