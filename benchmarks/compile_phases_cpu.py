"""Where compiling the packed layers spends its time: the whole-stack graph against the per-layer graph
(`packing.layers.WHOLE_STACK`), on this machine's CPU, each run its own process with an empty
TorchInductor cache, alternating. Dynamo's tracing, AOTAutograd's joint trace and partition, and the
graph passes and lowering are the same work on a GPU; only the kernel compile (C++ here, Triton there)
differs, and it is reported apart.

    python benchmarks/compile_phases_cpu.py --layers 12 --modes lora,full --rounds 2

A tiny BERT (hidden 64) at the given depth, one forward and backward in eval mode (on CPU the whole-stack
graph needs dropout off). Table last; JSON lines with every phase torch timed in --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

PHASES = {  # column -> torch's timer names (torch 2.11-2.13), summed
    "dynamo trace": ["bytecode_tracing"],
    "AOT joint trace": ["aot_trace_joint_graph"],
    "partition": ["min_cut_rematerialization_partition"],
    "graph passes": ["_recursive_joint_graph_passes", "_recursive_post_grad_passes"],
    "lowering": ["GraphLowering.run"],
    "codegen": ["Scheduler.codegen"],
    "kernel compile": ["async_compile.wait"],
}

CHILD = r"""
import json, sys, time, torch
sys.path.insert(0, sys.argv[5])
from torch._dynamo.utils import compilation_time_metrics
from tiny_models import make_tiny_model
from embedtune import FastModel
from embedtune.packing import enable_fast_path, layers
graph, mode, depth, root = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
layers.WHOLE_STACK = graph == "whole"
path = make_tiny_model("bert", root, name=f"bert{depth}", num_hidden_layers=depth)
model, tok = FastModel.from_pretrained(path, max_seq_length=64, fast=False)
if mode == "lora":
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, target_modules=["query", "key", "value", "dense"])
model.eval()
enable_fast_path(model, compile=True)
batch = tok(["hello world", "a longer text here and there and more"] * 3, padding=True, return_tensors="pt")
start = time.perf_counter()
model(**batch).last_hidden_state.sum().backward()
first = time.perf_counter() - start
print(json.dumps({"first_step_s": round(first, 2),
                  "timers": {k: round(sum(v), 3) for k, v in compilation_time_metrics.items()}}))
"""


def run(graph: str, mode: str, depth: int, root: str) -> dict:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=tempfile.mkdtemp(prefix="inductor-"))
    tests = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests")
    done = subprocess.run([sys.executable, "-c", CHILD, graph, mode, str(depth), root, tests], env=env,
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--modes", default="lora,full")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default="compile_phases_cpu.jsonl")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as root, open(args.out, "w") as out:
        for round_ in range(1, args.rounds + 1):
            for mode in args.modes.split(","):
                for graph in ("whole", "per-layer"):
                    result = run(graph, mode, args.layers, root)
                    row = {"graph": graph, "mode": mode, "layers": args.layers, "round": round_, **result}
                    out.write(json.dumps(row) + "\n")
                    rows.append(row)
                    print(f"{graph} {mode} round {round_}: first step {result['first_step_s']} s", flush=True)
    cols = list(PHASES)
    print(f"\n{'graph':10s} {'mode':5s} {'rnd':>3s} {'first step s':>12s} " + " ".join(f"{c:>15s}" for c in cols))
    for r in rows:
        phases = [sum(r["timers"].get(name, 0.0) for name in PHASES[c]) for c in cols]
        print(f"{r['graph']:10s} {r['mode']:5s} {r['round']:3d} {r['first_step_s']:12.1f} "
              + " ".join(f"{p:15.1f}" for p in phases))


if __name__ == "__main__":
    main()
