"""How much of a default `embedtune train` goes to evaluation, on this CPU: the bundled all-MiniLM-L6-v2
on the stdlib code-search pairs, through the CLI in its own process, default flags (1 epoch, held-out
split, `--evals 4` sized by `embedtune.eval_plan`). The promise: evaluation (the probe, the base
model, the in-training evaluations and the exact final one) takes at most a quarter of the wall time.

    python benchmarks/bench_eval_share_cpu.py [--pairs N] [-- EXTRA TRAIN FLAGS]

Prints the run's summary, then one JSON line: wall time (process start to exit), train and evaluation
seconds from metrics.json, evaluation's share of the wall time (all of it, and in-training alone:
base + in-training), the plan the run chose and why, and whether the share is within 25%.
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

SHARE = 0.25


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=None, help="stdlib pairs to use (default: all)")
    parser.add_argument("extra", nargs="*", help="extra `embedtune train` flags, after --")
    args = parser.parse_args()

    from embedtune.data import build_stdlib_pairs, write_jsonl

    root = Path(tempfile.mkdtemp(prefix="embedtune-eval-share-"))
    data = write_jsonl(build_stdlib_pairs(max_pairs=args.pairs, seed=0), root / "stdlib_pairs.jsonl")
    out = root / "run"
    command = [sys.executable, "-m", "embedtune", "train", str(data), "--output", str(out), *args.extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    print("$", " ".join(command), flush=True)
    started = time.time()
    subprocess.run(command, check=True, env=env)
    wall = time.time() - started
    metrics = json.loads((out / "metrics.json").read_text())
    evaluation = metrics["eval"]
    times = evaluation["time_s"]
    result = {
        "pairs": metrics["train_pairs"] + metrics["eval_pairs"],
        "steps": metrics["steps"],
        "wall_s": round(wall, 1),
        "train_s": metrics["train_time_s"],
        "eval_s": metrics["eval_time_s"],
        "eval_by_kind_s": times,
        "eval_share": round(metrics["eval_time_s"] / wall, 3),
        "in_training_share": round((times["base"] + times["during"]) / wall, 3),
        "plan": {k: evaluation["plan"][k] for k in ("requested", "evals", "full", "during", "seed", "budget_s",
                                                    "estimate", "reason")},
        "skipped_steps": evaluation["skipped_steps"],
        "base_ndcg@10": metrics["base"].get("ndcg@10"),
        "best_in_training_ndcg@10": (evaluation.get("best_during") or {}).get("ndcg@10"),
        "final_ndcg@10": metrics["final"].get("ndcg@10"),
        "cpu_count": os.cpu_count(),
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),
        "extra_flags": args.extra,
    }
    result["within_quarter"] = result["eval_share"] <= SHARE
    print(json.dumps(result))


if __name__ == "__main__":
    main()
