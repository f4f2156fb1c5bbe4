"""Running a stack of layers on the packed stream, honouring each layer's activation checkpointing
and, under FSDP, gathering each layer's sharded weights around its step (see `embedtune.sharding`)."""

from __future__ import annotations

from typing import Callable

import torch

PACKED_STEP = "embedtune_packed_step"  # set by embedtune.sharding on FSDP-sharded layers


def run_layers(layers, hidden: torch.Tensor, step: Callable) -> torch.Tensor:
    """`hidden = step(layer, hidden)` for each layer, through the layer's checkpoint function when it is on."""
    for layer in layers:
        sharded_step = layer.__dict__.get(PACKED_STEP)
        if sharded_step is not None:  # FSDP unshards before and reshards after, as around a forward
            hidden = sharded_step(step, hidden)
        elif getattr(layer, "gradient_checkpointing", False) and layer.training and torch.is_grad_enabled():
            hidden = layer._gradient_checkpointing_func(lambda h, _layer=layer: step(_layer, h), hidden)
        else:
            hidden = step(layer, hidden)
    return hidden
