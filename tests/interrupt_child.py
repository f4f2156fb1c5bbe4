"""A child process that tests kill or interrupt at a known point, never at a guessed time.

    python interrupt_child.py train ARGS...   runs `embedtune train ARGS...` (the real CLI)
    python interrupt_child.py save TARGET     saves a tiny merged model over the folder TARGET
    python interrupt_child.py tiny ARCH ROOT  builds tests/tiny_models' tiny ARCH model in ROOT/ARCH
    python interrupt_child.py serve           a fork server for many such children (see `serve`)
    python interrupt_child.py signals         prints how SIGINT and SIGTERM are handled (`_as_from_a_terminal`)

The gate, set by environment variables, makes the child stop and wait at one point:
  CHILD_GATE_DIR   folder where the child writes `reached` when it gets there, and waits
                   until the test writes `release` (or kills it)
  CHILD_BLOCK_AT   train: one of `TRAIN_GATES` (below), e.g. `step:5` or `finish:after-seal`
                   save:  `weights` = once the model is written into the temp folder, before the rename
  CHILD_TINY_MODEL save: the tiny model folder to build the saved model from

Each gate wraps a real function boundary of the run from outside (nothing in embedtune knows about
it), and holds the first time the run gets there. The finish gates follow `train._finish_output`,
`run_folder.complete_finish` and `save.replace_folder` step by step.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

# name -> where the child stops (N: a step number)
TRAIN_GATES = {
    "eval:base": "in the base model's evaluation, before training (nothing written yet)",
    "step:N": "in training step N+1 (before its forward), after the checkpoints up to step N",
    "eval:N": "in the evaluator call at step N (before that step's checkpoint)",
    "checkpoint:N": "in the middle of writing checkpoint N (weights, optimizer and scheduler written; RNG state, "
                    "trainer state and marker not)",
    "seal:N": "checkpoint N fully written (older ones rotated out), its marker not yet written",
    "finish:adapter-temp": "the adapter written into its temp folder, before its rename",
    "finish:adapter": "the adapter in place in the work folder, the merged model not yet written",
    "finish:model-temp": "the merged model written into its temp folder, before its rename",
    "finish:before-seal": "every artifact written into the work folder, before the seal",
    "finish:after-seal": "sealed, checkpoints still there, before the move into place",
    "finish:discarding": "sealed, the checkpoints renamed aside and about to be deleted",
    "finish:between-renames": "the previous result set aside (if any), the new one not yet renamed into place",
    "finish:after-rename": "the new result in place, its marker and the set-aside previous result not yet removed",
}


def _wait_at_gate() -> None:
    gate = Path(os.environ["CHILD_GATE_DIR"])
    (gate / "reached").write_text(str(os.getpid()))
    while not (gate / "release").exists():
        time.sleep(0.02)


def _install_train_gate(where: str) -> None:
    import transformers

    kind, _, at = where.partition(":")
    done = []

    def once() -> bool:
        if done:
            return False
        done.append(True)
        return True

    if kind == "step":
        step = int(at)
        original_step = transformers.Trainer.training_step

        def training_step(self, *args, **kwargs):
            if self.state.global_step == step and once():
                _wait_at_gate()
            return original_step(self, *args, **kwargs)

        transformers.Trainer.training_step = training_step
    elif kind == "checkpoint":
        step = int(at)
        original_rng = transformers.Trainer._save_rng_state

        def _save_rng_state(self, output_dir):
            if self.state.global_step == step and once():
                _wait_at_gate()
            return original_rng(self, output_dir)

        transformers.Trainer._save_rng_state = _save_rng_state
    elif kind == "eval":
        _install_eval_gate(at, once)
    elif kind == "seal":
        import importlib

        checkpoint_format = importlib.import_module("embedtune.checkpoint_format")
        step = int(at)
        original_write = checkpoint_format.write_json_atomic

        def write_json_atomic(path, data):  # seal_checkpoint writes the marker last, through this
            if (Path(path).name == checkpoint_format.MARKER
                    and checkpoint_format.checkpoint_step(Path(path).parent) == step and once()):
                _wait_at_gate()
            return original_write(path, data)

        checkpoint_format.write_json_atomic = write_json_atomic
    elif kind == "finish":
        _install_finish_gate(at, once)
    else:
        raise SystemExit(f"unknown CHILD_BLOCK_AT {where!r}")


def _install_eval_gate(at: str, once) -> None:
    import importlib

    import transformers

    evaluate = importlib.import_module("embedtune.evaluate")

    if at == "base":  # the recipe's own call, before the trainer exists (`run_eval` scores the base model)
        run_eval = importlib.import_module("embedtune.run_eval")
        original_base = run_eval.RunEvaluation.plan_and_score_base

        def base_evaluation(*args, **kwargs):
            if once():
                _wait_at_gate()
            return original_base(*args, **kwargs)

        run_eval.RunEvaluation.plan_and_score_base = base_evaluation
        return
    step = int(at)
    evaluating_at = []  # the trainer's step while it evaluates
    original_evaluate = transformers.Trainer._evaluate

    def _evaluate(self, *args, **kwargs):
        evaluating_at.append(self.state.global_step)
        try:
            return original_evaluate(self, *args, **kwargs)
        finally:
            evaluating_at.pop()

    original_model = evaluate.evaluate_model  # what the training-time evaluator calls

    def evaluate_model(*args, **kwargs):
        if evaluating_at and evaluating_at[-1] == step and once():
            _wait_at_gate()
        return original_model(*args, **kwargs)

    transformers.Trainer._evaluate = _evaluate
    evaluate.evaluate_model = evaluate_model


def _install_finish_gate(at: str, once) -> None:
    import importlib
    import shutil

    from sentence_transformers import SentenceTransformer

    save = importlib.import_module("embedtune.save")
    recipe = importlib.import_module("embedtune.train")  # (the package's `train` is the function)

    def after(module, name: str):  # the gate once `module.name` has returned
        original = getattr(module, name)

        def wrapped(*args, **kwargs):
            result = original(*args, **kwargs)
            if once():
                _wait_at_gate()
            return result

        setattr(module, name, wrapped)

    def before(module, name: str):  # the gate before `module.name` runs
        original = getattr(module, name)

        def wrapped(*args, **kwargs):
            if once():
                _wait_at_gate()
            return original(*args, **kwargs)

        setattr(module, name, wrapped)

    if at == "adapter-temp":
        after(save, "write_adapter_pipeline")  # save_adapter's last write into its temp folder
    elif at == "adapter":
        after(recipe, "save_adapter")
    elif at == "model-temp":
        original_st_save = SentenceTransformer.save

        def st_save(self, path, *args, **kwargs):  # save_merged writes into its temp folder here
            result = original_st_save(self, path, *args, **kwargs)
            if Path(path).name.startswith(".model.tmp-") and once():
                _wait_at_gate()
            return result

        SentenceTransformer.save = st_save
    elif at == "before-seal":
        before(recipe, "seal_finished")
    elif at == "after-seal":
        before(recipe, "complete_finish")
    elif at == "discarding":
        original_rmtree = shutil.rmtree

        def rmtree(path, *args, **kwargs):  # run_folder.discard_checkpoints: renamed aside, then deleted
            if Path(path).name.startswith(".checkpoints-discarded-") and once():
                _wait_at_gate()
            return original_rmtree(path, *args, **kwargs)

        shutil.rmtree = rmtree
    elif at in ("between-renames", "after-rename"):
        original_replace = os.replace

        def replace(src, dst, *args, **kwargs):  # save.replace_folder's second rename: work folder -> output
            moving = Path(src).name.endswith(".partial")
            if moving and at == "between-renames" and once():
                _wait_at_gate()
            result = original_replace(src, dst, *args, **kwargs)
            if moving and at == "after-rename" and once():
                _wait_at_gate()
            return result

        os.replace = replace
    else:
        raise SystemExit(f"unknown CHILD_BLOCK_AT finish:{at!r}")


def _save(target: str) -> None:
    import torch
    from sentence_transformers import SentenceTransformer

    from embedtune import FastModel, save_merged, to_sentence_transformer

    if os.environ.get("CHILD_BLOCK_AT") == "weights":
        original = SentenceTransformer.save

        def save(self, path, *args, **kwargs):  # save_merged writes into its temp folder here
            result = original(self, path, *args, **kwargs)
            _wait_at_gate()
            return result

        SentenceTransformer.save = save
    torch.manual_seed(1)
    model, tokenizer = FastModel.from_pretrained(os.environ["CHILD_TINY_MODEL"], max_seq_length=32)
    model = FastModel.get_peft_model(model, r=4)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)  # a model that differs from the one already in TARGET
    save_merged(to_sentence_transformer(model, tokenizer), target, overwrite=True)


def _run_cli(command: str, args: list[str]) -> None:
    if os.environ.get("CHILD_BLOCK_AT"):
        _install_train_gate(os.environ["CHILD_BLOCK_AT"])
    from embedtune.cli import main as cli_main

    sys.argv = ["embedtune", command, *args]
    cli_main()


# ----------------------------------------------------------------------------------- fork server

# What a training run imports: loaded once by the server, so each forked child starts at the CLI.
PRELOAD = ["torch", "transformers", "sentence_transformers", "peft", "datasets", "safetensors.torch",
           "matplotlib", "matplotlib.pyplot", "embedtune.cli", "embedtune.train", "embedtune.resilience",
           "embedtune.run_folder", "embedtune.save", "embedtune.plots", "embedtune.evaluate", "embedtune.retrieval",
           "embedtune.lora", "embedtune.losses", "embedtune.st", "embedtune.model_card", "embedtune.monitoring",
           "embedtune.speed", "embedtune.data", "embedtune.data.token_cache", "embedtune.data.sampler",
           "embedtune.loading", "embedtune.config_file", "embedtune.report", "embedtune.export"]


def _threads() -> int:
    """This process's threads, jemalloc's background purger left out: pyarrow (under datasets) starts
    it at import, and jemalloc takes its own locks across a fork (pthread_atfork), so it is harmless."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        import threading

        return threading.active_count()
    names = []
    for task in tasks:
        try:
            names.append(Path(f"/proc/self/task/{task}/comm").read_text().strip())
        except OSError:
            names.append("?")
    return sum(name != "jemalloc_bg_thd" for name in names)


def _child_main(request: dict) -> None:
    """In the forked child: the request's environment, output files and command; never returns."""
    import atexit
    import traceback

    code = 1
    try:
        for key in [k for k in os.environ if k.startswith("CHILD_")]:
            del os.environ[key]
        os.environ.update(request.get("env") or {})
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        for fd, name in ((1, "stdout"), (2, "stderr")):
            handle = os.open(request[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(handle, fd)
            os.close(handle)
        command, *args = request["argv"]
        try:
            _dispatch(command, args)
            code = 0
        except SystemExit as stop:  # what `python -m embedtune` would exit with
            if stop.code is None or isinstance(stop.code, int):
                code = stop.code or 0
            else:
                print(stop.code, file=sys.stderr)
                code = 1
        except BaseException:
            traceback.print_exc()
            code = 1
        atexit._run_exitfuncs()
        if request.get("warm"):  # what this run imported beyond the server's preload, for the server to load
            Path(request["warm"]).write_text("\n".join(sorted(set(sys.modules) - request["_loaded"])))
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


def serve() -> None:
    """A fork server: imports what a run needs once (about 10 s on a busy 2-core machine), then for
    each JSON request on stdin ({"argv": [...], "env": {...}, "stdout": path, "stderr": path}) forks
    a child that runs the request's command as this file would, and answers on stdout
    `started PID`, then `exited PID RETURNCODE` (negative: killed by that signal, as Popen says).
    With "warm": path, the child lists there the modules its run imported, and the server imports
    them before answering, so later children find them loaded.
    The test signals the child by its pid. One child at a time; EOF on stdin ends the server.

    Forking is safe because the server never runs torch or a tokenizer: it imports only, and it
    checks that it has one thread before each fork."""
    import importlib
    import json

    os.environ.setdefault("MPLBACKEND", "Agg")
    for name in PRELOAD:
        importlib.import_module(name)
    import torch

    torch.set_num_threads(1)
    print(f"ready {os.getpid()}", flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        if _threads() != 1:
            print(f"error the server has {_threads()} threads; it would not fork safely", flush=True)
            continue
        request["_loaded"] = set(sys.modules)
        pid = os.fork()
        if pid == 0:
            _child_main(request)
        print(f"started {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        if request.get("warm"):
            _preload(Path(request["warm"]).read_text().split())
        print(f"exited {pid} {os.waitstatus_to_exitcode(status)}", flush=True)


def _preload(names) -> None:
    """Import modules, skipping any that fail (a few only import in a certain order or context)."""
    import importlib

    for name in names:
        if name.startswith("__") or name in sys.modules:
            continue
        try:
            importlib.import_module(name)
        except BaseException:
            pass


def _tiny(arch: str, root: str) -> None:
    from tiny_models import make_tiny_model  # tests/, this file's folder

    print(make_tiny_model(arch, Path(root)))


def _as_from_a_terminal() -> None:
    """SIGINT and SIGTERM handled as in a command typed at a terminal: Ctrl-C raises KeyboardInterrupt,
    SIGTERM takes its default action. A process inherits ignored signals, and Python keeps an inherited
    SIG_IGN for SIGINT instead of installing its KeyboardInterrupt handler: under a launcher that ignores
    SIGINT (a background job of a non-interactive shell, `pytest ... &` in a script) the run would ignore
    the tests' Ctrl-C wherever embedtune keeps the disposition it started with (outside training: the
    base evaluation and the finish), finish, and exit 0 instead of 130."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _signals() -> None:
    def name(handler) -> str:
        return getattr(handler, "__name__", None) or signal.Handlers(handler).name

    print(name(signal.getsignal(signal.SIGINT)), name(signal.getsignal(signal.SIGTERM)))


def _dispatch(command: str, args: list[str]) -> None:
    """One child command: save, tiny, signals, or the CLI's (train ...)."""
    if command == "save":
        _save(args[0])
    elif command == "tiny":
        _tiny(*args)
    elif command == "signals":
        _signals()
    else:
        _run_cli(command, args)


def main() -> None:
    _as_from_a_terminal()  # the fork server's children inherit it
    command, *args = sys.argv[1:]
    if command == "serve":
        serve()
    else:
        _dispatch(command, args)


if __name__ == "__main__":
    main()
