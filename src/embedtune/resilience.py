"""Long runs that survive failures: checkpoints, `--resume`, Ctrl-C, NaN/inf losses and GPU OOM.

Checkpoints. The HF Trainer writes `checkpoint-N/` folders in place, file by file, so a process
killed mid-save leaves a folder that looks like a checkpoint (and transformers' `get_last_checkpoint`
goes by the folder name alone, so it would pick it). Here a folder counts only once
`embedtune_checkpoint.json` is in it: written last (after the trainer's files and the best-so-far
weights are flushed to disk), in one rename, listing every file with its size. A checkpoint holds
the trainable weights (safetensors; for LoRA a few MB), the optimizer, scheduler and RNG states
(torch files that transformers loads with `weights_only=True`, numpy's RNG types allow-listed:
nothing else is unpickled), `trainer_state.json` (step, log history) and `BestWeights`' best-so-far
weights. The data order needs no state: the NO_DUPLICATES sampler reshuffles from seed + epoch and
the trainer skips the batches already trained on, then restores the RNG (dropout) state.

The run's resolved config (and a digest of the data) is kept in `OUTPUT.partial/checkpoints/run_config.json`.
Resuming with other settings is refused, except those in `RESUMABLE_CHANGES`: a different learning
rate would be silently overridden by the restored optimizer and scheduler, and anything touching
batches, data or seed would give a different run.

In flight (`train_resumably`): the first Ctrl-C (or SIGTERM) makes the trainer save a checkpoint after the current
step and stop (`TrainingInterrupted`, a KeyboardInterrupt); a second one aborts at once. A NaN/inf
loss stops the run (`NonFiniteLoss`) before the optimizer uses it: on the CPU or across processes at
its step; on one GPU with the fused optimizer one step later, its update skipped on the device
(`_NonFiniteGate`), so the host never waits for a step's loss. No checkpoint is sealed with
non-finite weights. CUDA out-of-memory becomes one line naming the flags that need less.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from sentence_transformers import SentenceTransformerTrainer
from transformers import TrainerCallback

from .config_file import dataclass_defaults
from .errors import EmbedtuneError

MARKER = "embedtune_checkpoint.json"
TRAINABLE_WEIGHTS = "trainable.safetensors"
BEST_WEIGHTS = "best_weights.safetensors"
RUN_CONFIG = "run_config.json"
CHECKPOINTS = "checkpoints"
# The newest checkpoint is unmarked while the trainer writes it (and rotates old ones out), so the
# one before it must survive until then.
KEEP_CHECKPOINTS = 2
# The default cadence is by the clock: a checkpoint of a full model with its optimizer takes seconds,
# so a step count would tax fast runs and leave slow ones unprotected. A preemption loses at most this.
CHECKPOINT_EVERY_S = 600.0
# Settings a resumed run may change: where things go, logging, and memory/speed knobs that compute the
# same step (activation checkpointing, the packed forward, GradCache and its chunk size). The data
# path may change; its content may not (`data_sha256`).
RESUMABLE_CHANGES = frozenset({
    "resume", "overwrite", "output_dir", "data", "logging_steps", "save_every", "report_to",
    "gradient_checkpointing", "fast", "cached_loss", "token_budget", "compile", "cuda_graphs",
})
_FLAG_NAMES = {"evals_per_run": "--evals", "eval": "--no-eval", "lora_r": "--lora-r/--full",
               "data_sha256": "the data's content", "extra": "extra training arguments"}
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
_OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


class NonFiniteLoss(EmbedtuneError):
    """The loss (or the weights) became NaN or inf; the run stops before the optimizer uses it."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM stopped the run after a step and a checkpoint; `--resume` continues it.
    `signum` is the signal, so the command line can exit with 128 + it (130, or 143 for SIGTERM)."""

    def __init__(self, step: int, checkpoint: Path | None, signum: int = signal.SIGINT):
        where = f"checkpoint saved in {checkpoint}" if checkpoint else "no checkpoint could be saved"
        super().__init__(f"stopped at step {step}; {where}")
        self.step, self.checkpoint, self.signum = step, checkpoint, int(signum)


# ----------------------------------------------------------------------------------- on disk


def checkpoint_step(folder: Path) -> int | None:
    match = _CHECKPOINT_NAME.match(Path(folder).name)
    return int(match.group(1)) if match else None


def is_complete(folder: Path) -> bool:
    """A checkpoint folder whose marker exists, names its own step and lists files that are all there."""
    try:
        marker = json.loads((Path(folder) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if marker.get("step") != checkpoint_step(folder) or not marker.get("files"):
        return False
    for name, size in marker["files"].items():
        path = Path(folder) / name
        if not path.is_file() or path.stat().st_size != size:
            return False
    return True


def _checkpoint_folders(checkpoints: Path) -> list[Path]:
    if not Path(checkpoints).is_dir():
        return []
    found = [p for p in Path(checkpoints).iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(checkpoints: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint in a run's checkpoints folder, or None."""
    complete = [p for p in _checkpoint_folders(Path(checkpoints)) if is_complete(p)]
    return complete[-1] if complete else None


def checkpoints_dir(output: str | os.PathLike) -> Path:
    """Where the checkpoints of a run writing to `output` live (beside the real output: links followed)."""
    from .run_folder import work_folder

    return work_folder(output) / CHECKPOINTS


def discard_incomplete(checkpoints: Path) -> None:
    for folder in _checkpoint_folders(checkpoints):
        if not is_complete(folder):
            shutil.rmtree(folder, ignore_errors=True)


def _fsync(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")
    _fsync(tmp)
    os.replace(tmp, path)
    _fsync(path.parent)


def seal_checkpoint(folder: Path, step: int, best=None) -> None:
    """Add the best-so-far weights to a checkpoint the trainer has just written, then mark it complete."""
    meta = None
    if best is not None:
        meta, weights = best.state()
        if weights:
            save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / BEST_WEIGHTS))
        if meta.get("step") is None:
            meta = None  # no evaluation yet
    files = {}
    for path in sorted(p for p in folder.iterdir() if p.is_file() and p.name != MARKER):
        _fsync(path)
        files[path.name] = path.stat().st_size
    write_json_atomic(folder / MARKER, {"step": step, "files": files, "best": meta})


def restore_best(best, checkpoint: Path) -> None:
    """Give a resumed run's BestWeights the best-so-far weights and score saved with the checkpoint."""
    meta = json.loads((checkpoint / MARKER).read_text(encoding="utf-8")).get("best")
    if best is not None and meta:
        weights = checkpoint / BEST_WEIGHTS
        best.load_state(meta, load_file(str(weights), device="cpu") if weights.exists() else {})


# ----------------------------------------------------------------------------------- same run?


def data_digest(path: str | os.PathLike, exclude: tuple[str | os.PathLike, ...] = ()) -> str | None:
    """sha256 of a data file (or of every file of a dataset folder, but those under `exclude`: a run's
    own folders inside it); None for anything else."""
    root = Path(path)
    skip = [Path(os.path.realpath(folder)) for folder in exclude]

    def kept(file: Path) -> bool:
        real = Path(os.path.realpath(file))
        return not any(folder == real or folder in real.parents for folder in skip)

    files = ([root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file() and kept(p))
             if root.is_dir() else [])
    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        digest.update(str(file.relative_to(root) if file != root else file.name).encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def run_record(config) -> dict:
    """What must match between a checkpointed run and its resumption (JSON-normalised)."""
    fields = {k: v for k, v in dataclasses.asdict(config).items() if k not in RESUMABLE_CHANGES}
    own = ()
    if getattr(config, "output_dir", None):  # a run's folders may lie inside a dataset folder
        from .run_folder import work_folder

        work = work_folder(config.output_dir)
        own = (work.with_name(work.name.removesuffix(".partial")), work)
    record = {"config": fields, "data_sha256": data_digest(config.data, exclude=own)}
    return json.loads(json.dumps(record, default=str))


def _defaults(config) -> dict:
    return json.loads(json.dumps(dataclass_defaults(type(config)), default=str))


def _flag(name: str) -> str:
    return _FLAG_NAMES.get(name, "--" + name.replace("_", "-"))


def check_same_run(checkpoints: Path, config) -> None:
    """Refuse to resume a run made with other settings, naming the first difference."""
    try:
        saved = json.loads((checkpoints / RUN_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise EmbedtuneError(f"{checkpoints / RUN_CONFIG}: missing or unreadable, so this run can't be resumed; "
                             "start over with --overwrite") from None
    now, defaults = run_record(config), _defaults(config)
    then = saved.get("config", {})
    diffs = [(k, then.get(k, defaults.get(k)), v) for k, v in now["config"].items() if then.get(k, defaults.get(k)) != v]
    if saved.get("data_sha256") != now["data_sha256"]:
        diffs.append(("data_sha256", "", ""))
    if diffs:
        name, was, is_ = diffs[0]
        detail = f"{_flag(name)} changed" if name in ("data_sha256", "extra") else f"{_flag(name)} is {is_!r}, was {was!r}"
        more = f" (and {', '.join(_flag(d[0]) for d in diffs[1:])})" if len(diffs) > 1 else ""
        raise EmbedtuneError(f"can't resume {checkpoints.parent}: {detail}{more}; rerun with the settings of the "
                             "interrupted run, or drop --resume and pass --overwrite to start over")


def resume_point(work: Path, config, resumable: bool) -> Path | None:
    """The checkpoint `config.resume` continues from (None: a fresh start), validated before anything
    is loaded or written. A fresh start refuses to throw away an interrupted run unless `overwrite`."""
    checkpoints = work / CHECKPOINTS
    latest = latest_checkpoint(checkpoints)
    if getattr(config, "resume", False):
        if not resumable:
            raise EmbedtuneError("--resume needs the output folder of the interrupted run (--output)")
        if latest is None:
            finished = work.with_name(work.name.removesuffix(".partial"))
            if not work.exists() and (finished / "metrics.json").exists():
                raise EmbedtuneError(f"nothing to resume: the run in {finished} has finished")
            raise EmbedtuneError(f"nothing to resume: {checkpoints} holds no complete checkpoint; "
                                 "run without --resume to start")
        check_same_run(checkpoints, config)
        return latest
    if latest is not None and not config.overwrite:
        raise EmbedtuneError(f"{work}: holds an interrupted run (checkpoint at step {checkpoint_step(latest)}); "
                             "pass --resume to continue it or --overwrite to start over")
    return None


def prepare_work(work: Path, config, resume_from: Path | None, resumable: bool) -> None:
    """Resuming: drop checkpoints a crash left half-written. Else: a fresh work folder holding the
    run's config, which a later --resume must match."""
    checkpoints = work / CHECKPOINTS
    if resume_from is not None:
        discard_incomplete(checkpoints)
        return
    if work.exists():
        shutil.rmtree(work)
    checkpoints.mkdir(parents=True)
    if resumable:
        write_json_atomic(checkpoints / RUN_CONFIG, run_record(config))


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
    return shlex.join(["embedtune", *args])


# ----------------------------------------------------------------------------------- the trainer


def check_finite_weights(weights: dict[str, torch.Tensor], step: int, checkpoints: Path) -> None:
    bad = [name for name, tensor in weights.items() if not torch.isfinite(tensor).all()]
    if bad:
        raise NonFiniteLoss(f"weights became NaN/inf by step {step} (e.g. {bad[0]}): likely a learning rate too "
                            f"high or fp16 overflow; lower --lr, or train in bf16/fp32; {_last_good(checkpoints)}")


def nonfinite_loss_message(value: float, step: int, lr: float, precision: str, checkpoints: Path) -> str:
    """One line: the step, the likely cause for this precision, what to change, where the last good checkpoint is."""
    if precision == "fp16":
        cause = f"fp16 overflow or a learning rate too high (--lr {lr:g}): train in bf16/fp32 or lower --lr"
    elif precision == "bf16":
        cause = f"a learning rate too high (--lr {lr:g}) or bf16 precision: lower --lr or train in fp32"
    else:
        cause = f"a learning rate too high (--lr {lr:g}): lower --lr"
    return f"training loss became {value} at step {step}: likely {cause}; {_last_good(checkpoints)}"


def _last_good(checkpoints: Path) -> str:
    latest = latest_checkpoint(checkpoints)
    if latest is None:
        return "no checkpoint was saved before it"
    return f"the last good checkpoint (step {checkpoint_step(latest)}) is kept in {latest}"


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
        weights = {n: p.detach().to("cpu", copy=True) for n, p in self.trainable_parameters().items()}
        check_finite_weights(weights, self.state.global_step, Path(self.args.output_dir))
        save_file(weights, str(folder / TRAINABLE_WEIGHTS))

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if 0 < self.state.max_steps <= self.state.global_step:
            return  # the last step's checkpoint only lets a killed finish complete: no step follows it
        super()._save_optimizer_and_scheduler(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if self.is_fsdp_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint)
        path = Path(resume_from_checkpoint) / TRAINABLE_WEIGHTS
        saved = load_file(str(path), device="cpu")
        params = self.trainable_parameters()
        if set(saved) != set(params):
            raise EmbedtuneError(f"{path}: its weights don't match this model's trainable weights; "
                                 "resume with the model and LoRA settings of the interrupted run")
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(saved[name].to(param.device))

    def get_batch_sampler(self, dataset, batch_size, drop_last, valid_label_columns=None, generator=None, seed=0):
        """The hashed NO_DUPLICATES sampler hashing in this process (`data.sampler`); the rest as the
        trainer builds them."""
        from .data.sampler import batch_sampler

        sampler = batch_sampler(self.args.batch_sampler, dataset, batch_size=batch_size, drop_last=drop_last,
                                valid_label_columns=valid_label_columns, generator=generator, seed=seed)
        return sampler or super().get_batch_sampler(dataset, batch_size, drop_last, valid_label_columns,
                                                    generator, seed)

    graph_step = None  # an embedtune.graphs.GraphedStep when the run replays its steps as CUDA graphs
    _modules_of = None  # the graphed step's model and its modules, listed once
    _finite_gate = None  # a _NonFiniteGate, if the first step chose the deferred check
    _finite_gate_decided = False

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
            optimizer = _deferrable_optimizer(self)
            if optimizer is not None:
                self._finite_gate = _NonFiniteGate(self, optimizer)
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
        """The trainer's step (loss scaled for gradient accumulation, as `Trainer.training_step` does)
        with forward and backward replayed as a CUDA graph."""
        # What the trainer's own step does before its forward: every module in train mode (a replayed
        # graph keeps the modes it was captured in), and the optimizer's train mode where it has one.
        from .graphs import train_mode

        if self._modules_of is None or self._modules_of[0] is not model:
            self._modules_of = list(model.modules())  # listed once: reading their flags is cheap
        train_mode(model, self._modules_of)
        if callable(getattr(self.optimizer, "train", None)):
            self.optimizer.train()
        # the batch stays on the host, where the graph step reads its shape and pads it, then copies
        # it into the graph's buffers (moving it to the device first would cost a round trip and a sync)
        inputs = dict(inputs)
        inputs.pop("dataset_name", None)
        features, _labels = self.collect_features(inputs)
        scale = 1.0 / self.current_gradient_accumulation_steps
        loss = self.graph_step(features, scale=scale) * scale
        every = self.args.torch_empty_cache_steps
        if every is not None and self.state.global_step % every == 0:
            torch.cuda.empty_cache()
        return loss


def _fused_adam(optimizer):
    """The torch Adam/AdamW under accelerate's wrapper if it runs the fused kernel, which skips its
    update on the device when its `found_inf` tensor is set (what GradScaler uses); else None."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)) and inner.defaults.get("fused"):
        return inner
    return None


def _deferrable_optimizer(trainer):
    """The fused optimizer `_NonFiniteGate` works through if it guards this run (one CUDA process, a
    fused Adam/AdamW, no fp16 scaler, which sets `found_inf` itself), else None. Under torch.distributed
    each rank must stop at the same step, and on the CPU reading the loss costs nothing: there each loss
    is checked at once."""
    if (trainer.args.device.type != "cuda" or trainer.args.world_size != 1 or trainer.args.fp16
            or not hasattr(TrainerCallback, "on_pre_optimizer_step")):  # transformers calls the gate before the step
        return None
    return _fused_adam(trainer.optimizer)


class _NonFiniteGate(TrainerCallback):
    """The NaN/inf loss check without reading every loss on the host: each read waits for the GPU,
    which then idles while the host prepares the next step. Each micro-step's loss folds into a flag
    on the device; the fused optimizer takes it as `found_inf` and skips its update when it is set, so
    the weights stay finite; the host reads the flag one step later, when the GPU is past it, and
    stops the run there, naming the step whose loss was not finite. Checkpoints wait for the flag.
    The flag goes to page-locked host memory by an asynchronous copy behind an event, and the host
    waits on that event only: a plain `.item()` would wait for everything queued on the stream (the
    next step too), leaving the GPU idle while the host prepares the step after."""

    def __init__(self, trainer, optimizer):
        self.trainer = trainer
        self.optimizer = optimizer  # the fused Adam/AdamW that reads `found_inf`
        self.flag = None  # this optimizer step's flag: a 0-dim float32, 1.0 if a loss was not finite
        self.losses: list[torch.Tensor] = []  # its micro-steps' losses, for the message
        self.pending: list[tuple[torch.Tensor, Any, list, int]] = []  # (host flag, event, losses, step) not yet read

    def note(self, loss: torch.Tensor) -> None:
        bad = (~torch.isfinite(loss.detach())).any().to(torch.float32)
        self.flag = bad if self.flag is None else torch.maximum(self.flag, bad)
        self.losses.append(loss.detach())

    def _close_step(self, step: int) -> None:
        flag, event = self.flag, None
        if flag.is_cuda:  # copied behind the step's work; `check` waits for this point of the stream only
            host = torch.empty((), dtype=flag.dtype, pin_memory=True)
            host.copy_(flag, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            flag = host
        self.pending.append((flag, event, self.losses, step))
        self.flag, self.losses = None, []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.flag is not None:
            self.optimizer.found_inf = self.flag
            self._close_step(state.global_step + 1)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.optimizer.found_inf = None

    def on_step_end(self, args, state, control, **kwargs):
        self.check(keep_last=1)  # the steps before this one: done on the GPU by now

    def on_train_end(self, args, state, control, **kwargs):
        if self.flag is not None:  # micro-steps after the last optimizer step
            self._close_step(state.global_step + 1)
        self.check()

    def check(self, keep_last: int = 0) -> None:
        """Raise NonFiniteLoss for the oldest unread step whose loss was not finite."""
        while len(self.pending) > keep_last:
            flag, event, losses, step = self.pending.pop(0)
            if event is not None:
                event.synchronize()
            if flag.item():
                self.pending.clear()
                loss = next(x for x in losses if not torch.isfinite(x).all())
                raise self.trainer.nonfinite_loss(loss, step)


# ----------------------------------------------------------------------------------- the run


class _Seal(TrainerCallback):
    def __init__(self, best):
        self.best = best

    def on_save(self, args, state, control, **kwargs):
        from . import distributed

        distributed.barrier()  # every rank's files (its RNG state) are written before rank 0 seals
        if args.should_save:
            seal_checkpoint(Path(args.output_dir) / f"checkpoint-{state.global_step}", state.global_step, self.best)


class InterruptGuard(TrainerCallback):
    """First Ctrl-C or SIGTERM (what schedulers and Kubernetes send before a preemption): finish the
    current step, save a checkpoint, stop. A second one: abort at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)
    NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}

    def __init__(self):
        self.requested = False
        self.signum = signal.SIGINT  # the first signal received
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested, self.signum = True, signum
        print(f"\n{self.NAMES.get(signum, signum)}: saving a checkpoint after this step, then stopping "
              "(Ctrl-C again aborts at once)", file=sys.stderr, flush=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}
        return False

    def on_step_end(self, args, state, control, **kwargs):
        from . import distributed

        requested = self.requested
        if distributed.initialized():  # ranks must stop at the same step, whichever saw the signal
            import torch.distributed as dist

            flag = torch.tensor([int(requested)], device=args.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            requested = self.requested = bool(flag.item())
        if requested:
            control.should_save = True
            control.should_training_stop = True


def _oom_message(trainer, step: int) -> str:
    args = trainer.args
    max_len = getattr(trainer.model, "max_seq_length", None)
    checkpoints = Path(args.output_dir)
    latest = latest_checkpoint(checkpoints)
    keep = (f"; the last checkpoint (step {checkpoint_step(latest)}) is kept in {latest}: --resume continues it, "
            "e.g. with --gradient-checkpointing or --cached-loss added" if latest else "")
    return (f"out of GPU memory at step {step} (--batch-size {args.per_device_train_batch_size}, --max-seq-length "
            f"{max_len}): use a smaller --batch-size or --max-seq-length, add --gradient-checkpointing, or use "
            f"--cached-loss with a smaller --token-budget{keep}")


def _close_progress_bars(trainer) -> None:
    """A run stopped by an exception leaves the trainer's bars open; the error line should start a line."""
    for callback in trainer.callback_handler.callbacks:
        for name in ("training_bar", "prediction_bar"):
            bar = getattr(callback, name, None)
            if bar is not None and hasattr(bar, "close"):
                with contextlib.suppress(Exception):
                    bar.close()
                setattr(callback, name, None)


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
    if resume_from is not None:
        from transformers.trainer_callback import TrainerState

        saved = TrainerState.load_from_json(str(Path(resume_from) / "trainer_state.json"))
        if 0 < saved.max_steps <= saved.global_step:
            # Nothing left to train (a run stopped after its last step, in its finish): the trainer would
            # still run one more step, and this checkpoint keeps no optimizer; its weights are the result.
            trainer._load_from_checkpoint(str(resume_from))
            trainer.state = saved
            return
    if clock is not None and resumable:
        trainer.add_callback(clock)
    out_of_memory = False
    with guard if resumable else contextlib.nullcontext():
        try:
            trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        except _OUT_OF_MEMORY:
            out_of_memory = True  # raised below, outside this block, so the failed step's tensors can go
        except BaseException:
            _close_progress_bars(trainer)
            raise
    if out_of_memory:
        _close_progress_bars(trainer)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise EmbedtuneError(_oom_message(trainer, trainer.state.global_step + 1))
    state = trainer.state
    if guard.requested and state.global_step < state.max_steps:
        raise TrainingInterrupted(state.global_step, latest_checkpoint(Path(trainer.args.output_dir)), guard.signum)
