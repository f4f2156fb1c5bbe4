#!/usr/bin/env bash
# Issue "Scale" on 2 GPUs (device kind nvidia-h100-x2), one call:
#   1. DDP: 1 GPU vs 2 GPUs alternating in one launch (BERT-base, full and LoRA, cross-device negatives);
#   2. `accelerate launch --multi_gpu` runs `embedtune train` (tiny BERT, checks world_size 2);
#   3. FSDP: `torchrun -m embedtune train --full --fsdp` on a Qwen3-4B-shaped decoder.
#     bash benchmarks/run_multi_gpu.sh     (results in $OUT)
set -uo pipefail
OUT=${OUT:-/tmp/out}
FX=${FX:-/tmp/fx}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD/src"
TOK=.bench/tokenizer
python3 -c "import datasets" 2>/dev/null || python3 -m pip install -q --no-deps .whl/*.whl
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/cards.txt"

if [ -z "${SKIP_DDP:-}" ]; then
echo "== 1. DDP scaling"
torchrun --nproc-per-node 2 benchmarks/bench_scale_gpu.py ddp --tokenizer $TOK --steps ${DDP_STEPS:-20} \
  --rounds ${DDP_ROUNDS:-3} 2>&1 | grep '^{' | tee "$OUT/ddp.jsonl"
fi

echo "== fixtures"
python3 benchmarks/make_gpu_fixtures.py --tokenizer $TOK --root "$FX" --models tiny-bert,${FSDP_MODEL:-qwen3-4b} 2>&1 | tail -2

if [ -z "${SKIP_ACCELERATE:-}" ]; then
echo "== 2. accelerate launch"
rm -rf "$FX/acc"
accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision bf16 --dynamo_backend no \
  -m embedtune train "$FX/pairs.jsonl" --model "$FX/tiny-bert" --output "$FX/acc" --max-steps 20 --batch-size 64 \
  --max-seq-length 128 --eval-size 256 --evals 1 > "$OUT/accelerate.log" 2>&1
echo "accelerate rc=$?"; tail -3 "$OUT/accelerate.log"
python3 -c "import json; m=json.load(open('$FX/acc/metrics.json')); print('accelerate world_size', m['world_size'], 'steps', m['steps'], 'ndcg', m['base']['ndcg@10'], '->', m['final']['ndcg@10'])" | tee "$OUT/accelerate.txt"
fi

echo "== 3. FSDP"
rm -rf "$FX/fsdp"
SECONDS=0
torchrun --nproc-per-node 2 -m embedtune train "$FX/pairs.jsonl" --model "$FX/${FSDP_MODEL:-qwen3-4b}" \
  --output "$FX/fsdp" --full --fsdp --max-steps ${FSDP_STEPS:-10} --batch-size ${FSDP_BATCH:-64} --max-seq-length 256 \
  --eval-size 256 --evals 1 --lr 1e-5 > "$OUT/fsdp.log" 2>&1
FSDP_RC=$?
echo "fsdp rc=$FSDP_RC wall ${SECONDS}s"; grep -v -i warn "$OUT/fsdp.log" | grep -v "^\[rank" | tail -25
[ $FSDP_RC -ne 0 ] && { grep -m1 -B2 -A8 "Error" "$OUT/fsdp.log" | head -40; exit 1; }
cp "$FX/fsdp/metrics.json" "$OUT/fsdp_metrics.json" 2>/dev/null
python3 - "$FX/fsdp/model" <<'PY' | tee "$OUT/fsdp_saved.txt"
import glob, math, sys
from safetensors import safe_open
n = 0
for path in glob.glob(sys.argv[1] + "/*.safetensors"):
    with safe_open(path, "pt") as f:
        n += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
print(f"saved model: {n/1e9:.2f}B parameters, unsharded")
PY
