"""No silent success: a run that cannot train is refused before anything is written, and a run that
trained nothing (or less than planned) says so in its summary and metrics.json ("warnings").

- Up front (`check_settings`, `check_speed_options`, `check_batches`): settings no run can use, flag
  combinations the run does not cover, and data whose batches would give no optimizer step.
- After training (`RunChecks`): fewer steps than planned, a loss that never moved, gradients that
  were all zero (or never finite), weights that ended equal to the base model's.
"""

from __future__ import annotations

import logging
import math

import torch

from . import distributed
from .errors import EmbedtuneError
from .sharding import local_tensor

logger = logging.getLogger(__name__)

# The InfoNCE temperature's sane range: the loss divides cosine similarities (in [-1, 1]) by it.
TEMPERATURE_RANGE = (1e-4, 100.0)
_FLOAT_FLAGS = {"epochs": "--epochs", "lr": "--lr", "temperature": "--temperature"}


def check_finite(config) -> None:
    """Every float setting (fields and `extra` training arguments) must be a finite number: inf or NaN
    would pass the range checks or fail deep in the trainer (`--epochs inf`: an OverflowError)."""
    import dataclasses

    settings = [(_FLOAT_FLAGS.get(f.name, f.name), getattr(config, f.name)) for f in dataclasses.fields(config)]
    settings += list((config.extra or {}).items())
    for flag, value in settings:
        if isinstance(value, float) and not math.isfinite(value):
            raise EmbedtuneError(f"{flag} {value}: must be a finite number")


def _sampler_is_no_duplicates(config) -> bool:
    choice = (config.extra or {}).get("batch_sampler")
    return choice is None or str(getattr(choice, "value", choice)) in ("no_duplicates", "no_duplicates_hashed")


def check_batches(config, train_ds, alone: bool = True) -> dict | None:
    """The full batches the NO_DUPLICATES sampler will really yield (`data.sampler.plan_batches`):
    zero optimizer steps is an error naming the data and why; fewer batches than the row count
    promises is a one-line warning, also returned for metrics.json (`batches`, with its `warning`).
    Where the data set is one of several (`alone` False), the run's steps depend on all of them: the
    warning and the result say nothing of the run's steps. None when the run uses another sampler."""
    from .data.sampler import fitting_batch_size, plan_batches

    if not _sampler_is_no_duplicates(config):
        return None
    extra = config.extra or {}
    batch_size = int(extra.get("per_device_train_batch_size", config.batch_size))
    per_step = int(extra.get("gradient_accumulation_steps", 1)) * distributed.world_size()  # batches per step
    columns = [c for c in train_ds.column_names if c == "anchor" or c == "positive" or c.startswith("negative_")]
    plan = plan_batches(train_ds, batch_size, seed=int(extra.get("seed", config.seed)), columns=columns)
    info = {**plan.as_dict(), "warning": None}
    if not plan.short:
        return info
    steps_per_epoch = plan.per_epoch // per_step
    if steps_per_epoch == 0:
        step = f" ({per_step} batches make one optimizer step)" if per_step > 1 and plan.per_epoch else ""
        smaller = fitting_batch_size(train_ds, batch_size, int(extra.get("seed", config.seed)), columns, per_step)
        fix = (f"remove the duplicate rows or lower --batch-size (to {smaller}, for one)" if smaller else
               "remove the duplicate rows (not even --batch-size 2 fills a batch)")
        raise EmbedtuneError(f"{config.data}: {plan.describe()}{step}: the run would train no step; {fix}")
    line = f"{config.data}: {plan.describe()}"
    if plan.per_epoch > plan.per_pass:
        line += f"; the sampler repeats rows to make {plan.per_epoch} batches per epoch"
    if alone:
        planned_per_epoch = max(1, len(train_ds) // (batch_size * per_step))  # as `run` plans
        planned = config.max_steps or max(1, math.ceil(planned_per_epoch * config.epochs))
        expected = min(planned, steps_per_epoch * math.ceil(planned / planned_per_epoch))
        if expected < planned:
            line += f"; the run trains about {expected} of {planned} planned steps"
        info.update(planned_steps=planned, expected_steps=expected)
    if distributed.is_main():  # one line, not one per rank
        logger.warning("embedtune: %s", line)
    info.update(warning=line)
    return info


# Signed integers of each element size: a parameter's elements read as the integers their bits spell.
_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _digests(model) -> dict[str, int]:
    """Per trainable parameter (this rank's shard under FSDP): the sum of its elements' bit patterns
    read as integers. Exact, so any change to any element changes it (short of changes that cancel
    to the bit, which training does not make), without keeping a copy of the weights. An integer
    sum runs at memory speed everywhere: a float64 sum of BERT-base's weights took 4 s on two CPU
    cores."""
    with torch.no_grad():
        names, sums = [], []
        for name, param in model.named_parameters():
            if param.requires_grad:
                values = local_tensor(param).detach()
                names.append(name)  # reduced where the weights live, read back once
                sums.append(values.view(_BITS[values.element_size()]).sum(dtype=torch.int64))
        if not names:
            return {}
        table = torch.stack([s.to(sums[0].device) for s in sums]).cpu().tolist()
        return dict(zip(names, table))


def _lora_update_vanishes(model) -> bool | None:
    """True when every LoRA layer's update leaves its base weight exactly as it is once merged
    (W + delta == W: lora_B still zero, or too small for W's precision); None without LoRA layers."""
    found = False
    with torch.no_grad():
        for module in model.modules():
            delta_of = getattr(module, "get_delta_weight", None)
            adapters = getattr(module, "lora_A", None)
            if delta_of is None or adapters is None or not hasattr(module, "get_base_layer"):
                continue
            weight = module.get_base_layer().weight
            for name in getattr(module, "active_adapters", ()):
                if name in adapters:
                    found = True
                    if not torch.equal(weight, weight + delta_of(name).to(weight.dtype)):
                        return False
    return True if found else None


class RunChecks:
    """What a finished run may have hidden, for the summary and metrics.json's `warnings`: fewer steps
    than planned, a loss that never moved, gradients that were all zero (or never finite), weights
    that ended equal to the base model's. Made just before training (it fingerprints the weights)."""

    def __init__(self, st_model):
        self.model = st_model
        self.before = _digests(st_model)

    def unchanged(self) -> bool:
        """The trained model equals the one training started from (LoRA: its merged update is nil)."""
        after = _digests(self.model)
        lora = _lora_update_vanishes(self.model)
        if lora is None:
            return after == self.before
        return lora is True and all(after[n] == self.before.get(n) for n in after if "lora_" not in n)

    def warnings(self, history: list[dict], steps: int, first_step: int, planned: int,
                 batches: dict | None) -> list[str]:
        found = []
        if batches and batches.get("warning"):
            found.append(batches["warning"])
        if steps < planned and not (batches and batches.get("expected_steps") == steps):
            found.append(f"trained {steps} of the {planned} planned steps")
        logs = [entry for entry in history if entry.get("step", 0) > first_step]
        losses = [entry["loss"] for entry in logs if isinstance(entry.get("loss"), (int, float))]
        if len(losses) >= 2 and len(set(losses)) == 1:
            found.append(f"the training loss stayed exactly {losses[0]:.6g} over the run ({len(losses)} logged "
                         "values): the model learned nothing from the data")
        norms = [entry["grad_norm"] for entry in logs if isinstance(entry.get("grad_norm"), (int, float))]
        if norms and all(n == 0 for n in norms):
            found.append("the gradient norm was 0 at every logged step: no weight received a gradient")
        elif norms and not any(math.isfinite(n) for n in norms):
            found.append("the gradient norm was never finite at a logged step: every update was clipped from inf/NaN")
        if steps > first_step and self.unchanged():
            found.append("the fine-tuned weights equal the base model's (nothing training changed survives in the "
                         "saved model): the saved model is the base model, unchanged")
        return found

    def report(self, metrics: dict, state, first_step: int, planned: int, batches: dict | None, loaded) -> None:
        """Add `warnings` (one-line strings), `planned_steps`, `batches` and `rows_negatives_cut` to metrics;
        each warning is logged too."""
        warnings = self.warnings(state.log_history, state.global_step, first_step, planned, batches)
        for line in warnings[1 if batches and batches.get("warning") else 0:]:  # the batch line was logged up front
            if distributed.is_main():
                logger.warning("embedtune: %s", line)
        metrics.update(warnings=warnings, planned_steps=planned, batches=batches,
                       rows_negatives_cut=getattr(loaded, "cut_negatives", 0))


def check_settings(config) -> None:
    """Refuse numeric settings no run can use, before anything is loaded or written (each would
    otherwise fail deep inside torch or the trainer, or quietly mean something else)."""
    def need(ok: bool, flag: str, value, rule: str) -> None:
        if not ok:
            raise EmbedtuneError(f"{flag} {value}: {rule}")

    check_finite(config)
    need(config.max_seq_length >= 1, "--max-seq-length", config.max_seq_length, "must be at least 1")
    need(config.epochs > 0, "--epochs", config.epochs, "must be positive")
    if config.max_steps is not None:
        need(config.max_steps >= 1, "--max-steps", config.max_steps, "must be at least 1")
    if config.lr is not None:
        need(config.lr > 0, "--lr", config.lr, "must be positive")
    if config.lora_r is not None:
        need(config.lora_r >= 1, "--lora-r", config.lora_r, "must be at least 1 (use --full for full fine-tuning)")
    if config.lora_alpha is not None:
        need(config.lora_alpha > 0, "lora_alpha", config.lora_alpha, "must be positive")
    need(config.evals_per_run >= 0, "--evals", config.evals_per_run,
         "must not be negative (0: the final evaluation only; --no-eval: none)")
    need(0 < config.eval_share <= 1, "eval_share", config.eval_share, "must be above 0 and at most 1 (1: never cut)")
    need(config.temperature > 0, "--temperature", config.temperature, "must be positive")
    need(TEMPERATURE_RANGE[0] <= config.temperature <= TEMPERATURE_RANGE[1], "--temperature", config.temperature,
         f"must be between {TEMPERATURE_RANGE[0]:g} and {TEMPERATURE_RANGE[1]:g}: the loss divides cosine "
         f"similarities by it, so below {TEMPERATURE_RANGE[0]:g} the scores reach "
         f"±{1 / TEMPERATURE_RANGE[0]:,.0f} and "
         f"the softmax saturates (gradients vanish or overflow), and above {TEMPERATURE_RANGE[1]:g} they all lie "
         f"within ±{1 / TEMPERATURE_RANGE[1]:g}, so the loss hardly depends on the embeddings (usual: 0.01-0.1)")
    need(0 <= config.warmup_ratio <= 1, "warmup_ratio", config.warmup_ratio, "must be between 0 and 1")
    need(config.weight_decay >= 0, "weight_decay", config.weight_decay, "must not be negative")
    need(config.logging_steps >= 1, "logging_steps", config.logging_steps, "must be at least 1")
    if config.save_every is not None:
        need(config.save_every >= 0, "--save-every", config.save_every, "must not be negative (0: off)")
    if config.token_budget is not None:
        need(config.token_budget >= 1, "--token-budget", config.token_budget, "must be at least 1")


def check_speed_options(config) -> None:
    """Refuse --compile without the fast path, and --fsdp combinations it does not cover (it shards
    full fine-tuning over a torchrun launch)."""
    if config.compile and not config.fast:
        raise EmbedtuneError("--compile compiles the packed fast path: drop --no-fast")
    if config.cuda_graphs and not config.fast:
        raise EmbedtuneError("--cuda-graphs captures the packed fast path: drop --no-fast")
    if not config.fsdp:
        return
    if not distributed.launched():
        raise EmbedtuneError("--fsdp shards the model over several processes: launch with "
                             "`torchrun --nproc-per-node N -m embedtune train ...`")
    if config.lora_r:
        raise EmbedtuneError("--fsdp is for full fine-tuning (add --full); LoRA runs fit with plain DDP")
    if config.gradient_checkpointing:
        raise EmbedtuneError("--fsdp with --gradient-checkpointing is not supported yet")
    if config.resume or config.save_every:
        raise EmbedtuneError("--fsdp runs keep no resumable checkpoints yet: drop --resume/--save-every")
