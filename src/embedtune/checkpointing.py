"""Activation checkpointing, optionally with the checkpointed layer inputs offloaded to CPU.

`use_gradient_checkpointing="unsloth"` in the guide means: checkpoint every layer and keep the
one tensor each layer must save (its input hidden states) in pinned CPU memory instead of on the
GPU, so activation memory no longer grows with depth. On CPU there is nothing to offload to, so
it is plain checkpointing there.
"""

from __future__ import annotations

import types
from typing import Any, Callable

import torch
from torch.utils.checkpoint import checkpoint

from .errors import SettingError


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


def parse_mode(mode):
    """`use_gradient_checkpointing` as given (True/False, "unsloth", or "True"/"False" as strings in
    any case, as configs write them) -> True, False or "unsloth"/"offload"."""
    if isinstance(mode, str):
        lowered = mode.strip().lower()
        if lowered in ("false", "none", "off", "0", ""):
            return False
        if lowered in ("true", "on", "1"):
            return True
        if lowered in ("unsloth", "offload"):
            return lowered
    elif mode in (False, None, 0):
        return False
    elif mode is True or mode == 1:
        return True
    raise SettingError(f"use_gradient_checkpointing must be True, False or 'unsloth', not {mode!r}")


# Families whose transformers layers cannot checkpoint themselves but whose layer stack we checkpoint:
# the packed forward goes through each layer's `_gradient_checkpointing_func` (packing.layers), the
# plain forward through `_checkpointed_forward`.
_OWN_LAYER_STACKS = {"mpnet": ("encoder", "layer")}


def _layer_stack(base):
    path = _OWN_LAYER_STACKS.get(getattr(getattr(base, "config", None), "model_type", None))
    stack = base
    for name in path or ():
        stack = getattr(stack, name, None)
    return stack if path and isinstance(stack, torch.nn.ModuleList) else None


def _checkpointed_forward(self, *args, **kwargs):
    """A layer's forward, checkpointed while training (bound to the layer, so copies stay right).
    Plain non-reentrant checkpointing: it carries the gradients of every input, such as MPNet's shared
    position bias, which the offloaded function (hidden states only) would drop."""
    original = type(self).forward
    if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
        return checkpoint(original, self, *args, use_reentrant=False, **kwargs)
    return original(self, *args, **kwargs)


def _plain_checkpoint(fn, *args, **kwargs):
    return checkpoint(fn, *args, use_reentrant=False, **kwargs)


def _checkpoint_own_layers(base, layers, mode) -> None:
    """Checkpoint a layer stack transformers does not (MPNet), for the packed and the plain forward."""
    for layer in layers:
        layer.gradient_checkpointing = True
        layer._gradient_checkpointing_func = offloaded_checkpoint if mode in ("unsloth", "offload") else _plain_checkpoint
        if "forward" not in layer.__dict__:
            layer.forward = types.MethodType(_checkpointed_forward, layer)


def enable_checkpointing(model, mode) -> str:
    """Turn on checkpointing for `mode` in {True, "unsloth", False} (or their string spellings);
    returns what was enabled."""
    mode = parse_mode(mode)
    if mode is False:
        return "off"
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    own_layers = _layer_stack(base)
    if own_layers is not None and not getattr(base, "supports_gradient_checkpointing", False):
        _checkpoint_own_layers(base, own_layers, mode)
    elif not getattr(base, "supports_gradient_checkpointing", False):
        raise SettingError(f"{type(base).__name__} does not support gradient checkpointing; train without it")
    else:
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
