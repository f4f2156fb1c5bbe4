"""Activation checkpointing, optionally with the checkpointed layer inputs offloaded to CPU.

`use_gradient_checkpointing="unsloth"` in the guide means: checkpoint every layer and keep the
one tensor each layer must save (its input hidden states) in pinned CPU memory instead of on the
GPU, so activation memory no longer grows with depth. On CPU there is nothing to offload to, so
it is plain checkpointing there.

Checkpointing buys memory with a second forward and, for small batches on a GPU, with host work that
outweighs the step itself (each layer's hooks, copies and recompute: the guide's batch of 8 spends
most of its step there). So True and "unsloth" checkpoint a batch's layers only where keeping their
activations would not fit comfortably (`WhenMemoryNeeds`): a batch that fits trains as without
checkpointing, which gives the same numbers, dropout included. `"always"` checkpoints every batch.
"""

from __future__ import annotations

import logging
import time
import types
from typing import Any, Callable

import torch
from torch.utils.checkpoint import checkpoint

from .distributed import world_size
from .errors import SettingError

logger = logging.getLogger(__name__)


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


# Activation memory a layer keeps for backward, per token and hidden unit: about 34 bytes in 16-bit
# training (Korthikanti et al., 2022); counted here at fp32 width, with room for LoRA's inputs.
ACTIVATION_BYTES_PER_TOKEN_UNIT = 96
# and per attention score where the attention is padded ([batch, heads, seq, seq]: probabilities and
# dropout mask; flash kernels keep none)
ACTIVATION_BYTES_PER_SCORE = 10
FREE_SHARE = 0.5  # the share of free memory a batch's un-checkpointed activations may take
FREE_READ_S = 0.25


def free_memory_bytes(device: torch.device) -> int:
    """Memory a batch's activations could take now: the device's free memory plus what torch's caching
    allocator holds unused (CUDA), or the host's available memory (CPU)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    import psutil  # a dependency of accelerate, so of the trainer

    return int(psutil.virtual_memory().available)


def _several_processes() -> bool:
    return world_size() > 1


class WhenMemoryNeeds:
    """A layer's `_gradient_checkpointing_func` that checkpoints (through `inner`) only where the
    batch's activations over all `layers` checkpointed layers would take more than `FREE_SHARE` of the
    memory free; otherwise it runs the layer as is. One object serves every layer of a model and counts
    its choices (`skipped`, `checkpointed`)."""

    def __init__(self, inner: Callable, layers: int, heads: int):
        self.inner = inner
        self.layers = max(1, layers)
        self.heads = max(1, heads)
        self.skipped = 0
        self.checkpointed = 0
        self._told = False
        self._free: tuple | None = None  # (device, bytes, when read)
        # set by `skip_for_run`: every batch of the run fits (a step replayed as a CUDA graph must not
        # read the free memory inside its capture, nor change course between replays)
        self.skips_every_batch = False

    def activation_bytes(self, hidden: torch.Tensor) -> int:
        """An upper estimate of what all layers keep for this batch without checkpointing."""
        width = hidden.shape[-1]
        tokens = hidden.numel() // max(1, width)
        per_layer = tokens * width * ACTIVATION_BYTES_PER_TOKEN_UNIT
        if hidden.dim() == 3:  # padded [batch, seq, width]: the attention scores may be kept too
            batch, seq = hidden.shape[0], hidden.shape[1]
            per_layer += batch * self.heads * seq * seq * ACTIVATION_BYTES_PER_SCORE
        return per_layer * self.layers

    def free_bytes(self, device: torch.device) -> int:
        """`free_memory_bytes`, read at most every `FREE_READ_S` (each layer of each batch asks)."""
        now = time.monotonic()
        if self._free is None or self._free[0] != device or now - self._free[2] > FREE_READ_S:
            self._free = (device, free_memory_bytes(device), now)
        return self._free[1]

    def fits(self, hidden) -> bool:
        """Whether this batch's layers may keep their activations (and counts the choice). Across
        several processes every batch is checkpointed, as before: each process would choose alone, and
        DDP's static graph is learnt from the first step."""
        if self.skips_every_batch:
            self.skipped += 1
            return True
        if torch.is_tensor(hidden) and not _several_processes():
            need = self.activation_bytes(hidden)
            free = self.free_bytes(hidden.device)
            if need <= FREE_SHARE * free:
                self.skipped += 1
                if not self._told:
                    self._told = True
                    logger.info("embedtune: a batch's activations (~%.2f GB) fit in the %.1f GB free: its layers "
                                "run without checkpointing (the same numbers; use_gradient_checkpointing='always' "
                                "checkpoints every batch)", need / 1e9, free / 1e9)
                return True
        self.checkpointed += 1
        return False

    def __call__(self, fn, hidden, *args, **kwargs):
        if self.fits(hidden):
            return fn(hidden, *args, **kwargs)
        return self.inner(fn, hidden, *args, **kwargs)


def gates(model) -> list:
    """Each module's `_gradient_checkpointing_func` where its checkpointing is on (`gradient_checkpointing`)."""
    return [m._gradient_checkpointing_func for m in model.modules()
            if getattr(m, "gradient_checkpointing", False) and hasattr(m, "_gradient_checkpointing_func")]


def blocks_graphs(model) -> bool:
    """Whether some layer of `model` may checkpoint a batch: a step captured as a CUDA graph cannot
    (the offload copies to the host, the recompute runs at backward). Layers behind a `WhenMemoryNeeds`
    gate that `skip_for_run` settled do not."""
    return any(not (isinstance(g, WhenMemoryNeeds) and g.skips_every_batch) for g in gates(model))


def skip_for_run(model, tokens: int, width: int, device: torch.device) -> str | None:
    """For a run whose steps replay as CUDA graphs: settle, once, that no batch of up to `tokens` packed
    tokens of `width` hidden units is checkpointed, where every checkpointing layer sits behind a
    `WhenMemoryNeeds` gate (True / "unsloth") and such a batch's activations fit in `FREE_SHARE` of the
    memory free now; returns None then (or where nothing checkpoints), else why checkpointing stays."""
    found = gates(model)
    if not found:
        return None
    if not all(isinstance(g, WhenMemoryNeeds) for g in found):
        return "gradient checkpointing is on for every batch"
    if _several_processes():
        return "gradient checkpointing across several processes checkpoints every batch"
    free = free_memory_bytes(device)
    for gate in {id(g): g for g in found}.values():
        need = gate.activation_bytes(torch.empty(tokens, width, device="meta"))
        if need > FREE_SHARE * free:
            return f"gradient checkpointing: a full batch's activations (~{need / 1e9:.1f} GB) need it"
    for gate in found:
        gate.skips_every_batch = True
    return None


def parse_mode(mode):
    """`use_gradient_checkpointing` as given (True/False, "unsloth", or "True"/"False" as strings in
    any case, as configs write them) -> True, False, "unsloth"/"offload" or "always"."""
    if isinstance(mode, str):
        lowered = mode.strip().lower()
        if lowered in ("false", "none", "off", "0", ""):
            return False
        if lowered in ("true", "on", "1"):
            return True
        if lowered in ("unsloth", "offload", "always"):
            return lowered
    elif mode in (False, None, 0):
        return False
    elif mode is True or mode == 1:
        return True
    raise SettingError(f"use_gradient_checkpointing must be True, False, 'unsloth' or 'always', not {mode!r}")


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
    gate = self._gradient_checkpointing_func
    if self.gradient_checkpointing and self.training and torch.is_grad_enabled() and not (
            isinstance(gate, WhenMemoryNeeds) and args and gate.fits(args[0])):
        return checkpoint(original, self, *args, use_reentrant=False, **kwargs)
    return original(self, *args, **kwargs)


def _plain_checkpoint(fn, *args, **kwargs):
    return checkpoint(fn, *args, use_reentrant=False, **kwargs)


def _checkpoint_own_layers(base, layers, mode) -> None:
    """Checkpoint a layer stack transformers does not (MPNet), for the packed and the plain forward."""
    for layer in layers:
        layer.gradient_checkpointing = True
        layer._gradient_checkpointing_func = offloaded_checkpoint if mode in ("unsloth", "offload", "always") else _plain_checkpoint
        if "forward" not in layer.__dict__:
            layer.forward = types.MethodType(_checkpointed_forward, layer)


def enable_checkpointing(model, mode) -> str:
    """Turn on checkpointing for `mode` in {True, "unsloth", "always", False} (or their string
    spellings); returns what was enabled. True and "unsloth" checkpoint only the batches whose
    activations would not fit comfortably (`WhenMemoryNeeds`), "always" every batch (offloaded)."""
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
        if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.2x: its name for it
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # With frozen embeddings (LoRA) the first layer's input carries no grad; the offloaded
    # checkpoint only runs its backward when an input requires grad.
    base.enable_input_require_grads()
    offload = mode in ("unsloth", "offload", "always")
    config = getattr(base, "config", None)
    layers = int(getattr(config, "num_hidden_layers", 0) or 0)
    heads = int(getattr(config, "num_attention_heads", 0) or 0)
    gates: dict[int, WhenMemoryNeeds] = {}  # one per checkpoint function, shared by the layers using it
    for module in base.modules():
        if hasattr(module, "_gradient_checkpointing_func"):
            func = offloaded_checkpoint if offload and own_layers is None else module._gradient_checkpointing_func
            if mode != "always":
                func = gates.setdefault(id(func), WhenMemoryNeeds(func, layers, heads))
            module._gradient_checkpointing_func = func
    how = ("offload" if torch.cuda.is_available() else "checkpoint (no GPU: nothing to offload)") if offload else "checkpoint"
    return how + (", every batch" if mode == "always" else ", where a batch's activations need it")
