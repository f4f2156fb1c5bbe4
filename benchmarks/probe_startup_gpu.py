"""Where a job's start goes before its first step: the imports `embedtune train` makes, by package
(`python -X importtime`), and whether CUDA's start-up can run in a thread while the imports go on.

Each variant runs in fresh processes, alternated, three times; a line per run, then a table.
    PYTHONPATH=src python3 benchmarks/probe_startup_gpu.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys

IMPORTS = ("import embedtune.cli, importlib; importlib.import_module(\"embedtune.train\")._import_trainer_libraries()")

# The run's imports with CUDA started after them (as a run does today), or in a thread started right
# after `import torch`. Each prints its wall seconds from interpreter start as JSON.
VARIANTS = {
    "after": """
import time, os; t0 = time.perf_counter()
import torch
{imports}
t1 = time.perf_counter(); torch.zeros(1, device="cuda"); torch.cuda.synchronize(); t2 = time.perf_counter()
import json; print(json.dumps({{"imports": t1 - t0, "cuda": t2 - t1, "total": t2 - t0}}))
""",
    "thread": """
import time, os, threading; t0 = time.perf_counter()
import torch
def start():
    torch.zeros(1, device="cuda")
worker = threading.Thread(target=start); worker.start()
{imports}
t1 = time.perf_counter(); worker.join(); torch.cuda.synchronize(); t2 = time.perf_counter()
import json; print(json.dumps({{"imports": t1 - t0, "cuda": t2 - t1, "total": t2 - t0}}))
""",
}


def by_package(text: str) -> dict[str, float]:
    """Self seconds of -X importtime's lines, summed by top-level package."""
    totals: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|\s*(\S+)", line)
        if m:
            top = m[3].split(".")[0]
            totals[top] = totals.get(top, 0.0) + int(m[1]) / 1e6
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, ["src", os.environ.get("PYTHONPATH")]))}
    subprocess.run([sys.executable, "-c", IMPORTS], env=env, check=True)  # .pyc files and page cache warm
    timed = subprocess.run([sys.executable, "-X", "importtime", "-c", IMPORTS], env=env, capture_output=True, text=True)
    with open(os.path.join(args.out, "importtime.txt"), "w") as f:
        f.write(timed.stderr)
    packages = by_package(timed.stderr)
    print("import seconds by package (self time):", json.dumps({k: round(v, 3) for k, v in list(packages.items())[:15]}))
    runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    for _ in range(args.repeats):
        for name, code in VARIANTS.items():
            out = subprocess.run([sys.executable, "-c", code.format(imports=IMPORTS)], env=env, capture_output=True,
                                 text=True)
            if out.returncode:
                print(f"{name}: failed: {out.stderr[-400:]}")
                continue
            row = json.loads(out.stdout.strip().splitlines()[-1])
            runs[name].append(row)
            print(name, {k: round(v, 3) for k, v in row.items()}, flush=True)
    print("\nvariant   imports s   cuda s after them   total s   (medians)")
    for name, rows in runs.items():
        if rows:
            med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
            print(f"{name:8s} {med['imports']:10.2f} {med['cuda']:19.2f} {med['total']:9.2f}")


if __name__ == "__main__":
    main()
