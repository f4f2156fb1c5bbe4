"""What a run reports while it trains: tokens/s in the trainer's logs, and TensorBoard / W&B wiring.

Tokens/s is an estimate kept cheap on purpose: the mean real (unpadded) tokens per training row,
measured once on a sample before training, times the rows each step consumes, over wall time
without the evaluations. It lands in every training log entry (so in the progress bar, in
TensorBoard / W&B, and in metrics.json's history) under ``tokens_per_s``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import time
from pathlib import Path

from embedtune.errors import EmbedtuneError

REPORT_TO = ("none", "tensorboard", "wandb")
TENSORBOARD_DIR = "tensorboard"  # inside the run folder
TOKENS_KEY = "tokens_per_s"
# In-training evaluations show encoding bars only from this many texts (queries + corpus) on:
# below it an evaluation takes seconds and bars would only clutter the training bar.
ENCODE_BAR_MIN_TEXTS = 10_000


def check_report_to(report_to: str, has_output: bool) -> None:
    """Refuse an unknown or unusable --report-to before anything is written."""
    if report_to not in REPORT_TO:
        raise EmbedtuneError(f"--report-to {report_to!r} is not one of {', '.join(REPORT_TO)}")
    if report_to == "tensorboard":
        if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
            raise EmbedtuneError("--report-to tensorboard: tensorboard is not installed; pip install tensorboard")
        if not has_output:
            raise EmbedtuneError("--report-to tensorboard needs an output folder for its event files (output_dir)")
    if report_to == "wandb" and importlib.util.find_spec("wandb") is None:
        raise EmbedtuneError("--report-to wandb: wandb is not installed; pip install wandb")


def report_arguments(report_to: str, work: Path, run_name: str | None, args_class) -> dict:
    """Training-argument overrides for ``report_to``; TensorBoard writes to ``work/tensorboard``."""
    out: dict = {"report_to": report_to}
    if report_to == "none":
        return out
    if run_name:
        out["run_name"] = run_name  # W&B's run name; the default would be the checkpoint folder
    names = {f.name for f in dataclasses.fields(args_class)}
    if report_to == "tensorboard" and "logging_dir" in names:  # transformers 4.x reads it from the args
        out["logging_dir"] = str(work / TENSORBOARD_DIR)
    return out


def point_tensorboard(trainer, work: Path) -> Path:
    """Send the trainer's TensorBoard events to ``work/tensorboard`` (transformers 5 has no logging_dir)."""
    from transformers.integrations import TensorBoardCallback

    logdir = work / TENSORBOARD_DIR
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback):
            callback.logging_dir = str(logdir)
    return logdir


def attach_tokens_per_second(trainer, tokens_per_step: float):
    """Add a callback that puts ``tokens_per_s`` (since the previous log) into each training log.

    It goes first in the callback list, so the progress bar and the TensorBoard / W&B callbacks,
    which also act on the log, see the value.
    """
    from transformers import TrainerCallback

    handler = trainer.callback_handler

    class TokensPerSecond(TrainerCallback):
        """Windowed tokens/s between training logs, evaluation time excluded."""

        def __init__(self):
            self.since = self.last_step_end = None
            self.step0 = 0
            self.paused = 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            self.since, self.step0, self.paused = time.perf_counter(), state.global_step, 0.0

        def on_step_end(self, args, state, control, **kwargs):
            self.last_step_end = time.perf_counter()

        def on_evaluate(self, args, state, control, **kwargs):
            if self.last_step_end is not None:  # evaluations run after a step's end and its log
                self.paused += time.perf_counter() - self.last_step_end

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs is None or "loss" not in logs or self.since is None:
                return
            now = time.perf_counter()
            seconds = now - self.since - self.paused
            steps = state.global_step - self.step0
            if steps > 0 and seconds > 0:
                rate = round(steps * tokens_per_step / seconds, 1)
                logs[TOKENS_KEY] = rate
                last = state.log_history[-1] if state.log_history else None
                if last is not None and last.get("step") == state.global_step and "loss" in last:
                    last[TOKENS_KEY] = rate  # the trainer stored its copy of the log before calling us
                _bar_postfix(handler, rate)
            self.since, self.step0, self.paused = now, state.global_step, 0.0

    callback = TokensPerSecond()
    handler.callbacks.insert(0, callback)
    return callback


def _bar_postfix(handler, rate: float) -> None:
    """Show tokens/s next to the training bar's own ETA."""
    for callback in handler.callbacks:
        bar = getattr(callback, "training_bar", None)
        if bar is not None and hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(f"{rate:,.0f} tok/s", refresh=False)


_LOG_NAMES = {"loss": "loss", "learning_rate": "lr", "grad_norm": "grad norm"}


def log_line(logs: dict, step: int, max_steps: int) -> str | None:
    """One readable line for a trainer log (the trainer's own bar prints the raw dict): training logs
    as loss / lr / grad norm / tok/s, evaluations as their retrieval metrics; None for the others."""
    where = f"step {step}/{max_steps}" if max_steps > 0 else f"step {step}"
    if "loss" in logs:
        parts = [f"{_LOG_NAMES[k]} {logs[k]:.4g}" for k in _LOG_NAMES if isinstance(logs.get(k), (int, float))]
        if isinstance(logs.get(TOKENS_KEY), (int, float)):
            parts.append(f"{logs[TOKENS_KEY]:,.0f} tok/s")
        return f"{where}  " + "  ".join(parts)
    metrics = {k.removeprefix("eval_"): v for k, v in logs.items() if k.startswith("eval_")}
    scores = {k.rsplit("_", 1)[-1]: v for k, v in metrics.items() if "@" in k and isinstance(v, (int, float))}
    if not scores:
        return None
    shown = [f"{name} {scores[name]:.4f}" for name in ("ndcg@10", "mrr@10", "recall@10") if name in scores]
    shown = shown or [f"{name} {value:.4f}" for name, value in list(scores.items())[:3]]
    runtime = metrics.get("runtime")
    return f"{where}  eval  " + "  ".join(shown) + (f"  ({runtime:.1f} s)" if isinstance(runtime, (int, float)) else "")


def readable_logs(trainer) -> None:
    """Print each log as one readable line above the trainer's progress bar instead of a raw dict."""
    from transformers.trainer_callback import ProgressCallback

    class ReadableProgress(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or self.training_bar is None or not logs:
                return
            line = log_line(logs, state.global_step, state.max_steps)
            if line is not None:
                self.training_bar.write(line)

    handler = trainer.callback_handler
    if any(type(cb) is ProgressCallback for cb in handler.callbacks):
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(ReadableProgress)


def process_age_s() -> float | None:
    """Seconds since this process started (Python start-up and imports included), where the OS says."""
    try:
        import psutil  # a dependency of accelerate, so of the trainer

        return max(0.0, time.time() - psutil.Process().create_time())
    except Exception:  # noqa: BLE001 - a missing figure, never a failed run
        return None


def _last_step(state) -> bool:
    return 0 < state.max_steps <= state.global_step


class Phases:
    """Wall-clock seconds of a run's named stages, for metrics.json's `phases_s`: where a job's time
    goes outside its training steps (the fixed cost a user waits through on every run)."""

    def __init__(self):
        age = process_age_s()
        self.seconds: dict[str, float] = {"process_start": round(age, 2)} if age is not None else {}
        self._last = time.time()

    def mark(self, name: str) -> None:
        now = time.time()
        self.seconds[name] = round(self.seconds.get(name, 0.0) + now - self._last, 2)
        self._last = now

    def step_callback(self):
        """A trainer callback that cuts the train stage where a job's fixed costs sit: the trainer's own
        set-up before the first step (trainer_setup), the first step (first_step: its one-time CUDA and
        kernel set-up), the steps (train), and the last step's checkpoint (final_checkpoint)."""
        from transformers import TrainerCallback

        phases = self

        class StepMarks(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                if "trainer_setup" not in phases.seconds:
                    phases.mark("trainer_setup")

            def on_step_end(self, args, state, control, **kwargs):
                if "first_step" not in phases.seconds:
                    phases.mark("first_step")
                elif _last_step(state):
                    phases.mark("train")

            def on_log(self, args, state, control, **kwargs):
                if _last_step(state):  # the last step's log and evaluation come before its checkpoint
                    phases.mark("train")

            on_evaluate = on_log

            def on_save(self, args, state, control, **kwargs):
                if _last_step(state):
                    phases.mark("final_checkpoint")

        return StepMarks()
