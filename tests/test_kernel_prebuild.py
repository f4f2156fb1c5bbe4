"""The fused norm kernels built ahead of a run in a child process (`embedtune.kernel_prebuild`,
`embedtune.kernels.prebuild`): when the child starts, that the speed choice waits for it only where
the kernels would pay on a warm cache, and what it decides when the build is there or is not. The
variants the child builds are checked against a training step's in tests/fused_norm_cases.py."""

from __future__ import annotations

import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from embedtune import kernel_prebuild, speed

_real_spare_cpu = kernel_prebuild._spare_cpu  # the fixture below replaces it
from embedtune.speed_choice import choose_speed
from tiny_models import make_tiny_model


@pytest.fixture
def gpu_visible(monkeypatch):
    monkeypatch.setattr(kernel_prebuild, "_gpu_visible", lambda: True)
    monkeypatch.setattr(kernel_prebuild, "_spare_cpu", lambda: True)
    monkeypatch.setattr(kernel_prebuild, "_started", {})
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    started = []

    class FakePopen:
        def __init__(self, argv, **kwargs):
            started.append(argv)
            assert kwargs["stdout"] is subprocess.DEVNULL and kwargs["stderr"] is subprocess.DEVNULL

    monkeypatch.setattr(kernel_prebuild.subprocess, "Popen", FakePopen)
    return started


def test_starts_one_child_per_model_and_dtype_where_the_run_could_use_the_kernels(gpu_visible, monkeypatch):
    pytest.importorskip("triton")
    first = kernel_prebuild.start("m", kernel_prebuild.weights_for(False, None))
    assert first is not None
    assert gpu_visible == [[sys.executable, "-m", "embedtune.kernels.prebuild", "m", "--weights", "fp32"]]
    assert kernel_prebuild.start("m", "fp32") is first  # the run picks up the CLI's child
    kernel_prebuild.start("m", kernel_prebuild.weights_for(True, None))  # LoRA: bf16 LayerNorms
    assert gpu_visible[-1][-1] == "bf16" and len(gpu_visible) == 2
    # settings under which the run cannot use the kernels start nothing
    assert kernel_prebuild.start("n", "fp32", compile=True) is None
    assert kernel_prebuild.start("n", "fp32", cuda_graphs=False) is None
    assert kernel_prebuild.start("n", "fp32", fused_kernels=False) is None
    assert kernel_prebuild.start("n", "fp32", fast=False) is None
    assert kernel_prebuild.start("n", kernel_prebuild.weights_for(True, "fp16")) is None
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert kernel_prebuild.start("n", "fp32") is None
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setattr(kernel_prebuild.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    monkeypatch.setattr(kernel_prebuild, "_spare_cpu", _real_spare_cpu)
    assert kernel_prebuild.start("n", "fp32") is None  # one CPU: the build would slow the run's start
    assert len(gpu_visible) == 2


def test_nothing_starts_without_a_gpu(monkeypatch):
    monkeypatch.setattr(kernel_prebuild, "_started", {})
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert kernel_prebuild.start("m", "fp32") is None


def test_the_child_exits_quietly_where_there_is_nothing_to_build(tmp_path):
    """On this CPU machine: no CUDA device, so nothing is built; exit 0 and no output."""
    folder = make_tiny_model("bert", tmp_path)
    done = subprocess.run([sys.executable, "-m", "embedtune.kernels.prebuild", str(folder)], capture_output=True,
                          text=True, timeout=300)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


def test_the_child_names_the_families_whose_layers_call_the_fused_norm():
    from embedtune.kernels.prebuild import FUSED_NORM_TYPES
    from embedtune.packing import PACKED_FORWARDS
    from embedtune.packing.bert import packed_bert_forward

    assert FUSED_NORM_TYPES == {t for t, fn in PACKED_FORWARDS.items() if fn is packed_bert_forward}


def test_the_child_reads_width_and_family_from_the_config(tmp_path):
    from embedtune.kernels.prebuild import fused_width, read_config
    from embedtune.model_facts import DEFAULT_MODEL_ID

    assert fused_width(read_config(DEFAULT_MODEL_ID)) == 384  # the bundled MiniLM
    config = read_config(str(make_tiny_model("bert", tmp_path)))
    assert fused_width(config) == config["hidden_size"]
    assert fused_width({**config, "model_type": "modernbert"}) is None  # its layers have no fused norm
    assert read_config(str(tmp_path / "missing")) is None


class FakeBuild:
    """A child that, once waited for, has (or has not) left the kernels in Triton's cache."""

    def __init__(self, succeeds: bool, age_s: float = 60.0):
        self.succeeds, self.waits = succeeds, []
        self.started = time.monotonic() - age_s  # started long enough ago to be expected done
        self.process = SimpleNamespace(poll=lambda: None if not self.waits else 0 if succeeds else 1)

    def running(self):
        return self.process.poll() is None

    def wait(self, seconds):
        from embedtune.kernels.fused_norm import kernels_fingerprint

        self.waits.append(seconds)
        if self.succeeds:
            speed.mark_fused_kernels_built(kernels_fingerprint())
        return self.succeeds


@pytest.fixture
def bert_on_a_fake_gpu(tmp_path, monkeypatch):
    """A packed tiny BERT, with the speed choice made to believe it runs on a CUDA card."""
    pytest.importorskip("triton")
    from embedtune import FastModel
    from embedtune.kernels import fused_norm

    model, _ = FastModel.from_pretrained(str(make_tiny_model("bert", tmp_path)), max_seq_length=32)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "fake")
    monkeypatch.setattr(speed, "step_seconds", lambda *a: 0.05)
    fused_norm.kernels_fingerprint.cache_clear()
    yield model
    fused_norm.kernels_fingerprint.cache_clear()


def _config(**kw):
    return SimpleNamespace(**{"fast": True, "compile": False, "cuda_graphs": True, "fused_kernels": None, "batch_size": 8,
                              **kw})


def test_waits_for_the_child_where_the_kernels_pay_on_a_warm_cache(bert_on_a_fake_gpu):
    # between the break-even of a warm and of a cold cache: only the build ahead makes them pay
    steps = int((speed.FUSED_NORM_WARM_S + speed.FUSED_NORM_COLD_S) / 2 / (speed.FUSED_NORM_GAIN * 0.05))
    assert not choose_speed(_config(), bert_on_a_fake_gpu, 100.0, steps)[0].fused_kernels  # no child: cold
    build = FakeBuild(succeeds=True)
    mode = choose_speed(_config(), bert_on_a_fake_gpu, 100.0, steps, prebuild=build)[0]
    # at most what the kernels save over the run less a warm load: going without them is the alternative
    assert build.waits == [pytest.approx(speed.FUSED_NORM_GAIN * 0.05 * steps - speed.FUSED_NORM_WARM_S)]
    assert mode.fused_kernels and "built ahead" in mode.why and "warm cache" in mode.why
    assert choose_speed(_config(), bert_on_a_fake_gpu, 100.0, steps, prebuild=FakeBuild(True))[0].fused_kernels


def test_waits_while_the_child_runs_even_once_its_first_kernel_marked_the_cache(bert_on_a_fake_gpu):
    from embedtune.kernels.fused_norm import kernels_fingerprint

    speed.mark_fused_kernels_built(kernels_fingerprint())  # the child's first kernel is built; the rest may not be
    build = FakeBuild(succeeds=True)
    assert choose_speed(_config(), bert_on_a_fake_gpu, 100.0, 10**4, prebuild=build)[0].fused_kernels
    assert len(build.waits) == 1
    done = FakeBuild(succeeds=True)
    done.waits.append(0.0)  # ended before the choice: nothing to wait for
    mode = choose_speed(_config(), bert_on_a_fake_gpu, 100.0, 10**4, prebuild=done)[0]
    assert done.waits == [0.0] and "built ahead in a child process, no wait" in mode.why


def test_the_wait_is_bounded_by_what_it_can_pay(bert_on_a_fake_gpu):
    """A short run waits at most what the kernels would save it (less a warm load), so a child due
    later than that is not waited for: the run goes without them; a run long enough to build them
    itself on a cold cache, or one asked to use them, waits up to a cold build's cost."""
    gain = speed.FUSED_NORM_GAIN * 0.05  # seconds saved a step (the fixture's step time)
    short = int((speed.FUSED_NORM_WARM_S + 0.2) / gain)  # saves 0.2 s net on a warm cache
    assert speed.prebuild_wait_s(fused_kernels=None, steps=short, step_s=0.05) == pytest.approx(short * gain - 0.3)
    late = FakeBuild(succeeds=True, age_s=speed.FUSED_PREBUILD_S - 0.8)  # due in 0.8 s: more than it pays
    mode = choose_speed(_config(), bert_on_a_fake_gpu, 100.0, short, prebuild=late)[0]
    assert late.waits == [] and not mode.fused_kernels and "still running" in mode.why
    due = FakeBuild(succeeds=True, age_s=speed.FUSED_PREBUILD_S - 0.1)
    assert choose_speed(_config(), bert_on_a_fake_gpu, 100.0, short, prebuild=due)[0].fused_kernels
    assert due.waits == [pytest.approx(short * gain - 0.3)]
    long = int(2 * speed.FUSED_NORM_COLD_S / gain)  # the kernels pay even built here on a cold cache
    cold_minus_warm = speed.FUSED_NORM_COLD_S - speed.FUSED_NORM_WARM_S
    assert speed.prebuild_wait_s(fused_kernels=None, steps=long, step_s=0.05) == cold_minus_warm
    assert speed.prebuild_wait_s(fused_kernels=True, steps=short, step_s=0.05) == cold_minus_warm
    assert speed.prebuild_wait_s(fused_kernels=None, steps=1, step_s=0.05) == 0.0
    waited = FakeBuild(succeeds=True)
    assert choose_speed(_config(), bert_on_a_fake_gpu, 100.0, long, prebuild=waited)[0].fused_kernels
    assert waited.waits == [cold_minus_warm]


def test_a_failed_build_leaves_the_cold_choice(bert_on_a_fake_gpu):
    steps = int((speed.FUSED_NORM_WARM_S + speed.FUSED_NORM_COLD_S) / 2 / (speed.FUSED_NORM_GAIN * 0.05))
    build = FakeBuild(succeeds=False)
    mode = choose_speed(_config(), bert_on_a_fake_gpu, 100.0, steps, prebuild=build)[0]
    assert len(build.waits) == 1 and not mode.fused_kernels and "the build ahead failed (exit code 1)" in mode.why


def test_a_child_that_built_nothing_or_still_runs_says_so(bert_on_a_fake_gpu):
    steps = int((speed.FUSED_NORM_WARM_S + speed.FUSED_NORM_COLD_S) / 2 / (speed.FUSED_NORM_GAIN * 0.05))
    nothing = FakeBuild(succeeds=True)
    nothing.wait = lambda seconds: nothing.waits.append(seconds) or True  # exit 0, no kernels in the cache
    mode = choose_speed(_config(), bert_on_a_fake_gpu, 100.0, steps, prebuild=nothing)[0]
    assert not mode.fused_kernels and "built nothing" in mode.why
    slow = FakeBuild(succeeds=False)
    slow.wait = lambda seconds: False  # timed out: poll() is still None
    mode = choose_speed(_config(), bert_on_a_fake_gpu, 100.0, steps, prebuild=slow)[0]
    assert not mode.fused_kernels and "still running" in mode.why


def test_no_wait_for_a_child_that_cannot_have_ended_yet(bert_on_a_fake_gpu):
    steps = int((speed.FUSED_NORM_WARM_S + speed.FUSED_NORM_COLD_S) / 2 / (speed.FUSED_NORM_GAIN * 0.05))
    fresh = FakeBuild(succeeds=True, age_s=0.0)  # the run started it itself, a moment ago
    mode = choose_speed(_config(), bert_on_a_fake_gpu, 100.0, steps, prebuild=fresh)[0]
    assert fresh.waits == [] and not mode.fused_kernels and "still running" in mode.why
    due = FakeBuild(succeeds=True, age_s=speed.FUSED_PREBUILD_S - 1.0)  # due within the wait
    assert choose_speed(_config(), bert_on_a_fake_gpu, 100.0, steps, prebuild=due)[0].fused_kernels and due.waits


def test_a_child_that_ended_while_not_waited_for_is_used(bert_on_a_fake_gpu):
    """Not expected in time (so not waited for), the child may still have ended by the time the run
    settles its mode: its kernels are used. (They were left out, the child said to have built nothing.)"""
    from embedtune.kernels.fused_norm import kernels_fingerprint

    steps = int((speed.FUSED_NORM_WARM_S + speed.FUSED_NORM_COLD_S) / 2 / (speed.FUSED_NORM_GAIN * 0.05))

    def poll():  # the cache was cold when the choice began; by its first look at the child, it had ended
        speed.mark_fused_kernels_built(kernels_fingerprint())
        return 0

    ended = FakeBuild(succeeds=True, age_s=0.0)  # due in FUSED_PREBUILD_S: more than the wait could pay
    ended.process = SimpleNamespace(poll=poll)
    mode = choose_speed(_config(), bert_on_a_fake_gpu, 100.0, steps, prebuild=ended)[0]
    assert ended.waits == [] and mode.fused_kernels and "built ahead in a child process (waited 0.0 s)" in mode.why


def test_no_wait_where_the_kernels_would_not_be_used(bert_on_a_fake_gpu):
    short = int(speed.FUSED_NORM_WARM_S / (speed.FUSED_NORM_GAIN * 0.05) * 0.5)  # too short even when warm
    for config, steps in [(_config(), short), (_config(fused_kernels=False), 10**6),
                          (_config(cuda_graphs=False), 10**6), (_config(compile=True), 10**6)]:
        build = FakeBuild(succeeds=True)
        assert not choose_speed(config, bert_on_a_fake_gpu, 100.0, steps, prebuild=build)[0].fused_kernels
        assert build.waits == [], config


def test_the_cli_starts_the_build_before_its_own_imports(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from embedtune.cli import app
    from embedtune.model_facts import DEFAULT_MODEL_ID

    calls = []
    monkeypatch.setattr(kernel_prebuild, "start", lambda *a, **kw: calls.append((a, kw)))
    result = CliRunner().invoke(app, ["train", str(tmp_path / "missing.jsonl"), "--full", "--no-compile",
                                      "--output", str(tmp_path / "out")])
    assert result.exit_code != 0  # the data is missing: the build was started before that was found
    expected = ((DEFAULT_MODEL_ID, "fp32"), {"fast": True, "compile": False, "cuda_graphs": None, "fused_kernels": None})
    assert calls == [expected, expected]  # the CLI's, then the run's own (which gets the CLI's child back)


class FakeNvml:
    """libnvidia-ml's few calls the child makes, over cards in the given compute modes."""

    def __init__(self, modes, init=0):
        self.modes, self.init, self.shut = modes, init, False

    def nvmlInit_v2(self):
        return self.init

    def nvmlDeviceGetCount_v2(self, count):
        count._obj.value = len(self.modes)
        return 0

    def nvmlDeviceGetHandleByIndex_v2(self, index, handle):
        handle._obj.value = index.value + 1
        return 0

    def nvmlDeviceGetComputeMode(self, handle, mode):
        mode._obj.value = self.modes[handle.value - 1]
        return 0

    def nvmlShutdown(self):
        self.shut = True


def test_the_child_builds_only_on_gpus_every_process_may_share():
    """A card in exclusive-process mode admits one CUDA context: the child's would lock the run out."""
    from embedtune.kernels.prebuild import gpus_shared

    shared = FakeNvml([0, 0])
    assert gpus_shared(lambda: shared) and shared.shut
    assert not gpus_shared(lambda: FakeNvml([0, 3]))  # one card exclusive-process
    assert not gpus_shared(lambda: FakeNvml([2]))  # prohibited
    assert not gpus_shared(lambda: FakeNvml([]))
    assert not gpus_shared(lambda: FakeNvml([0], init=1))  # NVML cannot say

    def missing():
        raise OSError("libnvidia-ml.so.1: cannot open shared object file")

    assert not gpus_shared(missing)


class LateBuild(FakeBuild):
    """A child that runs until `finish()`; nothing waits for it."""

    def __init__(self, succeeds: bool):
        super().__init__(succeeds)
        self.done = False
        self.process = SimpleNamespace(poll=lambda: None if not self.done else 0 if succeeds else 1)

    def finish(self):
        from embedtune.kernels.fused_norm import kernels_fingerprint

        self.done = True
        if self.succeeds:
            speed.mark_fused_kernels_built(kernels_fingerprint())


def test_the_recipe_switches_the_kernels_on_once_the_build_ahead_ends(bert_on_a_fake_gpu, monkeypatch):
    """The recipe leaves the choice open (`defer_wait`): the run starts without the fused norm and
    waits for nothing; the steps' callback polls the child at each step's start and switches the
    kernels on, with the mode handed on, once it ended and left them; a child that fails, or ends
    when the steps left no longer pay for the kernels' load, leaves them off; with --fused-kernels the
    first step waits instead; a run whose child ended before the plan needs nothing later."""
    from embedtune import speed_choice
    from embedtune.speed_choice import settle_during_steps

    model = bert_on_a_fake_gpu
    forward = model.__dict__["forward"]
    steps = int((speed.FUSED_NORM_WARM_S + speed.FUSED_NORM_COLD_S) / 2 / (speed.FUSED_NORM_GAIN * 0.05))
    build = LateBuild(succeeds=True)
    mode, _, _, settle = choose_speed(_config(), model, 100.0, steps, prebuild=build, defer_wait=True)
    assert settle is not None and not mode.fused_kernels and not forward.fused_kernels
    assert mode.cuda_graphs  # the rest of the mode is decided already
    applied = []
    callback = settle_during_steps(settle, applied.append)
    args = SimpleNamespace(gradient_accumulation_steps=2)
    for step in range(3):
        callback.on_step_begin(args, SimpleNamespace(global_step=step), None)
    assert applied == [] and not forward.fused_kernels and build.waits == []  # running: no wait, no switch
    build.finish()
    for step in range(3, 6):
        callback.on_step_begin(args, SimpleNamespace(global_step=step), None)
    assert len(applied) == 1 and build.waits == []
    assert applied[0].fused_kernels and forward.fused_kernels and "in use from micro-step 7" in applied[0].why

    failed = LateBuild(succeeds=False)
    mode, _, _, settle = choose_speed(_config(), model, 100.0, steps, prebuild=failed, defer_wait=True)
    assert settle(0) is None
    failed.finish()
    assert not settle(1).fused_kernels and not forward.fused_kernels and "failed" in mode.why + settle(1).why

    late = LateBuild(succeeds=True)
    mode, _, _, settle = choose_speed(_config(), model, 100.0, steps, prebuild=late, defer_wait=True)
    late.finish()
    last = settle(steps - 1)  # one step left saves less than the kernels' load
    assert not last.fused_kernels and not forward.fused_kernels and f"ended with 1 of {steps} micro-steps left" in last.why
    stuck = LateBuild(succeeds=True)
    mode, _, _, settle = choose_speed(_config(), model, 100.0, steps, prebuild=stuck, defer_wait=True)
    assert settle(steps - 1) is not None and not forward.fused_kernels  # still running: given up, not polled on
    slow = LateBuild(succeeds=True)
    mode, _, _, settle = choose_speed(_config(), model, 100.0, steps, prebuild=slow, defer_wait=True)
    bound = speed.prebuild_wait_s(fused_kernels=None, steps=steps, step_s=0.05)
    with monkeypatch.context() as later:
        later.setattr(speed_choice.time, "monotonic", lambda now=time.monotonic(): now - bound - 1)
        assert settle(0) is None  # the first step is an eager first sight anyway: the hold starts after it
    assert settle(1) is None
    with monkeypatch.context() as later:
        later.setattr(speed_choice.time, "monotonic", lambda now=time.monotonic(): now + bound + 1)
        given_up = settle(2)  # held (steps run eagerly) longer than a wait could pay
    assert not given_up.fused_kernels and "not waited for beyond" in given_up.why and not forward.fused_kernels

    forced = FakeBuild(succeeds=True, age_s=60.0)
    mode, _, _, settle = choose_speed(_config(fused_kernels=True), model, 100.0, steps, prebuild=forced, defer_wait=True)
    assert not forward.fused_kernels and forced.waits == []
    assert settle(0).fused_kernels and forward.fused_kernels and len(forced.waits) == 1

    done = FakeBuild(succeeds=True)
    done.waits.append(0.0)  # ended before the plan: decided there, nothing left for the steps
    mode, _, _, settle = choose_speed(_config(), model, 100.0, steps, prebuild=done, defer_wait=True)
    assert settle is None and mode.fused_kernels and forward.fused_kernels


def test_the_recipe_settles_a_left_open_choice_during_its_steps(tmp_path, monkeypatch):
    """`train.run` asks for the choice to be left open, calls what `choose_speed` left at each step's
    start until it gives a mode, and reports the mode it returned; its graph step holds its captures
    until then (CPU: a stand-in step that runs the loss eagerly and records the hold)."""
    import dataclasses
    import importlib
    import json

    from typer.testing import CliRunner

    from embedtune.cli import app
    from embedtune.resumable_trainer import ResumableTrainer
    from tiny_models import write_pairs

    recipe = importlib.import_module("embedtune.train")
    real, events = recipe.choose_speed, []

    def choose(*args, **kwargs):
        mode, cache, fingerprint, settle = real(*args, **kwargs)
        assert kwargs.get("defer_wait") is True and settle is None  # on a CPU: nothing to wait for
        settled = dataclasses.replace(mode, why=mode.why + "; settled at the second step")
        mode = dataclasses.replace(mode, cuda_graphs=True)  # as on a GPU, where the choice is left open
        return mode, cache, fingerprint, lambda done: events.append(("settle", done)) or (settled if done else None)

    class HoldingStep:
        counts, shapes, warmup_s, off_reason, hold_captures = {}, 0, 0.0, None, False

        def __init__(self, loss):
            self.loss = loss

        def __call__(self, features, scale=1.0):
            events.append(("held", self.hold_captures))
            loss = self.loss([{k: v for k, v in f.items()} for f in features])
            (loss * scale).backward()
            return loss.detach()

    step = ResumableTrainer.training_step
    monkeypatch.setattr(recipe, "choose_speed", choose)
    monkeypatch.setattr(recipe, "graph_step_for", lambda trainer, config: HoldingStep(trainer.loss))
    monkeypatch.setattr(ResumableTrainer, "training_step", lambda self, *a, **k: events.append("step") or step(self, *a, **k))
    out = tmp_path / "out"
    done = CliRunner().invoke(app, ["train", str(write_pairs(tmp_path / "d")), "--output", str(out), "--model",
                                    str(make_tiny_model("bert", tmp_path)), "--max-steps", "3", "--batch-size", "4",
                                    "--max-seq-length", "16", "--no-eval", "--full"])
    assert done.exit_code == 0, done.output
    assert events == [("settle", 0), "step", ("held", True), ("settle", 1), "step", ("held", False),
                      "step", ("held", False)]
    assert json.loads((out / "metrics.json").read_text())["speed"]["why"].endswith("; settled at the second step")


def test_tritons_compiler_key_is_computed_in_a_thread_and_kept_for_the_first_kernel():
    """Triton hashes its compiler (libtriton.so) for the key of a process's first kernel; the thread
    computes that key into Triton's own cache, importing nothing, and only where Triton is loaded."""
    pytest.importorskip("triton")
    from fresh_interpreter import fresh

    seen = fresh("""
        import json, sys
        from embedtune.kernel_prebuild import warm_compiler_key
        before_triton = warm_compiler_key()
        triton_loaded = "triton" in sys.modules
        import triton
        from triton.runtime.cache import triton_key
        modules = set(sys.modules)
        thread = warm_compiler_key()
        thread.join()
        info = triton_key.cache_info()
        imported = sorted(set(sys.modules) - modules)
        kept = triton_key() == triton_key.__wrapped__()  # what the first kernel gets: Triton's own key
        print(json.dumps({"before_triton": before_triton is None, "triton_loaded": triton_loaded,
                          "computed": [info.misses, info.currsize], "hits_after": triton_key.cache_info().hits,
                          "imported": imported, "kept": kept, "daemon": thread.daemon}))
    """)
    assert seen == {"before_triton": True, "triton_loaded": False, "computed": [1, 1], "hits_after": 1,
                    "imported": [], "kept": True, "daemon": True}


def test_the_speed_choice_warms_tritons_key_where_the_fused_kernels_apply(bert_on_a_fake_gpu, monkeypatch):
    calls = []
    monkeypatch.setattr(kernel_prebuild, "warm_compiler_key", lambda: calls.append(1))
    choose_speed(_config(), bert_on_a_fake_gpu, 100.0, 10)
    assert calls == [1]
    choose_speed(_config(fast=False, compile=None, cuda_graphs=None), bert_on_a_fake_gpu, 100.0, 10)
    assert calls == [1]  # no packed path: no kernels


def test_the_childs_triton_set_up_runs_without_torch_beside_its_import(tmp_path):
    """The child starts Triton's one-time set-up (its compiler key; the NVIDIA driver utilities, which
    cannot build on this machine and are left to the first kernel) in a thread before importing torch:
    the thread must not import torch itself, or it would wait on the import it is meant to overlap."""
    pytest.importorskip("triton")
    from fresh_interpreter import fresh

    seen = fresh("""
        import json, sys
        from embedtune.kernels.prebuild import warm_triton
        thread = warm_triton()
        thread.join()
        from triton.runtime.cache import triton_key
        print(json.dumps({"torch": "torch" in sys.modules, "key": triton_key.cache_info().currsize,
                          "daemon": thread.daemon}))
    """, env={"TRITON_CACHE_DIR": str(tmp_path / "triton")})
    assert seen == {"torch": False, "key": 1, "daemon": True}


def test_the_variant_calls_run_in_threads_of_their_own_and_fail_as_one(monkeypatch):
    """On a CUDA device the calls, which share no kernel, build in threads of their own (their builds
    run mostly outside the GIL); a call that fails fails the build, so the child exits non-zero and the
    run does not take the cache for warm."""
    import threading

    import torch

    from embedtune.kernels import variant_calls

    ran, together = [], threading.Barrier(3, timeout=30)  # broken unless all three run at once

    def record(name):
        def call(width, dtype, device):
            ran.append((name, width, dtype, threading.current_thread().name))
            if threading.current_thread().name != "MainThread":
                together.wait()
        return call

    for name in ("_attention_norm", "_ffn_norm", "_qkv_join"):
        monkeypatch.setattr(variant_calls, name, record(name))
    variant_calls.build(64, torch.float32, torch.device("cpu"), threads=3)
    assert sorted(r[0] for r in ran) == ["_attention_norm", "_ffn_norm", "_qkv_join"]
    assert len({r[3] for r in ran}) == 3 and all(r[3].startswith("embedtune-build") for r in ran)  # and at once
    assert {r[1:3] for r in ran} == {(64, torch.float32)}
    ran.clear()
    variant_calls.build(64, torch.bfloat16, torch.device("cpu"))  # LoRA: no join; the CPU's interpreter: in turn
    assert [(r[0], r[3]) for r in ran] == [("_attention_norm", "MainThread"), ("_ffn_norm", "MainThread")]

    def fail(width, dtype, device):
        raise RuntimeError("no kernel")

    for name in ("_attention_norm", "_qkv_join"):
        monkeypatch.setattr(variant_calls, name, lambda width, dtype, device: None)
    monkeypatch.setattr(variant_calls, "_ffn_norm", fail)
    with pytest.raises(RuntimeError, match="no kernel"):
        variant_calls.build(64, torch.float32, torch.device("cpu"), threads=3)


def test_a_left_open_choice_is_dropped_where_the_run_cannot_have_graphs(tmp_path, monkeypatch):
    """The fused norm is chosen for graph replays: where the run's graph step turns out impossible (a
    loss it cannot capture, fp16, ...), the choice left open is not settled, and the kernels stay off."""
    import dataclasses
    import importlib
    import json

    from typer.testing import CliRunner

    from embedtune.cli import app
    from tiny_models import write_pairs

    recipe = importlib.import_module("embedtune.train")
    real, settles = recipe.choose_speed, []

    def choose(*args, **kwargs):
        mode, cache, fingerprint, _ = real(*args, **kwargs)
        settled = dataclasses.replace(mode, fused_kernels=True, why=mode.why + "; switched on")
        return dataclasses.replace(mode, cuda_graphs=True), cache, fingerprint, lambda done: settles.append(done) or settled

    monkeypatch.setattr(recipe, "choose_speed", choose)
    monkeypatch.setattr(recipe, "graph_step_for", lambda trainer, config: "fp16 training scales its loss on the host")
    out = tmp_path / "out"
    done = CliRunner().invoke(app, ["train", str(write_pairs(tmp_path / "d")), "--output", str(out), "--model",
                                    str(make_tiny_model("bert", tmp_path)), "--max-steps", "2", "--batch-size", "4",
                                    "--max-seq-length", "16", "--no-eval", "--full"])
    assert done.exit_code == 0, done.output
    speed_record = json.loads((out / "metrics.json").read_text())["speed"]
    assert settles == [] and not speed_record["fused_kernels"]
    assert speed_record["why"].endswith("; fused norm not used: CUDA graphs off")
