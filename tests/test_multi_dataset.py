"""Several data sets in one run: `embedtune train a.jsonl b.jsonl`, or `data:` as a list or a name ->
file mapping in the YAML config, each data set with its own loss; every batch comes from one data set
(in-batch negatives never mix them); the summary and metrics.json list rows and loss per data set."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from embedtune.config_file import portable_path
from typer.testing import CliRunner

from embedtune.cli import app
from embedtune.errors import EmbedtuneError
from embedtune.multi_data import batches_per_epoch, data_sources, sampler_name

runner = CliRunner()


def _pairs_file(path: Path, rows: int = 60, seed: int = 3) -> Path:
    from embedtune.data import build_stdlib_pairs, write_jsonl

    return write_jsonl(build_stdlib_pairs(max_pairs=rows, seed=seed), path)


def _sts_file(path: Path, rows: int = 48) -> Path:
    """STS-shaped rows (sentence1, sentence2, score) made from real code-search pairs: a pair scores
    high, a mismatched one low."""
    from embedtune.data import build_stdlib_pairs

    pairs = build_stdlib_pairs(max_pairs=rows, seed=5)
    rng = random.Random(0)
    with path.open("w", encoding="utf-8") as f:
        for i, pair in enumerate(pairs):
            other = pairs[(i * 7 + 3) % len(pairs)]["positive"]
            high = i % 2 == 1
            f.write(json.dumps({"sentence1": pair["anchor"], "sentence2": pair["positive"] if high else other,
                                "score": round((0.6 if high else 0.0) + 0.4 * rng.random(), 3)}) + "\n")
    return path


# ----------------------------------------------------------------------------------------- sources


def test_sources_from_a_path_a_list_and_a_mapping():
    assert [(s.name, s.path, s.loss) for s in data_sources("d/a.jsonl")] == [("a", "d/a.jsonl", None)]
    listed = data_sources(["x/a.jsonl", "y/a.jsonl", "b.parquet"], loss="mnrl")
    assert [(s.name, s.loss) for s in listed] == [("a", "mnrl"), ("a_2", "mnrl"), ("b", "mnrl")]
    mapped = data_sources({"nli": "n.jsonl", "sts": {"path": "s.jsonl", "loss": "angle"}})
    assert [(s.name, s.path, s.loss) for s in mapped] == [("nli", "n.jsonl", None), ("sts", "s.jsonl", "angle")]
    for bad, needle in ((None, "no training data"), ({"a": {"file": "x"}}, "expected a file path"),
                        ({"a": {"path": "x", "weight": 2}}, "unknown key 'weight'"), (3, "expected a file")):
        with pytest.raises(EmbedtuneError, match=needle):
            data_sources(bad)


def test_batches_per_epoch_follow_the_sampler():
    assert batches_per_epoch([110, 70], 8, "proportional") == 13 + 8  # every full batch of each
    assert batches_per_epoch([110, 70], 8, "round-robin") == 2 * 8  # one of each until the smaller runs out
    assert sampler_name("round_robin") == "round_robin" and sampler_name("Proportional") == "proportional"
    with pytest.raises(EmbedtuneError, match="--multi-dataset 'mixed'"):
        sampler_name("mixed")


# ----------------------------------------------------------------------------------------- batches


@pytest.mark.parametrize("sampler", ["proportional", "round-robin"])
def test_no_batch_mixes_data_sets(tmp_path, sampler):
    """The trainer the recipe builds draws each batch from one data set (indices into the concatenated
    data sets never straddle the boundary), and from each data set in turn."""
    from tiny_models import make_tiny_model

    from embedtune.monitoring import Phases
    from embedtune.train import TrainConfig, load_model, loss_and_evaluator, place_output, read_data, set_up_trainer

    a = _pairs_file(tmp_path / "a.jsonl", rows=60)
    b = _sts_file(tmp_path / "b.jsonl", rows=40)
    tiny = make_tiny_model("bert", tmp_path / "models")
    config = TrainConfig(data=[str(a), str(b)], model=str(tiny), output_dir=str(tmp_path / "out"), batch_size=8,
                         max_steps=3, eval=False, max_seq_length=32, multi_dataset=sampler)
    phases = Phases()
    output, _ = place_output(config)
    data = read_data(config, output, phases)
    model = load_model(config, phases)
    objective = loss_and_evaluator(config, data, model, phases)
    assert set(objective.loss) == {"a", "b"}
    assert type(objective.loss["b"]).__name__ == "CoSENTLoss"
    setup = set_up_trainer(config, data, model, objective, phases)
    batches = list(setup.trainer.get_train_dataloader().batch_sampler)
    first, second = (len(part.train_ds) for part in data.parts)  # a's rows, then b's, in the concatenation
    assert (first, second) == (60, 40)
    owners = [{index >= first for index in batch} for batch in batches]
    assert all(len(owner) == 1 for owner in owners), "a batch holds rows of both data sets"
    drawn = [owner.pop() for owner in owners]
    assert all(len(batch) == 8 for batch in batches)
    if sampler == "round-robin":
        assert len(batches) == 2 * (second // 8) and drawn == [drawn[0], not drawn[0]] * (len(batches) // 2)
    else:
        assert sorted(drawn) == [False] * (first // 8) + [True] * (second // 8)
    assert setup.plan.total_steps == 3 and len(batches) == batches_per_epoch([first, second], 8, sampler)


# ----------------------------------------------------------------------------------------- the CLI


def test_cli_trains_on_two_files_and_reports_each(tmp_path):
    """A real run on two files: the summary and metrics.json give rows and loss per data set, and the
    evaluation says it covers the pairs and not the scored pairs."""
    a = _pairs_file(tmp_path / "a.jsonl", rows=60)
    b = _sts_file(tmp_path / "b.jsonl", rows=40)
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", str(a), str(b), "--output", str(out), "--max-steps", "3", "--batch-size",
                                 "8", "--max-seq-length", "32", "--eval-size", "6", "--evals", "1"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert f"data: a ({portable_path(a)}): 54 training rows, 6 held out, loss mnrl" in text
    assert f"data: b ({portable_path(b)}): 34 training rows, 6 held out, loss cosent" in text
    assert "held-out retrieval (nDCG@10) on a; not evaluated: b" in text
    metrics = json.loads((out / "metrics.json").read_text())
    assert [(d["name"], d["train_rows"], d["loss"]) for d in metrics["datasets"]] == [("a", 54, "mnrl"),
                                                                                      ("b", 34, "cosent")]
    assert metrics["train_pairs"] == 88 and metrics["steps"] == 3 and "ndcg@10" in metrics["final"]
    assert metrics["config"]["data"] == [portable_path(a), portable_path(b)]  # no absolute local path
    # one token cache holds both data sets' texts and serves every batch of either (each column: one call)
    cache = metrics["token_cache"]
    assert cache["texts"] >= 54 + 34 and cache["batches_served"] >= 3 * 2 and cache["batches_tokenized"] == 0  # 2 columns
    report = runner.invoke(app, ["report", str(out)])
    assert report.exit_code == 0 and "a: 54 training rows, loss mnrl" in report.output, report.output


def test_yaml_mapping_gives_each_data_set_its_loss(tmp_path):
    """`data:` as name -> file or {path, loss} in --config; scored pairs alone are evaluated by their
    similarity (Spearman), and the saved config.yaml replays the mapping."""
    sts = _sts_file(tmp_path / "sts.jsonl", rows=40)
    pairs = _pairs_file(tmp_path / "pairs.jsonl", rows=40)
    config = tmp_path / "run.yaml"
    config.write_text(f"data:\n  sts: {{path: {sts}, loss: angle}}\n  code: {pairs}\nloss: triplet\n"
                      "max_steps: 2\nbatch_size: 8\nmax_seq_length: 32\neval_size: 4\nevals: 1\n", encoding="utf-8")
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--config", str(config), "--output", str(out)])
    # `loss: triplet` applies to the data sets that name none: the pairs have no negative for it
    assert result.exit_code != 0 and "--loss triplet needs anchor, positive and exactly one negative" in result.output
    assert not out.exists()
    config.write_text(config.read_text(encoding="utf-8").replace("loss: triplet\n", ""), encoding="utf-8")
    result = runner.invoke(app, ["train", "--config", str(config), "--output", str(out)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert [(d["name"], d["loss"]) for d in metrics["datasets"]] == [("sts", "angle"), ("code", "mnrl")]
    assert metrics["evaluation"]["evaluated"] == ["code"]
    saved = (out / "config.yaml").read_text(encoding="utf-8")
    assert "sts:" in saved and "loss: angle" in saved

    only_sts = tmp_path / "sts_only"
    result = runner.invoke(app, ["train", str(sts), "--output", str(only_sts), "--max-steps", "2", "--batch-size", "8",
                                 "--max-seq-length", "32", "--eval-size", "8", "--evals", "1"])
    assert result.exit_code == 0, result.output
    assert "spearman_cosine" in result.output and "held-out similarity" in " ".join(result.output.split())
    metrics = json.loads((only_sts / "metrics.json").read_text())
    assert metrics["evaluation"]["kind"] == "similarity" and "spearman_cosine" in metrics["final"]
    report = runner.invoke(app, ["report", str(only_sts)])
    assert report.exit_code == 0 and "held-out similarity" in report.output and "spearman_cosine" in report.output


def test_bad_multi_dataset_option_is_one_line(tmp_path):
    a = _pairs_file(tmp_path / "a.jsonl", rows=20)
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", str(a), str(a), "--output", str(out), "--multi-dataset", "mixed"])
    assert result.exit_code != 0 and "--multi-dataset 'mixed': not one of proportional, round-robin" in result.output
    assert not out.exists()


def test_resume_record_holds_each_data_files_digest(tmp_path):
    """--resume checks the data did not change: with several files, each one's digest by its name."""
    from embedtune.checkpoint_format import data_digest, run_record
    from embedtune.train import TrainConfig

    a = _pairs_file(tmp_path / "a.jsonl", rows=20)
    b = _sts_file(tmp_path / "b.jsonl", rows=20)
    record = run_record(TrainConfig(data=[str(a), str(b)]))
    assert record["data_sha256"] == {"a": data_digest(a), "b": data_digest(b)} and None not in record["data_sha256"].values()
    b.write_text(b.read_text(encoding="utf-8").replace("0.", "1."), encoding="utf-8")
    assert run_record(TrainConfig(data=[str(a), str(b)]))["data_sha256"]["b"] != record["data_sha256"]["b"]


def test_a_short_data_set_among_several_warns_of_its_batches_not_the_runs_steps(tmp_path):
    """With several data sets the run's steps come from all of them: the first data set's batch plan is
    its own (under `data`), not the run's `batches`, and its shortfall warning predicts no run steps
    (it used to say "the run trains about N of M planned steps" for that data set alone)."""
    from embedtune.monitoring import Phases
    from embedtune.train import TrainConfig, place_output, read_data

    short = tmp_path / "short.jsonl"
    with short.open("w", encoding="utf-8") as f:  # 40 rows, 10 distinct positives: 4 batches of 8 a pass, not 5
        for i in range(40):
            f.write(json.dumps({"anchor": f"question number {i}", "positive": f"answer {i % 10}"}) + "\n")
    whole = _pairs_file(tmp_path / "whole.jsonl", rows=60)
    config = TrainConfig(data=[str(short), str(whole)], output_dir=str(tmp_path / "out"), batch_size=8, epochs=2,
                         eval=False, max_seq_length=32)
    output, _ = place_output(config)
    data = read_data(config, output, Phases())
    assert data.batches is None
    plan = data.parts[0].batches
    assert plan["full_batches_per_pass"] < plan["batches_planned_per_epoch"] == 5
    assert plan["warning"].startswith(f"{short}: ") and "the run trains" not in plan["warning"], plan["warning"]
    assert "expected_steps" not in plan and "planned_steps" not in plan
    assert data.parts[1].batches["warning"] is None
