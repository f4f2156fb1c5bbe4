"""Activation checkpointing, optionally with the checkpointed layer inputs offloaded to CPU.

`use_gradient_checkpointing="unsloth"` in the guide means: checkpoint every layer and keep the
one tensor each layer must save (its input hidden states) in pinned CPU memory instead of on the
GPU, so activation memory no longer grows with depth. On CPU there is nothing to offload to, so
it is plain checkpointing there.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils.checkpoint import checkpoint


def current_autocast(device: torch.device) -> Callable[[], Any]:
    """A factory of the autocast context in force now on `device` (autocast off if none is), to
    recompute later exactly as now: trainers call `backward()` outside their autocast block."""
    kind = device.type
    if not torch.is_autocast_enabled(kind):
        return lambda: torch.autocast(kind, enabled=False)
    dtype = torch.get_autocast_dtype(kind)
    return lambda: torch.autocast(kind, dtype=dtype)


class _OffloadedCheckpoint(torch.autograd.Function):
    """Run `fn(hidden, *rest)` without a graph; on backward, bring `hidden` back and recompute."""

    @staticmethod
    def forward(ctx, fn, hidden, *rest):
        ctx.fn = fn
        ctx.device = hidden.device
        ctx.rest = rest
        ctx.autocast = current_autocast(hidden.device)
        ctx.saved_hidden = hidden.detach().to("cpu", non_blocking=True)
        # Keep RNG in step for dropout between the forward and the recompute.
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(hidden.device) if hidden.is_cuda else None
        with torch.no_grad():
            out = fn(hidden, *rest)
        ctx.tuple_out = isinstance(out, tuple)
        return out[0] if ctx.tuple_out else out

    @staticmethod
    def backward(ctx, grad_out):
        hidden = ctx.saved_hidden.to(ctx.device, non_blocking=True).requires_grad_(True)
        cpu_state, cuda_state = torch.get_rng_state(), None
        torch.set_rng_state(ctx.cpu_rng)
        if ctx.cuda_rng is not None:
            cuda_state = torch.cuda.get_rng_state(ctx.device)
            torch.cuda.set_rng_state(ctx.cuda_rng, ctx.device)
        with torch.enable_grad(), ctx.autocast():
            out = ctx.fn(hidden, *ctx.rest)
            out = out[0] if ctx.tuple_out else out
        torch.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state, ctx.device)
        torch.autograd.backward(out, grad_out)
        return (None, hidden.grad) + (None,) * len(ctx.rest)


def offloaded_checkpoint(fn, hidden, *args, **kwargs):
    """A drop-in `_gradient_checkpointing_func` for transformers layers that offloads to CPU."""
    if kwargs or not torch.is_tensor(hidden) or not hidden.is_cuda:
        return checkpoint(fn, hidden, *args, use_reentrant=False, **kwargs)
    # Layers return a tuple or a tensor; the custom Function carries only the first output.
    return _OffloadedCheckpoint.apply(fn, hidden, *args)


def enable_checkpointing(model, mode) -> str:
    """Turn on checkpointing for `mode` in {True, "unsloth", False}; returns what was enabled."""
    if mode in (False, None, "none", "false"):
        return "off"
    if mode not in (True, "unsloth", "true", "offload"):
        raise ValueError(f"use_gradient_checkpointing must be True, False or 'unsloth', not {mode!r}")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(base).__name__} does not support gradient checkpointing")
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # With frozen embeddings (LoRA) the first layer's input carries no grad; the offloaded
    # checkpoint only runs its backward when an input requires grad.
    base.enable_input_require_grads()
    if mode in ("unsloth", "offload"):
        for module in base.modules():
            if hasattr(module, "_gradient_checkpointing_func"):
                module._gradient_checkpointing_func = offloaded_checkpoint
        return "offload" if torch.cuda.is_available() else "checkpoint (no GPU: nothing to offload)"
    return "checkpoint"
