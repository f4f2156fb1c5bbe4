"""A run's first start in an environment: the CLI's imports with an empty import memo, without and
with the child that writes it alongside (`import_memo.start_warming`), and with the memo already
written, each in a fresh process, alternated; wall seconds from process start to the imports' end.

    PYTHONPATH=src python benchmarks/probe_first_run_imports.py [--rounds 3] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

CODE = ("from embedtune.deferred_imports import defer_imports as d; d(); "
        "from embedtune.import_memo import remember_import_scans as r; r(warm_ahead={warm}); "
        "import embedtune.cli, embedtune.train")


def timed(memo: str, warm: bool) -> float:
    env = {**os.environ, "EMBEDTUNE_IMPORT_MEMO_DIR": memo}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", CODE.format(warm=warm)], env=env, check=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="first-run-")
    times: dict[str, list[float]] = {"empty memo": [], "empty memo, warming child": [], "memo written": []}
    timed(os.path.join(root, "bytecode"), False)  # bytecode and page cache warm for every variant alike
    for round_ in range(args.rounds):
        for label, warm in (("empty memo", False), ("empty memo, warming child", True)):
            memo = os.path.join(root, f"{round_}-{warm}")
            times[label].append(timed(memo, warm))
            time.sleep(3)  # a warming child still writing would share the CPU with the next run
        times["memo written"].append(timed(memo, False))
        print(round_, {k: round(v[-1], 2) for k, v in times.items()}, flush=True)
    shutil.rmtree(root, ignore_errors=True)
    summary = {k: {"median_s": round(statistics.median(v), 2), "runs_s": [round(x, 2) for x in v]} for k, v in times.items()}
    print(f"\n{'variant':28s} {'median s':>9s}  runs")
    for k, v in summary.items():
        print(f"{k:28s} {v['median_s']:9.2f}  {v['runs_s']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"python": sys.version.split()[0], "cpus": os.cpu_count(), **summary}, f, indent=1)


if __name__ == "__main__":
    main()
