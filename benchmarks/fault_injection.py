"""The whole fault-injection matrix of `embedtune train`: every kill point x SIGKILL/SIGINT/SIGTERM x
(over a previous result with --overwrite, into a new folder), each recovered as a user would and
checked against the uninterrupted run (tests/test_fault_injection.py holds the points and the checks;
CI runs one case per kill point).

    python benchmarks/fault_injection.py                     # the whole matrix, serially
    python benchmarks/fault_injection.py --points finish:after-seal step:5 --signals SIGINT

Prints each case, then: kill points tried, cases run, runs lost (the new result missing or wrong, the
previous result gone before the new one was in place, or checkpointed training lost), and cases with
other problems (a traceback, a wrong exit code, something left behind). Exit code 1 if any.
Equivalent, through pytest: EMBEDTUNE_FAULT_MATRIX=full python -m pytest -q tests/test_fault_injection.py
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import test_fault_injection as fi  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", nargs="*", default=[p for p, _ in fi.POINTS], help="kill points (default: all)")
    parser.add_argument("--signals", nargs="*", default=list(fi.SIGNALS), help="signals (default: all three)")
    parser.add_argument("--modes", nargs="*", default=list(fi.MODES), help="output modes (default: both)")
    parser.add_argument("--json", help="also write every case's result to this file")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (its path is printed)")
    args = parser.parse_args()
    unknown = sorted(set(args.points) - set(dict(fi.POINTS)) | set(args.signals) - set(fi.SIGNALS)
                     | set(args.modes) - set(fi.MODES))
    if unknown:
        parser.error(f"unknown: {', '.join(unknown)}")
    cases = [(p, s, m) for p, s, m in fi.all_cases() if p in args.points and s in args.signals and m in args.modes]

    started = time.monotonic()
    holder = tempfile.TemporaryDirectory(prefix="embedtune-faults-")
    root = Path(holder.name)
    setting = fi.make_setting(root / "setting")
    print(f"setting ready in {time.monotonic() - started:.0f} s (server, tiny model, uninterrupted run)", flush=True)
    results = []
    try:
        for i, (point, sig, mode) in enumerate(cases, 1):
            result = fi.run_case(setting, point, sig, mode, root / "case")
            results.append(result)
            verdict = "LOST" if result.lost else "problem" if result.problems else "ok"
            print(f"[{i}/{len(cases)}] {verdict:7} {result.seconds:5.1f} s  {result.describe()}", flush=True)
    finally:
        setting.server.close()
        if args.keep:
            print(f"kept {root}")
        else:
            holder.cleanup()
    lost = sum(r.lost for r in results)
    other = sum(bool(r.problems) and not r.lost for r in results)
    print()
    print(f"kill points tried: {len({r.point for r in results})}")
    print(f"signals: {', '.join(dict.fromkeys(r.signal for r in results))}; modes: "
          f"{', '.join(dict.fromkeys(r.mode for r in results))}")
    print(f"cases run: {len(results)}")
    print(f"runs lost: {lost}")
    print(f"cases with other problems: {other}")
    print(f"time: {time.monotonic() - started:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps([vars(r) for r in results], indent=2, default=str))
    return 1 if lost or other else 0


if __name__ == "__main__":
    sys.exit(main())
