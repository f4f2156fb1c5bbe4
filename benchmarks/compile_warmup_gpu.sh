#!/usr/bin/env bash
# Cold compile time of the packed layers: the whole-stack graph against the per-layer graph
# (`packing.layers.WHOLE_STACK`), each run its own process with empty TorchInductor and Triton caches,
# alternating, two rounds; torch's own compile timers broken down per phase. On the device:
#   bash benchmarks/compile_warmup_gpu.sh [MODEL] [MODE]        carry: [".bench"]   (env ROUNDS, default 2)
# MODEL bert-base|bert-large|qwen3-0.6b, MODE lora|full. JSON lines in $OUT/compile_warmup.jsonl.
set -euo pipefail
model=${1:-bert-base} mode=${2:-lora}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD/src:$PWD/benchmarks"
for round in $(seq "${ROUNDS:-2}"); do
  for graph in whole per-layer; do
    log="$OUT/compile_${graph}_$round.log"
    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) TRITON_CACHE_DIR=$(mktemp -d) \
      python3 - "$model" "$mode" "$graph" "$round" > "$log" 2>&1 <<'PY' || echo "FAILED: $graph round $round (see $log)"
import json, sys, tempfile, time
import torch
from torch._dynamo.utils import compilation_time_metrics
from bench_train_gpu import build_model_dir, embedtune_model, run_steps
from embedtune.compile_cache import compile_seconds
from embedtune.data.stdlib import build_stdlib_pairs
from embedtune.packing import layers
model, mode, graph, round_ = sys.argv[1:]
layers.WHOLE_STACK = graph == "whole"
path = build_model_dir(model, ".bench/tokenizer", tempfile.mkdtemp())
torch.ones(1, device="cuda")  # CUDA context outside the timed warm-up
st = embedtune_model(path, mode == "lora", 512, compile_model="default")
row = run_steps(st, build_stdlib_pairs(seed=0), 128, 10, 5, mode == "lora", embedtune_loss=True)
phases = {k: round(sum(v), 2) for k, v in compilation_time_metrics.items() if sum(v) >= 0.5}
print(json.dumps({"graph": graph, "round": int(round_), "model": model, "mode": mode,
                  "warmup_s": round(row["warmup_s"], 1), "compile_s": round(compile_seconds(), 1),
                  "tokens_per_s": round(row["tokens_per_s"]), "phases_s": phases}))
PY
    grep '^{' "$log" | tee -a "$OUT/compile_warmup.jsonl" || true
  done
done
