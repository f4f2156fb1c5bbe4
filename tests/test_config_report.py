"""`embedtune train --config`, the saved config.yaml, --report-to tensorboard, tokens/s in the logs,
and `embedtune report`.

One tiny real run (bundled MiniLM, 2 steps) driven by a config file serves the end-to-end checks;
precedence and error handling are checked with `train.run` replaced by a recorder, so they train nothing.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from embedtune.cli import app

runner = CliRunner()
train_module = importlib.import_module("embedtune.train")  # `embedtune.train` the attribute is the function


def _one_line_error(result, *needles: str) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    error = [line for line in lines if line.startswith("error:")]
    assert len(error) == 1, result.output
    text = " ".join(result.output.split())
    for needle in needles:
        assert needle in text, f"{needle!r} not in {text!r}"
    return error[0]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    from embedtune.data import build_stdlib_pairs, write_jsonl

    return write_jsonl(build_stdlib_pairs(max_pairs=40, seed=11), tmp_path_factory.mktemp("data") / "pairs.jsonl")


@pytest.fixture(scope="module")
def run_dir(pairs, tmp_path_factory) -> Path:
    """A real 2-step run whose settings come from a YAML file (max-steps overridden on the command line)."""
    folder = tmp_path_factory.mktemp("cfg")
    config = folder / "run.yaml"
    config.write_text(
        f"data: {pairs}\n"
        "max-steps: 5          # the command line's --max-steps 2 wins\n"
        "batch_size: 4\n"
        "--max-seq-length: 24\n"
        "eval-size: 8\n"
        "evals: 1\n"
        "logging_steps: 1      # a TrainConfig field with no flag of its own\n"
        "warmup_ratio: 0.5\n"
        "seed: 3\n"
        "report_to: tensorboard\n",
        encoding="utf-8",
    )
    out = folder / "run"
    result = runner.invoke(app, ["train", "--config", str(config), "--output", str(out), "--max-steps", "2"])
    assert result.exit_code == 0, result.output
    return out


# ------------------------------------------------------------------------------------- the real run


def test_config_file_drives_the_run_and_flags_win(run_dir, pairs):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == 2  # --max-steps 2 beat the file's 5
    assert metrics["eval_pairs"] == 8 and metrics["train_pairs"] == 32
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved == metrics["config"]
    assert saved["max_steps"] == 2 and saved["batch_size"] == 4 and saved["max_seq_length"] == 24
    assert saved["logging_steps"] == 1 and saved["warmup_ratio"] == 0.5 and saved["seed"] == 3
    assert saved["report_to"] == "tensorboard" and saved["evals_per_run"] == 1
    assert saved["data"] == Path(pairs).name  # by its file name: no local absolute path is saved
    assert saved["lr"] == 2e-4 and saved["eval_size"] == 8  # defaults resolved to what the run used
    assert "overwrite" not in saved  # a replay must never replace the folder it came from
    training_logs = [h for h in metrics["history"] if "loss" in h]
    assert len(training_logs) == 2  # logging_steps: 1 from the file reached the trainer


def test_tokens_per_second_is_in_the_training_logs(run_dir):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    rates = [h["tokens_per_s"] for h in metrics["history"] if "loss" in h]
    assert rates and all(r > 0 for r in rates)
    assert not any("tokens_per_s" in h for h in metrics["history"] if "loss" not in h)


def test_tensorboard_event_files_in_the_run_folder(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    assert not (run_dir / "checkpoints").exists()
    accumulator = EventAccumulator(str(run_dir / "tensorboard"))
    accumulator.Reload()
    scalars = accumulator.Tags()["scalars"]
    assert "train/loss" in scalars and "train/tokens_per_s" in scalars
    assert any(tag.endswith("ndcg@10") for tag in scalars)
    assert [e.step for e in accumulator.Scalars("train/loss")] == [1, 2]


def test_saved_config_replays_the_same_settings(run_dir, recorded):
    """OUTPUT/config.yaml given back to --config builds exactly the run's TrainConfig (resolved)."""
    from embedtune.config_file import resolved_config

    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    result = runner.invoke(app, ["train", "--config", str(run_dir / "config.yaml")])
    assert result.exit_code == 0, result.output
    assert resolved_config(recorded[-1]) == saved
    assert recorded[-1].output_dir == run_dir.name and recorded[-1].overwrite is False  # from where it started


def test_report_prints_tables_and_curves_and_renders_png(run_dir):
    result = runner.invoke(app, ["report", str(run_dir)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for name in ("ndcg@10", "mrr@10", "recall@1", "recall@10", "recall@100", "map@100"):
        assert name in text
    base, final = metrics["base"]["ndcg@10"], metrics["final"]["ndcg@10"]
    assert f"{base:.4f}" in text and f"{final:.4f}" in text and f"{final - base:+.4f}" in text
    for needle in ("all-MiniLM-L6-v2", "tokens/s", "best step", "train pairs", "evaluations", "loss", "LoRA r16"):
        assert needle in text, needle
    assert any(block in result.output for block in "▁▂▃▄▅▆▇█")  # the loss sparkline
    png = run_dir / "report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert str(png) in text


def test_report_png_option(run_dir, tmp_path):
    target = tmp_path / "curves.png"
    result = runner.invoke(app, ["report", str(run_dir), "--png", str(target)])
    assert result.exit_code == 0, result.output
    assert target.read_bytes()[:4] == b"\x89PNG"
    assert not list(tmp_path.glob(".*tmp*"))  # written atomically: no temp file left


# ------------------------------------------------------------------------- precedence, no training


@pytest.fixture
def recorded(monkeypatch):
    """Replace train.run by a recorder; the CLI then stops after building the TrainConfig."""
    seen = []

    def fake_run(config, *args, **kwargs):
        seen.append(config)
        raise SystemExit(0)

    monkeypatch.setattr(train_module, "run", fake_run)
    return seen


def _config(tmp_path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_precedence_flag_over_file_over_default(tmp_path, recorded):
    path = _config(tmp_path, "data: from-file.jsonl\nmax_steps: 7\nbatch-size: 16\nlr: 0.001\nno-eval: true\n"
                             "weight_decay: 0.2\nmatryoshka_dims: [384, 128]\nlogging_steps: 3.0\n")
    result = runner.invoke(app, ["train", "cli.jsonl", "--config", str(path), "--batch-size", "8"])
    assert result.exit_code == 0, result.output
    config = recorded[-1]
    assert config.data == "cli.jsonl"  # a positional argument beats the file too
    assert config.batch_size == 8  # flag over file
    assert config.max_steps == 7 and config.lr == 0.001 and config.eval is False  # file over default
    assert config.weight_decay == 0.2  # a flag-less TrainConfig field
    assert config.logging_steps == 3 and type(config.logging_steps) is int  # a whole 3.0 is the int 3
    assert config.matryoshka_dims == [384, 128]
    assert config.epochs == 1.0 and config.seed == 42  # untouched defaults


def test_data_sets_take_their_own_columns(tmp_path, recorded):
    """`data:` maps a data set to {path, loss, columns} (as the README shows, and as a run's config.yaml
    saves it), the columns by role name or as --columns' string."""
    path = _config(tmp_path, "data:\n  code: a.jsonl\n  docs: {path: b.csv, columns: {anchor: query, positive: doc}}\n"
                             "  qa: {path: c.jsonl, loss: mnrl, columns: 'anchor=q,positive=a'}\n")
    result = runner.invoke(app, ["train", "--config", str(path)])
    assert result.exit_code == 0, result.output
    assert recorded[-1].data == {"code": "a.jsonl", "docs": {"path": "b.csv", "columns": {"anchor": "query",
                                                                                         "positive": "doc"}},
                                 "qa": {"path": "c.jsonl", "loss": "mnrl", "columns": "anchor=q,positive=a"}}


def test_trainconfig_spellings_translate_to_flags(tmp_path, recorded):
    path = _config(tmp_path, "data: d.jsonl\noutput_dir: somewhere\nevals_per_run: 2\neval: false\nfast: false\n"
                             "lora_r: null\ngradient_checkpointing: unsloth\n")
    assert runner.invoke(app, ["train", "--config", str(path)]).exit_code == 0
    config = recorded[-1]
    assert (config.output_dir, config.evals_per_run, config.eval, config.fast) == ("somewhere", 2, False, False)
    assert config.lora_r is None and config.gradient_checkpointing == "unsloth"
    assert runner.invoke(app, ["train", "--config", str(path), "--output", "there"]).exit_code == 0
    assert recorded[-1].output_dir == "there"


def test_every_saved_field_reads_back(tmp_path, recorded):
    """resolved_config of any TrainConfig (here one far from the defaults) replays to the same fields."""
    from embedtune.config_file import resolved_config, write_config_yaml

    original = train_module.TrainConfig(
        data=str(tmp_path / "d.jsonl"), output_dir=str(tmp_path / "o"), epochs=2.5, max_steps=11, batch_size=6,
        lr=3e-5, max_seq_length=40, lora_r=8, lora_alpha=32, eval_size=5, eval=False, evals_per_run=3,
        pooling="mean", seed=9, warmup_ratio=0.2, weight_decay=0.0, gradient_checkpointing="unsloth",
        dtype="float32", logging_steps=2, fast=False, query_prompt="query: ", document_prompt="passage: ",
        report_to="tensorboard",
    )
    saved = resolved_config(original)
    write_config_yaml(saved, tmp_path / "config.yaml")
    result = runner.invoke(app, ["train", "--config", str(tmp_path / "config.yaml")])
    assert result.exit_code == 0, result.output
    assert resolved_config(recorded[-1]) == saved


@pytest.mark.parametrize(
    "text, needles",
    [
        ("data: d.jsonl\nmax_step: 3\n", ["run.yaml:2", "unknown setting 'max_step'", "did you mean max_steps"]),
        ("data: d.jsonl\nbatch_size: 2.5\n", ["run.yaml:2", "batch_size", "whole number", "2.5"]),
        ("data: d.jsonl\nlr: fast\n", ["run.yaml:2", "lr", "expected a number", '"fast"']),
        ("no_eval: maybe\n", ["run.yaml:1", "no_eval", "true or false"]),
        ("warmup_ratio: [1]\n", ["run.yaml:1", "warmup_ratio", "expected a number"]),
        ("batch_size: null\n", ["run.yaml:1", "batch_size", "null"]),
        ("max_steps: 2\nmax-steps: 3\n", ["run.yaml:2", "'max-steps'", "'max_steps'"]),
        ("seed: 1\nseed: 2\n", ["run.yaml:2", "'seed' is set twice", "line 1"]),
        ("data: [unclosed\n", ["run.yaml:2", "invalid YAML"]),
        ("- a\n- b\n", ["run.yaml", "expected a mapping"]),
        ("config: other.yaml\n", ["run.yaml:1", "another config file"]),
        ("data:\n  a: a.jsonl\n  b: {path: b.jsonl, colums: x}\n", ["run.yaml:3", "data: b:", "columns"]),
        ("data:\n  a: a.jsonl\n\n  b: {path: b.jsonl, columns: [query]}\n", ["run.yaml:4", "data: b:"]),
    ],
)
def test_bad_config_is_one_line_naming_file_line_and_key(tmp_path, recorded, text, needles):
    path = _config(tmp_path, text)
    result = runner.invoke(app, ["train", "--config", str(path), "--output", str(tmp_path / "out")])
    _one_line_error(result, *needles)
    assert not recorded and not (tmp_path / "out").exists()


def test_missing_config_file(tmp_path, recorded):
    result = runner.invoke(app, ["train", "--config", str(tmp_path / "nope.yaml")])
    _one_line_error(result, "nope.yaml", "no such file")


def test_unsafe_yaml_tags_are_refused(tmp_path, recorded):
    path = _config(tmp_path, "data: !!python/object/apply:os.system ['echo hacked']\n")
    _one_line_error(runner.invoke(app, ["train", "--config", str(path)]), "run.yaml:1", "invalid YAML")


# ------------------------------------------------------------------------------- --report-to errors


def test_report_to_checks_come_before_any_output(pairs, tmp_path, monkeypatch):
    from embedtune import monitoring

    out = tmp_path / "out"
    result = runner.invoke(app, ["train", str(pairs), "--output", str(out), "--report-to", "mlflow"])
    _one_line_error(result, "--report-to 'mlflow'", "none, tensorboard, wandb")
    real_find_spec = monitoring.importlib.util.find_spec
    monkeypatch.setattr(monitoring.importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real_find_spec(name, *a))
    result = runner.invoke(app, ["train", str(pairs), "--output", str(out), "--report-to", "wandb"])
    _one_line_error(result, "wandb is not installed", "pip install wandb")
    assert not out.exists() and not Path(f"{out}.partial").exists()


# ---------------------------------------------------------------------------------- report errors


def test_report_on_missing_folder(tmp_path):
    _one_line_error(runner.invoke(app, ["report", str(tmp_path / "nope")]), "nope", "no such folder")


def test_report_on_unfinished_and_non_run_folders(tmp_path):
    (tmp_path / "run.partial").mkdir()
    _one_line_error(runner.invoke(app, ["report", str(tmp_path / "run")]), "has not finished")
    # the output as `train --output run/` was given: its work folder is still run.partial
    _one_line_error(runner.invoke(app, ["report", str(tmp_path / "run") + "/"]), "has not finished", "run.partial")
    (tmp_path / "plain").mkdir()
    _one_line_error(runner.invoke(app, ["report", str(tmp_path / "plain")]), "no metrics.json")


@pytest.mark.parametrize(
    "content, needles",
    [
        ('{\n  "base": {},\n  "final": \n', ["metrics.json:4", "invalid JSON"]),
        ("[1, 2]", ["metrics.json", "expected a JSON object"]),
        ('{"history": {"step": 1}}', ["'history'", "array"]),
        ('{"history": [1, 2]}', ["'history'", "JSON objects"]),
        (b"\xff\xfe{}", ["metrics.json", "unreadable"]),
    ],
)
def test_report_on_corrupt_metrics(tmp_path, content, needles):
    (tmp_path / "metrics.json").write_bytes(content if isinstance(content, bytes) else content.encode())
    _one_line_error(runner.invoke(app, ["report", str(tmp_path)]), *needles)
    assert not (tmp_path / "report.png").exists()


def test_report_of_a_run_without_evaluation(tmp_path):
    history = [{"loss": 1.0 - i / 10, "step": i, "tokens_per_s": 100.0 + i} for i in range(1, 8)]
    metrics = {"base": {}, "final": {}, "steps": 7, "train_pairs": 50, "eval_pairs": 0, "train_time_s": 3.5,
               "tokens_per_s": 120.0, "best_step": None, "history": history,
               "config": {"model": "some/[/x]model", "lora_r": None}}  # not rich markup
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    result = runner.invoke(app, ["report", str(tmp_path), "--png", str(tmp_path / "r.png")])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "no held-out evaluation" in text and "full fine-tuning" in text and "some/[/x]model" in text
    assert "0.9000 -> 0.3000" in text  # the loss line: first -> last
    assert (tmp_path / "r.png").stat().st_size > 1000


def test_report_png_errors_before_printing(run_dir, tmp_path):
    result = runner.invoke(app, ["report", str(run_dir), "--png", str(tmp_path / "no" / "dir" / "x.png")])
    _one_line_error(result, "does not exist")
    assert "held-out retrieval" not in result.output


def test_sparkline_maps_lowest_and_highest_and_fits_width():
    from embedtune.report import sparkline

    line = sparkline([3.0, 1.0, 2.0, 5.0])
    assert len(line) == 4 and line[1] == "▁" and line[3] == "█" and line[0] < line[3]
    assert len(sparkline(list(range(1000)), width=40)) == 40
    assert sparkline([2.0, 2.0]) == sparkline([7.0, 7.0]) and sparkline([]) == ""


def test_extra_training_arguments_override_the_recipes_own(pairs, tmp_path, monkeypatch):
    """`TrainConfig.extra` reaches the trainer's arguments and wins over the recipe's defaults (it once
    collided with them: 'got multiple values for keyword argument')."""
    from embedtune.resilience import ResumableTrainer

    seen = []
    init = ResumableTrainer.__init__
    monkeypatch.setattr(ResumableTrainer, "__init__", lambda self, *a, **kw: seen.append(kw["args"]) or
                        init(self, *a, **kw))
    train_module.run(train_module.TrainConfig(
        data=str(pairs), output_dir=str(tmp_path / "out"), max_steps=1, batch_size=4, max_seq_length=32,
        eval=False, extra={"max_grad_norm": 0.5, "logging_nan_inf_filter": True, "gradient_accumulation_steps": 2}))
    args = seen[0]
    assert (args.max_grad_norm, args.logging_nan_inf_filter, args.gradient_accumulation_steps) == (0.5, True, 2)


def test_report_png_without_suffix_or_of_an_unknown_format(tmp_path):
    """--png curves (no suffix) writes a PNG there; --png curves.txt is one error line before anything is
    printed (the image format used to be guessed from the temp file's name, after the whole report)."""
    history = [{"loss": 1.0 - i / 10, "step": i} for i in range(1, 4)]
    (tmp_path / "metrics.json").write_text(json.dumps({"steps": 3, "history": history, "config": {}}))
    result = runner.invoke(app, ["report", str(tmp_path), "--png", str(tmp_path / "curves")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "curves").read_bytes()[:4] == b"\x89PNG"
    result = runner.invoke(app, ["report", str(tmp_path), "--png", str(tmp_path / "curves.txt")])
    _one_line_error(result, "curves.txt", ".txt image", ".png")
    assert result.output.lstrip().startswith("error:")  # nothing of the report printed before it
    assert not (tmp_path / "curves.txt").exists() and not list(tmp_path.glob(".*tmp*"))
