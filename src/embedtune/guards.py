"""What stops a run cleanly instead of wrecking it: NaN/inf losses, Ctrl-C/SIGTERM and GPU OOM.

- A NaN/inf loss stops the run (`NonFiniteLoss`) before the optimizer uses it: on the CPU or across
  processes at its step (`ResumableTrainer.training_step` reads it); on one GPU with the fused
  optimizer one step later, its update skipped on the device (`_NonFiniteGate`), so the host never
  waits for a step's loss. No checkpoint is sealed with non-finite weights (`check_finite_weights`).
- The first Ctrl-C (or SIGTERM) makes the trainer save a checkpoint after the current step and stop
  (`InterruptGuard`; the run then raises `TrainingInterrupted`, a KeyboardInterrupt); a second one
  aborts at once.
- CUDA out-of-memory becomes one line naming the flags that need less (`oom_message`).
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from .checkpoint_format import checkpoint_step, latest_checkpoint
from .errors import EmbedtuneError

OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


class NonFiniteLoss(EmbedtuneError):
    """The loss (or the weights) became NaN or inf; the run stops before the optimizer uses it."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM stopped the run after a step and a checkpoint; `--resume` continues it.
    `signum` is the signal, so the command line can exit with 128 + it (130, or 143 for SIGTERM)."""

    def __init__(self, step: int, checkpoint: Path | None, signum: int = signal.SIGINT):
        where = f"checkpoint saved in {checkpoint}" if checkpoint else "no checkpoint could be saved"
        super().__init__(f"stopped at step {step}; {where}")
        self.step, self.checkpoint, self.signum = step, checkpoint, int(signum)


# ----------------------------------------------------------------------------------- NaN/inf


def check_finite_weights(weights: dict[str, torch.Tensor], step: int, checkpoints: Path) -> None:
    """Raise NonFiniteLoss if any weight holds a NaN/inf. Checked where the weights live (on a GPU, one
    pass per tensor and a single read of all the flags, before a checkpoint copies them out)."""
    flags = [torch.isfinite(t).all() for t in weights.values()]
    finite = torch.stack([f.to(flags[0].device) for f in flags]).tolist() if flags else []
    bad = [name for name, ok in zip(weights, finite) if not ok]
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


class HostCopy:
    """A device tensor on its way to the host: copied into page-locked memory behind an event, so that
    reading it waits for that point of the stream only, not for the work queued after it. (A CPU
    tensor is simply kept.)"""

    def __init__(self, tensor: torch.Tensor):
        self.value, self.event = tensor, None
        if tensor.is_cuda:
            self.value = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self.value.copy_(tensor, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()

    def ready(self) -> bool:
        return self.event is None or self.event.query()

    def read(self) -> torch.Tensor:
        if self.event is not None:
            self.event.synchronize()
        return self.value


def finite_gate_for(trainer) -> _NonFiniteGate | None:
    """The deferred NaN/inf check for this run (chosen at its first step, once the optimizer exists),
    or None: then the trainer checks each loss at once."""
    optimizer = _deferrable_optimizer(trainer)
    return _NonFiniteGate(trainer, optimizer) if optimizer is not None else None


class _NonFiniteGate(TrainerCallback):
    """The NaN/inf loss check without reading every loss on the host: each read waits for the GPU,
    which then idles while the host prepares the next step. Each micro-step's loss folds into a flag
    on the device; the fused optimizer takes it as `found_inf` and skips its update when it is set, so
    the weights stay finite; the host reads the flag one step later, when the GPU is past it, and
    stops the run there, naming the step whose loss was not finite. Checkpoints wait for the flag.
    The flag reaches the host as a `HostCopy`: a plain `.item()` would wait for everything queued on
    the stream (the next step too), leaving the GPU idle while the host prepares the step after."""

    def __init__(self, trainer, optimizer):
        self.trainer = trainer
        self.optimizer = optimizer  # the fused Adam/AdamW that reads `found_inf`
        self.flag = None  # this optimizer step's flag: a 0-dim float32, 1.0 if a loss was not finite
        self.losses: list[torch.Tensor] = []  # its micro-steps' losses, for the message
        self.pending: list[tuple[HostCopy, list, int]] = []  # (the flag on its way, losses, step) not yet read

    def note(self, loss: torch.Tensor) -> None:
        bad = (~torch.isfinite(loss.detach())).any().to(torch.float32)
        self.flag = bad if self.flag is None else torch.maximum(self.flag, bad)
        self.losses.append(loss.detach())

    def _close_step(self, step: int) -> None:
        self.pending.append((HostCopy(self.flag), self.losses, step))  # copied behind the step's work
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
            flag, losses, step = self.pending.pop(0)
            if flag.read().item():
                self.pending.clear()
                loss = next(x for x in losses if not torch.isfinite(x).all())
                raise self.trainer.nonfinite_loss(loss, step)


# ----------------------------------------------------------------------------------- signals


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
              f"({'Ctrl-C' if signum == signal.SIGINT else 'a second signal'} aborts at once)", file=sys.stderr,
              flush=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            # A signal the process was started ignoring (`nohup`, or a background job of a script,
            # which starts with Ctrl-C ignored) stays ignored, as it is outside training.
            self._previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS
                              if signal.getsignal(signum) is not signal.SIG_IGN}
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


# ----------------------------------------------------------------------------------- out of memory


def oom_message(trainer, step: int) -> str:
    """One line for a CUDA out-of-memory error: the sizes that caused it, the flags that need less,
    and the checkpoint `--resume` would continue from."""
    args = trainer.args
    max_len = getattr(trainer.model, "max_seq_length", None)
    checkpoints = Path(args.output_dir)
    latest = latest_checkpoint(checkpoints)
    keep = (f"; the last checkpoint (step {checkpoint_step(latest)}) is kept in {latest}: --resume continues it, "
            "e.g. with --gradient-checkpointing or --cached-loss added" if latest else "")
    return (f"out of GPU memory at step {step} (--batch-size {args.per_device_train_batch_size}, --max-seq-length "
            f"{max_len}): use a smaller --batch-size or --max-seq-length, add --gradient-checkpointing, or use "
            f"--cached-loss with a smaller --token-budget{keep}")
