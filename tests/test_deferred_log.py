"""A log step's loss and gradient norm read one step later (`ResumableTrainer._maybe_log_save_evaluate`):
on a GPU the immediate read makes the GPU idle while the host prepares the next step. On CPU the
deferral is forced on: the log history must be the one the trainer writes itself, entry for entry
(step, epoch, loss, gradient norm, learning rate, evaluations in their place), and each entry must
reach the callbacks under its own step."""

from __future__ import annotations

import json

import pytest

from embedtune.resumable_trainer import ResumableTrainer
from tiny_models import make_tiny_model

TIMED = ("tokens_per_s", "eval_runtime", "eval_samples_per_second", "eval_steps_per_second", "train_runtime",
         "train_samples_per_second", "train_steps_per_second")


def test_deferred_logs_equal_the_trainers_own(tmp_path, monkeypatch):
    from transformers import TrainerCallback

    from embedtune.train import TrainConfig, run

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"anchor": f"how to do thing {i}", "positive": f"def thing_{i}(): pass"}) + "\n"
                            for i in range(60)))
    model = str(make_tiny_model("bert", tmp_path / "models"))
    taken, seen = [], []
    take = ResumableTrainer._take_log

    class Seen(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                seen.append((state.global_step, state.log_history[-1]["step"]))

    def add_seen(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.add_callback(Seen())

    original_init = ResumableTrainer.__init__
    monkeypatch.setattr(ResumableTrainer, "__init__", add_seen)
    monkeypatch.setattr(ResumableTrainer, "_take_log", lambda self, *a: taken.append(self.state.global_step) or
                        take(self, *a))

    def history(defer: bool, name: str):
        monkeypatch.setattr(ResumableTrainer, "defer_logs", defer)
        result = run(TrainConfig(data=str(data), model=model, max_steps=11, batch_size=4, eval_size=8,
                                 evals_per_run=3, max_seq_length=32, logging_steps=2, lora_r=None, lr=1e-3,
                                 output_dir=str(tmp_path / name)))
        return [{k: v for k, v in entry.items() if k not in TIMED} for entry in result.metrics["history"]]

    plain = history(False, "plain")
    assert not taken
    seen.clear()
    deferred = history(True, "deferred")
    assert taken  # the deferred path ran: log steps other than evaluations' and the last
    assert all(now == step for now, step in seen)  # each entry reached the callbacks under its own step
    assert len(deferred) == len(plain)
    for mine, theirs in zip(deferred, plain):
        assert mine.keys() == theirs.keys()
        assert mine == pytest.approx(theirs, rel=1e-6)
