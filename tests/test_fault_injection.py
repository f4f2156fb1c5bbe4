"""Fault injection: `embedtune train` killed or interrupted at every point of its life, then recovered.

Kill points (`POINTS`) cover the whole run: the base evaluation, training steps, evaluations,
checkpoint writes and seals, and every step of the finish (adapter and merged model into their
temp folders and renamed, the seal, the checkpoints discarded, the renames into place). Each is
hit with SIGKILL, SIGINT (Ctrl-C) and SIGTERM (a preemption notice), over a previous result
(`--overwrite`) or into a new folder. A case then recovers as a user would: the command the run
printed, else the same command with `--resume`; only when that says "nothing to resume" (and
nothing was checkpointed) the same command again. Every case must end with the uninterrupted
run's weights (1e-6; adapter too) and metrics, the previous result intact until the new one is
sealed, no checkpointed training trained again, no traceback, and nothing left behind
(`OUTPUT.partial`, `.OUTPUT.old-*`, temp folders, the finish marker).

Each child stops at its point through a gate (tests/interrupt_child.py) and waits there until it
has been signalled: nothing depends on timing. Children are forked from one server process that
has imported torch, transformers and embedtune once (a fresh process spends ~10 s importing on a
busy 2-core machine; a run of the tiny model ~3 s), and each runs the real CLI entry point. They
take SIGINT and SIGTERM as a command typed at a terminal does, even when whatever started the
tests ignores them (a background job of a non-interactive shell ignores SIGINT).

By default (CI) each kill point runs once, the signal and the output mode rotating across points
(`default_cases`, about a minute here). EMBEDTUNE_FAULT_MATRIX=full runs every point x signal x
mode; benchmarks/fault_injection.py runs the same matrix and prints the counts.
"""

from __future__ import annotations

import json
import os
import select
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).parent
CHILD = HERE / "interrupt_child.py"
HANG_GUARD_S = 300  # only ends a hung case; nothing waits for a duration
MATRIX_ENV = "EMBEDTUNE_FAULT_MATRIX"
FINISHED = "embedtune_finished.json"  # run_folder.FINISHED (kept here: this module imports no torch)
MARKER = "embedtune_checkpoint.json"  # resilience.MARKER

# 32 training pairs / batch 4: 8 steps, an evaluation every 2 steps (before that step's checkpoint),
# a checkpoint every 2 steps, the last two kept.
STEPS = 8
FLAGS = ["--max-steps", str(STEPS), "--batch-size", "4", "--max-seq-length", "16", "--eval-size", "8", "--evals", "4",
         "--save-every", "2", "--lr", "1e-3", "--lora-r", "4", "--seed", "7"]

# (kill point, the steps whose training must survive it: a complete checkpoint at least this far,
# or the sealed / moved result, which counts as all STEPS)
POINTS = [
    ("eval:base", 0),
    ("step:1", 0),  # before the first checkpoint: one step may be trained again
    ("eval:4", 2),
    ("checkpoint:4", 2),
    ("seal:4", 2),
    ("step:5", 4),
    ("eval:8", 6),
    ("checkpoint:8", 6),
    ("finish:adapter-temp", STEPS),
    ("finish:adapter", STEPS),
    ("finish:model-temp", STEPS),
    ("finish:before-seal", STEPS),
    ("finish:after-seal", STEPS),
    ("finish:discarding", STEPS),
    ("finish:between-renames", STEPS),
    ("finish:after-rename", STEPS),
]
# A full fine-tune without evaluation: its last checkpoint writes the run's model folder (the finish's own
# save, through save_merged's temp folder) and names its weights, so a kill in that write loses the last
# two steps like a kill in any checkpoint's write, and the finish keeps the folder.
FULL_FLAGS = ["--max-steps", str(STEPS), "--batch-size", "4", "--max-seq-length", "16", "--no-eval", "--save-every", "2",
              "--lr", "1e-3", "--full", "--seed", "7"]
FULL_POINTS = [
    ("checkpoint:8", 6),
    ("finish:model-temp", 6),  # in the last checkpoint: the model folder in its temp folder
    ("seal:8", 6),
    ("finish:before-seal", STEPS),
    ("finish:after-seal", STEPS),
]
SIGNALS = {"SIGKILL": signal.SIGKILL, "SIGINT": signal.SIGINT, "SIGTERM": signal.SIGTERM}
MODES = ("overwrite", "new")  # over a previous result with --overwrite, or into a folder that does not exist


def expected_exit(point: str, sig: str) -> int:
    """How a run signalled at `point` ends. In training (its guard set) SIGINT and SIGTERM save a checkpoint
    after the step and stop with 128 + the signal, or, at the last step, let the run finish (0). Outside
    training (the base evaluation, the finish) Ctrl-C stops it (130) and SIGTERM's default action kills it."""
    if sig == "SIGKILL":
        return -signal.SIGKILL
    kind, _, at = point.partition(":")
    if kind in ("finish",) or at == "base":
        return 130 if sig == "SIGINT" else -signal.SIGTERM
    in_flight = int(at) + 1 if kind == "step" else int(at)  # the step the signal comes during
    return 0 if in_flight >= STEPS else 128 + SIGNALS[sig]


def all_cases() -> list[tuple[str, str, str]]:
    return [(point, sig, mode) for point, _ in POINTS for sig in SIGNALS for mode in MODES]


def default_cases() -> list[tuple[str, str, str]]:
    """Each kill point once, the signal rotating across points and the mode every third point, so each
    signal meets both modes (finish:between-renames falls on --overwrite, where the previous result is
    set aside between the two renames)."""
    return [(point, list(SIGNALS)[i % 3], MODES[(i // 3) % 2]) for i, (point, _) in enumerate(POINTS)]


# ----------------------------------------------------------------------------------- the fork server


class Server:
    """tests/interrupt_child.py's fork server: one process that imports the run's modules once and
    forks a child per command (the CLI's `main`, run as `python -m embedtune` would)."""

    def __init__(self, log: Path):
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHILD_")}
        env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                   PYTHONUNBUFFERED="1", MPLBACKEND="Agg")
        self.log = log
        self.proc = subprocess.Popen([sys.executable, str(CHILD), "serve"], env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=open(log, "wb"), bufsize=0)
        self._buffer = b""
        self.pid: int | None = None  # the running child
        line = self._line(HANG_GUARD_S)
        if not line.startswith("ready"):
            raise RuntimeError(f"the fork server did not start: {line!r}\n{log.read_text()[-3000:]}")

    def _line(self, timeout: float) -> str | None:
        """The server's next line, or None after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError(f"the fork server ended:\n{self.log.read_text()[-3000:]}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    def start(self, argv: list[str], folder: Path, env: dict | None = None, warm: Path | None = None) -> int:
        folder.mkdir(parents=True, exist_ok=True)
        request = {"argv": argv, "env": env or {}, "stdout": str(folder / "stdout.txt"),
                   "stderr": str(folder / "stderr.txt")}
        if warm is not None:
            request["warm"] = str(warm)
        self.proc.stdin.write((json.dumps(request) + "\n").encode())
        self.proc.stdin.flush()
        line = self._line(HANG_GUARD_S)
        if not line or not line.startswith("started "):
            raise RuntimeError(f"the fork server answered {line!r}")
        self.pid = int(line.split()[1])
        return self.pid

    def poll(self, timeout: float = 0.0) -> int | None:
        """The child's return code once it has exited (negative: the signal that killed it)."""
        line = self._line(timeout)
        if line is None:
            return None
        kind, pid, code = line.split()
        assert kind == "exited" and int(pid) == self.pid, line
        self.pid = None
        return int(code)

    def wait(self) -> int:
        code = self.poll(HANG_GUARD_S)
        if code is None:
            os.kill(self.pid, signal.SIGKILL)
            raise RuntimeError(f"child {self.pid} ran past {HANG_GUARD_S} s")
        return code

    def run(self, argv: list[str], folder: Path, warm: Path | None = None) -> "Ran":
        self.start(argv, folder, warm=warm)
        return Ran(self.wait(), folder)

    def close(self) -> None:
        if self.pid is not None:  # a case that failed with its child still at the gate
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.poll(HANG_GUARD_S)
        self.proc.stdin.close()
        self.proc.kill()  # no child of it is running; its interpreter's teardown would take seconds
        self.proc.wait()


@dataclass
class Ran:
    code: int
    folder: Path

    @property
    def stdout(self) -> str:
        return (self.folder / "stdout.txt").read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return (self.folder / "stderr.txt").read_text(errors="replace")


# ----------------------------------------------------------------------------------- the setting


@dataclass
class Setting:
    """What every case shares: the server, the data, the tiny model, the uninterrupted run's result
    and a previous result for --overwrite cases."""

    server: Server
    root: Path
    pairs: Path
    model: Path
    reference: Path
    previous: Path
    flags: list[str] = field(default_factory=lambda: list(FLAGS))
    kept: dict[str, int] = field(default_factory=lambda: dict(POINTS))  # kill point -> steps that must survive
    artifacts: tuple[str, ...] = ("model/model.safetensors", "adapter/adapter_model.safetensors")

    def command(self, out: Path, overwrite: bool) -> list[str]:
        return ["train", str(self.pairs), "--output", str(out), "--model", str(self.model), *self.flags,
                *(["--overwrite"] if overwrite else [])]


def make_setting(root: Path, flags: list[str] = FLAGS, points: list[tuple[str, int]] = POINTS,
                 artifacts: tuple[str, ...] = Setting.artifacts) -> Setting:
    """Start the server, build the tiny model and data, and run the uninterrupted reference (it also
    tells the server what a run imports)."""
    root.mkdir(parents=True, exist_ok=True)
    rows = [{"anchor": f"question {i} about topic {i % 7}", "positive": f"answer {i} with detail {i * 3}"}
            for i in range(40)]
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(row) + "\n" for row in rows))
    server = Server(root / "server.log")
    try:
        built = server.run(["tiny", "bert", str(root / "tiny")], root / "tiny-log")  # torch stays out of pytest
        if built.code != 0:
            raise RuntimeError(f"the tiny model was not built ({built.code}):\n{built.stderr[-4000:]}")
        reference = root / "reference"
        setting = Setting(server, root, pairs, root / "tiny" / "bert", reference, root / "previous", list(flags),
                          dict(points), artifacts)
        done = server.run(setting.command(reference, overwrite=False), root / "reference-log",
                          warm=root / "warm.txt")
        if done.code != 0:
            raise RuntimeError(f"the reference run failed ({done.code}):\n{done.stderr[-4000:]}")
        # a previous result: the reference's folder with other model weights (a different run's)
        shutil.copytree(reference, setting.previous)
        weights = _load(setting.previous / "model" / "model.safetensors")
        from safetensors.numpy import save_file

        save_file({k: v + 1 for k, v in weights.items()}, str(setting.previous / "model" / "model.safetensors"))
        return setting
    except BaseException:
        server.close()
        raise


# ----------------------------------------------------------------------------------- one case


def _load(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path))


def _max_diff(a: Path, b: Path) -> float:
    left, right = _load(a), _load(b)
    if left.keys() != right.keys():
        return float("inf")
    return max(float(np.abs(left[k].astype(np.float64) - right[k].astype(np.float64)).max()) for k in left)


def _same_file(a: Path, b: Path) -> bool:
    return a.is_file() and b.is_file() and a.read_bytes() == b.read_bytes()


def _latest_checkpoint(checkpoints: Path) -> int:
    """The newest complete checkpoint's step (0: none): its marker names its step and lists files that
    are all there, at their sizes (what resilience.is_complete checks; that module imports torch)."""
    steps = [0]
    for folder in checkpoints.glob("checkpoint-*"):
        try:
            marker = json.loads((folder / MARKER).read_text())
            step = int(folder.name.split("-", 1)[1])
        except (OSError, ValueError):
            continue
        files = marker.get("files") or {}
        if marker.get("step") == step and files and all(
                (folder / name).is_file() and (folder / name).stat().st_size == size for name, size in files.items()):
            steps.append(step)
    return max(steps)


@dataclass
class CaseResult:
    point: str
    signal: str
    mode: str
    exit_code: int | None = None
    state: str = ""  # what the kill left: "checkpoint N", "sealed", "in place", "nothing"
    recovery: list[str] = field(default_factory=list)  # the commands that recovered it
    problems: list[str] = field(default_factory=list)
    lost: bool = False  # the new result missing or wrong, the previous result gone, or checkpointed steps lost
    seconds: float = 0.0

    def problem(self, text: str, lost: bool = False) -> None:
        self.problems.append(text)
        self.lost = self.lost or lost

    def describe(self) -> str:
        head = f"{self.point} x {self.signal} ({self.mode}): exit {self.exit_code}, left {self.state or '?'}"
        return head + (", recovered by " + " then ".join(self.recovery) if self.recovery else "") + \
            ("".join(f"\n  - {p}" for p in self.problems))


def run_case(setting: Setting, point: str, sig: str, mode: str, folder: Path) -> CaseResult:
    """Kill or interrupt a run at `point` with `sig`, recover it, and check the result."""
    started = time.monotonic()
    result = CaseResult(point, sig, mode)
    try:
        _run_case(setting, point, sig, mode, folder, result)
    except Exception as exc:  # a hung or failed step: the case is lost
        result.problem(f"{type(exc).__name__}: {exc}", lost=True)
    result.seconds = round(time.monotonic() - started, 1)
    return result


def _run_case(setting: Setting, point: str, sig: str, mode: str, folder: Path, result: CaseResult) -> None:
    from embedtune.run_folder import work_folder

    kept = setting.kept[point]
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    out = folder / "out"
    overwrite = mode == "overwrite"
    previous_weights = setting.previous / "model" / "model.safetensors"
    if overwrite:
        shutil.copytree(setting.previous, out)
    command = setting.command(out, overwrite)
    server = setting.server
    gate = folder / "gate"
    gate.mkdir()
    server.start(command, folder / "child", env={"CHILD_GATE_DIR": str(gate), "CHILD_BLOCK_AT": point})
    deadline = time.monotonic() + HANG_GUARD_S
    while not (gate / "reached").exists():
        code = server.poll(0.05)
        if code is not None:
            child = Ran(code, folder / "child")
            raise RuntimeError(f"the child exited with {code} before its gate:\n{child.stderr[-3000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError("the child never reached its gate")
    pid = server.pid
    os.kill(pid, SIGNALS[sig])
    if sig != "SIGKILL":
        (gate / "release").write_text("")  # the handler (or the default action) runs as the child goes on
    child = Ran(server.wait(), folder / "child")
    result.exit_code = child.code
    if child.code != expected_exit(point, sig):
        result.problem(f"exit code {child.code}, expected {expected_exit(point, sig)}:\n{child.stderr[-3000:]}")
    if child.code >= 0 and "Traceback" in child.stderr:
        result.problem(f"a traceback after {sig}:\n{child.stderr[-3000:]}")

    # what the kill left
    work = work_folder(out)
    in_place = (out / "model" / "model.safetensors").is_file() and \
        _max_diff(out / "model" / "model.safetensors", setting.reference / "model" / "model.safetensors") <= 1e-6
    sealed = (work / FINISHED).is_file()
    checkpoint = _latest_checkpoint(work / "checkpoints")
    result.state = "in place" if in_place else "sealed" if sealed else f"checkpoint {checkpoint}" if checkpoint \
        else "nothing"
    survived = STEPS if in_place or sealed else checkpoint
    if survived < kept:
        result.problem(f"only {survived} trained steps survived the kill at {point}, expected {kept}", lost=True)
    if overwrite and not in_place:  # until the new result is in place, the previous one is there or set aside
        candidates = [out, *folder.glob(".out.old-*")]
        if not any(_same_file(c / "model" / "model.safetensors", previous_weights) for c in candidates):
            result.problem("the previous result is gone before the new one was in place", lost=True)
    sealed_metrics = (work / "metrics.json").read_text() if sealed else None

    # recovery: the printed command, else the same command with --resume; a rerun only if there is nothing
    printed = [line for line in child.stderr.splitlines() if line.startswith("embedtune train ")]
    if child.code in (130, 143) and (checkpoint or sealed) and not printed:
        result.problem("stopped with a checkpoint or a sealed result on disk, but no command to continue it was printed")
    if child.code != 0:
        resume = shlex.split(printed[-1])[1:] if printed else [*command, "--resume"]
        if resume != [*command, "--resume"]:
            result.problem(f"the printed command {printed[-1]!r} is not the run's command with --resume")
        result.recovery.append("--resume" if not printed else "the printed command")
        done = server.run(resume, folder / "resume")
        if "Traceback" in done.stderr:
            result.problem(f"a traceback in the recovery:\n{done.stderr[-3000:]}")
        if done.code != 0:
            text = " ".join(done.stderr.split())
            if done.code != 1 or "nothing to resume" not in text:
                result.problem(f"--resume failed ({done.code}):\n{done.stderr[-3000:]}", lost=not in_place)
            elif survived and not in_place:
                result.problem(f"'nothing to resume' with {result.state} on disk: {text[-500:]}", lost=True)
            elif not in_place:
                result.recovery.append("a rerun")
                again = server.run(command, folder / "rerun")
                if again.code != 0 or "Traceback" in again.stderr:
                    result.problem(f"the rerun failed ({again.code}):\n{again.stderr[-3000:]}", lost=True)
        elif not in_place and not sealed and checkpoint:
            resumed = json.loads((out / "metrics.json").read_text()).get("resumed_from_step")
            if resumed != checkpoint:
                result.problem(f"resumed from step {resumed}, not from the checkpoint of step {checkpoint}",
                               lost=True)
        if sealed and (out / "metrics.json").is_file() and (out / "metrics.json").read_text() != sealed_metrics:
            result.problem("a sealed result was trained again instead of moved into place")

    # the end: the uninterrupted run's result, and nothing left behind
    for name in setting.artifacts:
        mine, reference = out / name, setting.reference / name
        if not mine.is_file():
            result.problem(f"no {name} after the recovery", lost=True)
            continue
        diff = _max_diff(mine, reference)
        if diff > 1e-6:
            result.problem(f"{name} differs from the uninterrupted run's by {diff:.3g}", lost=True)
    if (out / "metrics.json").is_file():
        metrics = json.loads((out / "metrics.json").read_text())
        reference = json.loads((setting.reference / "metrics.json").read_text())
        for key in ("steps", "best_step", "final"):
            if metrics.get(key) != reference.get(key):
                result.problem(f"metrics {key}: {metrics.get(key)!r}, uninterrupted: {reference.get(key)!r}",
                               lost=True)
    else:
        result.problem("no metrics.json after the recovery", lost=True)
    left = sorted(p.name for p in folder.iterdir() if p.name.startswith(".out") or p.name == "out.partial")
    if out.is_dir():  # hidden temp folders, the finish marker, checkpoints
        left += sorted(f"out/{p.name}" for p in out.iterdir()
                       if p.name.startswith(".") or p.name in (FINISHED, "checkpoints"))
    if left:
        result.problem(f"left behind after the recovery: {', '.join(left)}")


# ----------------------------------------------------------------------------------- the tests


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    made = make_setting(tmp_path_factory.mktemp("fault"))
    yield made
    made.server.close()


def _cases() -> list[tuple[str, str, str]]:
    return all_cases() if os.environ.get(MATRIX_ENV) == "full" else default_cases()


def test_the_default_slice_covers_every_kill_point_and_signal():
    cases = default_cases()
    assert [point for point, _, _ in cases] == [point for point, _ in POINTS]
    assert {sig for _, sig, _ in cases} == set(SIGNALS) and {mode for _, _, mode in cases} == set(MODES)
    assert {(sig, mode) for _, sig, mode in cases} == {(s, m) for s in SIGNALS for m in MODES}
    assert ("finish:between-renames", "SIGTERM", "overwrite") in cases
    # the kill just after the last rename, into a new folder: the case that found the finish marker left in
    # the output, and --resume answered "folder exists and is not empty; pass --overwrite" (run_folder.py)
    assert ("finish:after-rename", "SIGKILL", "new") in cases


def test_the_children_take_ctrl_c_as_from_a_terminal():
    """Launched with SIGINT and SIGTERM ignored (a background job of a non-interactive shell ignores
    SIGINT, and a process keeps what it inherits ignored), the child still handles them as a command
    typed at a terminal does; else Ctrl-C in the base evaluation or the finish would be ignored and
    the run would finish (exit 0, not 130)."""

    def ignore() -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    shown = subprocess.run([sys.executable, str(CHILD), "signals"], preexec_fn=ignore, capture_output=True,
                           text=True, timeout=HANG_GUARD_S)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.split() == ["default_int_handler", "SIG_DFL"]


@pytest.mark.parametrize("point,sig,mode", _cases(), ids=lambda value: str(value).replace(":", "-"))
def test_killed_run_recovers_to_the_uninterrupted_result(setting, point, sig, mode, tmp_path):
    result = run_case(setting, point, sig, mode, tmp_path / "case")
    assert not result.problems, result.describe()


@pytest.fixture(scope="module")
def full_setting(tmp_path_factory):
    made = make_setting(tmp_path_factory.mktemp("fault-full"), FULL_FLAGS, FULL_POINTS, ("model/model.safetensors",))
    yield made
    made.server.close()


@pytest.mark.parametrize("point,mode", [(point, MODES[i % 2]) for i, (point, _) in enumerate(FULL_POINTS)],
                         ids=lambda value: str(value).replace(":", "-"))
def test_a_full_fine_tune_killed_around_its_last_checkpoint_recovers(full_setting, point, mode, tmp_path):
    """SIGKILL around the last checkpoint that writes the model folder (a kill there in the finish proper
    is the LoRA matrix's): the recovery ends with the uninterrupted run's weights, nothing left behind."""
    result = run_case(full_setting, point, "SIGKILL", mode, tmp_path / "case")
    assert not result.problems, result.describe()
