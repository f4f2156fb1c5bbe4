"""`python -m embedtune` under torchrun, stopping every rank like a crash before step CRASH_AT_STEP + 1
(unset: no stop): the interrupted run that tests/test_distributed.py resumes."""

from __future__ import annotations

import os
import sys

import transformers

from embedtune.cli import app

CRASH_AT_STEP = int(os.environ.get("CRASH_AT_STEP", "-1"))
_training_step = transformers.Trainer.training_step


def _training_step_or_crash(self, *args, **kwargs):
    if self.state.global_step == CRASH_AT_STEP:
        raise RuntimeError("simulated crash")
    return _training_step(self, *args, **kwargs)


transformers.Trainer.training_step = _training_step_or_crash

if __name__ == "__main__":
    sys.exit(app(prog_name="embedtune"))
