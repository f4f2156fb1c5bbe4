"""GPU check of the fused norm kernels built ahead of a run (`embedtune.kernel_prebuild`,
`embedtune.kernels.prebuild`): with an empty Triton cache, the child builds the kernels; then a packed
BERT training step (bf16 autocast, dropout on) in a fresh process must find every kernel it calls in
the cache (no new cache entries) and its first call must cost what a warm cache costs. The child's
time is set beside the same calls made in turn in a plain process on another empty cache (how the
child built before its calls ran in threads and Triton's set-up beside torch's import). Full fine-tuning
(fp32 weights, its linears through `packing.main_grad` as the CUDA-graph step runs them: q, k and v's
gradients joined by `kernels.join_grads`' kernel) and LoRA (bf16 base). Prints a table last.

    python3 benchmarks/check_prebuild_gpu.py [--hidden 768]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STEP = r"""
import contextlib, json, sys, time
import torch
from transformers import BertConfig, BertModel
from embedtune.packing import enable_fast_path, main_grad
hidden, weights = int(sys.argv[1]), sys.argv[2]
config = BertConfig(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=hidden // 64,
                    intermediate_size=4 * hidden, vocab_size=30522)
model = BertModel(config, add_pooling_layer=False).cuda()
if weights == "bf16":
    model = model.to(torch.bfloat16)
model.train()
assert enable_fast_path(model, fused_kernels=True)
ids = torch.randint(1000, 30000, (64, 160), device="cuda")
mask = (torch.arange(160, device="cuda")[None] < torch.randint(8, 160, (64, 1), device="cuda")).long()
torch.cuda.synchronize()
t = time.perf_counter()
shadows = main_grad.Shadows(torch.bfloat16)
with torch.autocast("cuda", dtype=torch.bfloat16), (main_grad.active(shadows) if weights == "fp32" else contextlib.nullcontext()):
    out = model(input_ids=ids, attention_mask=mask).last_hidden_state
out.float().square().mean().backward()
torch.cuda.synchronize()
print(json.dumps({"first_step_s": time.perf_counter() - t}))
"""


SERIAL = r"""
import sys, torch
from embedtune.kernels.variant_calls import build
build(int(sys.argv[1]), torch.float32 if sys.argv[2] == "fp32" else torch.bfloat16, torch.device("cuda"), threads=1)
"""


def entries(cache: Path) -> int:
    return sum(1 for _ in cache.rglob("*.json")) if cache.exists() else 0


def check(hidden: int, weights: str, root: Path) -> dict:
    cache = root / f"triton_{hidden}_{weights}"
    env = dict(os.environ, TRITON_CACHE_DIR=str(cache))
    model_dir = root / f"bert_{hidden}"
    model_dir.mkdir(exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": hidden}))
    row = {"hidden": hidden, "weights": weights}
    # the step's first call on an empty cache: the cost the build ahead takes off the run
    t = time.perf_counter()
    cold = subprocess.run([sys.executable, "-c", STEP, str(hidden), weights], env=dict(env, TRITON_CACHE_DIR=str(cache) + "_cold"),
                          capture_output=True, text=True)
    row["cold_step_process_s"] = round(time.perf_counter() - t, 2)
    row["cold_first_step_s"] = round(json.loads(cold.stdout.strip().splitlines()[-1])["first_step_s"], 3) if cold.returncode == 0 else cold.stderr[-500:]
    t = time.perf_counter()  # the floor of any child: torch's import and a CUDA context
    floor = subprocess.run([sys.executable, "-c", "import torch; torch.zeros(1, device='cuda')"], env=env)
    row["torch_and_cuda_s"] = round(time.perf_counter() - t, 2) if floor.returncode == 0 else None
    t = time.perf_counter()
    serial = subprocess.run([sys.executable, "-c", SERIAL, str(hidden), weights],
                            env=dict(env, TRITON_CACHE_DIR=str(cache) + "_serial"), capture_output=True, text=True)
    row["serial_build_s"] = round(time.perf_counter() - t, 2) if serial.returncode == 0 else serial.stderr[-500:]
    row["entries_after_serial"] = entries(Path(str(cache) + "_serial"))
    t = time.perf_counter()
    child = subprocess.run([sys.executable, "-m", "embedtune.kernels.prebuild", str(model_dir), "--weights", weights],
                           env=env, capture_output=True, text=True)
    row["prebuild_s"] = round(time.perf_counter() - t, 2)
    row["prebuild_rc"] = child.returncode
    row["entries_after_prebuild"] = entries(cache)
    step = subprocess.run([sys.executable, "-c", STEP, str(hidden), weights], env=env, capture_output=True, text=True)
    if step.returncode != 0:
        row["error"] = step.stderr[-1500:]
        return row
    row["warm_first_step_s"] = round(json.loads(step.stdout.strip().splitlines()[-1])["first_step_s"], 3)
    row["entries_after_step"] = entries(cache)
    row["no_new_kernels"] = row["entries_after_step"] == row["entries_after_prebuild"] > 0
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", default="768,1024")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for hidden in (int(h) for h in args.hidden.split(",")):
            for weights in ("fp32", "bf16"):
                row = check(hidden, weights, Path(tmp))
                print(json.dumps(row), flush=True)
                rows.append(row)
    if args.out:
        Path(args.out).write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    print(f"\n{'hidden':>6} {'weights':>7} {'torch+CUDA s':>12} {'in turn s':>9} {'prebuild s':>10} {'cache entries':>13} {'after step':>10} "
          f"{'no new kernels':>14} {'first step cold s':>17} {'first step warm s':>17}")
    for r in rows:
        print(f"{r['hidden']:>6} {r['weights']:>7} {r['torch_and_cuda_s']!s:>12} {str(r['serial_build_s'])[:9]:>9} {r['prebuild_s']:>10} "
              f"{r['entries_after_prebuild']:>13} "
              f"{r.get('entries_after_step', '-'):>10} {str(r.get('no_new_kernels', r.get('error', '')[:40])):>14} "
              f"{r['cold_first_step_s']!s:>17} {r.get('warm_first_step_s', '-')!s:>17}")
    ok = all(r.get("no_new_kernels") and r["entries_after_serial"] == r["entries_after_prebuild"] for r in rows)
    print("prebuild check:", "PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
