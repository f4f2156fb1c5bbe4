"""Running a stack of layers on the packed stream.

Per layer this honours, in order: FSDP (gathering the layer's sharded weights around its step, see
`embedtune.sharding`), activation checkpointing, and compilation. Compiled, the per-layer step is
one graph that every layer reuses (parameters are graph inputs; attention is one opaque op,
`embedtune::varlen_attn`, so there are no graph breaks): a layer costs one graph call forward and
one backward instead of a Python-driven launch of every kernel. `PackedOptions.whole_stack` (default
`WHOLE_STACK`) compiles the whole
stack as one graph instead where it can, each layer a nested compile region
(`torch.compiler.nested_compile_region`) so identical layers share compiled code. On an H200 both
ran at the same speed, but dynamo, AOTAutograd and inductor's passes still walk every layer of the
whole stack: at 12 layers it compiled in 2-2.5x the time (docs/BENCHMARKS.md), so it is off by
default. The token dimension is compiled dynamic either way, so packed streams of any length reuse
the graph: one compile per run, not one per batch shape.
Mode "reduce-overhead" also replays the compiled regions as CUDA graphs, meant to remove the kernel
launch cost; it records one graph per input size, so it runs with `PackedOptions.token_multiple` (streams
padded to a few size classes).
What a forward runs with comes down explicitly as one `PackedOptions` (a direct call that passes none
gets the defaults, and `varlen.fixed_stream`'s stream length if inside one). Measured on an H200 it is still slower than the default mode
(docs/BENCHMARKS.md), so it is opt-in.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass
from typing import Callable

import torch

PACKED_STEP = "embedtune_packed_step"  # set by embedtune.sharding on FSDP-sharded layers
WHOLE_STACK = False  # `enable_fast_path`'s default for `whole_stack` (see above; a benchmark row)
COMPILE_MODES = ("default", "reduce-overhead")


def compile_mode(mode: bool | str | None) -> str | bool:
    """`mode` as the layers take it: False (eager), "default" (also for True) or "reduce-overhead"."""
    if mode is True:
        mode = "default"
    if mode and mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {COMPILE_MODES}, not {mode!r}")
    return mode or False


@dataclass(frozen=True)
class PackedOptions:
    """How one packed forward runs, passed down explicitly: the packed forward (`packing.PackedForward`)
    builds it per call and hands it to the architecture's forward, which gives it to `PackedBatch.for_forward`
    (the plan) and `run_layers` (the layers). Read in Python before anything is traced, so for
    torch.compile these are constants.

    token_multiple: pad packed streams to size classes of this many tokens (`PackedBatch.from_mask`);
    fixed_stream: make streams exactly this many tokens, planned on the device (`PackedBatch.fixed`,
        what a CUDA-graph step needs, `embedtune.graphs`);
    compile_layers: False, True / "default" or "reduce-overhead" (`run_layers`);
    whole_stack: compile the whole layer stack as one graph where it can be (`run_layers`);
    fused_kernels: end each BERT-family sub-block with the fused dropout + residual + LayerNorm
        kernels where they apply (`fused_norm.residual_norm`: CUDA, not compiled; the recipe turns
        them on where they pay, `speed`), and join their q, k, v gradients with one
        (`kernels.join_grads`, in `main_grad`'s steps).
    """

    token_multiple: int | None = None
    fixed_stream: int | None = None
    compile_layers: bool | str = False
    whole_stack: bool = False
    fused_kernels: bool = False

    def __post_init__(self):
        object.__setattr__(self, "compile_layers", compile_mode(self.compile_layers))

    @classmethod
    def current(cls) -> "PackedOptions":
        """For a direct call that passes no options: the defaults, inside `varlen.fixed_stream` its length."""
        return cls(fixed_stream=_FIXED_STREAM.get(), whole_stack=WHOLE_STACK)


# `PackedOptions.current()` reads this for direct calls that pass no options.
_FIXED_STREAM = contextvars.ContextVar("embedtune_fixed_stream", default=None)  # set by varlen.fixed_stream


def _compiled(step: Callable, mode: str, dynamic: bool | None = True) -> Callable:
    # torch.compile caches by the code object: a fresh closure per forward reuses the graph.
    return torch.compile(step, dynamic=dynamic, mode=None if mode == "default" else mode)


@torch.compiler.nested_compile_region
def _layer_region(step: Callable, layer, hidden: torch.Tensor) -> torch.Tensor:
    return step(layer, hidden)


def _stack(layers, hidden: torch.Tensor, step: Callable, per_token: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
    # Layers share one compiled region only if their inputs look alike. So the first layer gets, as
    # later layers do, a graph intermediate (the graph's input may be a view of the embeddings) whose
    # token count is the one symbol the per-token tables share (else its region takes extra sizes).
    for tensor in per_token:
        torch._check(tensor.shape[0] == hidden.shape[0])
    tokens = per_token[0].shape[0] if per_token else hidden.shape[0]
    hidden = hidden.reshape(tokens, -1).clone()
    for layer in layers:
        hidden = _layer_region(step, layer, hidden)
    return hidden


def mark_token_dim(*tensors: torch.Tensor) -> None:
    """Tell torch.compile that dim 0 of these (the packed token or sequence count) varies per batch,
    so the whole-stack graph is compiled dynamic in it from the first batch on. Only a hint: a tensor
    that turns out static costs one recompile, never an error. No effect in eager mode."""
    for tensor in tensors:
        torch._dynamo.maybe_mark_dynamic(tensor, 0)


def _whole_stack(layers, hidden: torch.Tensor, whole_stack: bool | None = None) -> bool:
    """Compile all layers as one graph (no graph breaks: attention is one opaque op) when `whole_stack`
    (None: `WHOLE_STACK`) is on, no layer is sharded or checkpointed, and attention will be that op: always on CUDA; on CPU
    only without dropout, whose masks the op cannot replay (see `varlen.varlen_attention`)."""
    first = layers[0]
    checkpointed = getattr(first, "gradient_checkpointing", False) and first.training
    if whole_stack is None:
        whole_stack = WHOLE_STACK
    if not whole_stack or PACKED_STEP in first.__dict__ or checkpointed:
        return False
    return hidden.is_cuda or not (first.training and torch.is_grad_enabled())


def run_layers(layers, hidden: torch.Tensor, step: Callable, stack_traceable: bool = True,
               per_token: tuple[torch.Tensor, ...] = (), options: PackedOptions | None = None) -> torch.Tensor:
    """`hidden = step(layer, hidden)` for each layer, through the layer's checkpoint function when it is on.

    Compiled (`options.compile_layers`), this is one graph per layer step; with `options.whole_stack`, one graph for the whole stack
    where it can be (`stack_traceable`: the architecture's attention is the opaque op, not host-side
    bucketing).
    `per_token`: tensors the step reads (from its closure) with one row per token, such as rotary
    tables: marked dynamic in that dimension like `hidden`.
    `options`: None takes `PackedOptions.current()`.
    """
    if options is None:
        options = PackedOptions.current()
    mode = options.compile_layers
    if mode and stack_traceable and len(layers) and _whole_stack(layers, hidden, options.whole_stack):
        # dynamic=None, not True: with every size symbolic, dynamo fails to stamp out the nested
        # layer regions; the token dimension is marked dynamic instead (here and by the callers).
        mark_token_dim(hidden, *per_token)
        return _compiled(_stack, mode, dynamic=None)(layers, hidden, step, per_token)
    if mode:
        step = _compiled(step, mode)
        if hidden._base is not None:
            # The embeddings hand over a view, later layers a plain tensor: dynamo would compile the
            # step once for each. A copy of one [tokens, hidden] tensor keeps it to one graph.
            hidden = hidden.clone()
        if not hidden.requires_grad and torch.is_grad_enabled() and any(
                p.requires_grad for p in layers[0].parameters()):
            # Likewise frozen embeddings (LoRA) hand over a tensor without grad, later layers one with:
            # dynamo guards on that and compiled the step twice (BERT-large LoRA: a 62 s warm-up on an
            # H200; the whole-stack graph compiles once either way). The unused input gradient costs
            # the first layer's input projections' backward product, about 1% of a BERT-base step's
            # FLOPs.
            hidden = hidden.detach().requires_grad_()  # not the caller's tensor: a copy or a detached alias
    for layer in layers:
        sharded_step = layer.__dict__.get(PACKED_STEP)
        if sharded_step is not None:  # FSDP unshards before and reshards after, as around a forward
            hidden = sharded_step(step, hidden)
        elif getattr(layer, "gradient_checkpointing", False) and layer.training and torch.is_grad_enabled():
            hidden = layer._gradient_checkpointing_func(lambda h, _layer=layer: step(_layer, h), hidden)
        else:
            hidden = step(layer, hidden)
    return hidden
