"""The gradient join's Triton kernel (`embedtune.kernels.join_grads`) on the CPU through Triton's
interpreter: the join exact and the column sums in fp32 against torch.cat and fp64 sums (rows and
widths off the tile), the parts it leaves to torch, a packed BERT training step through
`packing.main_grad` that joins q, k and v with it, and the prebuild calling the variant that step calls.

Run by tests/test_join_grads.py in a process of its own with TRITON_INTERPRET=1: Triton picks the
interpreter when it is first imported, which other tests may already have done."""

from __future__ import annotations

import functools
import os

import pytest
import torch

pytest.importorskip("triton")  # after TRITON_INTERPRET=1 (the runner's environment)

from embedtune.kernels import join_grads, variant_calls  # noqa: E402
from embedtune.packing import main_grad  # noqa: E402
from packed_steps import autocast_step, packed_model  # noqa: E402
from tiny_models import make_tiny_model  # noqa: E402


@pytest.fixture(autouse=True)
def interpreted():
    """Triton kernels on the CPU, through the interpreter (see the module's docstring)."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "run through tests/test_join_grads.py"
    assert type(join_grads._kernels()._join_and_sum).__name__ == "InterpretedFunction"


def _check(grads, joined, sums):
    want = torch.cat([g.double() for g in grads], dim=1)
    dtype = functools.reduce(torch.promote_types, [g.dtype for g in grads])  # the parts' own, unless they differ
    assert joined.dtype == dtype and torch.equal(joined.double(), want)
    assert sums.dtype == torch.float32
    assert ((sums.double() - want.sum(0)).abs() <= 1e-6 * want.abs().sum(0)).all()


# rows off the 64-row tile and widths off the 128-column tile (300, 200; 130, 96; 1, 40), and on them
@pytest.mark.parametrize("rows,width,parts,dtype", [(300, 200, 3, torch.bfloat16), (128, 128, 3, torch.bfloat16),
                                                    (130, 96, 2, torch.float32), (1, 40, 3, torch.float16)])
def test_the_kernel_joins_exactly_and_sums_in_fp32(rows, width, parts, dtype):
    torch.manual_seed(rows)
    grads = [(torch.randn(rows, width) * (i + 1) + i).to(dtype) for i in range(parts)]  # each part its own sums
    assert join_grads.can_join(grads)
    _check(grads, *join_grads.join_and_sum(grads))


def test_parts_the_kernel_does_not_take_are_joined_by_torch():
    torch.manual_seed(0)
    q = torch.randn(70, 48).to(torch.bfloat16)
    k, v = torch.randn(70, 16).to(torch.bfloat16), torch.randn(70, 16).to(torch.bfloat16)
    wide = torch.randn(70, 96).to(torch.bfloat16)
    others = [[q, k, v],  # grouped-query attention: narrower k and v
              [q, q.float(), q],  # mixed dtypes
              [q, wide[:, :48], q],  # not contiguous
              [q, wide.view(-1)[1 : 1 + 70 * 48].view(70, 48), q],  # misaligned: Triton would build another variant
              [q], [q, q, q, q]]  # one part, four
    for grads in others:
        assert not join_grads.can_join(grads)
        _check(grads, *join_grads.join_and_sum(grads))
    assert join_grads.can_join([q, q, q])
    _check([q, q, q], *join_grads.join_and_sum([q, q, q], fused=False))  # a run without the fused kernels


def _recorded_joins(monkeypatch) -> list:
    """The kernel's calls from now on: (dtype, width, parts), what its compiled variant depends on."""
    kernels = join_grads._kernels()
    real = kernels.join_and_sum
    calls = []
    monkeypatch.setattr(kernels, "join_and_sum",
                        lambda grads: calls.append((grads[0].dtype, grads[0].shape[1], len(grads))) or real(grads))
    return calls


def test_a_packed_bert_step_joins_q_k_v_with_the_kernel_as_torch_does(tmp_path, monkeypatch):
    """Full fine-tuning under bf16 autocast inside `main_grad.active`, the fused kernels on: each layer's
    q, k, v gradients go through the kernel, and every gradient is the one torch's join gives (the same
    joined tensor: weights and inputs bit for bit; the stacked biases' fp32 sums in another order)."""
    model, batch = packed_model(make_tiny_model("bert", tmp_path), fused_kernels=True)
    shadows = main_grad.Shadows(torch.bfloat16)
    calls = _recorded_joins(monkeypatch)
    out, got = autocast_step(model, batch, shadows)
    hidden = model.config.hidden_size
    assert calls == [(torch.bfloat16, hidden, 3)] * model.config.num_hidden_layers
    monkeypatch.setattr(join_grads, "can_join", lambda grads: False)
    want_out, want = autocast_step(model, batch, shadows)
    assert len(calls) == model.config.num_hidden_layers  # torch's join this time
    assert torch.equal(out, want_out) and set(got) == set(want)
    qkv_biases = {n for n in want if n.endswith(("query.bias", "key.bias", "value.bias"))}
    assert len(qkv_biases) == 3 * model.config.num_hidden_layers
    for name, grad in want.items():
        if name in qkv_biases:
            assert (got[name] - grad).abs().max() <= 1e-6 * grad.abs().max(), name
        else:
            assert torch.equal(got[name], grad), name


def test_prebuild_calls_the_variant_a_full_fine_tuning_step_calls(monkeypatch):
    """The step above calls the kernel on bf16 parts, 3 of the model's width: `variant_calls.build` must call
    that variant for full fine-tuning (fp32 weights), or the run's first step builds it; LoRA runs, whose
    frozen q, k, v weights take no gradient, need none."""
    calls = _recorded_joins(monkeypatch)
    variant_calls.build(32, torch.float32, torch.device("cpu"))
    assert calls == [(torch.bfloat16, 32, 3)]
    variant_calls.build(32, torch.bfloat16, torch.device("cpu"))
    assert len(calls) == 1
