"""After `run_job_gpu.sh ... --root ROOT --keep-outputs`: every embedtune job's saved model loads in
plain sentence-transformers and encodes, and its weights are finite and moved from the fixture's init.

    python3 benchmarks/check_saved_job_model.py ROOT
"""

from __future__ import annotations

import glob
import sys

import torch
from safetensors.torch import load_file
from sentence_transformers import SentenceTransformer


def main() -> int:
    pattern = sys.argv[1] + "/out-*-embedtune-*/model"
    failed = 0 if glob.glob(pattern) else 1  # nothing to check is a failure
    for folder in sorted(glob.glob(pattern)):
        root = folder.split("/out-")[0]
        init = load_file(glob.glob(root + "/bert-*/model.safetensors")[0])
        saved = load_file(folder + "/model.safetensors")
        shared = [k for k in init if k in saved]
        moved = max((saved[k].float() - init[k].float()).abs().max().item() for k in shared)
        finite = all(torch.isfinite(t).all().item() for t in saved.values())
        shape = tuple(SentenceTransformer(folder).encode(["def add(a, b): return a + b", "add two numbers"]).shape)
        ok = finite and moved > 0 and len(shared) == len(init) and shape[0] == 2
        failed += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {folder}: {len(saved)} tensors ({len(shared)} of the init's), "
              f"largest change {moved:.4f}, finite {finite}, encodes {shape}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
