"""benchmarks/bench_guide_gpu.py builds its three programs from tests/guide_program.py by replacing
marked lines; this keeps the two in step: each variant must still be built, parse, and differ from the
guide only where the bench means it to."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_guide_gpu.py"


@pytest.fixture(scope="module")
def bench():
    saved_path = list(sys.path)  # the bench puts its own folder first, to import bench_job_gpu
    try:
        spec = importlib.util.spec_from_file_location("bench_guide_gpu", BENCH)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path[:] = saved_path


@pytest.mark.parametrize("impl", ["embedtune", "embedtune_eager", "embedtune_stock_step", "stock", "stock_compile"])
@pytest.mark.parametrize("precision", ["guide", "cpu"])
def test_every_variant_builds_and_parses(bench, impl, precision):
    text = bench.program(impl, precision)
    compile(text, f"guide_{impl}.py", "exec")
    assert ("from embedtune import FastModel" in text) == impl.startswith("embedtune")
    assert ("cuda_graphs = False" in text) == (impl == "embedtune_eager")
    assert ("trainer_steps.decide = " in text) == (impl == "embedtune_stock_step")
    assert ("torch_compile=True" in text) == (impl == "stock_compile")
    assert ("bf16=torch.cuda.is_bf16_supported()" in text) == (precision == "guide")
    assert text.count("trainer.train()") == 1 and "_bench_train_s" in text
    assert text.rstrip().endswith(")")  # the report line comes last, after the guide's saves


def test_stock_variant_saves_the_merged_encoder(bench):
    text = bench.program("stock", "guide")
    # the peft wrapper's save after merge_and_unload writes an empty adapter: the stock side saves the merged model
    assert "merged.save_pretrained(\"embeddings_merged_hf\")" in text
    assert "model.save_pretrained(\"embeddings_merged_hf\")" not in text
    assert text.index("merged = model.merge_and_unload()") < text.index("sbert_model.save_pretrained(\"embeddings_merged\")")


def test_a_guide_program_without_a_marked_line_is_refused(bench, monkeypatch, tmp_path):
    moved = tmp_path / "guide_program.py"
    moved.write_text(Path(bench.GUIDE_PROGRAM).read_text().replace("trainer.train()\n", "trainer.train(  )\n"))
    monkeypatch.setattr(bench, "GUIDE_PROGRAM", str(moved))
    with pytest.raises(SystemExit, match="trainer.train"):
        bench.program("embedtune", "cpu")


def test_report_reads_the_last_marked_line(bench):
    lines = ["noise", bench.MARK + '{"steps": 1}', bench.MARK + '{"steps": 2}', "after"]
    assert bench.report(lines) == {"steps": 2}
    assert bench.report(["no report"]) is None
    assert bench.late_loss([[10, 4.0], [20, 3.0], [30, 2.0], [40, 1.0]]) == 1.0
    assert bench.late_loss([]) is None


@pytest.mark.parametrize("impl", ["embedtune", "embedtune_eager", "embedtune_stock_step", "stock", "stock_compile"])
def test_no_checkpointing_variant_turns_it_off_on_every_side(bench, impl):
    on, off = bench.program(impl, "cpu"), bench.program(impl, "cpu", checkpointing=False)
    compile(off, f"guide_{impl}.py", "exec")
    if impl.startswith("embedtune"):
        assert 'use_gradient_checkpointing="unsloth"' in on
        assert "use_gradient_checkpointing=False" in off and "unsloth\"" not in off
    else:
        assert "gradient_checkpointing_enable" in on and "gradient_checkpointing_enable" not in off
    # nothing else differs
    assert len(set(off.splitlines()) ^ set(on.splitlines())) == 2 - (not impl.startswith("embedtune"))


def test_curve_gap_compares_the_second_half(bench):
    rows = [{"impl": "embedtune", "losses": [[10, 3.0], [20, 2.0], [30, 1.5], [40, 1.0]]},
            {"impl": "embedtune_eager", "losses": [[10, 2.0], [20, 2.1], [30, 1.4], [40, 1.2]]}]
    line = bench.curve_gap(rows)
    assert "steps 30-40" in line and "largest gap 0.2000" in line
    assert bench.curve_gap(rows[:1]) is None
