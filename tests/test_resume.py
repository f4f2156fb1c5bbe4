"""Resume: a run killed mid-checkpoint (SIGKILL) or stopped with Ctrl-C (SIGINT) and resumed with
--resume ends with the weights of an uninterrupted run (same seed, CPU, 1e-6), and keeps the best
weights it had found before the interruption.

The subprocess test drives the real CLI. Its child stops at a known point (tests/interrupt_child.py)
and waits there until the test has killed or interrupted it: nothing depends on timing. The
uninterrupted reference runs the same CLI in this process (one process start less). One thread
everywhere, so the uninterrupted and resumed runs do the same arithmetic.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from embedtune.cli import app
from embedtune.checkpoint_format import EVALUATION_RECORD
from embedtune.resilience import MARKER, RUN_CONFIG, checkpoints_dir, is_complete, latest_checkpoint

HERE = Path(__file__).parent
CHILD = HERE / "interrupt_child.py"
HANG_GUARD_S = 900  # only ends a hung test; no step waits for a duration
# --no-eval: the saved model is then the last step's weights, so it shows the whole trajectory.
# 24 pairs / batch 4 = 6 steps an epoch: the run resumes once at an epoch boundary and once mid-epoch.
RUN_FLAGS = ["--max-steps", "12", "--batch-size", "4", "--max-seq-length", "8", "--no-eval", "--save-every", "3",
             "--lr", "1e-3", "--lora-r", "4", "--seed", "7"]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHILD_")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONUNBUFFERED="1", **extra)
    return env


def _cli(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "embedtune", *args], env=_env(), capture_output=True, text=True,
                          timeout=HANG_GUARD_S)


@pytest.fixture()
def children():
    """Children this test started; any still running when it ends (a failed assertion) are killed."""
    started: list[subprocess.Popen] = []
    yield started
    for child in started:
        if child.poll() is None:
            child.kill()
            child.communicate()


def _start_child(children: list, args: list[str], gate: Path, block_at: str) -> subprocess.Popen:
    gate.mkdir(parents=True, exist_ok=True)
    child = subprocess.Popen([sys.executable, str(CHILD), *args], env=_env(CHILD_GATE_DIR=str(gate),
                             CHILD_BLOCK_AT=block_at), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    children.append(child)
    return child


def _wait_for_gate(child: subprocess.Popen, gate: Path) -> None:
    """Wait until the child reports it is at the gate (or fails before getting there)."""
    deadline = time.monotonic() + HANG_GUARD_S
    while not (gate / "reached").exists():
        if child.poll() is not None:
            out, err = child.communicate()
            pytest.fail(f"child exited with {child.returncode} before its gate:\n{out}\n{err[-4000:]}")
        assert time.monotonic() < deadline, "child never reached its gate"
        time.sleep(0.05)


def _max_diff(a: Path, b: Path) -> float:
    left, right = load_file(str(a)), load_file(str(b))
    assert left.keys() == right.keys()
    return max((left[k].double() - right[k].double()).abs().max().item() for k in left)


TOPICS = ["list", "dict", "string", "file", "date", "socket", "thread", "regex", "json", "path", "queue", "heap"]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    from embedtune.data import write_jsonl

    rows = [{"anchor": f"how do I {verb} a {topic} in python", "positive": f"def {verb}_{topic}(x): return {verb}(x)"}
            for topic in TOPICS for verb in ("sort", "copy")]
    return write_jsonl(rows, tmp_path_factory.mktemp("resume") / "pairs.jsonl")


@pytest.fixture()
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(pairs, tmp_path_factory) -> Path:
    """The uninterrupted run (one thread, like the children) that every interrupted run must end at."""
    out = tmp_path_factory.mktemp("reference") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        done = CliRunner().invoke(app, ["train", str(pairs), "--output", str(out), *RUN_FLAGS])
    finally:
        torch.set_num_threads(threads)
    assert done.exit_code == 0, done.output[-4000:]
    return out


def test_killed_then_interrupted_run_resumes_to_the_uninterrupted_weights(tmp_path, pairs, reference, children):
    out = tmp_path / "run"
    train_args = ["train", str(pairs), "--output", str(out), *RUN_FLAGS]
    checkpoints = checkpoints_dir(out)

    # 1. SIGKILL while checkpoint 9 is half written: 6 is the last complete one, 9 must be ignored.
    child = _start_child(children, train_args, tmp_path / "gate-kill", "checkpoint:9")
    _wait_for_gate(child, tmp_path / "gate-kill")
    assert is_complete(checkpoints / "checkpoint-6")
    assert (checkpoints / "checkpoint-9").is_dir() and not is_complete(checkpoints / "checkpoint-9")
    assert latest_checkpoint(checkpoints) == checkpoints / "checkpoint-6"
    child.kill()
    child.communicate()
    assert child.returncode == -signal.SIGKILL
    assert not out.exists()

    # 2. Resume (from 6, an epoch boundary); Ctrl-C during step 11: it finishes the step, saves, exits 130.
    gate = tmp_path / "gate-int"
    child = _start_child(children, [*train_args, "--resume"], gate, "step:10")
    _wait_for_gate(child, gate)
    child.send_signal(signal.SIGINT)
    (gate / "release").write_text("")
    stdout, stderr = child.communicate(timeout=HANG_GUARD_S)
    assert child.returncode == 130, stderr[-4000:]
    assert "Traceback" not in stderr
    assert "Ctrl-C: saving a checkpoint" in stderr
    assert is_complete(checkpoints / "checkpoint-11")
    assert f"checkpoint of step 11 saved in {checkpoints / 'checkpoint-11'}" in " ".join(stderr.split())
    commands = [line for line in stderr.splitlines() if line.startswith("embedtune train ")]
    assert commands == [shlex.join(["embedtune", *train_args, "--resume"])], stderr[-2000:]
    assert not out.exists()

    # 3. The printed command (from 11, mid-epoch) completes the run.
    done = _cli(shlex.split(commands[0])[1:])
    assert done.returncode == 0, done.stderr[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 12
    # throughput counts this process's steps only (it was null: all 12 steps' evaluations over 1 step's time)
    assert metrics["resumed_from_step"] == 11 and metrics["tokens_per_s"] > 0
    assert "steps 12-12 (resumed from step 11)" in " ".join(done.stdout.split())
    assert not Path(f"{out}.partial").exists()
    diff = _max_diff(out / "model" / "model.safetensors", reference / "model" / "model.safetensors")
    assert diff <= 1e-6, f"resumed weights differ from the uninterrupted run's by {diff}"
    # and training really moved the weights, so the equality means something
    from embedtune.loading import bundled_model_path

    base = load_file(str(bundled_model_path() / "model.safetensors"))
    trained = load_file(str(out / "model" / "model.safetensors"))
    common = [k for k in trained if k in base and trained[k].shape == base[k].shape]
    assert common and max((trained[k] - base[k]).abs().max().item() for k in common) > 1e-4


def test_sigterm_checkpoints_stops_with_143_and_names_the_resume_command(tmp_path, pairs, reference, children):
    """SIGTERM (a scheduler's preemption notice) is handled like Ctrl-C: the step finishes, a checkpoint
    is saved, the resume command is printed (also for an output given with a trailing slash), exit 143;
    the printed command completes the run with the uninterrupted run's weights."""
    out = tmp_path / "run"
    train_args = ["train", str(pairs), "--output", f"{out}/", *RUN_FLAGS]
    gate = tmp_path / "gate-term"
    child = _start_child(children, train_args, gate, "step:4")
    _wait_for_gate(child, gate)
    child.send_signal(signal.SIGTERM)
    (gate / "release").write_text("")
    stdout, stderr = child.communicate(timeout=HANG_GUARD_S)
    assert child.returncode == 143, stderr[-4000:]
    assert "Traceback" not in stderr and "SIGTERM: saving a checkpoint" in stderr
    assert is_complete(checkpoints_dir(out) / "checkpoint-5")
    commands = [line for line in stderr.splitlines() if line.startswith("embedtune train ")]
    assert commands == [shlex.join(["embedtune", *train_args, "--resume"])], stderr[-2000:]
    done = _cli(shlex.split(commands[0])[1:])
    assert done.returncode == 0, done.stderr[-4000:]
    diff = _max_diff(out / "model" / "model.safetensors", reference / "model" / "model.safetensors")
    assert diff <= 1e-6, f"resumed weights differ from the uninterrupted run's by {diff}"


# ----------------------------------------------------------------------------------- in-process, tiny model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from tiny_models import make_tiny_model

    return make_tiny_model("bert", tmp_path_factory.mktemp("tiny_resume"))


@pytest.fixture()
def tiny_pairs(tmp_path) -> Path:
    from embedtune.data import write_jsonl

    rows = [{"anchor": f"question {i} about topic {i % 7}", "positive": f"answer {i} with detail {i * 3}"}
            for i in range(40)]
    return write_jsonl(rows, tmp_path / "pairs.jsonl")


def _tiny_config(data: Path, model: Path, out: Path, **overrides):
    from embedtune.train import TrainConfig

    settings = dict(data=str(data), model=str(model), output_dir=str(out), max_steps=8, batch_size=4,
                    max_seq_length=16, eval_size=8, evals_per_run=4, save_every=2, lr=1e-3, lora_r=4)
    return TrainConfig(**{**settings, **overrides})


def _crash_at_step(monkeypatch, step: int) -> None:
    """Make training die (like a crash) when it is about to run step `step + 1`."""
    import transformers

    original = transformers.Trainer.training_step

    def training_step(self, *args, **kwargs):
        if self.state.global_step == step:
            raise RuntimeError("simulated crash")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(transformers.Trainer, "training_step", training_step)


@pytest.mark.parametrize("lora_r", [4, None], ids=["lora", "full"])
def test_resume_keeps_the_best_weights_found_before_the_crash(tmp_path, tiny, tiny_pairs, monkeypatch, one_thread,
                                                             lora_r):
    from embedtune.train import run

    reference = run(_tiny_config(tiny_pairs, tiny, tmp_path / "reference", lora_r=lora_r))
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        _crash_at_step(patch, 5)
        with pytest.raises(RuntimeError, match="simulated crash"):
            run(_tiny_config(tiny_pairs, tiny, out, lora_r=lora_r))
    checkpoint = latest_checkpoint(checkpoints_dir(out))
    assert checkpoint.name == "checkpoint-4"
    saved_best = json.loads((checkpoint / MARKER).read_text())["best"]
    assert saved_best["step"] in (2, 4), "evaluations at steps 2 and 4 came before the crash"
    # no pickled Python objects (training_args.bin) among them; the best weights apart unless they are its own
    assert {p.name for p in checkpoint.iterdir()} == {
        MARKER, "trainable.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} | (
        {"best_weights.safetensors"} if saved_best["step"] != 4 else set())

    loads = []
    original_load = torch.load

    def recording_load(*args, **kwargs):
        loads.append(kwargs.get("weights_only"))
        return original_load(*args, **kwargs)

    import embedtune.run_eval as run_eval

    kept = json.loads((checkpoints_dir(out) / EVALUATION_RECORD).read_text())

    def busier_machine(requested, *args, **kwargs):  # what planning anew on a loaded machine could choose
        return run_eval.plan_evals(0, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(torch, "load", recording_load)
        patch.setattr(run_eval, "plan_evals", busier_machine)
        patch.setattr(run_eval.RunEvaluation, "probe", lambda *a: pytest.fail("a resumed run probes again"))
        resumed = run(_tiny_config(tiny_pairs, tiny, out, resume=True, lora_r=lora_r))
    assert loads and all(flag is True for flag in loads), "a resume unpickles nothing: weights_only loads only"
    # the interrupted run's evaluation plan and base score, kept with its checkpoints, not planned again
    plan = resumed.metrics["eval"]["plan"]
    assert (plan["evals"], plan["budget_s"], plan["reason"]) == (kept["plan"]["evals"], kept["plan"]["budget_s"],
                                                                 kept["plan"]["reason"]) and plan["evals"] == 4
    assert resumed.metrics["base"] == reference.metrics["base"] == kept["base"] and kept["base"]
    assert resumed.metrics["best_step"] == reference.metrics["best_step"]
    assert resumed.metrics["final"] == reference.metrics["final"]
    diff = _max_diff(out / "model" / "model.safetensors", tmp_path / "reference" / "model" / "model.safetensors")
    assert diff <= 1e-6


def test_resume_refusals_are_one_line(tmp_path, tiny, tiny_pairs, monkeypatch, one_thread):
    from embedtune.train import run

    runner = CliRunner()
    out = tmp_path / "run"
    flags = ["train", str(tiny_pairs), "--output", str(out), "--model", str(tiny), "--max-steps", "8",
             "--batch-size", "4", "--max-seq-length", "16", "--eval-size", "8", "--save-every", "2",
             "--lr", "0.001", "--lora-r", "4"]

    result = runner.invoke(app, [*flags, "--resume"])
    assert result.exit_code == 1 and "nothing to resume" in " ".join(result.output.split())
    assert "Traceback" not in result.output and not Path(f"{out}.partial", "checkpoints").exists()

    with monkeypatch.context() as patch:
        _crash_at_step(patch, 3)
        with pytest.raises(RuntimeError):
            run(_tiny_config(tiny_pairs, tiny, out))
    assert latest_checkpoint(checkpoints_dir(out)).name == "checkpoint-2"
    assert (checkpoints_dir(out) / RUN_CONFIG).exists()

    changed = [*flags, "--resume"]
    changed[changed.index("--lr") + 1] = "0.5"
    result = runner.invoke(app, changed)
    text = " ".join(result.output.split())
    assert result.exit_code == 1 and "can't resume" in text and "--lr is 0.5, was 0.001" in text, text
    result = runner.invoke(app, flags)  # a fresh start would throw the checkpoints away
    text = " ".join(result.output.split())
    assert result.exit_code == 1 and "interrupted run" in text and "--resume" in text and "--overwrite" in text
    assert latest_checkpoint(checkpoints_dir(out)).name == "checkpoint-2", "a refusal must not touch the run"

    data_changed = tmp_path / "other.jsonl"
    data_changed.write_text(tiny_pairs.read_text().replace("question 0 ", "question zero "))
    result = runner.invoke(app, [flags[0], str(data_changed), *flags[2:], "--resume"])
    assert result.exit_code == 1 and "the data's content changed" in " ".join(result.output.split())
    # an optimizer state changed after the checkpoint was sealed (its size recorded again): torch refuses what is
    # not tensors, and the refusal is one line naming the file, not torch's advice to load it unsafely
    checkpoint = latest_checkpoint(checkpoints_dir(out))
    state, marker = checkpoint / "optimizer.pt", json.loads((checkpoint / MARKER).read_text())
    sealed = state.read_bytes()
    torch.save({"state": torch.load(state, weights_only=True), "extra": _NotATensor()}, state)
    (checkpoint / MARKER).write_text(json.dumps({**marker, "files": {**marker["files"],
                                                                     "optimizer.pt": state.stat().st_size}}))
    result = runner.invoke(app, [*flags, "--resume"])
    text = " ".join(result.output.split())
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert [line for line in result.output.splitlines() if line.strip()][-1].startswith("error:")
    assert f"{state}: holds more than tensors" in text and "weights_only" not in text, text
    state.write_bytes(sealed)
    (checkpoint / MARKER).write_text(json.dumps(marker))
    renamed = tmp_path / "same_pairs_renamed.jsonl"  # the data's path may change, its file name too
    renamed.write_bytes(tiny_pairs.read_bytes())
    result = runner.invoke(app, [flags[0], str(renamed), *flags[2:], "--resume"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "metrics.json").read_text())["resumed_from_step"] == 2


class _NotATensor:
    """What no tensors-only load accepts."""


def test_resume_refuses_another_number_of_processes(tmp_path, tiny_pairs, monkeypatch):
    """A torchrun run resumed in one process (the batch and its in-batch negatives halved) is refused, and
    the printed resume command names the launcher."""
    from embedtune import distributed
    from embedtune.checkpoint_format import check_same_run, run_record
    from embedtune.resumable_trainer import resume_command
    from embedtune.train import TrainConfig

    config = TrainConfig(data=str(tiny_pairs), output_dir=str(tmp_path / "run"))
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    (tmp_path / RUN_CONFIG).write_text(json.dumps(run_record(config)))
    check_same_run(tmp_path, config)
    assert resume_command(["embedtune", "train", "d.jsonl"]).startswith("torchrun --nproc-per-node 2 -m embedtune train")
    monkeypatch.setattr(distributed, "world_size", lambda: 1)
    with pytest.raises(Exception, match=r"the number of processes \(torchrun --nproc-per-node\) is 1, was 2"):
        check_same_run(tmp_path, config)
    assert resume_command(["embedtune", "train", "d.jsonl"]) == "embedtune train d.jsonl --resume"


def test_checkpoints_of_older_runs_still_resume(tmp_path, tiny_pairs):
    """Runs recorded a lone data file's digest with its name; their checkpoints match the same data, and only it."""
    from embedtune.checkpoint_format import check_same_run, run_record
    from embedtune.train import TrainConfig

    config = TrainConfig(data=str(tiny_pairs), output_dir=str(tmp_path / "run"))
    older = {k: v for k, v in run_record(config, file_name=True).items() if k != "data_file"}
    assert older["data_sha256"] != run_record(config)["data_sha256"]
    (tmp_path / RUN_CONFIG).write_text(json.dumps(older))
    check_same_run(tmp_path, config)
    changed = tmp_path / "elsewhere" / tiny_pairs.name
    changed.parent.mkdir()
    changed.write_text(tiny_pairs.read_text().replace("question 0 ", "question zero "))
    with pytest.raises(Exception, match="the data's content changed"):
        check_same_run(tmp_path, TrainConfig(data=str(changed), output_dir=str(tmp_path / "run")))


@pytest.fixture
def ctrl_c_as_at_a_terminal():
    """Ctrl-C handled as in a process started from a terminal, whatever started pytest: a background job
    of a script starts with it ignored, and a run keeps an ignored signal ignored (`guards.InterruptGuard`)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_saves_and_stops_and_a_second_ctrl_c_aborts(tmp_path, tiny, tiny_pairs, monkeypatch, one_thread,
                                                          ctrl_c_as_at_a_terminal):
    """In-process: the guard's signal handling itself (the subprocess test covers the CLI around it)."""
    import signal as signals

    import transformers

    from embedtune.resilience import TrainingInterrupted
    from embedtune.train import run

    def press_ctrl_c_at(step: int, times: int) -> None:
        original = transformers.Trainer.training_step

        def training_step(self, *args, **kwargs):
            if self.state.global_step == step:
                for _ in range(times):
                    signals.raise_signal(signals.SIGINT)
            return original(self, *args, **kwargs)

        monkeypatch.setattr(transformers.Trainer, "training_step", training_step)

    handler = signals.getsignal(signals.SIGINT)
    out = tmp_path / "run"
    press_ctrl_c_at(2, times=1)  # during step 3: it finishes, is checkpointed, and the run stops
    with pytest.raises(TrainingInterrupted) as stopped:
        run(_tiny_config(tiny_pairs, tiny, out, save_every=0))  # no periodic checkpoints: Ctrl-C still saves
    assert stopped.value.step == 3 and stopped.value.checkpoint == checkpoints_dir(out) / "checkpoint-3"
    assert is_complete(stopped.value.checkpoint) and not out.exists()
    assert signals.getsignal(signals.SIGINT) is handler

    press_ctrl_c_at(5, times=2)  # resumed; Ctrl-C twice during step 6: abort at once, no new checkpoint
    with pytest.raises(KeyboardInterrupt) as aborted:
        run(_tiny_config(tiny_pairs, tiny, out, save_every=0, resume=True))
    assert type(aborted.value) is KeyboardInterrupt
    assert latest_checkpoint(checkpoints_dir(out)).name == "checkpoint-3"
    assert signals.getsignal(signals.SIGINT) is handler


# ------------------------------------------------------------------------ weights kept once


def _sealed(folder: Path, step: int, weights: dict, best_step: int | None, best_weights: dict | None = None):
    """A checkpoint folder as the trainer leaves it, sealed with a best-so-far found at `best_step`."""
    from safetensors.torch import save_file

    from embedtune.best_weights import BestWeights
    from embedtune.checkpoint_format import seal_checkpoint

    folder.mkdir(parents=True)
    save_file(weights, str(folder / "trainable.safetensors"))
    best = BestWeights(torch.nn.Linear(2, 2), "eval_score")
    if best_step is not None:
        best.load_state({"value": 0.5, "metrics": {"eval_score": 0.5}, "step": best_step}, best_weights or weights)
    seal_checkpoint(folder, step, best)
    return folder


def test_best_weights_at_the_checkpoints_own_step_are_not_written_twice_and_come_back(tmp_path):
    from embedtune.best_weights import BestWeights
    from embedtune.checkpoint_format import restore_best

    own = {"w": torch.arange(4.0).reshape(2, 2), "b": torch.ones(2)}
    here = _sealed(tmp_path / "checkpoint-4", 4, own, best_step=4)
    assert not (here / "best_weights.safetensors").exists() and is_complete(here)
    earlier = {k: v - 1 for k, v in own.items()}
    apart = _sealed(tmp_path / "checkpoint-6", 6, own, best_step=2, best_weights=earlier)
    assert (apart / "best_weights.safetensors").exists()
    for checkpoint, expected, step in ((here, own, 4), (apart, earlier, 2)):
        best = BestWeights(torch.nn.Linear(2, 2), "eval_score")
        restore_best(best, checkpoint)
        meta, weights = best.state()
        assert meta["step"] == step and weights.keys() == expected.keys()
        assert all(torch.equal(weights[k], expected[k]) for k in expected)


def test_a_checkpoint_names_another_files_weights_only_where_all_match(tmp_path):
    from safetensors.torch import save_file

    from embedtune.checkpoint_format import checkpoint_weights, reference_weights, referenced_folder

    model = torch.nn.Linear(3, 2)
    params = {"0.auto_model.weight": model.weight, "0.auto_model.bias": model.bias}
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    save_file({"weight": model.weight.detach(), "bias": model.bias.detach(), "frozen": torch.zeros(1)},
              str(model_dir / "model.safetensors"))
    names = {id(model.weight): ["weight"], id(model.bias): ["tied.bias", "bias"]}  # the first name present counts
    checkpoint = tmp_path / "checkpoints" / "checkpoint-3"
    checkpoint.mkdir(parents=True)
    for wrong in ({id(model.weight): ["weight"]},  # a trainable tensor with no name in the file
                  {id(model.weight): ["bias"], id(model.bias): ["weight"]}):  # shapes that differ
        assert not reference_weights(checkpoint, model_dir / "model.safetensors", params, wrong)
        assert not list(checkpoint.iterdir())
    assert reference_weights(checkpoint, model_dir / "model.safetensors", params, names)
    assert referenced_folder(checkpoint) == model_dir.resolve()
    loaded = checkpoint_weights(checkpoint)
    assert loaded.keys() == params.keys() and all(torch.equal(loaded[k], params[k].detach()) for k in params)
    from embedtune.checkpoint_format import seal_checkpoint  # the named file counts toward completeness

    seal_checkpoint(checkpoint, 3)
    assert is_complete(checkpoint)
    (model_dir / "model.safetensors").unlink()
    assert not is_complete(checkpoint)
