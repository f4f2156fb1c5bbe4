"""The speed mode a run picks by itself (`embedtune.speed`): compile and CUDA graphs on a GPU where
they pay, the user's flags over the choice, and the choice recorded in metrics.json."""

from __future__ import annotations

import json
import logging

import pytest

from embedtune import speed
from embedtune.speed import choose

GPU = dict(fast=True, cuda=True, layers=12, cache_warm=False)


def test_cpu_runs_eager():
    mode = choose(compile=None, cuda_graphs=None, fast=True, cuda=False, steps=10_000, step_s=1.0, layers=12,
                  cache_warm=True)
    assert (mode.compile, mode.cuda_graphs) == (False, False) and "no CUDA device" in mode.why


def test_graphs_on_a_gpu_once_the_run_is_long_enough():
    assert not choose(compile=None, cuda_graphs=None, steps=speed.GRAPH_MIN_STEPS - 1, step_s=0.05, **GPU).cuda_graphs
    assert choose(compile=None, cuda_graphs=None, steps=speed.GRAPH_MIN_STEPS, step_s=0.05, **GPU).cuda_graphs


def test_compile_when_the_steps_earn_the_warm_up_back():
    cold = speed.compile_seconds(12, warm=False)
    break_even = cold / (speed.COMPILE_GAIN * 0.05)
    short = choose(compile=None, cuda_graphs=None, steps=int(break_even * 0.9), step_s=0.05, **GPU)
    long = choose(compile=None, cuda_graphs=None, steps=int(break_even * 1.1), step_s=0.05, **GPU)
    assert not short.compile and long.compile
    assert "cold cache" in long.why
    # a warm cache costs less: the short run compiles too
    warm = choose(compile=None, cuda_graphs=None, steps=int(break_even * 0.9), step_s=0.05,
                  **{**GPU, "cache_warm": True})
    assert warm.compile and "warm cache" in warm.why


def test_fused_norm_where_its_build_pays_or_is_cached(tmp_path, monkeypatch):
    """The fused kernels' cold build is paid back by long runs; a cached build by short ones; compiled layers
    fuse the norm themselves, and models without such layers never take it."""
    step_s = 0.05
    break_even = speed.FUSED_NORM_COLD_S / (speed.FUSED_NORM_GAIN * step_s)
    kw = dict(compile=False, cuda_graphs=None, step_s=step_s, fused_applies=True, **GPU)
    short = choose(steps=int(break_even * 0.9), **kw)
    long = choose(steps=int(break_even * 1.1), **kw)
    assert not short.fused_kernels and long.fused_kernels and "cold cache" in long.why
    warm = choose(steps=int(break_even * 0.9), fused_warm=True, **kw)
    assert warm.fused_kernels and "warm cache" in warm.why
    assert not choose(steps=10**6, **{**kw, "compile": True}).fused_kernels
    assert not choose(steps=10**6, **{**kw, "fused_applies": False}).fused_kernels
    assert not choose(steps=10**6, **{**kw, "cuda": False}).fused_kernels
    eager = choose(steps=10**6, **{**kw, "cuda_graphs": False})
    assert not eager.fused_kernels and "without CUDA graphs" in eager.why
    forced = choose(steps=1, fused_kernels=True, **kw)
    assert forced.fused_kernels and "--fused-kernels" in forced.why
    assert not choose(steps=10**6, fused_kernels=False, **kw).fused_kernels
    # the marker: written after a build, per kernel source (an edited kernel is built anew)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    assert not speed.fused_kernels_cached("abc")
    speed.mark_fused_kernels_built("abc")
    assert speed.fused_kernels_cached("abc") and not speed.fused_kernels_cached("abd")
    assert speed.fused_kernels_fingerprint("one source") != speed.fused_kernels_fingerprint("another")


def test_flags_overrule_the_choice():
    off = choose(compile=False, cuda_graphs=False, steps=10**6, step_s=1.0, **GPU)
    assert (off.compile, off.cuda_graphs) == (False, False)
    assert "--no-compile" in off.why and "--no-cuda-graphs" in off.why
    on = choose(compile=True, cuda_graphs=True, steps=1, step_s=0.001, **GPU)
    assert (on.compile, on.cuda_graphs) == (True, True)


def test_several_processes_stay_eager_unless_asked():
    mode = choose(compile=None, cuda_graphs=None, steps=10**6, step_s=1.0, processes=2, **GPU)
    assert (mode.compile, mode.cuda_graphs) == (False, False) and "2 processes" in mode.why


def test_no_fast_path_no_speed_modes():
    assert choose(compile=None, cuda_graphs=None, steps=10**6, step_s=1.0, **{**GPU, "fast": False}).compile is False
    with pytest.raises(ValueError):
        choose(compile=True, cuda_graphs=None, steps=1, step_s=1.0, **{**GPU, "fast": False})


def test_step_estimate_counts_weight_gradients_only_where_they_train():
    full = speed.step_seconds(10_000, params=100, trainable=100, peak_flops=1e6)
    lora = speed.step_seconds(10_000, params=100, trainable=0, peak_flops=1e6)
    assert full == pytest.approx(lora * 1.5)


def _bert(layers: int):
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=37,
                                vocab_size=50))


def test_warm_marker_is_per_model(tmp_path):
    small, other = _bert(1), _bert(2)
    a, b = speed.model_fingerprint(small), speed.model_fingerprint(other)
    small.embeddings.requires_grad_(False)  # another set of trainable weights (LoRA's rank does this)
    assert a != b and a != speed.model_fingerprint(small)
    small.embeddings.requires_grad_(True)
    assert speed.model_fingerprint(small) == a
    assert not speed.cache_is_warm(tmp_path, a)
    speed.mark_cache_warm(tmp_path, a)
    assert speed.cache_is_warm(tmp_path, a) and not speed.cache_is_warm(tmp_path, b)


def test_auto_compile_starts_once_training_has_paid_for_it(tmp_path, monkeypatch, caplog):
    """Outside the recipe the run's length is unknown: eager until the training time spent would have
    paid for the compile (gaps such as evaluations do not count), then compiled for good; never on
    the CPU or in inference; at once when this model's code is cached. Each switch is announced once,
    with the warm-up it costs and why."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    clock = [0.0]
    monkeypatch.setattr(speed.time, "perf_counter", lambda: clock[0])
    model = _bert(2)
    auto = speed.CompileWhenItPays(model)
    cost = speed.compile_seconds(2, warm=False)
    step = 0.5
    needed = cost / speed.COMPILE_GAIN  # training seconds that pay for the compile
    assert not auto(cuda=False, training=True) and not auto(cuda=True, training=False)
    decisions = []
    caplog.set_level(logging.WARNING, logger="embedtune.speed")
    for i in range(int(needed / step) + 3):
        clock[0] += step if i != 5 else 600.0  # one long pause (an evaluation): counted as at most MAX_GAP_S
        decisions.append(auto(cuda=True, training=True))
    first_on = decisions.index(True)
    assert not any(decisions[:first_on]) and all(decisions[first_on:])
    assert needed <= auto.spent < needed + speed.CompileWhenItPays.MAX_GAP_S + step
    assert auto(cuda=True, training=False), "once on, stays on"
    (notice,) = [r.getMessage() for r in caplog.records]
    assert f"a warm-up of about {cost:.0f} s" in notice and "of training would have paid for it" in notice
    auto.compiled()
    warm = speed.CompileWhenItPays(model)
    assert warm(cuda=True, training=True), "cached: compiled from the first training forward"
    assert "compiled code is cached" in caplog.records[-1].getMessage() and len(caplog.records) == 2


def test_loaded_models_compile_automatically_and_the_recipe_decides_for_itself(tmp_path):
    from embedtune import FastModel
    from embedtune.packing import PackedForward, set_compile
    from tiny_models import make_tiny_model

    model, _ = FastModel.from_pretrained(str(make_tiny_model("bert", tmp_path)), max_seq_length=32)
    forward = model.__dict__["forward"]
    assert isinstance(forward, PackedForward) and forward.compile == "auto"
    set_compile(model, False)
    assert forward.compile is False


def test_recipe_records_its_speed_mode(tmp_path):
    """On this CPU the recipe runs eager by itself, and says so in metrics.json and the summary."""
    from typer.testing import CliRunner

    from embedtune.cli import app

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"anchor": f"how to do thing {i}", "positive": f"def thing_{i}(): pass"}) + "\n"
                            for i in range(16)))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["train", str(data), "--output", str(out), "--max-steps", "1", "--batch-size", "4",
                                      "--max-seq-length", "32", "--no-eval"])
    assert result.exit_code == 0, result.output
    mode = json.loads((out / "metrics.json").read_text())["speed"]
    assert mode == {"compile": False, "cuda_graphs": False, "fused_kernels": False, "why": mode["why"]}
    assert "no CUDA device" in mode["why"]
    assert "speed mode: eager" in result.output
