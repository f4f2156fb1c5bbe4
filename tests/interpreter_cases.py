"""Run a file of Triton kernel cases under Triton's interpreter, in a process of its own: Triton picks
the interpreter when it is first imported, which other tests in this process may already have done."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_cases(name: str, timeout: int = 900) -> None:
    """Assert that tests/NAME passes, with every case run (none failed or skipped)."""
    here = Path(__file__).parent
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(here), env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(here / name)],
                          env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert " passed" in done.stdout and "failed" not in done.stdout and "skipped" not in done.stdout, done.stdout[-2000:]
