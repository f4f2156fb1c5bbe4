"""The speed mode applied to one run: compiled layers switched on or off, the CUDA-graph step built.

`speed.choose` decides from plain numbers; this module reads them off the run (its model, its planned
steps, its trainer) and applies the decision.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import torch

from . import distributed
from .compile_cache import compile_cache_dir, use_persistent_compile_cache

logger = logging.getLogger(__name__)


def start_kernel_prebuild(config):
    """Start building the fused norm kernels for this run in a child process (`kernel_prebuild`), or
    get the one the CLI started before its imports; None where the run could not use them."""
    from .kernel_prebuild import start, weights_for

    return start(config.model, weights_for(config.lora_r is not None, config.dtype), fast=config.fast,
                 compile=config.compile, cuda_graphs=config.cuda_graphs, fused_kernels=getattr(config, "fused_kernels", None))


def choose_speed(config, model, tokens_per_row: float, micro_steps: int, prebuild=None, defer_wait: bool = False):
    """The run's speed mode (`speed.choose`) from the planned steps and the model's size, with compiling
    switched on where chosen; returns (mode, compile cache folder or None, the model's fingerprint,
    None or a function that settles the fused norm later).

    `prebuild` (`kernel_prebuild.Prebuild`): the fused norm kernels building in a child process. Where
    they would be chosen on a warm cache but the child has not ended, the choice waits for it, at most
    as long as the wait can pay (`speed.prebuild_wait_s`: what a cold build here would cost, or what the
    kernels save over the run), and only where it is expected to end by then; then the choice sees the
    cache it left. With `defer_wait` (the recipe), nothing waits where the choice is automatic: the run
    starts without the fused norm and the returned function, called at each step's start with the
    micro-steps done, switches it on once the child has ended, while the steps left still pay for the
    kernels' load (it returns the mode from then on, None while the child runs). Until then the recipe
    holds the graph step's captures (`graphs.GraphedStep.hold_captures`: steps run eagerly), so that no
    shape is captured twice, and gives up on the kernels after as long as a wait could pay. Asked for
    with --fused-kernels, the function waits at the first step instead, so that every step has them."""
    from . import speed as speed_mode
    from .lora import unwrap_peft

    base = unwrap_peft(model)
    params = trainable = 0
    for p in base.parameters():
        params += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    fingerprint = speed_mode.model_fingerprint(base)
    cache_dir = compile_cache_dir()
    fused_applies = fused_warm = False
    if config.fast and torch.cuda.is_available():
        from .packing import has_fused_kernels
        from .kernels.fused_norm import can_build

        fused_applies = has_fused_kernels(model) and can_build()
        if fused_applies:
            from .kernel_prebuild import warm_compiler_key
            from .kernels.fused_norm import kernels_fingerprint

            warm_compiler_key()  # Triton's key for the first step's kernels, hashed during the set-up
            fused_warm = speed_mode.fused_kernels_cached(kernels_fingerprint())
    facts = dict(  # what the choice reads off the run, read once however often it is made below
        compile=config.compile, cuda_graphs=config.cuda_graphs, fast=config.fast,
        cuda=torch.cuda.is_available(), steps=micro_steps,
        step_s=speed_mode.step_seconds(tokens_per_row * config.batch_size, params, trainable, speed_mode.peak_flops()),
        layers=int(getattr(base.config, "num_hidden_layers", 0) or 0),
        cache_warm=speed_mode.cache_is_warm(cache_dir, fingerprint), processes=distributed.world_size(),
        fused_kernels=getattr(config, "fused_kernels", None), fused_applies=fused_applies,
    )

    def choose(fused_warm: bool, prebuilt: str | None = None):
        return speed_mode.choose(**facts, fused_warm=fused_warm, prebuilt=prebuilt)

    # the child marks the cache after its first kernel: while it runs, the rest may still be building
    building = prebuild is not None and (not fused_warm or prebuild.running())
    waits = fused_applies and building and choose(True).fused_kernels
    # how long waiting for it can pay: the bound of a wait (--fused-kernels), and of the steps held for it
    wait_bound = speed_mode.prebuild_wait_s(fused_kernels=facts["fused_kernels"], steps=facts["steps"],
                                            step_s=facts["step_s"])

    def ended(waited: float | None = None) -> tuple[bool, str]:
        """Whether the ended (or waited for) child left the kernels in the cache, and how it went."""
        from .kernels.fused_norm import kernels_fingerprint

        code = prebuild.process.poll()
        warm = code == 0 and speed_mode.fused_kernels_cached(kernels_fingerprint())
        return warm, (("built ahead in a child process" + (f" (waited {waited:.1f} s)" if waited is not None else ""))
                      if warm else "the build ahead is still running" if code is None
                      else "the build ahead built nothing (no GPU it may share, or another model family)" if code == 0
                      else f"the build ahead failed (exit code {code})")

    def settle():
        """The mode once the build ahead has been waited for where it is due."""
        if not waits:
            done = fused_applies and prebuild is not None and fused_warm and prebuild.process.poll() == 0
            return choose(fused_warm, prebuilt="built ahead in a child process, no wait" if done else None)
        expected_left = speed_mode.FUSED_PREBUILD_S - (time.monotonic() - prebuild.started)
        waited = time.monotonic()
        if expected_left <= wait_bound:  # a child just started: no use waiting
            prebuild.wait(wait_bound)
        return choose(*ended(time.monotonic() - waited))

    first_poll: list[float] = []

    def switch(steps_done: int):
        """At a step's start: the mode from now on once the child has ended, None while it runs. The
        steps until then run eagerly (the graph step holds its captures), so the run gives up on the
        kernels once it has held them as long as a wait could pay (`speed.prebuild_wait_s`), counted
        from the end of the first step (which runs eagerly anyway, a shape's first sight), or when the
        steps left no longer pay for the kernels' load."""
        left = max(0, facts["steps"] - steps_done)
        pays = speed_mode.fused_norm_saving_s(facts["step_s"], left) > speed_mode.FUSED_NORM_WARM_S
        if steps_done > 0 and not first_poll:
            first_poll.append(time.monotonic())
        held = time.monotonic() - first_poll[0] if first_poll else 0.0
        if prebuild.running() and pays and held <= wait_bound:
            return None
        warm, prebuilt = ended()
        mode = choose(warm, prebuilt=f"{prebuilt}, in use from micro-step {steps_done + 1}" if warm and pays else prebuilt)
        if mode.fused_kernels and not pays:
            when = "ended" if not prebuild.running() else "still ran"
            mode = dataclasses.replace(mode, fused_kernels=False, why=mode.why + (
                f"; not used: the build ahead {when} with {left} of {facts['steps']} micro-steps left"))
        elif mode.fused_kernels is False and prebuild.running():
            mode = dataclasses.replace(mode, why=mode.why + f"; not waited for beyond {held:.1f} s of steps")
        return mode

    def apply_fused(mode):
        if mode is not None and config.fast:
            from .packing import set_fused_kernels

            set_fused_kernels(model, mode.fused_kernels)
        return mode

    later = defer_wait and waits
    mode = apply_fused(dataclasses.replace(choose(fused_warm), fused_kernels=False) if later else settle())
    compile_cache = use_persistent_compile_cache() if mode.compile else None  # later runs reuse its code
    if config.fast:
        from .packing import set_compile

        set_compile(model, mode.compile)  # decided here, for the whole run (not "auto", as loaded)
    if not later:
        return mode, compile_cache, fingerprint, None
    if facts["fused_kernels"]:  # asked for: waited for at the first step, so that every step has them
        return mode, compile_cache, fingerprint, lambda steps_done: apply_fused(settle())
    return mode, compile_cache, fingerprint, lambda steps_done: apply_fused(switch(steps_done))


def settle_during_steps(settle, apply):
    """A trainer callback that settles a choice `choose_speed` left open: at each step's start until it
    is settled, `settle(micro-steps done)` gives the mode from then on (None: not yet), handed to
    `apply`."""
    from transformers import TrainerCallback

    class SettleSpeed(TrainerCallback):
        pending = True

        def on_step_begin(self, args, state, control, **kwargs):
            if self.pending:
                done = state.global_step * max(1, int(getattr(args, "gradient_accumulation_steps", 1) or 1))
                mode = settle(done)
                if mode is not None:
                    self.pending = False
                    apply(mode)

    return SettleSpeed()


def graph_step_for(trainer, config):
    """The run's CUDA-graph step (`embedtune.graphs`), or why not (str); a one-line notice when the
    user asked for graphs (`--cuda-graphs`) and the run cannot have them."""
    from .graphs import GraphedStep, unsupported_reason
    from .loss_choice import graphs_off_reason

    # a loss other than the contrastive one, or one per data set: off, with the reason
    reason = graphs_off_reason(trainer.loss) or unsupported_reason(trainer.loss, trainer.model.device)
    if reason is None and trainer.args.fp16:
        reason = "fp16 training scales its loss on the host (use bf16)"
    if reason is not None:
        if config.cuda_graphs:
            logger.warning("embedtune: --cuda-graphs off: %s", reason)
        else:  # chosen automatically: the summary says why the run stayed eager
            logger.info("embedtune: CUDA graphs off: %s", reason)
        return reason
    return GraphedStep(trainer.loss, trainer.model.max_seq_length, dtype=torch.bfloat16 if trainer.args.bf16 else None)


def graph_summary(step) -> dict:
    """metrics.json's `cuda_graphs`: steps run each way and graphs captured, or why graphs were off."""
    if isinstance(step, str):
        return {"off": step}
    return {**step.counts, "shapes": step.shapes, "warmup_s": round(step.warmup_s, 2), "off": step.off_reason}
