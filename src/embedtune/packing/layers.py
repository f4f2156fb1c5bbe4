"""Running a stack of layers on the packed stream.

Per layer this honours, in order: FSDP (gathering the layer's sharded weights around its step, see
`embedtune.sharding`), activation checkpointing, and regional compilation. Compilation is regional:
the per-layer step is compiled, not the model. Every layer of a model runs the same code on the same
shapes, so one compiled graph serves all of them (parameters are graph inputs), and the token
dimension is compiled dynamic, so packed streams of any length reuse it: one compile per run, not
one per layer or per batch shape. Attention (`varlen_attention`) stays outside the graph.
Mode "reduce-overhead" also replays the compiled regions as CUDA graphs, which removes the kernel
launch cost that dominates small steps on a fast GPU; it records one graph per stream length, so
use it with `varlen.static_tokens` (streams padded to a token multiple: few lengths).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable

import torch

PACKED_STEP = "embedtune_packed_step"  # set by embedtune.sharding on FSDP-sharded layers
_COMPILE_LAYERS = contextvars.ContextVar("embedtune_compile_layers", default=False)
COMPILE_MODES = ("default", "reduce-overhead")


@contextlib.contextmanager
def compiled_layers(mode: bool | str = True):
    """Run the packed layer steps inside this block through torch.compile (`True` = "default")."""
    if mode is True:
        mode = "default"
    if mode and mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {COMPILE_MODES}, not {mode!r}")
    token = _COMPILE_LAYERS.set(mode)
    try:
        yield
    finally:
        _COMPILE_LAYERS.reset(token)


def _compiled(step: Callable, mode: str) -> Callable:
    # torch.compile caches by the code object: a fresh closure per forward reuses the graph.
    return torch.compile(step, dynamic=True, mode=None if mode == "default" else mode)


def run_layers(layers, hidden: torch.Tensor, step: Callable) -> torch.Tensor:
    """`hidden = step(layer, hidden)` for each layer, through the layer's checkpoint function when it is on."""
    mode = _COMPILE_LAYERS.get()
    if mode:
        step = _compiled(step, mode)
    for layer in layers:
        sharded_step = layer.__dict__.get(PACKED_STEP)
        if sharded_step is not None:  # FSDP unshards before and reshards after, as around a forward
            hidden = sharded_step(step, hidden)
        elif getattr(layer, "gradient_checkpointing", False) and layer.training and torch.is_grad_enabled():
            hidden = layer._gradient_checkpointing_func(lambda h, _layer=layer: step(_layer, h), hidden)
        else:
            hidden = step(layer, hidden)
    return hidden
