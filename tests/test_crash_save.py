"""A save killed midway leaves the previous model folder exactly as it was (stock SentenceTransformer
loads it), and the next save to that folder clears what the killed one left behind.

The child process (tests/interrupt_child.py) stops inside the save, after the new model is written
into the temp folder and before the rename, and waits there until this test kills it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from embedtune import FastModel, save_merged, to_sentence_transformer
from embedtune.files import clear_stale

HERE = Path(__file__).parent
HANG_GUARD_S = 600  # only ends a hung test; nothing waits for a duration
TEXTS = ["binary search over a sorted list", "parse a date string", "open a file for writing"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from tiny_models import make_tiny_model

    return make_tiny_model("bert", tmp_path_factory.mktemp("tiny_crash"))


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_save_killed_midway_leaves_the_previous_folder_intact(tmp_path, tiny):
    from sentence_transformers import SentenceTransformer

    model, tokenizer = FastModel.from_pretrained(str(tiny), max_seq_length=32)
    st = to_sentence_transformer(model, tokenizer)
    target = tmp_path / "model"
    save_merged(st, target)
    before = _files(target)
    encoded_before = SentenceTransformer(str(target), device="cpu").encode(TEXTS)

    gate = tmp_path / "gate"
    gate.mkdir()
    env = dict(os.environ, CHILD_GATE_DIR=str(gate), CHILD_BLOCK_AT="weights", CHILD_TINY_MODEL=str(tiny),
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    child = subprocess.Popen([sys.executable, str(HERE / "interrupt_child.py"), "save", str(target)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + HANG_GUARD_S
        while not (gate / "reached").exists():
            if child.poll() is not None:
                pytest.fail(f"child exited with {child.returncode} before its gate: {child.communicate()[1][-3000:]}")
            assert time.monotonic() < deadline, "child never reached its gate"
            time.sleep(0.05)
        strays = list(tmp_path.glob(".model.tmp-*"))
        assert len(strays) == 1 and (strays[0] / "modules.json").exists(), "the new model was being written"
    finally:
        child.kill()  # SIGKILL mid-save (and never a child left behind)
        child.communicate()
    assert child.returncode == -signal.SIGKILL

    assert _files(target) == before, "the previous folder must be untouched"
    encoded = SentenceTransformer(str(target), device="cpu").encode(TEXTS)
    assert np.abs(encoded - encoded_before).max() < 1e-6

    save_merged(st, target, overwrite=True)  # the next save to the same folder
    assert not strays[0].exists(), "the killed save's temp folder is cleared"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".model")] == []
    assert np.abs(SentenceTransformer(str(target), device="cpu").encode(TEXTS) - encoded_before).max() < 1e-6


def test_crash_between_the_two_renames_is_undone(tmp_path):
    """replace_folder moves the old folder aside, then the new one in; a crash between the two leaves
    no target, and the next save (clear_stale) puts the previous folder back."""
    target = tmp_path / "model"
    dead = _dead_pid()
    aside = tmp_path / f".model.old-{dead}-0123abcd"
    aside.mkdir()
    (aside / "weights.bin").write_bytes(b"previous")
    new = tmp_path / f".model.tmp-{dead}-4567cdef"
    new.mkdir()
    (new / "weights.bin").write_bytes(b"half-written")
    live = tmp_path / f".model.tmp-{os.getpid()}-89abcdef"  # a save still running in this process
    live.mkdir()

    clear_stale(target)
    assert (target / "weights.bin").read_bytes() == b"previous"
    assert not aside.exists() and not new.exists()
    assert live.exists(), "a live process's temp folder is left alone"
