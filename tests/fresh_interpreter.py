"""Running test code in a fresh Python interpreter: what a process imports at start-up can only be
seen in a process of its own (pytest's has imported everything already)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def fresh(code: str, env: dict | None = None) -> dict:
    """Run `code` in a fresh interpreter (`env` added to the environment); it ends by printing one
    JSON line, returned parsed."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env={**ENV, **(env or {})}, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
