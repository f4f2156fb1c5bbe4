"""What a job costs outside its training steps, checked by structure (no timings):

- `import embedtune` / `embedtune.cli`, `embedtune --help` and the CLI's argument parsing load none of
  torch, transformers, peft or sentence-transformers (the package's names are imported on first use),
  while `embedtune.train` stays the function and importing patches nothing (the compat patches come with the first model embedtune builds);
- the CLI imports the libraries with the cyclic GC paused and frozen after, and freezes at exit;
- `_tokens_per_row` tokenizes its sample on several threads, to the same count;
- `_finish_output` draws the curves on a thread beside the model's save, and still fails (a plot that
  fails) before the result is moved into place;
- the curves are drawn without pyplot, to the same PNG bytes.
"""

from __future__ import annotations

import importlib
import json
import sys
import threading
from pathlib import Path

import pytest

from fresh_interpreter import fresh

HEAVY = ("torch", "transformers", "peft", "sentence_transformers")
def _cli(argv: list[str]) -> dict:
    """`embedtune ARGV` in a fresh interpreter (as the console script runs it): exit code and heavy modules loaded."""
    return fresh(f"""
        import json, sys
        sys.argv = ["embedtune", *{argv!r}]
        from embedtune.cli import main
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code
        print(json.dumps({{"code": code, "loaded": [m for m in {HEAVY!r} if m in sys.modules]}}))
    """)


# ------------------------------------------------------------------------------- start-up


def test_importing_the_package_and_the_cli_loads_no_ml_library():
    seen = fresh(f"""
        import json, sys
        import embedtune
        after_package = [m for m in {HEAVY!r} if m in sys.modules]
        import embedtune.cli
        print(json.dumps({{"package": after_package, "cli": [m for m in {HEAVY!r} if m in sys.modules],
                           "version": embedtune.__version__, "error": embedtune.EmbedtuneError.__name__}}))
    """)
    assert seen == {"package": [], "cli": [], "version": "0.1.0", "error": "EmbedtuneError"}


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["eval", "--help"], ["mine", "--help"], ["export", "--help"]])
def test_help_loads_no_ml_library(argv):
    seen = _cli(argv)
    assert seen == {"code": 0, "loaded": []}


def test_argument_errors_are_reported_before_any_ml_library_loads(tmp_path):
    """Parsing runs the eager --config callback too: without a file it must not import the recipe."""
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"anchor": "a", "positive": "b"}\n')
    seen = _cli(["train", str(data), "--max-steps", "many"])
    assert seen["code"] == 2  # click's usage error
    assert seen["loaded"] == []


def test_lazy_names_resolve_as_the_eager_package_bound_them():
    seen = fresh("""
        import json, sys, types
        import embedtune
        names = {n: getattr(embedtune, n).__module__ for n in
                 ("FastModel", "to_sentence_transformer", "install_compat", "TrainConfig", "save_merged", "save_hf",
                  "save_adapter")}
        first = type(embedtune.train).__name__
        # importing the submodule (as the CLI and the tests do) binds it on the package: the name stays the function
        from embedtune.train import TrainConfig
        import embedtune.train as by_import
        from embedtune import train as by_from
        print(json.dumps({"names": names, "first": first, "after": type(embedtune.train).__name__,
                          "by_import": type(by_import).__name__, "by_from": type(by_from).__name__,
                          "module": type(sys.modules["embedtune.train"]).__name__,
                          "same": embedtune.train is sys.modules["embedtune.train"].train,
                          "dir": all(n in dir(embedtune) for n in embedtune.__all__)}))
    """)
    assert seen["names"] == {"FastModel": "embedtune.loading", "to_sentence_transformer": "embedtune.st",
                             "install_compat": "embedtune.st", "TrainConfig": "embedtune.train",
                             "save_merged": "embedtune.save", "save_hf": "embedtune.save",
                             "save_adapter": "embedtune.save"}
    assert seen["first"] == seen["after"] == seen["by_import"] == seen["by_from"] == "function"
    assert seen["module"] == "module" and seen["same"] and seen["dir"]


def test_unknown_attribute_is_still_an_attribute_error():
    import embedtune

    with pytest.raises(AttributeError):
        embedtune.no_such_name  # noqa: B018


@pytest.mark.parametrize("st_first", [False, True])
def test_importing_embedtune_patches_nothing_and_its_first_model_installs_the_compat(st_first):
    """`import embedtune` leaves sentence-transformers stock, whichever is imported first; the guide's
    compatibility patches (`st.install_compat`) arrive with the first model embedtune builds."""
    seen = fresh(f"""
        import json, sys
        if {st_first!r}:
            import sentence_transformers
        import embedtune
        import sentence_transformers
        from embedtune.st import _transformer_class, _BUNDLED_FLAG, _RESUME_FLAG
        try:
            from sentence_transformers.base.trainer import BaseTrainer as trainer
        except ImportError:
            from sentence_transformers import SentenceTransformerTrainer as trainer
        cls = _transformer_class()

        def state():
            return {{"bundled": bool(getattr(cls, _BUNDLED_FLAG, False)),
                     "resume": bool(getattr(trainer, _RESUME_FLAG, False))}}

        before = state()
        embedtune.FastModel.from_pretrained(max_seq_length=32)
        print(json.dumps({{"before": before, "after": state(), "models": hasattr(sentence_transformers, "models"),
                           "hook": any(type(f).__module__.startswith("embedtune") for f in sys.meta_path)}}))
    """)
    assert seen["before"] == {"bundled": False, "resume": False}
    assert seen["after"] == {"bundled": True, "resume": True} and seen["models"]
    assert not seen["hook"]


# ------------------------------------------------------------------------------- garbage collector


def test_heavy_imports_pause_the_collector_and_freeze_once():
    seen = fresh("""
        import gc, json, sys
        from embedtune.cli import heavy_imports
        with heavy_imports():
            paused = not gc.isenabled()
            import torch
        frozen, enabled = gc.get_freeze_count(), gc.isenabled()
        with heavy_imports():  # torch is in: nothing more is frozen
            again = not gc.isenabled()
            junk = [[] for _ in range(1000)]
        print(json.dumps({"paused": paused, "frozen": frozen, "enabled": enabled, "again": again,
                          "unchanged": gc.get_freeze_count() == frozen}))
    """)
    assert seen["paused"] and seen["frozen"] > 100_000 and seen["enabled"]
    assert not seen["again"] and seen["unchanged"]


def test_the_cli_freezes_the_heap_at_exit():
    """main() registers gc.freeze first, so it runs last among the exit handlers, before the
    interpreter's final collections."""
    seen = fresh("""
        import atexit, gc, json, sys
        registered = []
        atexit.register = lambda fn, *a, **k: registered.append(fn) or fn
        sys.argv = ["embedtune", "--help"]
        from embedtune.cli import main
        before = len(registered)  # handlers the imports registered
        try:
            main()
        except SystemExit:
            pass
        print(json.dumps({"first": registered[before] is gc.freeze if len(registered) > before else None}))
    """)
    assert seen["first"] is True


# ------------------------------------------------------------------------------- tokens per row


class _CountingTokenizer:
    """A fast tokenizer stand-in: whitespace tokens plus two specials, truncated; records calling threads."""

    is_fast = True

    def __init__(self):
        self.threads: set[int] = set()
        self.texts = 0
        self.lock = threading.Lock()

    def __call__(self, texts, truncation=False, max_length=None):
        with self.lock:
            self.threads.add(threading.get_ident())
            self.texts += len(texts)
        ids = [[101, *range(len(t.split())), 102] for t in texts]
        return {"input_ids": [x[:max_length] if truncation else x for x in ids]}


def _pairs_dataset(rows: int):
    from datasets import Dataset

    return Dataset.from_dict({"anchor": [f"query {i} " + "w " * (i % 7) for i in range(rows)],
                              "positive": [f"doc {i} " + "x " * (i % 50) for i in range(rows)]})


def _reference_tokens_per_row(tokenizer, dataset, columns, max_len, sample=2048):  # the sequential original
    from embedtune.data import column

    rows = dataset.select(range(min(sample, len(dataset))))
    total = 0
    for name in columns:
        total += sum(len(ids) for ids in tokenizer(column(rows, name), truncation=True, max_length=max_len)["input_ids"])
    return total / max(1, len(rows))


def test_tokens_per_row_tokenizes_the_sample_once_on_several_threads(monkeypatch):
    train_module = importlib.import_module("embedtune.train")
    monkeypatch.setattr(train_module.os, "sched_getaffinity", lambda pid: set(range(4)), raising=False)
    dataset = _pairs_dataset(3000)
    tokenizer = _CountingTokenizer()
    value = train_module._tokens_per_row(tokenizer, dataset, ["anchor", "positive"], 32)
    assert value == _reference_tokens_per_row(_CountingTokenizer(), dataset, ["anchor", "positive"], 32)
    assert tokenizer.texts == 2 * 2048  # every sampled text once
    assert len(tokenizer.threads) > 1


def test_tokens_per_row_with_a_real_fast_tokenizer_matches_the_sequential_count(monkeypatch):
    from transformers import AutoTokenizer

    from embedtune.loading import bundled_model_path

    train_module = importlib.import_module("embedtune.train")
    monkeypatch.setattr(train_module.os, "sched_getaffinity", lambda pid: set(range(4)), raising=False)
    tokenizer = AutoTokenizer.from_pretrained(str(bundled_model_path()))
    dataset = _pairs_dataset(700)
    expected = _reference_tokens_per_row(AutoTokenizer.from_pretrained(str(bundled_model_path())), dataset,
                                         ["anchor", "positive"], 24)
    assert train_module._tokens_per_row(tokenizer, dataset, ["anchor", "positive"], 24) == expected


# ------------------------------------------------------------------------------- after the last step


def _finish_setup(tmp_path, monkeypatch, plot=None):
    train_module = importlib.import_module("embedtune.train")
    plots = importlib.import_module("embedtune.plots")
    work, output = tmp_path / "run.partial", tmp_path / "run"
    for step in (1, 2):
        (work / "checkpoints" / f"checkpoint-{step}").mkdir(parents=True)
        (work / "checkpoints" / f"checkpoint-{step}" / "trainable.safetensors").write_bytes(b"\0" * 1024)
    seen = {}

    def fake_save_merged(st_model, folder):
        seen["save"] = threading.current_thread() is threading.main_thread()
        Path(folder).mkdir()
        (Path(folder) / "model.safetensors").write_bytes(b"weights")
        return Path(folder)

    def recording_plot(history, path, **kwargs):
        seen["plot"] = threading.current_thread() is threading.main_thread()
        Path(path).write_bytes(b"png")
        return Path(path)

    monkeypatch.setattr(train_module, "save_merged", fake_save_merged)
    monkeypatch.setattr(plots, "plot_curves", plot or recording_plot)
    metrics = {"config": {"lora_r": None}, "history": [{"step": 1, "loss": 1.0}], "base": {}}
    return train_module, work, output, metrics, seen


def test_finish_output_draws_the_curves_beside_the_save(tmp_path, monkeypatch):
    train_module, work, output, metrics, seen = _finish_setup(tmp_path, monkeypatch)
    result = train_module._finish_output(None, metrics, work, output, overwrite=False)
    assert result == output and not work.exists()
    assert sorted(p.name for p in output.iterdir()) == ["config.yaml", "metrics.json", "model", "training_curves.png"]
    assert json.loads((output / "metrics.json").read_text())["artifacts"]["plot"] == "training_curves.png"
    assert seen["save"] is True and seen["plot"] is False  # the curves were drawn on another thread


def test_finish_output_fails_before_the_move_when_the_plot_fails(tmp_path, monkeypatch):
    def broken_plot(history, path, **kwargs):
        raise ValueError("no plot")

    train_module, work, output, metrics, _ = _finish_setup(tmp_path, monkeypatch, plot=broken_plot)
    with pytest.raises(ValueError, match="no plot"):
        train_module._finish_output(None, metrics, work, output, overwrite=False)
    assert not output.exists() and (work / "model").is_dir()  # and the checkpoints: --resume finishes it


# ------------------------------------------------------------------------------- the curves


def _pyplot_curves(history, path, metric, base=None, label="held-out nDCG@10"):  # the pyplot original
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loss = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
    evals = [(h["step"], h[metric]) for h in history if metric in h and "step" in h]
    if base is not None:
        evals = [(0, base)] + evals
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 4))
    if loss:
        ax_loss.plot(*zip(*loss), marker=".")
    ax_loss.set(title="training loss", xlabel="step", ylabel="MNRL loss")
    if evals:
        ax_metric.plot(*zip(*evals), marker="o", color="tab:green")
    ax_metric.set(title=label, xlabel="step", ylabel="score")
    for ax in (ax_loss, ax_metric):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def test_curves_are_the_same_png_without_pyplot(tmp_path):
    from embedtune.plots import plot_curves

    metric = "eval_ir-eval_cosine_ndcg@10"
    history = [{"step": s, "loss": 2.0 / s} for s in range(5, 200, 5)] + [{"step": s, metric: 0.3 + s / 1000}
                                                                        for s in (50, 100, 150, 200)]
    for i, (hist, base) in enumerate([(history, 0.28), (history[:3], None), ([], None)]):
        plot_curves(hist, tmp_path / f"new{i}.png", metric=metric, base=base)
        _pyplot_curves(hist, tmp_path / f"old{i}.png", metric=metric, base=base)
        assert (tmp_path / f"new{i}.png").read_bytes() == (tmp_path / f"old{i}.png").read_bytes()


def test_curves_leave_pyplot_and_the_backend_alone(tmp_path):
    seen = fresh(f"""
        import json, sys
        import matplotlib
        matplotlib.use("svg")
        from embedtune.plots import plot_curves
        plot_curves([{{"step": 1, "loss": 1.0}}], {str(tmp_path / "c.png")!r}, metric="m")
        print(json.dumps({{"pyplot": "matplotlib.pyplot" in sys.modules, "backend": matplotlib.get_backend()}}))
    """)
    assert seen == {"pyplot": False, "backend": "svg"}
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_matplotlib_loads_in_a_thread_once_the_last_step_has_run_and_leaves_the_backend_alone():
    """The finish's plot finds matplotlib loaded: the warm-up callback loads it in a thread at the end
    of the last step (not before: an importing thread would hold up the training loop), on the main
    process only, once, without pyplot or a backend switch."""
    seen = fresh("""
        import json, sys, threading, types
        import matplotlib
        matplotlib.use("svg")
        from embedtune.plots import warm_up_callback

        callback, loaded = warm_up_callback(), []
        def step(global_step, zero=True):
            state = types.SimpleNamespace(global_step=global_step, max_steps=3, is_world_process_zero=zero)
            callback.on_step_end(None, state, None)
            for thread in threading.enumerate():
                if thread.name == "embedtune-plot-warm-up":
                    thread.join()
            loaded.append("matplotlib.figure" in sys.modules)
        step(1); step(2); step(3, zero=False)
        plain = [t for t in threading.enumerate() if t.name == "embedtune-plot-warm-up"]
        step(3); step(3)
        print(json.dumps({"loaded": loaded, "fonts": "matplotlib.font_manager" in sys.modules,
                          "pyplot": "matplotlib.pyplot" in sys.modules, "backend": matplotlib.get_backend(),
                          "started_early": bool(plain)}))
    """)
    assert seen == {"loaded": [False, False, False, True, True], "fonts": True, "pyplot": False, "backend": "svg",
                    "started_early": False}


# ------------------------------------------------------------------------------- the exit


class _Exited(Exception):
    pass


@pytest.fixture
def quick_exits(monkeypatch):
    """console_main's os._exit recorded (and turned into an exception) instead of ending the tests."""
    from embedtune import cli

    codes = []

    def exit_now(code):
        codes.append(code)
        raise _Exited()

    monkeypatch.setattr(cli.os, "_exit", exit_now)
    monkeypatch.setattr(cli.atexit, "register", lambda fn, *a, **k: fn)
    return codes


def test_the_command_leaves_at_once_with_its_exit_code(quick_exits, monkeypatch, tmp_path, capsys):
    """A finished command ends with os._exit and the code typer gave (0, or 2 for a bad argument), its
    output flushed first; the interpreter's teardown is skipped."""
    from embedtune.cli import console_main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(sys, "argv", ["embedtune", "--help"])
    with pytest.raises(_Exited):
        console_main()
    assert quick_exits == [0] and "train" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", ["embedtune", "train", str(tmp_path / "pairs.jsonl"), "--batch-size", "many"])
    with pytest.raises(_Exited):
        console_main()
    assert quick_exits == [0, 2] and "batch-size" in capsys.readouterr().err  # typer's usage error, exit code 2


@pytest.mark.parametrize("why", ["tracker", "failed torchrun worker"])
def test_the_command_exits_the_usual_way_where_exit_handlers_matter(quick_exits, monkeypatch, tmp_path, why):
    """A tracker's exit handler (it syncs the run), or a torchrun worker that failed: SystemExit with the
    command's code, never os._exit."""
    import types

    from embedtune.cli import console_main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    if why == "tracker":
        monkeypatch.setitem(sys.modules, "wandb", types.ModuleType("wandb"))
        argv, code = ["embedtune", "--help"], 0
    else:
        monkeypatch.setenv("WORLD_SIZE", "2")
        argv, code = ["embedtune", "train", str(tmp_path / "pairs.jsonl"), "--batch-size", "many"], 2
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exited:
        console_main()
    assert exited.value.code == code and quick_exits == []


def test_a_finished_torchrun_worker_ends_its_process_group_then_leaves_at_once(quick_exits, monkeypatch):
    """Its process group ended by the command (`distributed.end_process_group`), nothing is left for the
    teardown: the finished worker leaves at once, as one process does."""
    from embedtune import distributed
    from embedtune.cli import console_main

    ended = []
    monkeypatch.setattr(distributed, "end_process_group", lambda: ended.append(True))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(sys, "argv", ["embedtune", "--help"])
    with pytest.raises(_Exited):
        console_main()
    assert ended == [True] and quick_exits == [0]


def test_python_m_embedtune_and_the_console_script_use_the_quick_exit():
    root = Path(__file__).resolve().parents[1]
    assert 'embedtune = "embedtune.cli:console_main"' in (root / "pyproject.toml").read_text()
    assert "console_main()" in (root / "src" / "embedtune" / "__main__.py").read_text()


# ------------------------------------------------------------------------------- the phases


def test_phases_cut_the_train_stage_at_the_first_step_and_the_last_checkpoint(monkeypatch):
    """The trainer's set-up, the first step, the steps (with the last step's log and evaluation) and the
    last step's checkpoint land in their own phases; a checkpoint before the last step is training."""
    import types

    from embedtune import monitoring

    clock = [100.0]
    monkeypatch.setattr(monitoring.time, "time", lambda: clock[0])
    monkeypatch.setattr(monitoring, "process_age_s", lambda: 5.0)
    phases = monitoring.Phases()
    marks = phases.step_callback()
    state = types.SimpleNamespace(max_steps=3, global_step=0)

    def after(seconds, hook, step=None):
        clock[0] += seconds
        if step is not None:
            state.global_step = step
        getattr(marks, hook)(None, state, None)

    after(1.0, "on_step_begin")  # the trainer's set-up
    after(2.0, "on_step_end", 1)  # the first step
    after(0.5, "on_step_begin")
    after(0.25, "on_save", 2)  # a checkpoint by the clock, mid-run: training
    after(0.25, "on_step_end", 2)
    after(0.5, "on_step_end", 3)
    after(0.25, "on_log")
    after(4.0, "on_evaluate")  # the last step's evaluation
    after(0.75, "on_save")  # the last step's checkpoint
    assert phases.seconds == {"process_start": 5.0, "trainer_setup": 1.0, "first_step": 2.0,
                              "train": 5.75, "final_checkpoint": 0.75}
