"""Random-init model folders and the stdlib pairs as JSONL, for the device runs that use the CLI.

    python benchmarks/make_gpu_fixtures.py --tokenizer .bench/tokenizer --root /tmp/fx --models tiny-bert,qwen3-4b
writes /tmp/fx/<model>/ for each model and /tmp/fx/pairs.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from bench_train_gpu import build_model_dir  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--root", required=True)
    ap.add_argument("--models", type=lambda s: s.split(","), default=[])
    args = ap.parse_args()
    from embedtune.data.stdlib import build_stdlib_pairs

    os.makedirs(args.root, exist_ok=True)
    with open(os.path.join(args.root, "pairs.jsonl"), "w") as f:
        for row in build_stdlib_pairs(seed=0):
            f.write(json.dumps(row) + "\n")
    for name in args.models:
        print(build_model_dir(name, args.tokenizer, args.root), flush=True)


if __name__ == "__main__":
    main()
