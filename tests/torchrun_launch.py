"""Launching a test's worker script under torchrun (two ranks, gloo on CPU), for the tests that train
across processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent


def worker_env():
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent / "src"), env.get("PYTHONPATH", "")])
    return env


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args, nproc: int = 2, cwd=None, timeout: int = 300, attempts: int = 2, env: dict | None = None):
    """Run a torchrun launch to its end. A launch that hangs (once in a CI run, gloo ranks waited on
    each other for 10 minutes; the same launch takes seconds and passed on every rerun) is killed with
    its workers and started again on a fresh port, once; a second hang fails the test."""
    import signal

    for attempt in range(attempts):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
               *map(str, args)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**worker_env(), **(env or {})}, cwd=cwd,
                                start_new_session=True)  # its own process group: a hang is killed whole
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
            return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            if attempt == attempts - 1:
                raise


def exit_without_teardown() -> None:
    """For a worker whose work is done and written: leave at once. About one launch in twelve aborted
    in the interpreter's teardown ("terminate called without an active exception", SIGABRT in torch's
    C++ threads), failing the launch after its work."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
