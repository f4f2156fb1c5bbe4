"""Long runs that survive failures, as one import: the names of the three modules that do it.

- `checkpoint_format`: what a checkpoint holds, its seal (a marker written last), the newest complete
  one, and whether a run may resume it (`run_config.json`, the data's digest).
- `resumable_trainer`: `ResumableTrainer`, the clock that takes checkpoints, `train_resumably`.
- `guards`: NaN/inf losses, Ctrl-C/SIGTERM and GPU OOM turned into clean stops and one-line errors.

Kept for the command line, the tests and the benchmarks, which import these names from here (and
`benchmarks/bench_input_cpu.py` replaces `train_resumably` here: the recipe reads it from this module).
"""

from __future__ import annotations

import time  # noqa: F401 - tests/test_checkpoint_cadence.py stops the clock as `resilience.time.monotonic`

from .checkpoint_format import (  # noqa: F401
    BEST_WEIGHTS, CHECKPOINTS, KEEP_CHECKPOINTS, MARKER, RESUMABLE_CHANGES, RUN_CONFIG, TRAINABLE_WEIGHTS,
    check_same_run, checkpoint_step, checkpoints_dir, data_digest, discard_incomplete, is_complete, latest_checkpoint,
    prepare_work, restore_best, resume_point, run_record, seal_checkpoint, write_json_atomic,
)
from .guards import (  # noqa: F401
    InterruptGuard, NonFiniteLoss, TrainingInterrupted, _deferrable_optimizer, _fused_adam, _NonFiniteGate,
    check_finite_weights, nonfinite_loss_message,
)
from .resumable_trainer import (  # noqa: F401
    CHECKPOINT_EVERY_S, CheckpointClock, ResumableTrainer, resume_command, save_arguments, train_resumably,
)
