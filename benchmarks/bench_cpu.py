"""CPU wall time: `embedtune train` vs stock sentence-transformers + PEFT on the same job.

MiniLM (bundled), LoRA r16, batch 32, max_seq_length 256, 24 steps, stdlib code-search pairs.
Each side runs as its own process, timed end to end (imports and model load included), in
alternation, `--repeats` times; the table reports the median.

    python benchmarks/bench_cpu.py --repeats 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--out", default=str(HERE / "results" / "cpu_minilm.json"))
    args = parser.parse_args()

    from embedtune.data import build_stdlib_pairs, write_jsonl

    with tempfile.TemporaryDirectory() as tmp:
        data = write_jsonl(build_stdlib_pairs(), Path(tmp) / "pairs.jsonl")
        common = ["--max-steps", str(args.steps), "--batch-size", "32", "--max-seq-length", "256", "--lora-r", "16"]
        commands = {
            "stock sentence-transformers + PEFT": [sys.executable, str(HERE / "stock_st_train.py"), str(data), *common],
            "embedtune train": [sys.executable, "-m", "embedtune", "train", str(data), *common, "--no-eval",
                                "--overwrite", "--output", str(Path(tmp) / "out")],
        }
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.repeats):
            for name, cmd in commands.items():
                times[name].append(timed(cmd))
                print(f"{name}: {times[name][-1]:.1f} s", flush=True)
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    stock, ours = medians["stock sentence-transformers + PEFT"], medians["embedtune train"]
    result = {"times_s": times, "median_s": medians, "ratio_embedtune_over_stock": ours / stock,
              "command": " ".join(sys.argv)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\n{'job':38s} {'median wall s':>14s}")
    for name, value in medians.items():
        print(f"{name:38s} {value:14.1f}")
    print(f"embedtune / stock = {ours / stock:.2f}")


if __name__ == "__main__":
    main()
