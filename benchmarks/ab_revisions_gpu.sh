#!/usr/bin/env bash
# Training throughput of embedtune at an older revision against the working tree, alternating runs in
# one device call (same card, same machine state), each run its own process with its own src.
#   here:    bash benchmarks/ab_revisions_gpu.sh prepare REV          (exports REV's src/ to .ab/REV/src)
#   device:  bash benchmarks/ab_revisions_gpu.sh run REV [MODEL] [MODE] [COMPILE]   carry: [".bench", ".ab"]
# MODEL bert-base|bert-large|qwen3-0.6b, MODE lora|full, COMPILE default|none. The harness (model
# building, timing) is this tree's benchmarks/bench_train_gpu.py for both sides; only embedtune differs.
set -euo pipefail
what=$1 rev=$2
if [ "$what" = prepare ]; then
  rm -rf ".ab/$rev" && mkdir -p ".ab/$rev"
  git archive "$rev" src | tar -x -C ".ab/$rev"
  echo "exported $rev src to .ab/$rev/src"
  exit 0
fi
model=${3:-bert-base} mode=${4:-full} compile=${5:-default}
OUT=${OUT:-/tmp/out}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TORCHINDUCTOR_CACHE_DIR=$(mktemp -d)
for round in 1 2; do
  for side in "$rev:.ab/$rev/src" "HEAD:src"; do
    log="$OUT/ab_${side%%:*}_$round.log"
    PYTHONPATH="${side#*:}:benchmarks" python3 - "$model" "$mode" "$compile" "${side%%:*}" "$round" > "$log" 2>&1 <<'PY' \
      || echo "FAILED: ${side%%:*} round $round (see $log)"
import json, sys, tempfile
from bench_train_gpu import build_model_dir, embedtune_model, run_steps
from embedtune.data.stdlib import build_stdlib_pairs
import embedtune
model, mode, compile_mode, side, round_ = sys.argv[1:]
path = build_model_dir(model, ".bench/tokenizer", tempfile.mkdtemp())
st = embedtune_model(path, mode == "lora", 512, compile_model=False if compile_mode == "none" else compile_mode)
row = run_steps(st, build_stdlib_pairs(seed=0), 128, 20, 10, mode == "lora", embedtune_loss=True)
print(json.dumps({"side": side, "src": embedtune.__file__, "round": int(round_), "model": model, "mode": mode,
                  "compile": compile_mode, "tokens_per_s": round(row["tokens_per_s"]), "warmup_s": round(row["warmup_s"], 1)}))
PY
    grep '^{' "$log" | tee -a "$OUT/ab_revisions.jsonl" || true
  done
done
