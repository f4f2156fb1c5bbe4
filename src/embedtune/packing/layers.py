"""Running a stack of layers on the packed stream, honouring each layer's activation checkpointing."""

from __future__ import annotations

from typing import Callable

import torch


def run_layers(layers, hidden: torch.Tensor, step: Callable) -> torch.Tensor:
    """`hidden = step(layer, hidden)` for each layer, through the layer's checkpoint function when it is on."""
    for layer in layers:
        if getattr(layer, "gradient_checkpointing", False) and layer.training and torch.is_grad_enabled():
            hidden = layer._gradient_checkpointing_func(lambda h, _layer=layer: step(_layer, h), hidden)
        else:
            hidden = step(layer, hidden)
    return hidden
