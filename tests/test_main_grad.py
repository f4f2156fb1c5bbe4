"""`packing.main_grad` (fp32 master weights without per-weight casts) against the plain autocast path,
on the CPU: a packed training step (BERT with dropout, Qwen2, ModernBERT), its outputs and every
parameter's gradient, the shadows following the weights from step to step, and gradient accumulation. The GPU's GEMM
accumulation (`addmm` into an fp32 `.grad`) is checked by benchmarks/check_graphs_gpu.py."""

from __future__ import annotations

import pytest
import torch

from embedtune.packing import main_grad
from packed_steps import autocast_step as _step
from packed_steps import packed_model as _packed
from tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    model, batch = _packed(make_tiny_model("bert", tmp_path_factory.mktemp("main_grad")))
    assert model.config.hidden_dropout_prob > 0 and model.config.attention_probs_dropout_prob > 0
    return model, batch


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
    # the stacked projections' biases (q, k, v), whose gradients are summed in fp32 here
    stacked = {id(p) for p in model.parameters()} & {i for key in shadows._buffers if len(key) > 1 for i in key}
    fp32_sums = linear | {n for n, p in model.named_parameters() if id(p) in stacked and n.endswith(".bias")}
    for name, want in plain.items():
        # weight gradients (and stacked biases') are summed in fp32 here, rounded to bf16 first on the plain
        # path: one bf16 step apart
        tol = 2 ** -7 if name in fp32_sums else 1e-6
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


def _grads_of(params) -> list[torch.Tensor | None]:
    out = [None if p.grad is None else p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    return out


@pytest.mark.parametrize("widths", [(24, 24, 24), (24, 8, 8)])  # q, k, v; grouped-query attention's narrower k, v
@pytest.mark.parametrize("lead", [(37,), (3, 13)])  # the packed stream; a padded batch
def test_split_projections_match_three_linears(widths, lead):
    """`linear(..., split=True)` (`lora_linear.linears`' q, k, v): each output is its layer's, and the
    backward, handed the three gradients apart, joins them itself: the input's, every weight's and every
    bias's gradient are those of three nn.Linear under autocast, the weights' and biases' summed in fp32
    (to the fp64 sums). The upstream gradients differ per output, so a block joined out of place shows."""
    torch.manual_seed(0)
    layers = [torch.nn.Linear(16, w) for w in widths]
    with torch.no_grad():
        for layer in layers:
            layer.bias.normal_()
    params = [x for layer in layers for x in (layer.weight, layer.bias)]
    x = torch.randn(*lead, 16, requires_grad=True)
    ups = [torch.randn(*lead, w).to(torch.bfloat16) * (i + 1) for i, w in enumerate(widths)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = [layer(x) for layer in layers]
    torch.autograd.backward(plain, ups)
    want = _grads_of([x] + params)
    shadows = main_grad.Shadows(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16), main_grad.active(shadows):
        outs = main_grad.linear(shadows, layers, x, split=True)
    assert len(outs) == 3 and all(torch.equal(o, p) for o, p in zip(outs, plain))
    torch.autograd.backward(outs, ups)
    got = _grads_of([x] + params)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype == torch.float32 and (g - w).abs().max() <= 2 ** -7 * w.abs().max()
    x16 = x.detach().to(torch.bfloat16).double().reshape(-1, 16)
    for i, up in enumerate(ups):
        up = up.double().reshape(-1, widths[i])
        weight, bias = got[1 + 2 * i], got[2 + 2 * i]
        assert torch.allclose(weight.double(), up.t() @ x16, rtol=1e-5, atol=1e-5 * (up.abs().max() * x16.abs().max()).item())
        assert torch.allclose(bias.double(), up.sum(0), rtol=1e-5, atol=1e-5 * up.abs().max().item())


def test_an_unused_split_output_gets_zero_gradients():
    """Only q and v feed the loss: k's block of the joined gradient is zeros (autograd hands the backward
    none for it), so k's weight and bias gradients are zeros and q's and v's are the plain path's."""
    torch.manual_seed(1)
    layers = [torch.nn.Linear(16, 24) for _ in range(3)]
    params = [x for layer in layers for x in (layer.weight, layer.bias)]
    x = torch.randn(29, 16, requires_grad=True)
    ups = [torch.randn(29, 24).to(torch.bfloat16) for _ in range(2)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = [layers[0](x), layers[2](x)]
    torch.autograd.backward(plain, ups)
    want = _grads_of([x] + params)
    shadows = main_grad.Shadows(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16), main_grad.active(shadows):
        q, _, v = main_grad.linear(shadows, layers, x, split=True)
    torch.autograd.backward([q, v], ups)
    got = _grads_of([x] + params)
    assert want[3] is None and want[4] is None  # the plain path: k's parameters took no gradient
    assert not got[3].any() and not got[4].any()
    for i in (0, 1, 2, 5, 6):
        assert (got[i] - want[i]).abs().max() <= 2 ** -7 * want[i].abs().max(), i
