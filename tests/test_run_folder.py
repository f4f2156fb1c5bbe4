"""Where a run writes and how its result gets there (`embedtune.run_folder`): the output's place is
checked before anything runs, and the finish is a transaction: a kill at any point of it leaves the
previous result or a run that --resume completes without training again."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from embedtune.cli import app
from embedtune.errors import EmbedtuneError
from embedtune.run_folder import FINISHED, resolve_output, work_folder
from tiny_models import write_pairs as _pairs

FLAGS = ["--max-steps", "3", "--batch-size", "4", "--max-seq-length", "16", "--no-eval", "--lora-r", "4",
         "--save-every", "1"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from tiny_models import make_tiny_model

    return make_tiny_model("bert", tmp_path_factory.mktemp("tiny_run_folder"))


def _train(data: Path, output: str, tiny: Path, *extra: str):
    return CliRunner().invoke(app, ["train", str(data), "--output", output, "--model", str(tiny), *FLAGS, *extra])


def test_output_that_holds_the_data_or_the_current_folder_is_refused(tmp_path, monkeypatch):
    data = _pairs(tmp_path / "d")
    with pytest.raises(EmbedtuneError, match="holds the training data"):
        resolve_output(tmp_path / "d", data)
    with pytest.raises(EmbedtuneError, match="holds the training data"):  # its work folder would hold it
        resolve_output(tmp_path / "x", tmp_path / "x.partial" / "pairs.jsonl")
    monkeypatch.chdir(tmp_path / "d")
    for output in (".", "..", str(tmp_path)):
        with pytest.raises(EmbedtuneError, match="current folder or one of its parents"):
            resolve_output(output, data)
    assert resolve_output("sub", data) == Path(os.path.realpath(tmp_path / "d" / "sub"))


def test_cli_refuses_an_output_holding_the_data_and_keeps_the_data(tmp_path, tiny):
    data = _pairs(tmp_path / "d")
    result = _train(data, str(tmp_path / "d"), tiny, "--overwrite")
    assert result.exit_code == 1 and "holds the training data" in result.output
    assert data.exists()


def test_output_through_a_symlink_is_written_at_its_target(tmp_path, tiny):
    data = _pairs(tmp_path / "d")
    target = tmp_path / "target"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target)
    result = _train(data, str(link), tiny)
    assert result.exit_code == 0, result.output
    assert link.is_symlink() and (target / "model" / "model.safetensors").exists()
    assert (link / "metrics.json").exists() and not (tmp_path / "link.partial").exists()


def test_resume_works_when_the_run_lies_inside_a_dataset_folder(tmp_path, tiny):
    """The data digest that a resume compares leaves out the run's own folders."""
    from embedtune.resilience import RUN_CONFIG, check_same_run, run_record
    from embedtune.train import TrainConfig

    folder = tmp_path / "dataset"
    _pairs(folder)
    config = TrainConfig(data=str(folder), output_dir=str(folder / "run"))
    record = run_record(config)
    checkpoints = work_folder(folder / "run") / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / RUN_CONFIG).write_text(json.dumps(record))
    (checkpoints / "checkpoint-1").mkdir()
    (checkpoints / "checkpoint-1" / "weights.bin").write_bytes(b"x" * 100)
    check_same_run(checkpoints, config)  # no "the data's content changed"
    (folder / "more.jsonl").write_text('{"anchor": "a", "positive": "b"}\n')
    with pytest.raises(EmbedtuneError, match="content changed"):
        check_same_run(checkpoints, config)


def _kill_finish_at(monkeypatch, where: str):
    """Make the finish stop (as a kill would) at one of its steps."""
    import embedtune.run_folder as run_folder
    import embedtune.files as files
    import embedtune.train as recipe_module

    recipe = __import__("importlib").import_module("embedtune.train")

    class Killed(BaseException):
        pass

    if where == "before-seal":  # artifacts written, not yet sealed
        monkeypatch.setattr(recipe, "seal_finished", lambda work: (_ for _ in ()).throw(Killed()))
    elif where == "after-seal":  # sealed, checkpoints not yet dropped, not moved
        monkeypatch.setattr(recipe, "complete_finish", lambda work, output: (_ for _ in ()).throw(Killed()))
    elif where == "between-renames":  # the previous result set aside, the new one not yet in place
        original = os.replace

        def replace(src, dst):
            if Path(src).name.endswith(".partial"):
                raise Killed()
            return original(src, dst)

        monkeypatch.setattr(files.os, "replace", replace)
    del run_folder, recipe_module
    return Killed


@pytest.mark.parametrize("where", ["before-seal", "after-seal", "between-renames"])
def test_a_killed_finish_leaves_the_old_result_or_a_run_that_resume_completes(tmp_path, tiny, monkeypatch, where):
    data = _pairs(tmp_path / "d")
    out = tmp_path / "out"
    assert _train(data, str(out), tiny, "--seed", "1").exit_code == 0
    old = load_file(str(out / "model" / "model.safetensors"))
    reference = tmp_path / "reference"
    assert _train(data, str(reference), tiny).exit_code == 0

    with monkeypatch.context() as patch:
        killed = _kill_finish_at(patch, where)
        with pytest.raises(killed):
            CliRunner().invoke(app, ["train", str(data), "--output", str(out), "--model", str(tiny), *FLAGS,
                                     "--overwrite"], catch_exceptions=False)
    work = work_folder(out)
    # the previous result is in place, or set aside and put back at the next start
    if where == "between-renames":
        aside = list(tmp_path.glob(".out.old-*"))
        assert not out.exists() and len(aside) == 1
        # the "killed" process is this one, still alive: give the set-aside folder a dead process's id
        import subprocess
        import sys

        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        tag = aside[0].name.split("-", 2)[2]
        aside[0].rename(aside[0].with_name(f".out.old-{dead.pid}-{tag}"))
    else:
        assert out.exists() and load_file(str(out / "model" / "model.safetensors")).keys() == old.keys()
    assert work.exists()
    if where == "before-seal":  # not sealed: the checkpoints are still there to resume from
        assert (work / "checkpoints").is_dir() and not (work / FINISHED).exists()
    else:
        assert (work / FINISHED).exists()
    # a plain rerun does not train over a sealed result silently
    if where != "before-seal":
        again = _train(data, str(out), tiny)
        assert again.exit_code == 1 and "--resume" in again.output
        if where == "between-renames":
            assert out.exists()  # the previous result was put back at that start
    done = _train(data, str(out), tiny, "--overwrite", "--resume")  # the interrupted command, plus --resume
    assert done.exit_code == 0, done.output
    assert not work.exists() and not list(tmp_path.glob(".out.*"))
    assert not (out / FINISHED).exists() and not (out / "checkpoints").exists()
    new = load_file(str(out / "model" / "model.safetensors"))
    ref = load_file(str(reference / "model" / "model.safetensors"))
    assert max((new[k] - ref[k]).abs().max().item() for k in ref) <= 1e-6  # the killed run's result, not the old


def test_output_that_is_the_home_folder_or_above_it_is_refused_even_with_overwrite(tmp_path, monkeypatch, tiny):
    """`--output ~` (or a folder above it) would replace the user's home folder when the run finishes:
    refused whatever the current folder, and --overwrite does not change that."""
    home, elsewhere = tmp_path / "home", tmp_path / "work"
    (home / "notes").mkdir(parents=True)
    (home / "notes" / "keep.txt").write_text("mine")
    elsewhere.mkdir()
    data = _pairs(elsewhere)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(elsewhere)
    for output in ("~", str(home), "~/notes/../", "~/.."):  # ~/.. is also above the current folder: named first
        with pytest.raises(EmbedtuneError, match="(home|current) folder or one of its parents"):
            resolve_output(output, data)
    assert resolve_output("~/runs/one", data) == Path(os.path.realpath(home / "runs" / "one"))
    result = _train(data, "~", tiny, "--overwrite")
    assert result.exit_code != 0 and "home folder" in " ".join(result.output.split())
    assert (home / "notes" / "keep.txt").read_text() == "mine" and sorted(p.name for p in home.iterdir()) == ["notes"]


def test_no_save_replaces_the_home_or_the_current_folder(tmp_path, monkeypatch):
    """Every writer's folder goes through `files.atomic_folder`: a target that is the home or the current
    folder, or above either, is refused with overwrite too, and nothing in it is touched."""
    from embedtune.errors import SaveError
    from embedtune.files import atomic_folder

    home, here = tmp_path / "home", tmp_path / "here"
    for folder in (home, here):
        folder.mkdir()
        (folder / "keep.txt").write_text("mine")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(here)
    for target in ("~", str(home), ".", str(here), str(tmp_path)):
        with pytest.raises(SaveError, match="folder or one of its parents"):
            with atomic_folder(target, overwrite=True) as tmp:
                (Path(tmp) / "model.safetensors").write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here", "home"]
    assert [p.name for p in home.iterdir()] == [p.name for p in here.iterdir()] == ["keep.txt"]
    with atomic_folder(home / "models" / "one", overwrite=True) as tmp:  # inside the home folder: fine
        (Path(tmp) / "model.safetensors").write_text("x")
    assert (home / "models" / "one" / "model.safetensors").is_file()
