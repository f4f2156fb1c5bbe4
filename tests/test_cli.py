"""The CLI turns bad input into one clear line, a non-zero exit, and no output folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from embedtune.cli import app

runner = CliRunner()


def _train(data: Path, out: Path, *extra: str):
    return runner.invoke(app, ["train", str(data), "--output", str(out), "--max-steps", "1", *extra])


def _assert_clean_failure(result, out: Path, *needles: str):
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    text = " ".join(result.output.split())
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in text, f"{needle!r} not in {text!r}"
    assert not out.exists(), "nothing may be written before the data validates"
    assert not Path(f"{out}.partial").exists()


def test_malformed_line_names_file_and_line(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"anchor": "a", "positive": "b"}\n{"anchor": "c", "positive": \n')
    _assert_clean_failure(_train(data, tmp_path / "out"), tmp_path / "out", "pairs.jsonl:2", "invalid JSON")


def test_missing_columns_lists_columns_found(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"text": "a", "label": 1}) + "\n")
    _assert_clean_failure(_train(data, tmp_path / "out"), tmp_path / "out", "missing columns", "text", "label")


def test_empty_file_says_so(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("")
    _assert_clean_failure(_train(data, tmp_path / "out"), tmp_path / "out", "empty")


def test_no_usable_rows_says_so(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"anchor": "", "positive": "x"}\n{"anchor": null, "positive": "y"}\n')
    _assert_clean_failure(_train(data, tmp_path / "out"), tmp_path / "out", "no usable rows", "2 skipped")


def test_missing_path_is_named(tmp_path):
    data = tmp_path / "nope.jsonl"
    _assert_clean_failure(_train(data, tmp_path / "out"), tmp_path / "out", "nope.jsonl", "no such file")


def test_existing_output_is_refused_without_overwrite(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"anchor": f"q{i}", "positive": f"d{i}"}) + "\n" for i in range(8)))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    result = _train(data, out)
    assert result.exit_code != 0 and "not empty" in " ".join(result.output.split())
    assert (out / "keep.txt").read_text() == "precious"


@pytest.mark.parametrize("command", [["eval", "missing-model-dir/", "x.jsonl"], ["eval", ".", "x.jsonl"]])
def test_eval_bad_input_is_one_line(tmp_path, command):
    result = runner.invoke(app, command)
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    assert "error:" in result.output


def test_bad_pooling_is_one_line(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"anchor": f"q{i}", "positive": f"d{i}"}) + "\n" for i in range(8)))
    _assert_clean_failure(_train(data, tmp_path / "out", "--pooling", "median"), tmp_path / "out", "--pooling", "median")


def test_train_then_eval_happy_path(tmp_path):
    """A tiny real run: summary printed, artifacts written, and `eval` scores the saved model."""
    from embedtune.data import build_stdlib_pairs, write_jsonl

    data = write_jsonl(build_stdlib_pairs(max_pairs=120, seed=3), tmp_path / "pairs.jsonl")
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", str(data), "--output", str(out), "--max-steps", "2", "--batch-size", "8",
                                 "--max-seq-length", "32", "--eval-size", "20", "--evals", "1"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    for needle in ("ndcg@10", "mrr@10", "recall@10", "tokens/s", str(out / "model"), "training_curves.png"):
        assert needle in text, needle
    assert (out / "model" / "model.safetensors").exists()
    assert not (out / "model" / "adapter_config.json").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["eval_pairs"] == 20 and "ndcg@10" in metrics["final"]
    assert not Path(f"{out}.partial").exists()

    result = runner.invoke(app, ["eval", str(out / "model"), str(data), "--max-seq-length", "32"])
    assert result.exit_code == 0, result.output
    assert "ndcg@10" in result.output and "120 queries" in " ".join(result.output.split())
    by_run = runner.invoke(app, ["eval", str(out), str(data), "--max-seq-length", "32"])  # the run folder, as export takes
    assert by_run.exit_code == 0, by_run.output
    rows = lambda text: [line for line in text.splitlines() if "@" in line]  # the metric rows
    assert rows(by_run.output) and rows(by_run.output) == rows(result.output)


def test_prompts_are_trained_with_and_saved(tmp_path):
    """--query-prompt/--document-prompt reach training and evaluation and land in the saved config,
    so stock encode_query/encode_document apply them after loading."""
    from sentence_transformers import SentenceTransformer

    from embedtune.data import build_stdlib_pairs, write_jsonl

    data = write_jsonl(build_stdlib_pairs(max_pairs=80, seed=4), tmp_path / "pairs.jsonl")
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", str(data), "--output", str(out), "--max-steps", "1", "--batch-size", "8",
                                 "--max-seq-length", "32", "--eval-size", "16", "--evals", "1",
                                 "--query-prompt", "query: ", "--document-prompt", "passage: "])
    assert result.exit_code == 0, result.output
    config = json.loads((out / "model" / "config_sentence_transformers.json").read_text())
    assert config["prompts"]["query"] == "query: " and config["prompts"]["document"] == "passage: "
    model = SentenceTransformer(str(out / "model"), device="cpu")
    text = "sort a list in place"
    assert abs(model.encode_query([text]) - model.encode(["query: " + text])).max() < 1e-5
    assert abs(model.encode_document([text]) - model.encode(["passage: " + text])).max() < 1e-5


def test_mine_then_train_reads_negatives(tmp_path):
    from embedtune.data import build_stdlib_pairs, load_pairs, write_jsonl

    data = write_jsonl(build_stdlib_pairs(max_pairs=60, seed=5), tmp_path / "pairs.jsonl")
    mined = tmp_path / "mined.jsonl"
    result = runner.invoke(app, ["mine", str(data), "--output", str(mined), "--num-negatives", "2",
                                 "--range", "1:20", "--max-seq-length", "32"])
    assert result.exit_code == 0, result.output
    loaded = load_pairs(mined)
    assert loaded.num_negatives == 2 and len(loaded.dataset) > 30
    result = runner.invoke(app, ["train", str(mined), "--output", str(tmp_path / "run"), "--max-steps", "1",
                                 "--batch-size", "4", "--max-seq-length", "32", "--no-eval"])
    assert result.exit_code == 0, result.output
    bad = runner.invoke(app, ["mine", str(data), "--output", str(tmp_path / "x.jsonl"), "--range", "oops"])
    assert bad.exit_code != 0 and "--range" in bad.output and not (tmp_path / "x.jsonl").exists()


@pytest.mark.parametrize("flags, needle", [
    (["--max-seq-length", "0"], "--max-seq-length 0"),
    (["--lr", "-1"], "--lr -1.0"),
    (["--lora-r", "0"], "--full"),
    (["--lora-r", "-1"], "--lora-r -1"),
    (["--max-steps", "0"], "--max-steps 0"),
    (["--epochs", "-1"], "--epochs -1.0"),
    (["--evals", "-1"], "--evals -1"),
    (["--temperature", "0"], "--temperature 0.0"),
    (["--matryoshka-dims", "1000"], "larger than the model's embedding size"),
])
def test_unusable_settings_are_one_line_and_write_nothing(tmp_path, flags, needle):
    """Values no run can use fail before anything is written (before, some crashed in torch with a
    traceback, --lora-r 0 quietly ran full fine-tuning and --max-steps 0 a whole epoch)."""
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"anchor": f"q{i}", "positive": f"d{i}"}) + "\n" for i in range(40)))
    out = tmp_path / "out"
    result = runner.invoke(app, ["train", str(data), "--output", str(out), "--no-eval", "--batch-size", "4", *flags])
    _assert_clean_failure(result, out, needle)


def test_demo_scales_its_held_out_split_and_runs_without_one(tmp_path, monkeypatch):
    """`demo --pairs 120` holds out a quarter (the fixed 300 was more than the data); --eval-size 0 trains
    without evaluation (it crashed reading the missing nDCG); the data stays in the cache, which config.yaml
    names by its file name."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    result = runner.invoke(app, ["demo", "--output", str(out), "--pairs", "120", "--max-steps", "1",
                                 "--batch-size", "8", "--max-seq-length", "32"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval_pairs"] == 30 and "nDCG@10:" in result.output
    from embedtune.cli import demo_data_path

    assert metrics["config"]["data"] == demo_data_path(120).name and demo_data_path(120).is_file()
    result = runner.invoke(app, ["demo", "--output", str(out), "--pairs", "120", "--eval-size", "0",
                                 "--max-steps", "1", "--batch-size", "8", "--max-seq-length", "32"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "metrics.json").read_text())["eval_pairs"] == 0


@pytest.mark.parametrize("command", [["eval", "model", "pairs.jsonl", "--max-seq-length", "0"],
                                     ["mine", "pairs.jsonl", "--output", "m.jsonl", "--max-seq-length", "0"],
                                     ["mine", "pairs.jsonl", "--output", "m.jsonl", "--range", "5:3"]])
def test_eval_and_mine_refuse_unusable_settings_in_one_line(tmp_path, command, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, command)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.startswith("error:") and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "m.jsonl").exists()


def test_demo_keeps_a_folder_of_the_users_own_files(tmp_path, monkeypatch):
    """The demo replaces an earlier run's result without asking, but a folder holding anything else is refused
    (one line, nothing written) unless --overwrite says so."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    flags = ["--pairs", "16", "--eval-size", "0", "--max-steps", "1", "--batch-size", "4", "--max-seq-length", "32"]
    result = runner.invoke(app, ["demo", "--output", str(out), *flags])
    assert result.exit_code == 1 and "Traceback" not in result.output and "--overwrite" in result.output
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and not (tmp_path / "mine.partial").exists()
    result = runner.invoke(app, ["demo", "--output", str(out), "--overwrite", *flags])
    assert result.exit_code == 0, result.output
    assert not (out / "notes.txt").exists() and (out / "metrics.json").is_file()
    result = runner.invoke(app, ["demo", "--output", str(out), *flags])  # an earlier run's result: replaced
    assert result.exit_code == 0, result.output


def _launched_as(monkeypatch, rank: int, error_file: Path | None):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", str(rank))
    if error_file is None:
        monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    else:
        monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))


def _run_user_errors(raised: BaseException) -> str:
    """What `cli.user_errors` prints to stderr for `raised` (it always ends in typer.Exit)."""
    import io

    import typer

    from embedtune import cli

    held = io.StringIO()
    console = cli.err_console
    cli.err_console = type(console)(file=held, width=200)
    try:
        with pytest.raises(typer.Exit), cli.user_errors():
            raise raised
    finally:
        cli.err_console = console
    return held.getvalue()


@pytest.mark.parametrize("rank", [0, 1])
def test_a_launched_rank_leaves_its_error_with_the_launcher_and_rank_0_prints_it(tmp_path, monkeypatch, rank):
    """Under torchrun (TORCHELASTIC_ERROR_FILE set) each rank writes its one line where torchrun's failure
    summary reads it; only rank 0 prints it, so N ranks meeting the same bad input print it once."""
    from embedtune.errors import DataError

    from embedtune import cli

    error_file = tmp_path / "error.json"
    _launched_as(monkeypatch, rank, error_file)
    monkeypatch.setattr(cli, "RANK_ERROR_GRACE_S", 0.0)
    printed = _run_user_errors(DataError("pairs.jsonl:2: invalid JSON"))
    recorded = json.loads(error_file.read_text())["message"]
    assert recorded["extraInfo"]["py_callstack"] == recorded["message"] == "error: pairs.jsonl:2: invalid JSON"
    assert ("pairs.jsonl:2: invalid JSON" in printed) == (rank == 0), printed


def test_a_launched_rank_without_a_launcher_error_file_prints_its_error_marked(monkeypatch):
    from embedtune.errors import DataError

    _launched_as(monkeypatch, 1, None)
    printed = _run_user_errors(DataError("pairs.jsonl:2: invalid JSON"))
    assert printed.strip() == "rank 1 error: pairs.jsonl:2: invalid JSON"


@pytest.mark.parametrize("rank", [0, 1])
def test_an_interrupt_under_a_launcher_is_announced_once(monkeypatch, rank):
    """torchrun hands Ctrl-C to every rank: rank 0 says "interrupted", the others only exit."""
    _launched_as(monkeypatch, rank, None)
    printed = _run_user_errors(KeyboardInterrupt())
    assert ("interrupted" in printed) == (rank == 0), printed


def test_eval_refuses_batch_size_zero_before_loading_anything(tmp_path):
    """`eval --batch-size 0` is one line naming the flag, before the data (maybe a large BEIR corpus) and the
    model load; it was refused only at the first encoding, as "batch size and chunk size must be at least 1"."""
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"anchor": "a", "positive": "b"}\n{"anchor": "c", "positive": "d"}\n')
    result = runner.invoke(app, ["eval", str(tmp_path / "no-model"), str(data), "--batch-size", "0"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.startswith("error: --batch-size 0") and len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize(("given", "refusal"), [("~", "home folder or one of its parents"),
                                               ("~/new/..", "home folder or one of its parents"),
                                               ("~/mywork", "--overwrite")])
def test_demo_output_naming_the_home_folder_keeps_the_users_files(tmp_path, monkeypatch, given, refusal):
    """`demo --output=~` (a tilde the shell leaves alone after "=") or a path through ".." names the home
    folder, which no run replaces; `~/mywork` holding the user's files is refused as any such folder is.
    The demo once checked the name as given (no folder "~" here: "nothing to lose") while the run
    expanded it, and replaced the home folder."""
    home = tmp_path / "home"
    (home / "mywork").mkdir(parents=True)
    (home / "notes.txt").write_text("keep me")
    (home / "mywork" / "draft.txt").write_text("keep me too")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    flags = ["--pairs", "16", "--eval-size", "0", "--max-steps", "1", "--batch-size", "4", "--max-seq-length", "32"]
    result = runner.invoke(app, ["demo", f"--output={given}", *flags])
    assert result.exit_code == 1 and "Traceback" not in result.output and refusal in " ".join(result.output.split())
    assert sorted(p.name for p in home.iterdir()) == ["mywork", "notes.txt"] and not (tmp_path / "home.partial").exists()
    assert [p.name for p in (home / "mywork").iterdir()] == ["draft.txt"]
