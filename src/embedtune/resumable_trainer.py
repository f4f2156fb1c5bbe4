"""The trainer of a long run: checkpoints it can resume, taken by the clock, and `train_resumably`.

`ResumableTrainer` is the SentenceTransformerTrainer with checkpoints of the trainable weights only
(safetensors, in the format of `checkpoint_format`), the NaN/inf loss check of `guards` at every
step, and the CUDA-graph step of `graphs` where the run has one. `CheckpointClock` takes checkpoints
by the clock by default. `train_resumably` runs it: continuing from a checkpoint, each checkpoint
sealed, Ctrl-C/SIGTERM turned into a checkpoint and a clean stop, GPU OOM into a one-line error.
"""

from __future__ import annotations

import contextlib
import pickle
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from sentence_transformers import SentenceTransformerTrainer
from transformers import TrainerCallback

from .checkpoint_format import (
    KEEP_CHECKPOINTS, MODEL_CARD_COPY, TRAINABLE_WEIGHTS, WEIGHTS_REFERENCE, checkpoint_weights, latest_checkpoint,
    reference_weights, referenced_folder, restore_best, seal_checkpoint,
)
from .errors import EmbedtuneError
from .hf_quiet import ignoring_warnings
from .guards import (
    OUT_OF_MEMORY, HostCopy, InterruptGuard, NonFiniteLoss, TrainingInterrupted, check_finite_weights, finite_gate_for,
    nonfinite_loss_message, oom_message,
)
from .trainer_steps import graphed_training_step, listed_modules

# The default cadence is by the clock: a checkpoint of a full model with its optimizer takes seconds,
# so a step count would tax fast runs and leave slow ones unprotected. A preemption loses at most this.
CHECKPOINT_EVERY_S = 600.0


# ----------------------------------------------------------------------------------- cadence


def save_arguments(save_every: int | None, resumable: bool) -> dict:
    """Trainer arguments for periodic checkpoints: every `save_every` steps, the last KEEP_CHECKPOINTS
    kept; 0 turns them off; None leaves the cadence to `CheckpointClock` (`train_resumably`)."""
    if save_every is not None and save_every < 0:
        raise EmbedtuneError(f"--save-every {save_every}: must be 0 (off) or a number of steps")
    if not resumable or save_every == 0:
        return {"save_strategy": "no"}
    if save_every is None:  # the trainer saves when the clock sets control.should_save
        return {"save_strategy": "no", "save_total_limit": KEEP_CHECKPOINTS}
    return {"save_strategy": "steps", "save_steps": save_every, "save_total_limit": KEEP_CHECKPOINTS}


class CheckpointClock(TrainerCallback):
    """The default checkpoint cadence: one when `every_s` seconds of training have passed since the
    last checkpoint, and one at the last step (what a killed finish resumes from without retraining).
    Under torchrun the ranks must agree: rank 0's clock decides, read every `check_every` steps."""

    def __init__(self, every_s: float = CHECKPOINT_EVERY_S, check_every: int = 10):
        self.every_s, self.check_every = every_s, max(1, check_every)
        self.last = time.monotonic()

    def on_train_begin(self, args, state, control, **kwargs):
        self.last = time.monotonic()

    def on_save(self, args, state, control, **kwargs):
        self.last = time.monotonic()  # any checkpoint (a Ctrl-C's too) restarts the clock

    def on_step_end(self, args, state, control, **kwargs):
        from . import distributed

        if 0 < state.max_steps <= state.global_step:
            control.should_save = True
            return
        several = distributed.world_size() > 1
        if several and state.global_step % self.check_every:
            return
        due = time.monotonic() - self.last >= self.every_s
        if distributed.rank0_says(due) if several else due:
            control.should_save = True


def resume_command(argv: list[str] | None = None) -> str:
    """The command line that was run, with --resume appended: what continues an interrupted run."""
    args = list(sys.argv if argv is None else argv)[1:]
    if "--resume" not in args:
        args.append("--resume")
    from . import distributed

    processes = distributed.world_size()
    launcher = ["torchrun", "--nproc-per-node", str(processes), "-m", "embedtune"] if processes > 1 else ["embedtune"]
    return shlex.join([*launcher, *args])


@contextlib.contextmanager
def host_rng_kept():
    """Within the block, draws from torch's CPU generator, Python's `random` and NumPy's global generator
    leave no trace: their states are put back afterwards."""
    import random

    import numpy as np

    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


# ----------------------------------------------------------------------------------- the trainer


class ResumableTrainer(SentenceTransformerTrainer):
    """SentenceTransformerTrainer whose checkpoints hold only the trainable weights, as safetensors,
    and that stops at the first non-finite loss, before the optimizer step that would spread it."""

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The model's trainable parameters, plus any the loss owns (e.g. a learned temperature)."""
        params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        seen = {id(p) for p in params.values()}
        losses = self.loss.items() if isinstance(self.loss, dict) else [("", self.loss)]
        for key, loss in losses:
            if isinstance(loss, torch.nn.Module):
                for name, param in loss.named_parameters():
                    if param.requires_grad and id(param) not in seen:
                        seen.add(id(param))
                        params[".".join(filter(None, ("loss", key, name)))] = param
        return params

    def evaluate(self, *args, **kwargs):
        """The trainer's evaluation, leaving the host's random generators (torch's CPU generator, Python's,
        NumPy's) as it found them. Setting up an evaluation draws from them (a data loader's seed), and
        the next steps' dropout masks come from them on a CPU: else whether and where a run evaluates
        would change what it trains (two runs evaluated at different steps, or a resumed run whose
        evaluations fell elsewhere, would end with different weights)."""
        with host_rng_kept():
            return super().evaluate(*args, **kwargs)

    def evaluation_loop(self, *args, **kwargs):
        """Under embedtune's FSDP (`embedtune.sharding`, unknown to the trainer) every rank must run
        the evaluator: each forward is a collective. sentence-transformers shares evaluation across
        ranks unless FSDP is on, so say it is, for the evaluation only."""
        from .sharding import is_sharded

        if not is_sharded(self.model) or self.is_fsdp_enabled:
            return super().evaluation_loop(*args, **kwargs)
        self.is_fsdp_enabled = True
        try:
            return super().evaluation_loop(*args, **kwargs)
        finally:
            self.is_fsdp_enabled = False

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        if self._finite_gate is not None:  # no checkpoint at a step whose loss was not finite
            self._finite_gate.check()
        if self.is_fsdp_enabled:  # sharded weights: the trainer's own (gathered) save
            return super()._save(output_dir, state_dict)
        folder = Path(output_dir or self.args.output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        trainable = self.trainable_parameters()
        params = {n: p.detach() for n, p in trainable.items()}
        check_finite_weights(params, self.state.global_step, Path(self.args.output_dir))
        if self._final_weights_referenced(folder, trainable):
            return
        weights = {n: p.to("cpu", copy=True) for n, p in params.items()}
        save_file(weights, str(folder / TRAINABLE_WEIGHTS))

    # Set by the recipe where the final weights could be written once: called with the step at the last
    # step's checkpoint, it writes the run's model folder when the final weights are that step's and
    # returns (the folder, its weights file, each tensor's names there by `id`), else None.
    final_save = None
    saved_model_by: Path | None = None  # the last step's checkpoint that references the model folder

    def _final_weights_referenced(self, folder: Path, trainable: dict) -> bool:
        """The last step's checkpoint naming the model folder's weights (written now, once, by the
        recipe's `final_save`) instead of holding a copy; False where it cannot, and no folder is left."""
        if self.final_save is None or not 0 < self.state.max_steps <= self.state.global_step:
            return False
        written = self.final_save(self.state.global_step)
        if written is None:
            return False
        model_dir, weights_file, stored_names = written
        if not (weights_file.is_file() and reference_weights(folder, weights_file, trainable, stored_names)):
            shutil.rmtree(model_dir, ignore_errors=True)  # the finish writes it again
            return False
        card = Path(model_dir) / "README.md"  # the card the finish completes: kept as written now
        if card.is_file():
            shutil.copyfile(card, folder / MODEL_CARD_COPY)
        self.saved_model_by = folder
        return True

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if 0 < self.state.max_steps <= self.state.global_step:
            return  # the last step's checkpoint only lets a killed finish complete: no step follows it
        super()._save_optimizer_and_scheduler(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if self.is_fsdp_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint)
        checkpoint = Path(resume_from_checkpoint)
        referenced = referenced_folder(checkpoint)
        saved = checkpoint_weights(checkpoint)
        params = self.trainable_parameters()
        if set(saved) != set(params):
            path = checkpoint / (WEIGHTS_REFERENCE if referenced is not None else TRAINABLE_WEIGHTS)
            raise EmbedtuneError(f"{path}: its weights don't match this model's trainable weights; "
                                 "resume with the model and LoRA settings of the interrupted run")
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(saved[name].to(param.device))
        if referenced is not None:  # the last step's: the model folder it names is the finish's, written already
            self.saved_model_by = checkpoint

    def get_batch_sampler(self, dataset, batch_size, drop_last, valid_label_columns=None, generator=None, seed=0):
        """The hashed NO_DUPLICATES sampler hashing in this process (`data.sampler`); the rest as the
        trainer builds them."""
        from .data.sampler import batch_sampler

        sampler = batch_sampler(self.args.batch_sampler, dataset, batch_size=batch_size, drop_last=drop_last,
                                valid_label_columns=valid_label_columns, generator=generator, seed=seed)
        return sampler or super().get_batch_sampler(dataset, batch_size, drop_last, valid_label_columns,
                                                    generator, seed)

    # ---- a log step's loss read one step later

    defer_logs: bool | None = None  # None: where the loss lives on a GPU and one process trains; True/False: forced
    _pending_log = None  # a log step's values on their way to the host (`_take_log`)

    def _maybe_log_save_evaluate(self, tr_loss, grad_norm, model, *args, **kwargs):
        """The trainer's log, evaluation and checkpoint after a step, with a plain log step's loss and
        gradient norm read one step later. Reading them at once waits for the GPU to finish the step,
        and the GPU then idles while the host prepares the next one (every `logging_steps` steps).
        The entry keeps its own step and epoch. An evaluation, a checkpoint or the last step reads at
        once, after any entry still pending, so the log history keeps its order."""
        self._emit_pending_log(wait=False)
        control, state = self.control, self.state
        if (control.should_log and state.global_step > self._globalstep_last_logged and not control.should_evaluate
                and not control.should_save and not 0 < state.max_steps <= state.global_step
                and self._defers_logs(tr_loss)):
            self._take_log(tr_loss, grad_norm, kwargs.get("learning_rate"))
        else:
            self._emit_pending_log(wait=True)
        return super()._maybe_log_save_evaluate(tr_loss, grad_norm, model, *args, **kwargs)

    def _defers_logs(self, tr_loss) -> bool:
        if self.defer_logs is not None:
            return self.defer_logs
        from . import distributed

        tokens_seen = getattr(self.args, "include_num_input_tokens_seen", False)  # its speed figures read "now"
        return (isinstance(tr_loss, torch.Tensor) and tr_loss.is_cuda and distributed.world_size() == 1
                and tokens_seen in (False, None, "no"))

    def _take_log(self, tr_loss: torch.Tensor, grad_norm, learning_rate) -> None:
        """What the trainer's log does before its host read (sum, reset, bookkeeping), with the values
        sent to the host (`guards.HostCopy`) instead of read."""
        norm_on_device = isinstance(grad_norm, torch.Tensor)
        values = torch.stack([tr_loss.detach().float().reshape(())]
                             + ([grad_norm.detach().float().reshape(())] if norm_on_device else []))
        host = HostCopy(values)
        tr_loss -= tr_loss
        state = self.state
        self._pending_log = dict(
            host=host, step=state.global_step, epoch=state.epoch,
            steps=state.global_step - self._globalstep_last_logged,
            grad_norm=None if norm_on_device else grad_norm,
            learning_rate=learning_rate if learning_rate is not None else self._get_learning_rate())
        self._globalstep_last_logged = state.global_step
        self.store_flos()

    def _emit_pending_log(self, wait: bool) -> None:
        """Log the pending entry once its values are on the host (at once if `wait`), under its own step."""
        pending = self._pending_log
        if pending is None:
            return
        if not wait and not pending["host"].ready():
            return
        self._pending_log = None
        values = pending["host"].read().tolist()
        logs = {"loss": values[0] / pending["steps"]}
        grad_norm = values[1] if len(values) > 1 else pending["grad_norm"]
        if grad_norm is not None:
            logs["grad_norm"] = grad_norm
        logs["learning_rate"] = pending["learning_rate"]
        self._total_loss_scalar += values[0]
        state, should_log = self.state, self.control.should_log
        now = state.global_step, state.epoch
        state.global_step, state.epoch = pending["step"], pending["epoch"]
        try:
            self.log(logs)
        finally:
            state.global_step, state.epoch = now
            self.control.should_log = should_log  # (the callbacks' on_log clears it: it is this step's)

    chooses_own_steps = True  # its speed mode is the recipe's (`speed_choice`): `trainer_steps` passes it through
    graph_step = None  # an embedtune.graphs.GraphedStep when the run replays its steps as CUDA graphs
    _modules_of = None  # the graphed step's model and its modules, listed once
    _finite_gate = None  # a guards._NonFiniteGate, if the first step chose the deferred check
    _finite_gate_decided = False

    def get_resumed_dataloader(self, train_dataloader, steps_trained_in_current_epoch):
        """The trainer's loader for the resumed epoch, its batches already trained skipped. Under torchrun
        the skipping wrapper sits around accelerate's shard of the batch sampler, deeper than the
        trainer's and accelerate's `set_epoch` reach, so the sampler would replay epoch 0's order: the
        wrapper forwards `set_epoch` to the sampler (one process reaches it already)."""
        loader = super().get_resumed_dataloader(train_dataloader, steps_trained_in_current_epoch)
        outer = inner = getattr(loader, "batch_sampler", None)
        for _ in range(4):  # skip wrapper -> accelerate's shard -> the batch sampler
            inner = getattr(inner, "batch_sampler", None)
            if inner is None or hasattr(inner, "set_epoch"):
                break
        if outer is not None and not hasattr(outer, "set_epoch") and hasattr(inner, "set_epoch"):
            outer.set_epoch = inner.set_epoch
        return loader

    def get_train_dataloader(self):
        """With CUDA graphs, batches stay on the host: the graph step pads and pins them and copies them
        into its buffers without blocking. accelerate's copy to the device (a blocking one per tensor)
        would make the host wait for the GPU's previous step, and the step would copy them back."""
        loader = super().get_train_dataloader()
        if self.graph_step is not None and getattr(loader, "device", None) is not None:
            loader.device = None
        return loader

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.graph_step is not None:
            loss = self._graphed_training_step(model, inputs)
        else:
            loss = super().training_step(model, inputs, num_items_in_batch)
        if not self._finite_gate_decided:  # at the first step: the optimizer exists by then
            self._finite_gate_decided = True
            self._finite_gate = finite_gate_for(self)
            if self._finite_gate is not None:
                self.add_callback(self._finite_gate)
        if self._finite_gate is not None:
            self._finite_gate.note(loss)
        elif not torch.isfinite(loss).all():
            raise self.nonfinite_loss(loss, self.state.global_step + 1)
        return loss

    def nonfinite_loss(self, loss: torch.Tensor, step: int) -> NonFiniteLoss:
        precision = "fp16" if self.args.fp16 else "bf16" if self.args.bf16 else "fp32"
        return NonFiniteLoss(nonfinite_loss_message(loss.float().mean().item(), step, self.args.learning_rate,
                                                    precision, Path(self.args.output_dir)))

    def _graphed_training_step(self, model, inputs):
        """The trainer's step with forward and backward replayed as a CUDA graph
        (`trainer_steps.graphed_training_step`)."""
        self._modules_of = listed_modules(model, self._modules_of)
        return graphed_training_step(self, self.graph_step, model, inputs, self._modules_of)


# ----------------------------------------------------------------------------------- the run


class _Seal(TrainerCallback):
    def __init__(self, best):
        self.best = best

    def on_save(self, args, state, control, **kwargs):
        from . import distributed

        distributed.barrier()  # every rank's files (its RNG state) are written before rank 0 seals
        if args.should_save:
            seal_checkpoint(Path(args.output_dir) / f"checkpoint-{state.global_step}", state.global_step, self.best)


def _close_progress_bars(trainer) -> None:
    """A run stopped by an exception leaves the trainer's bars open; the error line should start a line."""
    for callback in trainer.callback_handler.callbacks:
        for name in ("training_bar", "prediction_bar"):
            bar = getattr(callback, name, None)
            if bar is not None and hasattr(bar, "close"):
                with contextlib.suppress(Exception):
                    bar.close()
                setattr(callback, name, None)


def _already_done(trainer, resume_from: Path) -> bool:
    """A checkpoint at the run's last step (a run stopped after it, in its finish): its weights are the
    result. The trainer would still run one more step, and this checkpoint keeps no optimizer, so its
    weights and state are loaded here instead of training (True)."""
    from transformers.trainer_callback import TrainerState

    saved = TrainerState.load_from_json(str(Path(resume_from) / "trainer_state.json"))
    if not 0 < saved.max_steps <= saved.global_step:
        return False
    trainer._load_from_checkpoint(str(resume_from))
    trainer.state = saved
    return True


def refused_checkpoint_state(checkpoint: Path) -> str:
    """The one-line error for a checkpoint whose optimizer, scheduler or RNG state torch refused to unpickle
    (it holds more than tensors: changed after it was sealed). Each state file is tried again, tensors
    only, to name the one at fault; torch's own message would suggest loading it unsafely."""
    for file in sorted(Path(checkpoint).glob("*.pt*")):
        try:
            torch.load(file, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - any refusal names this file
            return (f"{file}: holds more than tensors, so it was refused (loading it could run code); the checkpoint "
                    "was changed after it was written: remove it to resume from the one before, or start over "
                    "with --overwrite")
    return (f"{checkpoint}: its saved training state was refused (it holds more than tensors); remove this checkpoint "
            "to resume from the one before, or start over with --overwrite")


def train_resumably(trainer, best=None, resume_from: Path | None = None, resumable: bool = True,
                    clock: CheckpointClock | None = None) -> None:
    """`trainer.train()`, continuing from `resume_from`, with checkpoints sealed (when `clock` says, if
    given), Ctrl-C turned into a checkpoint and a clean stop (`TrainingInterrupted`), and GPU OOM into a
    message naming the fixes."""
    if resume_from is not None:
        restore_best(best, resume_from)
    trainer.add_callback(_Seal(best))
    guard = InterruptGuard()
    if resumable:
        trainer.add_callback(guard)
    if resume_from is not None and _already_done(trainer, resume_from):
        return
    if clock is not None and resumable:
        trainer.add_callback(clock)
    out_of_memory = False
    with guard if resumable else contextlib.nullcontext():
        try:
            # torch 2.13 deprecates DDP's broadcast_buffers, the only name the trainer has for it
            with ignoring_warnings("`broadcast_buffers` is deprecated", category=FutureWarning):
                trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        except OUT_OF_MEMORY:
            out_of_memory = True  # raised below, outside this block, so the failed step's tensors can go
        except pickle.UnpicklingError as exc:
            _close_progress_bars(trainer)
            if resume_from is None:
                raise
            raise EmbedtuneError(refused_checkpoint_state(resume_from)) from exc
        except BaseException:
            _close_progress_bars(trainer)
            raise
    if out_of_memory:
        _close_progress_bars(trainer)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise EmbedtuneError(oom_message(trainer, trainer.state.global_step + 1))
    state = trainer.state
    if guard.requested and state.global_step < state.max_steps:
        raise TrainingInterrupted(state.global_step, latest_checkpoint(Path(trainer.args.output_dir)), guard.signum)
