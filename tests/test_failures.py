"""Failures mid-run end in one line that says what happened and what to do, and keep the last good
checkpoint: a NaN/inf loss (caught at its step, before the optimizer uses it) and GPU out-of-memory.
Both are injected into a tiny model's run; nothing here needs a GPU."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from embedtune.cli import app
from embedtune.errors import EmbedtuneError
from embedtune.resilience import (
    NonFiniteLoss, ResumableTrainer, check_finite_weights, checkpoints_dir, is_complete, latest_checkpoint,
    nonfinite_loss_message,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from tiny_models import make_tiny_model

    return make_tiny_model("bert", tmp_path_factory.mktemp("tiny_failures"))


@pytest.fixture()
def pairs(tmp_path) -> Path:
    from embedtune.data import write_jsonl

    rows = [{"anchor": f"question {i} about topic {i % 5}", "positive": f"answer {i} in detail {i * 7}"}
            for i in range(24)]
    return write_jsonl(rows, tmp_path / "pairs.jsonl")


def _flags(data: Path, model: Path, out: Path) -> list[str]:
    return ["train", str(data), "--output", str(out), "--model", str(model), "--max-steps", "6", "--batch-size", "4",
            "--max-seq-length", "16", "--no-eval", "--save-every", "2", "--lr", "0.001", "--lora-r", "4"]


def _one_line_error(result) -> str:
    assert result.exit_code == 1, (result.output, result.exception)
    assert "Traceback" not in result.output
    text = " ".join(result.output.split())
    assert text.count("error:") == 1
    return text


@pytest.mark.parametrize("deferred", [False, True], ids=["checked-at-once", "checked-on-device"])
def test_nan_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint(tmp_path, tiny, pairs, monkeypatch, deferred):
    """At once: the CPU's check. On the device: what one GPU runs (`_NonFiniteGate`), forced here on the
    CPU's fused AdamW: the NaN step's update is skipped, the host learns of it one step later."""
    import importlib

    from embedtune import guards

    if deferred:
        monkeypatch.setattr(importlib.import_module("embedtune.train"), "_optimizer_name", lambda: "adamw_torch_fused")
        monkeypatch.setattr(guards, "_deferrable_optimizer", lambda trainer: guards._fused_adam(trainer.optimizer))
        skipped = []
        original_step = torch.optim.AdamW.step

        def step(self, *args, **kwargs):
            found_inf = getattr(self, "found_inf", None)
            before = [p.detach().clone() for group in self.param_groups for p in group["params"]]
            result = original_step(self, *args, **kwargs)
            after = [p.detach() for group in self.param_groups for p in group["params"]]
            if found_inf is not None and found_inf.item():
                skipped.append(all(torch.equal(a, b) for a, b in zip(before, after)))
            return result

        monkeypatch.setattr(torch.optim.AdamW, "step", step)
    calls = []
    original = ResumableTrainer.compute_loss

    def compute_loss(self, *args, **kwargs):
        loss = original(self, *args, **kwargs)
        calls.append(self.state.global_step)
        return loss * math.nan if self.state.global_step == 2 else loss  # step 3's loss

    monkeypatch.setattr(ResumableTrainer, "compute_loss", compute_loss)
    out = tmp_path / "run"
    text = _one_line_error(CliRunner().invoke(app, _flags(pairs, tiny, out)))
    checkpoint = checkpoints_dir(out) / "checkpoint-2"
    for needle in ("loss became nan at step 3", "learning rate too high (--lr 0.001)", "lower --lr",
                   "last good checkpoint (step 2)", str(checkpoint)):
        assert needle in text, (needle, text)
    if deferred:
        assert skipped == [True], "the NaN step's update was skipped on the device"
        assert calls[-1] == 3, "the host learned of the NaN one step later"
    else:
        assert calls[-1] == 2, "training stopped at the step whose loss was NaN"
    assert is_complete(checkpoint) and latest_checkpoint(checkpoints_dir(out)) == checkpoint
    assert not out.exists()
    from safetensors.torch import load_file

    weights = load_file(str(checkpoint / "trainable.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_nan_message_names_the_likely_cause_for_the_precision(tmp_path):
    fp16 = nonfinite_loss_message(math.inf, 7, 2e-4, "fp16", tmp_path)
    assert fp16.startswith("training loss became inf at step 7: likely fp16 overflow")
    assert "train in bf16/fp32 or lower --lr" in fp16 and "no checkpoint was saved" in fp16
    assert "lower --lr or train in fp32" in nonfinite_loss_message(math.nan, 7, 2e-4, "bf16", tmp_path)


def test_non_finite_weights_are_never_sealed_into_a_checkpoint(tmp_path):
    good = {"a": torch.ones(3), "b": torch.zeros(2)}
    check_finite_weights(good, 4, tmp_path)
    bad = {"a": torch.ones(3), "b": torch.tensor([0.0, math.inf])}
    with pytest.raises(NonFiniteLoss, match=r"by step 4 \(e\.g\. b\).*lower --lr.*no checkpoint was saved"):
        check_finite_weights(bad, 4, tmp_path)


def test_gpu_out_of_memory_names_the_flags_that_fix_it(tmp_path, tiny, pairs, monkeypatch):
    import transformers

    original = transformers.Trainer.training_step

    def training_step(self, *args, **kwargs):
        if self.state.global_step == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(transformers.Trainer, "training_step", training_step)
    out = tmp_path / "run"
    text = _one_line_error(CliRunner().invoke(app, _flags(pairs, tiny, out)))
    for needle in ("out of GPU memory at step 4", "--batch-size 4", "--max-seq-length 16", "smaller --batch-size",
                   "--gradient-checkpointing", "--cached-loss", "--token-budget", "--resume",
                   str(checkpoints_dir(out) / "checkpoint-2")):
        assert needle in text, (needle, text)
    assert is_complete(checkpoints_dir(out) / "checkpoint-2")

    from embedtune.train import TrainConfig, run

    with pytest.raises(EmbedtuneError, match="out of GPU memory"):  # the library raises the same error
        run(TrainConfig(data=str(pairs), model=str(tiny), output_dir=str(tmp_path / "api"), max_steps=6,
                        batch_size=4, max_seq_length=16, eval=False, lora_r=4))


def test_deferred_check_folds_micro_steps_skips_the_update_and_names_the_step():
    """`_NonFiniteGate` on its own, with the CPU's fused AdamW: a NaN in any micro-step of an
    optimizer step skips that step's update on the device; the host reads the flag one step later
    and names the step and the non-finite loss (not the last micro-step's)."""
    from types import SimpleNamespace

    from embedtune.resilience import _NonFiniteGate

    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([param], lr=0.1, fused=True)
    raised = []

    class Trainer:
        def __init__(self):
            self.optimizer = optimizer

        def nonfinite_loss(self, loss, step):
            raised.append((loss.item(), step))
            return NonFiniteLoss(f"step {step}")

    gate, state = _NonFiniteGate(Trainer(), optimizer), SimpleNamespace(global_step=0)

    def optimizer_step(losses, grad):
        for loss in losses:
            gate.note(torch.tensor(loss))
        param.grad = torch.full((3,), grad)
        gate.on_pre_optimizer_step(None, state, None)
        optimizer.step()
        gate.on_optimizer_step(None, state, None)
        state.global_step += 1
        gate.on_step_end(None, state, None)

    optimizer_step([1.0, 2.0], 1.0)  # step 1: finite, applied
    applied = param.detach().clone()
    assert not torch.equal(applied, torch.ones(3))
    optimizer_step([math.nan, 1.0], math.nan)  # step 2: a NaN micro-step, its update skipped
    assert torch.equal(param.detach(), applied) and not raised
    with pytest.raises(NonFiniteLoss, match="step 2"):
        optimizer_step([1.0, 1.0], 1.0)  # step 3 ends: the host reads step 2's flag
    assert math.isnan(raised[0][0]) and raised[0][1] == 2
    assert getattr(optimizer, "found_inf", None) is None
