"""Shared by the tests of `packing.main_grad` and of the gradient join: a tiny packed model with
non-zero biases, and one training step of it under bf16 autocast (inside `main_grad.active` when
given shadows), returning its output and every gradient."""

from __future__ import annotations

import contextlib

import torch

from embedtune import FastModel
from embedtune.packing import enable_fast_path, main_grad


def packed_model(path, fused_kernels: bool = False):
    torch.manual_seed(0)
    model, tok = FastModel.from_pretrained(str(path), max_seq_length=64, fast=False)
    with torch.no_grad():  # BERT starts its biases at zero, which would hide a bias gradient lost or doubled
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, 0.2)
    assert enable_fast_path(model, fused_kernels=fused_kernels)
    model.train()
    batch = tok(["short", "a longer sentence with more tokens in it", "def f(x):\n    return x + 1"],
                padding=True, return_tensors="pt")
    return model, batch


def autocast_step(model, batch, shadows=None, seed: int = 3, zero: bool = True):
    if zero:
        model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    inside = main_grad.active(shadows) if shadows is not None else contextlib.nullcontext()
    with torch.autocast("cpu", dtype=torch.bfloat16), inside:
        if shadows is not None:
            shadows.refresh()
        out = model(**batch).last_hidden_state
        mask = batch["attention_mask"].bool()
        loss = (out[mask].float() * torch.linspace(0.5, 1.5, out.shape[-1])).pow(2).mean()
    loss.backward()
    return out.detach().float(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
