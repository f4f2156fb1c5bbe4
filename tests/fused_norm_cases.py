"""The fused dropout + residual + LayerNorm kernels against the plain ops, run on the CPU through
Triton's interpreter: outputs and gradients, the dropout mask's rate, scale and reuse in the backward,
fresh masks per call, seeded reproducibility, eval mode, and whole packed BERT training steps
(dropout on, activation checkpointing's recompute).

Run by tests/test_fused_norm.py in a process of its own with TRITON_INTERPRET=1: Triton picks the
interpreter when it is first imported, which other tests may already have done."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")  # after TRITON_INTERPRET=1 (the runner's environment)

from embedtune import FastModel  # noqa: E402
from embedtune.packing import enable_fast_path  # noqa: E402
from embedtune.kernels import fused_norm  # noqa: E402
from embedtune.kernels.fused_norm import DropoutAddNorm, dropout_add_norm, dropout_seed, residual_norm  # noqa: E402
from tiny_models import make_tiny_model  # noqa: E402


@pytest.fixture(autouse=True)
def interpreted():
    """Triton kernels on the CPU, through the interpreter (see the module's docstring)."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "run through tests/test_fused_norm.py"
    kernels = fused_norm._kernels()
    assert type(kernels._forward).__name__ == "InterpretedFunction"


def _norm(cols: int) -> torch.nn.LayerNorm:
    norm = torch.nn.LayerNorm(cols, eps=1e-12)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.3)
        norm.bias.normal_(0.0, 0.3)
    return norm


def _grads(*tensors):
    out = [t.grad.clone() for t in tensors]
    for t in tensors:
        t.grad = None
    return out


@pytest.mark.parametrize("rows,cols", [(37, 48), (5, 96), (70, 33), (9, 768)])  # 768: the tuned tiles
def test_matches_plain_ops_without_dropout(rows, cols):
    torch.manual_seed(rows)
    norm = _norm(cols)
    x = torch.randn(rows, cols, requires_grad=True)
    r = torch.randn(rows, cols, requires_grad=True)
    up = torch.randn(rows, cols)
    fused, same = dropout_add_norm(norm, 0.0, x, r)
    assert same is fused  # no autocast: one tensor serves both
    (fused * up).sum().backward()
    got = _grads(x, r, norm.weight, norm.bias)
    plain = norm(x + r)
    (plain * up).sum().backward()
    want = _grads(x, r, norm.weight, norm.bias)
    assert (fused - plain).abs().max() < 1e-5
    for g, w in zip(got, want):
        assert (g - w).abs().max() < 1e-4 * max(1.0, w.abs().max().item())


def test_under_autocast_gives_fp32_stream_and_half_copy_with_both_gradients():
    """Under autocast the plain path's LayerNorm returns fp32, which the next products cast back: the fused op
    returns both, and the gradients reaching either output are added."""
    torch.manual_seed(1)
    norm = _norm(64)
    x = torch.randn(21, 64, dtype=torch.bfloat16, requires_grad=True)
    r = torch.randn(21, 64, requires_grad=True)
    up, up_half = torch.randn(21, 64), torch.randn(21, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stream, half = dropout_add_norm(norm, 0.0, x, r)
    assert stream.dtype == torch.float32 and half.dtype == torch.bfloat16
    # one bf16 step apart at most (Triton's interpreter truncates to bf16; a GPU rounds to nearest)
    assert torch.allclose(half.float(), stream, rtol=2 ** -7, atol=0)
    ((stream * up).sum() + (half.float() * up_half).sum()).backward()
    got = _grads(x, r, norm.weight, norm.bias)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = norm(x + r)
        plain_half = plain.to(torch.bfloat16)
    assert plain.dtype == torch.float32
    ((plain * up).sum() + (plain_half.float() * up_half).sum()).backward()
    want = _grads(x, r, norm.weight, norm.bias)
    assert (stream - plain).abs().max() < 1e-5
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.float32
    for g, w in zip(got, want):
        assert (g.float() - w.float()).abs().max() < 2e-2 * max(1.0, w.abs().max().item())


def test_dropout_mask_rate_scale_and_reuse_in_backward():
    torch.manual_seed(2)
    rows, cols, p = 400, 96, 0.1
    norm = _norm(cols)
    x = (torch.rand(rows, cols) + 0.5).requires_grad_()  # never zero, so dropped entries show
    r = torch.randn(rows, cols, requires_grad=True)
    seed = dropout_seed(x.device)
    up = torch.randn(rows, cols)
    fused = DropoutAddNorm.apply(x, r, norm.weight, norm.bias, p, norm.eps, seed, torch.float32, None)
    (fused * up).sum().backward()
    got = _grads(x, r, norm.weight, norm.bias)
    # the mask as the kernel drew it: the pre-norm sum minus the residual is the dropped branch
    _, _, pre_norm, _, _ = fused_norm._kernels().forward(x.detach(), r.detach(), norm.weight, norm.bias, seed,
                                                         p, norm.eps, torch.float32, None)
    dropped = pre_norm - r.detach()
    keep = dropped != 0
    rate = keep.float().mean().item()
    assert abs(rate - (1 - p)) < 0.01, rate  # 38,400 draws: the rate's standard deviation is 0.0015
    assert torch.allclose(dropped[keep], x.detach()[keep] / (1 - p), rtol=1e-6)
    plain = norm(x * keep / (1 - p) + r)  # the same mask through the plain ops
    (plain * up).sum().backward()
    want = _grads(x, r, norm.weight, norm.bias)
    assert (fused - plain).abs().max() < 1e-5
    for g, w in zip(got, want):
        assert (g - w).abs().max() < 1e-4 * max(1.0, w.abs().max().item())
    assert (got[0][~keep] == 0).all()  # dropped entries get no gradient


@pytest.mark.parametrize("cols", [96, 102])  # 102: each row's last draw serves two columns
def test_dropout_mask_draws_shared_by_four_columns_are_independent_and_tile_free(cols):
    """One Philox draw serves four neighbouring columns: each column keeps at the rate, the four kept
    together as independent draws would, rows differ, and the mask is the same whatever the tiles
    (forward and backward tile rows differently)."""
    torch.manual_seed(3)
    rows, p = 800, 0.5  # the rate's standard deviation about 0.0036 per column class, 0.0031 for pairs
    kernels = fused_norm._kernels()
    x = torch.rand(rows, cols) + 0.5
    r = torch.randn(rows, cols)
    w, b = torch.ones(cols), torch.zeros(cols)
    seed = dropout_seed(x.device)
    mask = (kernels.forward(x, r, w, b, seed, p, 1e-5, torch.float32, None)[2] - r) != 0
    few = 96  # the tile checks on the first rows (a row's draws depend on its index, not on the row count)
    tiled = (kernels.forward(x[:few], r[:few], w, b, seed, p, 1e-5, torch.float32, None, tile=(4, 4))[2] - r[:few]) != 0
    assert torch.equal(tiled, mask[:few])
    keep = mask.float()
    for k in range(4):
        assert abs(keep[:, k::4].mean().item() - (1 - p)) < 0.015, k
    for a, c in [(0, 1), (0, 2), (0, 3), (1, 2), (2, 3)]:  # columns of one draw
        both = (keep[:, a::4][:, :cols // 4] * keep[:, c::4][:, :cols // 4]).mean().item()
        assert abs(both - (1 - p) ** 2) < 0.015, (a, c, both)
    assert not torch.equal(keep[0], keep[1]) and not torch.equal(keep[:, 0], keep[:, 4])
    dy = torch.randn(few, cols)
    pre_norm = (x * keep / (1 - p) + r)[:few]
    for tile in [None, (4, 2, 8)]:
        _, dx, _, _, _ = kernels.backward(dy, None, pre_norm, torch.zeros(few), torch.ones(few), w, seed, p,
                                          torch.float32, torch.float32, True, False, tile=tile)
        assert torch.equal(dx != 0, mask[:few]), tile  # the backward drops what the forward dropped


@pytest.mark.parametrize("p", [0.0, 0.1])
def test_branch_bias_is_added_before_dropout_and_its_gradient_summed(p):
    """The dense layer's bias left to the fused op (`branch_bias`): norm(dropout(x + b) + r), with b's
    gradient the column sums of the branch gradient, as the plain ops give it."""
    torch.manual_seed(5)
    rows, cols = 300, 96
    norm = _norm(cols)
    x = (torch.rand(rows, cols) + 0.5).requires_grad_()
    r = torch.randn(rows, cols, requires_grad=True)
    b = (torch.rand(cols) + 0.5).requires_grad_()  # positive, so x + b is never zero and drops show
    seed = dropout_seed(x.device) if p else None
    up = torch.randn(rows, cols)
    fused = DropoutAddNorm.apply(x, r, norm.weight, norm.bias, p, norm.eps, seed, torch.float32, None, b)
    (fused * up).sum().backward()
    got = _grads(x, r, norm.weight, norm.bias, b)
    _, _, pre_norm, _, _ = fused_norm._kernels().forward(x.detach(), r.detach(), norm.weight, norm.bias, seed, p,
                                                         norm.eps, torch.float32, None, branch_bias=b.detach())
    keep = (pre_norm - r.detach()) != 0
    if p:
        assert abs(keep.float().mean().item() - (1 - p)) < 0.02
    else:
        assert keep.all()
    plain = norm((x + b) * keep / (1 - p) + r)
    (plain * up).sum().backward()
    want = _grads(x, r, norm.weight, norm.bias, b)
    assert (fused - plain).abs().max() < 1e-5
    for g, w in zip(got, want):
        assert (g - w).abs().max() < 1e-4 * max(1.0, w.abs().max().item())
    # a frozen bias (LoRA's base layer): still added, no gradient asked
    b.requires_grad_(False)
    again = DropoutAddNorm.apply(x, r, norm.weight, norm.bias, p, norm.eps, seed, torch.float32, None, b)
    assert torch.equal(again, fused)
    (again * up).sum().backward()
    assert torch.allclose(x.grad, got[0]) and b.grad is None


def test_residual_norm_adds_the_branch_bias_on_the_plain_path_too():
    norm, dropout = _norm(32), torch.nn.Dropout(0.0)
    x, r, b = torch.randn(10, 32), torch.randn(10, 32), torch.randn(32)
    with torch.no_grad():  # inference takes the modules
        plain, _ = residual_norm(norm, dropout, x, r, fused=True, branch_bias=b)
    assert (plain - norm(x + b + r)).abs().max() < 1e-6


def test_each_call_draws_a_new_mask_from_torchs_generator():
    norm = _norm(32)
    x, r = torch.rand(64, 32) + 0.5, torch.randn(64, 32)
    torch.manual_seed(3)
    first, second = dropout_add_norm(norm, 0.2, x, r)[0], dropout_add_norm(norm, 0.2, x, r)[0]
    torch.manual_seed(3)
    again = dropout_add_norm(norm, 0.2, x, r)[0]
    assert not torch.equal(first, second)  # a new mask per call
    assert torch.equal(first, again)  # seeded by torch's generator: reproducible


def test_residual_norm_follows_the_dropout_modules_mode():
    norm, dropout = _norm(32), torch.nn.Dropout(0.1)
    x, r = torch.rand(50, 32) + 0.5, torch.randn(50, 32)
    dropout.eval()
    state = torch.get_rng_state()
    fused, _ = residual_norm(norm, dropout, x, r, fused=True)
    assert torch.equal(torch.get_rng_state(), state)  # eval draws nothing, as the plain path
    assert (fused - norm(x + r)).abs().max() < 1e-5
    dropout.train()
    assert not torch.allclose(residual_norm(norm, dropout, x, r, fused=True)[0], fused)


def _bert(tmp_path, dropout: float):
    torch.manual_seed(0)
    model, tok = FastModel.from_pretrained(str(make_tiny_model("bert", tmp_path)), max_seq_length=64, fast=False)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = dropout
    with torch.no_grad():  # BERT starts its linear biases at zero, which would hide a bias added twice or never
        for name, param in model.named_parameters():
            if name.endswith("dense.bias"):
                param.normal_(0.0, 0.2)
    model.config.attention_probs_dropout_prob = 0.0  # attention dropout is not this op's; keep it out of the way
    for layer in model.encoder.layer:
        layer.attention.self.dropout.p = 0.0
    batch = tok(["short", "a longer sentence with more tokens in it", "def f(x):\n    return x + 1"],
                padding=True, return_tensors="pt")
    return model, batch


def _step(model, batch, seed: int = 0):
    model.zero_grad()
    torch.manual_seed(seed)
    out = model(**batch).last_hidden_state
    mask = batch["attention_mask"].bool()
    loss = (out[mask] * torch.linspace(0.5, 1.5, out.shape[-1])).pow(2).sum()
    loss.backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _recorded_applies(monkeypatch) -> list:
    """Every `DropoutAddNorm.apply` call's arguments from now on, in order (p is [4], the half dtype [8],
    the branch bias [9])."""
    applied = []
    real = DropoutAddNorm.apply
    monkeypatch.setattr(DropoutAddNorm, "apply", lambda *a: applied.append(a) or real(*a))
    return applied


def _close(a: dict, b: dict, tol: float) -> bool:
    return set(a) == set(b) and all((a[k] - b[k]).abs().max() <= tol * max(1.0, b[k].abs().max().item()) for k in a)


def test_packed_bert_layers_use_the_fused_op_and_train_like_the_modules(tmp_path, monkeypatch):
    model, batch = _bert(tmp_path, dropout=0.1)
    mask = batch["attention_mask"].bool()
    applied = _recorded_applies(monkeypatch)
    assert enable_fast_path(model, fused_kernels=False)
    model.eval()
    plain_out, plain_grads = _step(model, batch)
    assert not applied
    enable_fast_path(model, fused_kernels=True)
    fused_out, fused_grads = _step(model, batch)
    assert [a[4] for a in applied] == [0.0] * 4  # two sub-blocks in each of two layers, eval mode: no dropout
    dense = [m for layer in model.encoder.layer for m in (layer.attention.output.dense, layer.output.dense)]
    assert [a[9] is d.bias for a, d in zip(applied, dense)] == [True] * 4  # their biases are left to the fused op
    assert (fused_out[mask] - plain_out[mask]).abs().max() < 1e-5
    assert _close(fused_grads, plain_grads, 1e-4)

    model.train()  # dropout on: masks differ from torch's own bits, so compare behaviour, not values
    applied.clear()
    train_out, train_grads = _step(model, batch, seed=1)
    assert [a[4] for a in applied] == [0.1] * 4
    assert (train_out[mask] - fused_out[mask]).abs().max() > 1e-3  # dropout acted
    again_out, again_grads = _step(model, batch, seed=1)
    assert torch.equal(train_out, again_out) and _close(again_grads, train_grads, 0)  # seeded: same masks
    other_out, _ = _step(model, batch, seed=2)
    assert not torch.equal(other_out, train_out)

    # activation checkpointing recomputes each layer in the backward: it must redraw the same masks
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ckpt_out, ckpt_grads = _step(model, batch, seed=1)
    assert torch.equal(ckpt_out, train_out)
    assert _close(ckpt_grads, train_grads, 1e-6)


@pytest.mark.parametrize("bias", ["none", "all"])
def test_packed_lora_bert_leaves_the_dense_biases_to_the_fused_op(tmp_path, monkeypatch, bias):
    """LoRA on the dense layers (the default targets): the base product is made without its bias, which the
    fused op adds (frozen, or trained with peft's bias="all"); outputs and every trained gradient are the
    modules'."""
    model, batch = _bert(tmp_path, dropout=0.0)
    mask = batch["attention_mask"].bool()
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, lora_dropout=0.0, bias=bias)
    torch.manual_seed(4)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.2)  # peft starts B at zero, which would hide the low-rank path
    applied = _recorded_applies(monkeypatch)
    model.train()
    results = {}
    for fused in (False, True):
        assert enable_fast_path(model, fused_kernels=fused)
        results[fused] = _step(model, batch)
    biases = [a[9] for a in applied]
    assert len(biases) == 4 and all(b is not None and b.requires_grad == (bias == "all") for b in biases)
    (plain_out, plain_grads), (fused_out, fused_grads) = results[False], results[True]
    assert any("lora_A" in k for k in plain_grads) and (bias == "all") == any(k.endswith("dense.base_layer.bias")
                                                                             for k in plain_grads)
    assert (fused_out[mask] - plain_out[mask]).abs().max() < 1e-5
    assert _close(fused_grads, plain_grads, 1e-4)


def test_packed_bert_without_dropout_trains_as_the_modules(tmp_path):
    model, batch = _bert(tmp_path, dropout=0.0)
    mask = batch["attention_mask"].bool()
    model.train()
    assert enable_fast_path(model, fused_kernels=False)
    plain_out, plain_grads = _step(model, batch)
    enable_fast_path(model, fused_kernels=True)
    fused_out, fused_grads = _step(model, batch)
    assert (fused_out[mask] - plain_out[mask]).abs().max() < 1e-5
    assert _close(fused_grads, plain_grads, 1e-4)


def test_packed_bert_under_autocast_feeds_the_half_copy_to_the_products(tmp_path, monkeypatch):
    """Under autocast the attention block's norm hands its bf16 copy to the feed-forward product and the
    feed-forward's norm writes none (nothing reads it); outputs and gradients stay those of the modules."""
    model, batch = _bert(tmp_path, dropout=0.1)
    mask = batch["attention_mask"].bool()
    applied = _recorded_applies(monkeypatch)
    model.eval()
    results = {}
    for fused in (False, True):
        enable_fast_path(model, fused_kernels=fused)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results[fused] = _step(model, batch)
    assert [a[8] for a in applied] == [torch.bfloat16, None] * 2
    (plain_out, plain_grads), (fused_out, fused_grads) = results[False], results[True]
    assert fused_out.dtype == plain_out.dtype == torch.float32
    assert (fused_out[mask] - plain_out[mask]).abs().max() < 2e-2 * plain_out[mask].abs().max()
    assert set(fused_grads) == set(plain_grads)
    # bf16 products: 3% of each gradient's norm, with a floor for the key biases, whose exact gradient is
    # zero (softmax ignores a per-query constant) and which hold only rounding noise on both paths
    floor = 3e-3 * max(g.norm().item() for g in plain_grads.values())
    excess = {k: (fused_grads[k] - plain_grads[k]).norm().item() - 3e-2 * plain_grads[k].norm().item() - floor
              for k in plain_grads}
    assert max(excess.values()) <= 0, sorted(excess.items(), key=lambda kv: -kv[1])[:4]


def _record_variants(monkeypatch) -> set:
    """Record the kernel variants called: what Triton specializes on (tensor dtypes, the width's block)."""
    kernels = fused_norm._kernels()
    seen = set()
    real_forward, real_backward = kernels.forward, kernels.backward

    def forward(x, residual, weight, bias, seed, p, eps, out_dtype, half_dtype, branch_bias=None):
        # the branch bias's pointer is the norm bias's where there is none: its dtype is what specializes
        seen.add(("forward", x.dtype, residual.dtype, weight.dtype, bias.dtype, out_dtype, half_dtype,
                  kernels._block(x.shape[1]), (branch_bias if branch_bias is not None else bias).dtype))
        return real_forward(x, residual, weight, bias, seed, p, eps, out_dtype, half_dtype, branch_bias=branch_bias)

    def backward(dy, dy_half, s, mean, rstd, weight, seed, p, x_dtype, residual_dtype, want_dx, want_dw,
                 want_dxb=False):
        seen.add(("backward", dy.dtype, None if dy_half is None else dy_half.dtype, s.dtype, weight.dtype,
                  x_dtype, residual_dtype, kernels._block(s.shape[1])))
        return real_backward(dy, dy_half, s, mean, rstd, weight, seed, p, x_dtype, residual_dtype, want_dx, want_dw,
                             want_dxb=want_dxb)

    monkeypatch.setattr(kernels, "forward", forward)
    monkeypatch.setattr(kernels, "backward", backward)

    return seen


def _as_bf16_weights(variant: tuple) -> tuple:
    """A variant as a LoRA run calls it: the model's own weights (norms, biases) in bf16."""
    bf16 = torch.bfloat16
    kind = variant[0]
    if kind == "forward":
        return variant[:3] + (bf16, bf16) + variant[5:8] + (bf16,)
    return variant[:4] + (bf16,) + variant[5:]


def test_prebuild_calls_every_kernel_variant_a_training_step_calls(tmp_path, monkeypatch):
    """`kernels.prebuild` builds Triton's kernels ahead of a run through `variant_calls.build`: it must
    call the variants (dtypes, block width) that a packed BERT training step under bf16 autocast calls,
    or the run builds them again."""
    from embedtune.kernels import prebuild, variant_calls

    seen = _record_variants(monkeypatch)
    model, batch = _bert(tmp_path, dropout=0.1)
    enable_fast_path(model, fused_kernels=True)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _step(model, batch)
    trained = set(seen)
    assert {v[0] for v in trained} == {"forward", "backward"}
    seen.clear()
    width = prebuild.fused_width({"model_type": model.config.model_type, "hidden_size": model.config.hidden_size})
    assert width == model.config.hidden_size
    variant_calls.build(width, torch.float32, torch.device("cpu"))
    assert trained <= seen, sorted(map(str, trained - seen))
    # LoRA runs keep the base (its LayerNorms) in bf16: the variants differ in the weights' dtype only
    seen.clear()
    variant_calls.build(width, torch.bfloat16, torch.device("cpu"))
    as_bf16 = {_as_bf16_weights(v) for v in trained}
    assert as_bf16 <= seen, sorted(map(str, as_bf16 - seen))
