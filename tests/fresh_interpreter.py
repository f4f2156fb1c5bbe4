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


def console_main_code(hook: str, command: str) -> str:
    """Code for `fresh` that imports embedtune and its CLI, notes whether that alone installed the
    import hook `hook` ("module:Class" in `sys.meta_path`), then runs `console_main` with `command`
    (indented code that fills the dict `seen`) as the CLI's command, and prints both."""
    module, _, name = hook.partition(":")
    body = textwrap.indent(textwrap.dedent(command).strip(), "    ")
    return "\n".join([
        "import json, sys",
        "import embedtune, embedtune.cli",
        f"from {module} import {name}",
        f"on_import = any(isinstance(f, {name}) for f in sys.meta_path)",
        "seen = {}",
        "def main():",
        body,
        "    raise SystemExit(0)",
        "embedtune.cli.main = main",
        'embedtune.cli.EXIT_HANDLERS_NEEDED = ("json",)  # exit the usual way, after this print',
        "try:",
        "    embedtune.cli.console_main()",
        "except SystemExit:",
        "    pass",
        'print(json.dumps({"on_import": on_import, **seen}))',
    ])
