"""The fused dropout + residual + LayerNorm kernels (`embedtune.kernels.fused_norm`) against the plain
ops on the CPU: the cases in tests/fused_norm_cases.py, run under Triton's interpreter in a process
of their own (Triton chooses the interpreter at its first import)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")


def test_fused_norm_cases_pass_under_the_triton_interpreter():
    here = Path(__file__).parent
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(here), env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(here / "fused_norm_cases.py")],
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert " passed" in done.stdout and "failed" not in done.stdout and "skipped" not in done.stdout, done.stdout[-2000:]
