#!/usr/bin/env bash
# The kernel probes and the fused norm's tile sweep in one GPU call (no carried folders needed):
#   bash benchmarks/run_probes_gpu.sh
# Writes $OUT/<probe>.jsonl and $OUT/<probe>.log (each with its table last).
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
cd "$(dirname "$0")"
export PYTHONPATH=$PWD/../src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
for probe in probe_bias_gelu_gpu probe_qkv_grad_gpu; do
  timeout 240 python3 "$probe.py" --out "$OUT/$probe.jsonl" 2>&1 | grep -v -i warn > "$OUT/$probe.log"
  tail -12 "$OUT/$probe.log"
done
timeout 300 python3 tune_fused_norm_gpu.py --cols 768,1024 --out "$OUT/tune_fused_norm.jsonl" 2>&1 | grep -v -i warn > "$OUT/tune_fused_norm.log"
tail -6 "$OUT/tune_fused_norm.log"
