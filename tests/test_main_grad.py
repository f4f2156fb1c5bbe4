"""`packing.main_grad` (fp32 master weights without per-weight casts) against the plain autocast path,
on the CPU: a packed training step (BERT with dropout, Qwen2, ModernBERT), its outputs and every
parameter's gradient, the shadows following the weights from step to step, and gradient accumulation. The GPU's GEMM
accumulation (`addmm` into an fp32 `.grad`) is checked by benchmarks/check_graphs_gpu.py."""

from __future__ import annotations

import contextlib

import pytest
import torch

from embedtune import FastModel
from embedtune.packing import enable_fast_path, main_grad
from tiny_models import make_tiny_model


def _packed(path):
    torch.manual_seed(0)
    model, tok = FastModel.from_pretrained(str(path), max_seq_length=64, fast=False)
    with torch.no_grad():  # BERT starts its biases at zero, which would hide a bias gradient lost or doubled
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, 0.2)
    assert enable_fast_path(model)
    model.train()
    batch = tok(["short", "a longer sentence with more tokens in it", "def f(x):\n    return x + 1"],
                padding=True, return_tensors="pt")
    return model, batch


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    model, batch = _packed(make_tiny_model("bert", tmp_path_factory.mktemp("main_grad")))
    assert model.config.hidden_dropout_prob > 0 and model.config.attention_probs_dropout_prob > 0
    return model, batch


def _step(model, batch, shadows=None, seed: int = 3, zero: bool = True):
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


def _linear_weights(model) -> set[str]:
    return {f"{n}.weight" for n, m in model.named_modules() if type(m) is torch.nn.Linear}


def test_a_training_step_matches_the_plain_autocast_path(bert):
    shadows = _matches_the_plain_path(*bert)
    # a layer's q, k and v share one stacked buffer; with their biases, 4 weight and 4 bias buffers a layer
    assert len(shadows._buffers) == 8 * bert[0].config.num_hidden_layers


@pytest.mark.parametrize("arch", ["qwen2", "modernbert"])  # q, k, v with biases stacked; one fused Wqkv, no biases
def test_other_packed_architectures_match_the_plain_path(arch, tmp_path):
    model, batch = _packed(make_tiny_model(arch, tmp_path))
    assert len(_matches_the_plain_path(model, batch)._buffers) > 0


def _matches_the_plain_path(model, batch) -> main_grad.Shadows:
    plain_out, plain = _step(model, batch)
    shadows = main_grad.Shadows(torch.bfloat16)
    out, got = _step(model, batch, shadows)
    # the same bf16 weights and inputs, the same dropout draws: the forward is the plain one, bit for bit
    assert torch.equal(out, plain_out)
    assert set(got) == set(plain)  # every parameter got its gradient, none was left out
    linear = _linear_weights(model)
    assert linear and linear <= set(got)
    for name, want in plain.items():
        # weight gradients are summed in fp32 here, rounded to bf16 first on the plain path: one bf16 step apart
        tol = 2 ** -7 if name in linear else 1e-6
        assert (got[name] - want).abs().max() <= tol * want.abs().max(), name
    return shadows


def test_the_shadows_follow_the_weights_and_gradients_accumulate(bert):
    model, batch = bert
    shadows = main_grad.Shadows(torch.bfloat16)
    _step(model, batch, shadows)
    query = model.encoder.layer[0].attention.self.value
    with torch.no_grad():
        query.weight.mul_(1.5)  # what an optimizer step does between two steps
        query.bias.add_(0.25)
    try:
        plain_out, plain = _step(model, batch)
        out, got = _step(model, batch, shadows)
        assert torch.equal(out, plain_out)  # refreshed: the new weights ran
        stale = main_grad.Shadows(torch.bfloat16)
        stale.stacked([query.weight])
        with torch.no_grad():
            query.weight.mul_(2.0)
        with main_grad.active(stale), torch.autocast("cpu", dtype=torch.bfloat16):
            torch.manual_seed(3)
            not_refreshed = model(**batch).last_hidden_state.detach().float()
        with torch.no_grad():
            query.weight.div_(2.0)
        assert not torch.equal(not_refreshed, plain_out)  # (the check above can fail: a stale copy runs old weights)
        # a second backward adds to .grad (gradient accumulation), as autograd's own accumulation does
        _, twice = _step(model, batch, shadows, zero=False)
        for name in _linear_weights(model) | {"encoder.layer.0.attention.self.value.bias"}:
            assert torch.allclose(twice[name], 2 * got[name], rtol=1e-6, atol=1e-9), name
    finally:
        with torch.no_grad():
            query.weight.div_(1.5)
            query.bias.sub_(0.25)


def test_only_steps_with_a_backward_and_trained_fp32_weights_take_it():
    layer = torch.nn.Linear(8, 4)
    x = torch.randn(3, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert main_grad.applies([layer], x)
        assert not main_grad.applies([layer], x.detach())  # nothing would call the backward
        with torch.no_grad():
            assert not main_grad.applies([layer], x)
        layer.weight.requires_grad_(False)
        assert not main_grad.applies([layer], x)  # frozen (LoRA's base): the plain path
        layer.weight.requires_grad_(True)
        handle = layer.register_forward_hook(lambda *a: None)
        assert not main_grad.applies([layer], x)
        handle.remove()
        assert not main_grad.applies([layer, torch.nn.Linear(8, 4, bias=False)], x)  # biases on some only
    assert not main_grad.applies([layer], x)  # no autocast: no casts to save
