"""The default checkpoint cadence (`resilience.CheckpointClock`): by the clock, not by steps, plus one
at the last step that holds the weights but no optimizer, which a killed finish resumes from."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
from safetensors.torch import load_file
from transformers import TrainerControl, TrainerState
from typer.testing import CliRunner

import embedtune.resilience as resilience
from embedtune.cli import app
from embedtune.resilience import CheckpointClock, save_arguments
from tiny_models import write_pairs as _pairs

from embedtune.checkpoint_format import is_complete
from embedtune.run_folder import work_folder

FULL = ["--max-steps", "3", "--batch-size", "4", "--max-seq-length", "16", "--no-eval", "--full", "--lr", "1e-3"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from tiny_models import make_tiny_model

    return make_tiny_model("bert", tmp_path_factory.mktemp("tiny_cadence"))


def _step(clock: CheckpointClock, step: int, max_steps: int = 100) -> bool:
    state, control = TrainerState(global_step=step, max_steps=max_steps), TrainerControl()
    clock.on_step_end(None, state, control)
    return control.should_save


def test_the_clock_saves_when_its_interval_has_passed_and_at_the_last_step(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(resilience.time, "monotonic", lambda: now[0])
    clock = CheckpointClock(every_s=600)
    clock.on_train_begin(None, None, None)
    now[0] += 599
    assert not _step(clock, 1)
    now[0] += 2
    assert _step(clock, 2)
    clock.on_save(None, None, None)  # the checkpoint restarts the clock
    now[0] += 10
    assert not _step(clock, 3)
    assert _step(clock, 100)  # the last step: always


def test_save_arguments_leave_the_default_cadence_to_the_clock():
    assert save_arguments(None, resumable=True) == {"save_strategy": "no", "save_total_limit": 2}
    assert save_arguments(5, resumable=True)["save_steps"] == 5
    assert save_arguments(0, resumable=True) == {"save_strategy": "no"}
    assert save_arguments(None, resumable=False) == {"save_strategy": "no"}


@pytest.mark.parametrize("earlier_best", [False, True], ids=["final-weights-of-the-last-step", "an-earlier-best"])
def test_default_run_keeps_one_weights_only_checkpoint_that_a_killed_finish_resumes_from(tmp_path, tiny, monkeypatch,
                                                                                         earlier_best):
    """Full fine-tuning, default cadence, killed just before its result is sealed: the last step's
    checkpoint (no optimizer) is there, naming the model folder's weights, written once at that step
    (or, where an earlier best would be put back, holding its own copy), and --resume completes the
    run without a step, its card completed once."""
    recipe = importlib.import_module("embedtune.train")  # `embedtune.train` the attribute is the function
    if earlier_best:  # (the best weights being those of the last step is what a run without evaluation has)
        monkeypatch.setattr(recipe.BestWeights, "restores_other_than", lambda self, step: True)

    data = _pairs(tmp_path / "d")
    reference = tmp_path / "reference"
    done = CliRunner().invoke(app, ["train", str(data), "--output", str(reference), "--model", str(tiny), *FULL])
    assert done.exit_code == 0, done.output
    phases = json.loads((reference / "metrics.json").read_text())["phases_s"]  # where the job's time went
    assert {"read_data", "load_model", "trainer", "token_cache", "trainer_setup", "first_step", "train",
            "final_checkpoint", "save_model", "plot"} <= set(phases)
    assert all(v >= 0 for v in phases.values())

    class Killed(BaseException):
        pass

    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        patch.setattr(recipe, "seal_finished", lambda work: (_ for _ in ()).throw(Killed()))
        with pytest.raises(Killed):
            CliRunner().invoke(app, ["train", str(data), "--output", str(out), "--model", str(tiny), *FULL],
                               catch_exceptions=False)
    checkpoints = sorted((work_folder(out) / "checkpoints").glob("checkpoint-*"))
    assert [c.name for c in checkpoints] == ["checkpoint-3"]  # no periodic one in a run this short
    assert not (checkpoints[0] / "optimizer.pt").exists()
    weights = work_folder(out) / "model" / "model.safetensors"  # written by the checkpoint, at the last step
    assert (checkpoints[0] / "trainable.safetensors").exists() == earlier_best
    if earlier_best:
        assert not (checkpoints[0] / "weights_reference.json").exists()
        written_once = None
    else:
        named = json.loads((checkpoints[0] / "weights_reference.json").read_text())
        marker = json.loads((checkpoints[0] / "embedtune_checkpoint.json").read_text())
        assert (checkpoints[0] / named["file"]).resolve() == weights.resolve()
        assert marker["files"][named["file"]] == weights.stat().st_size and is_complete(checkpoints[0])
        stored = load_file(str(weights))
        assert named["keys"] and set(named["keys"].values()) <= set(stored)  # the trainable ones, by the trainer's names
        assert all(name.endswith(key) for name, key in named["keys"].items())
        written_once = weights.stat().st_ino

    trained = []
    original = resilience.ResumableTrainer.training_step
    monkeypatch.setattr(resilience.ResumableTrainer, "training_step",
                        lambda self, *a, **k: trained.append(1) or original(self, *a, **k))
    resumed = CliRunner().invoke(app, ["train", str(data), "--output", str(out), "--model", str(tiny), *FULL, "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert not trained  # completed from the checkpoint, not retrained
    if written_once is not None:
        assert (out / "model" / "model.safetensors").stat().st_ino == written_once  # kept, not written again
    new, ref = load_file(str(out / "model" / "model.safetensors")), load_file(str(reference / "model" / "model.safetensors"))
    assert new.keys() == ref.keys()
    assert max((new[k] - ref[k]).abs().max().item() for k in ref) <= 1e-6
    card = (out / "model" / "README.md").read_text()
    assert card.count("## Fine-tuned with embedtune") == 1 and "sentence-transformers" in card.split("\n---\n")[0]
