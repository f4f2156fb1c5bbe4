"""No run lost, no silent success: a run that cannot train is an error before anything is written; a run
that trained less than planned, or nothing at all, says so (summary, metrics.json, report); silent
choices of the readers and of BEIR evaluation are errors or notes. Tiny random-init model, CPU."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from embedtune.data import load_pairs, read_beir, write_jsonl
from embedtune.errors import DataError, EmbedtuneError
from embedtune.train import RunChecks, TrainConfig, check_settings, run


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from tiny_models import make_tiny_model

    return make_tiny_model("bert", tmp_path_factory.mktemp("tiny_no_silent_success"))


def _config(data: Path, model: Path, out: Path, **kw) -> TrainConfig:
    settings = dict(batch_size=8, max_seq_length=16, eval=False, lora_r=4, logging_steps=1)
    settings.update(kw)
    return TrainConfig(data=str(data), model=str(model), output_dir=str(out), **settings)


def _jsonl(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------------ 1. a run that cannot train


def test_identical_rows_are_refused_before_anything_is_written(tmp_path, tiny):
    """64 identical rows: the no-duplicates sampler fills no batch. It used to train 0 steps, exit 0 and
    save the base model as the result."""
    data = write_jsonl([{"anchor": "same question", "positive": "same answer"}] * 64, tmp_path / "same.jsonl")
    out = tmp_path / "out"
    with pytest.raises(EmbedtuneError) as caught:
        run(_config(data, tiny, out))
    message = str(caught.value)
    assert "\n" not in message and message.startswith(str(data))
    assert "64 of 64 training rows share texts" in message and "can fill 0 batches of 8" in message
    assert "not even --batch-size 2" in message
    assert not out.exists() and not Path(f"{out}.partial").exists()


def test_zero_steps_names_a_batch_size_that_fits_and_the_cli_says_one_line(tmp_path, tiny):
    from typer.testing import CliRunner

    from embedtune.cli import app

    rows = [{"anchor": f"question {i}", "positive": "shared answer" if i < 60 else f"answer {i}"} for i in range(64)]
    data = write_jsonl(rows, tmp_path / "shared.jsonl")
    result = CliRunner().invoke(app, ["train", str(data), "--model", str(tiny), "--output", str(tmp_path / "out"),
                                      "--batch-size", "8", "--no-eval", "--max-seq-length", "16"])
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    assert text.count("error:") == 1 and "Traceback" not in result.output
    assert "60 of 64 training rows share texts" in text and "lower --batch-size (to 4, for one)" in text
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_fewer_batches_than_planned_are_a_warning_in_summary_metrics_and_report(tmp_path, tiny):
    """56 of 64 rows share one positive: 3 steps instead of 8 (sentence-transformers 6.3 reshuffles to
    make up part of it), with no word before. Now: predicted up front, and said everywhere."""
    from rich.console import Console

    from embedtune import cli
    from embedtune.report import print_report

    rows = [{"anchor": f"question {i}", "positive": "shared answer" if i < 56 else f"answer {i}"} for i in range(64)]
    data = write_jsonl(rows, tmp_path / "shared.jsonl")
    out = tmp_path / "out"
    metrics = run(_config(data, tiny, out)).metrics
    batches = metrics["batches"]
    assert batches["rows_sharing_texts"] == 56 and batches["full_batches_per_pass"] == 1
    assert batches["batches_planned_per_epoch"] == 8
    assert metrics["steps"] == batches["batches_per_epoch"] < 8  # the prediction is what the trainer ran
    assert metrics["planned_steps"] == 8
    warning = metrics["warnings"][0]
    assert "56 of 64 training rows share texts" in warning and "can fill 1 batch of 8" in warning
    assert f"the run trains about {metrics['steps']} of 8 planned steps" in warning
    assert json.loads((out / "metrics.json").read_text())["warnings"] == metrics["warnings"]
    with cli.console.capture() as captured:
        cli.print_summary(metrics)
    assert f"warning: {warning}" in " ".join(captured.get().split())
    console = Console(record=True, width=400)
    print_report(str(out), png=str(tmp_path / "r.png"), console=console)
    assert "can fill 1 batch of 8" in console.export_text()


def test_the_batch_plan_is_what_the_sampler_yields():
    """`plan_batches` replays the sampler's rule: on random data with repeated texts (across columns,
    shuffled and selected rows) it counts exactly the full batches sentence-transformers' sampler
    yields; the trainer's sampler then reuses the plan's text codes and yields the very same batches."""
    from datasets import Dataset

    from embedtune.data.sampler import NoDuplicatesBatchSampler, _can_hash, batch_sampler, no_duplicates_sampler
    from embedtune.data.sampler import plan_batches

    rng = random.Random(7)
    for trial in range(25):
        rows, batch, vocab = rng.randint(8, 200), rng.randint(2, 12), rng.randint(3, 300)
        columns = ["anchor", "positive"] + (["negative_1"] if trial % 2 else [])
        data = {c: [f"text {rng.randrange(vocab)}" for _ in range(rows)] for c in columns}
        ds = Dataset.from_dict(data).shuffle(seed=trial, keep_in_memory=True).select(range(rows - rows // 8))
        seed = rng.randint(0, 99)
        plan = plan_batches(ds, batch, seed, columns=columns)
        reference = NoDuplicatesBatchSampler(ds, batch_size=batch, drop_last=True, generator=torch.Generator(),
                                             seed=seed)
        expected = list(reference)
        assert plan.per_epoch == len(expected), (trial, plan)
        assert plan.per_pass <= plan.per_epoch <= plan.planned == len(ds) // batch
        if _can_hash():
            sampler = batch_sampler(no_duplicates_sampler(), ds.select_columns(columns), batch_size=batch,
                                    drop_last=True, generator=torch.Generator(), seed=seed)
            assert sampler._row_hashes is not None  # handed over by the plan: no second hashing pass
            assert list(sampler) == expected


def test_distinct_rows_plan_every_batch_without_replaying():
    from datasets import Dataset

    from embedtune.data.sampler import plan_batches

    ds = Dataset.from_dict({"anchor": [f"q{i}" for i in range(100)], "positive": [f"p{i}" for i in range(100)]})
    plan = plan_batches(ds, 16, seed=0)
    assert (plan.shared_rows, plan.per_pass, plan.per_epoch, plan.planned, plan.short) == (0, 6, 6, 6, False)
    # a text repeated inside one row (anchor == positive) is no conflict with another row
    ds = Dataset.from_dict({"anchor": [f"t{i}" for i in range(32)], "positive": [f"t{i}" for i in range(32)]})
    assert plan_batches(ds, 8, seed=0).shared_rows == 0


@pytest.mark.parametrize("field, value, flag", [
    ("epochs", math.inf, "--epochs inf"),
    ("epochs", math.nan, "--epochs nan"),
    ("lr", math.inf, "--lr inf"),
    ("temperature", math.inf, "--temperature inf"),
    ("temperature", math.nan, "--temperature nan"),
    ("warmup_ratio", math.nan, "warmup_ratio nan"),
    ("weight_decay", math.inf, "weight_decay inf"),
])
def test_non_finite_float_settings_are_refused(field, value, flag):
    with pytest.raises(EmbedtuneError) as caught:
        check_settings(TrainConfig(data="x.jsonl", **{field: value}))
    assert str(caught.value) == f"{flag}: must be a finite number"


def test_non_finite_extra_training_argument_is_refused():
    with pytest.raises(EmbedtuneError, match=r"^max_grad_norm inf: must be a finite number$"):
        check_settings(TrainConfig(data="x.jsonl", extra={"max_grad_norm": math.inf}))


@pytest.mark.parametrize("value", [1e-30, 5e-5, 101.0, 1e9])
def test_temperature_outside_its_sane_range_is_refused(value):
    with pytest.raises(EmbedtuneError) as caught:
        check_settings(TrainConfig(data="x.jsonl", temperature=value))
    message = str(caught.value)
    assert message.startswith(f"--temperature {value}: must be between 0.0001 and 100") and "saturates" in message


@pytest.mark.parametrize("value", [1e-4, 0.01, 0.05, 1.0, 100.0])
def test_sane_temperatures_pass(value):
    check_settings(TrainConfig(data="x.jsonl", temperature=value))


def test_cli_epochs_inf_is_one_line_not_a_traceback(tmp_path):
    from typer.testing import CliRunner

    from embedtune.cli import app

    data = write_jsonl([{"anchor": f"q{i}", "positive": f"p{i}"} for i in range(16)], tmp_path / "p.jsonl")
    result = CliRunner().invoke(app, ["train", str(data), "--epochs", "inf", "--output", str(tmp_path / "out")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert " ".join(result.output.split()) == "error: --epochs inf: must be a finite number"


def test_a_run_whose_weights_end_as_the_base_says_so_and_cut_negatives_are_counted(tmp_path, tiny):
    """--lr 1e-30: LoRA's update rounds away in the merge, so the saved model is the base model; the run
    used to end like any other. The data's extra negatives (3 rows hold 2, most hold 1) are counted."""
    from embedtune import cli

    rows = [{"anchor": f"question {i}", "positive": f"answer {i}", "negative": [f"other {i}"]} for i in range(61)]
    rows += [{"anchor": f"question {i}", "positive": f"answer {i}", "negative": [f"other {i}", f"more {i}"]}
             for i in range(61, 64)]
    data = write_jsonl(rows, tmp_path / "negs.jsonl")
    out = tmp_path / "out"
    metrics = run(_config(data, tiny, out, lr=1e-30, max_steps=3)).metrics
    assert metrics["steps"] == 3
    assert any("the fine-tuned weights equal the base model's" in w for w in metrics["warnings"])
    assert metrics["rows_negatives_cut"] == 3
    summary = metrics["skipped_summary"]
    assert "3 rows held more than 1 hard negative: only the first 1 used (first at line 62)" in summary
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["warnings"] == metrics["warnings"] and on_disk["rows_negatives_cut"] == 3
    with cli.console.capture() as captured:
        cli.print_summary(metrics)
    text = " ".join(captured.get().split())
    assert "warning: the fine-tuned weights equal the base model's" in text and "3 rows held more than 1" in text


def test_a_run_that_learns_is_not_warned_about(tmp_path, tiny):
    data = write_jsonl([{"anchor": f"question {i}", "positive": f"answer {i}"} for i in range(64)],
                       tmp_path / "ok.jsonl")
    metrics = run(_config(data, tiny, tmp_path / "out", max_steps=3, lr=1e-3)).metrics
    assert metrics["warnings"] == [] and metrics["batches"]["warning"] is None


def test_constant_loss_zero_gradients_and_missing_steps_are_warnings():
    checks = RunChecks(torch.nn.Linear(3, 2))
    flat = [{"loss": 2.0794, "grad_norm": 0.0, "step": s} for s in (1, 2, 3)]
    found = checks.warnings(flat, steps=3, first_step=0, planned=8, batches=None)
    assert "trained 3 of the 8 planned steps" in found
    assert any("loss stayed exactly 2.0794 over the run (3 logged values)" in w for w in found)
    assert any("gradient norm was 0 at every logged step" in w for w in found)
    assert any("equal the base model's" in w for w in found)  # the Linear never changed
    infinite = [{"loss": 3.0 + s, "grad_norm": math.inf, "step": s} for s in (1, 2)]
    assert any("never finite" in w for w in checks.warnings(infinite, steps=2, first_step=0, planned=2, batches=None))
    with torch.no_grad():
        checks.model.weight.add_(1.0)
    moving = [{"loss": 2.0 - s / 10, "grad_norm": 0.5, "step": s} for s in (1, 2, 3)]
    assert checks.warnings(moving, steps=3, first_step=0, planned=3, batches=None) == []
    # the logs of steps before a resume are not this run's
    resumed = [{"loss": 1.0, "grad_norm": 0.0, "step": 1}, {"loss": 1.0, "grad_norm": 0.0, "step": 2},
               {"loss": 0.5, "grad_norm": 0.3, "step": 3}]
    assert checks.warnings(resumed, steps=3, first_step=2, planned=3, batches=None) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_the_weights_fingerprint_sees_one_element_moved_by_its_smallest_step(dtype):
    """`RunChecks` fingerprints the trainable weights without a copy of them: the smallest change
    there is (one element of a 262k-element tensor, one ulp) counts, in every dtype; frozen
    parameters are left out; equal weights fingerprint equal."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Linear(512, 4)).to(dtype)
    model[1].requires_grad_(False)
    checks = RunChecks(model)
    assert checks.unchanged()  # computed twice from the same weights: equal
    assert set(checks.before) == {"0.weight", "0.bias"}
    with torch.no_grad():
        model[1].weight.add_(1.0)  # frozen: not part of what training changes
    assert checks.unchanged()
    with torch.no_grad():
        element = model[0].weight.view(-1)[12345:12346]
        element.copy_(torch.nextafter(element, torch.full_like(element, math.inf)))
    assert not checks.unchanged()


# ------------------------------------------------------------------------ 2. silent choices, visible


def test_duplicate_json_keys_in_a_jsonl_row_are_an_error(tmp_path):
    path = _jsonl(tmp_path / "dup.jsonl", '{"anchor": "a", "positive": "p"}\n'
                                          '{"anchor": "a", "anchor": "b", "positive": "p"}\n')
    with pytest.raises(DataError) as caught:
        load_pairs(path)
    assert str(caught.value) == (f'{path}:2: duplicate key "anchor" in one object (JSON keeps only its last '
                                 "value): keep one")


def test_duplicate_json_keys_in_a_json_document_name_the_line(tmp_path):
    path = _jsonl(tmp_path / "dup.json", '[\n  {"anchor": "a", "positive": "p"},\n  {"anchor": "a",\n'
                                         '   "positive": "p",\n   "positive": "q"}\n]\n')
    with pytest.raises(DataError, match=r"dup.json:5: duplicate key \"positive\""):
        load_pairs(path)
    # JSON lines saved as .json: each line parsed on its own, the line named
    path = _jsonl(tmp_path / "lines.json", '{"anchor": "a", "positive": "p"}\n{"query": "x", "positive": "p", '
                                           '"query": "y"}\n')
    with pytest.raises(DataError, match=r"lines.json:2: duplicate key \"query\""):
        load_pairs(path)


def test_duplicate_keys_in_a_beir_file_are_an_error(tmp_path):
    folder = _beir(tmp_path / "beir", [("q1", "d1")])
    _jsonl(folder / "corpus.jsonl", '{"_id": "d1", "text": "one", "text": "two"}\n')
    with pytest.raises(DataError, match=r"corpus.jsonl:1: duplicate key \"text\""):
        read_beir(folder)


def test_two_aliases_of_one_column_with_text_are_an_error(tmp_path):
    path = _jsonl(tmp_path / "alias.jsonl", '{"anchor": "a", "positive": "p"}\n'
                                            '{"anchor": "a", "query": "b", "positive": "p"}\n')
    with pytest.raises(DataError) as caught:
        load_pairs(path)
    assert str(caught.value).startswith(f"{path}:2: both 'anchor' and 'query' given; they name the same column "
                                        "(the anchor)")
    path = _jsonl(tmp_path / "pos.jsonl", '{"question": "a", "positive": "p", "answer": "x"}\n')
    with pytest.raises(DataError, match=r"pos.jsonl:1: both 'positive' and 'answer' given.*\(the positive\)"):
        load_pairs(path)


def test_csv_with_two_alias_columns_names_the_line_and_uses_the_filled_one(tmp_path):
    path = tmp_path / "alias.csv"
    path.write_text('anchor,query,positive\na,,p\n,b,q\n', encoding="utf-8")
    assert load_pairs(path).dataset.to_dict() == {"anchor": ["a", "b"], "positive": ["p", "q"]}
    path.write_text('anchor,query,positive\na,,p\n"two\nlines",b,q\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"alias.csv:3: both 'anchor' and 'query' given"):
        load_pairs(path)


def test_an_alias_holding_nothing_is_not_a_conflict(tmp_path):
    path = _jsonl(tmp_path / "null.jsonl", '{"anchor": null, "query": "from query", "positive": "p", "pos": " "}\n')
    assert load_pairs(path).dataset.to_dict() == {"anchor": ["from query"], "positive": ["p"]}


def test_rows_with_more_negatives_than_most_are_counted(tmp_path):
    rows = [{"anchor": f"a{i}", "positive": f"p{i}", "neg": ["x", "y"]} for i in range(5)]
    rows[3]["neg"] = ["x", "y", "z", "w"]
    loaded = load_pairs(write_jsonl(rows, tmp_path / "more.jsonl"))
    assert (loaded.num_negatives, loaded.cut_negatives, loaded.first_cut_negatives) == (2, 1, "line 4")
    assert loaded.skipped_summary() == ("0 rows skipped for empty, null or missing text; 1 row held more than 2 hard negatives: "
                                        "only the first 2 used (first at line 4)")
    rows = [{"anchor": f"a{i}", "positive": f"p{i}"} for i in range(5)]
    rows[1]["neg"] = ["x"]
    loaded = load_pairs(write_jsonl(rows, tmp_path / "few.jsonl"))
    assert loaded.num_negatives == 0 and loaded.cut_negatives == 1
    assert loaded.skipped_summary().endswith("1 row held hard negatives, which most rows lack: not used "
                                             "(first at line 2)")


def _beir(folder: Path, qrels: list[tuple[str, str]], docs: list[str] | None = None) -> Path:
    (folder / "qrels").mkdir(parents=True)
    docs = docs or sorted({d for _, d in qrels})
    queries = sorted({q for q, _ in qrels})
    write_jsonl([{"_id": d, "text": f"document {d} about {d}"} for d in docs], folder / "corpus.jsonl")
    write_jsonl([{"_id": q, "text": f"what about {q}?"} for q in queries], folder / "queries.jsonl")
    (folder / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t1\n" for q, d in qrels), encoding="utf-8")
    return folder


def test_beir_query_ids_equal_to_document_ids_are_counted_and_noted(tmp_path):
    """Queries judged relevant to the document of their own id score 0 under BEIR's rule; that used to
    come with no word."""
    from embedtune.retrieval import load_eval_task

    folder = _beir(tmp_path / "same", [(f"x{i}", f"x{i}") for i in range(4)] + [("x0", "y0")],
                   docs=[f"x{i}" for i in range(4)] + ["y0"])
    loaded = read_beir(folder)
    ids = loaded.identical_ids
    assert (ids.pairs, ids.judged_relevant, ids.only_relevant) == (4, 4, 3)
    note = ("4 queries share their id with a corpus document: it is dropped from their results, as BEIR does; "
            "4 of these documents are judged relevant to their query and can never be found (3 of these queries "
            "have no other relevant document and score 0); --keep-identical-ids counts them")
    assert loaded.notes() == [note]
    assert load_eval_task(folder).notes == [note]  # what `embedtune eval` prints and writes to --output-json
    assert read_beir(folder, keep_identical_ids=True).notes() == [
        "4 queries share their id with a corpus document: counted as retrieved for them (--keep-identical-ids; "
        "BEIR drops such pairs)"]
    assert ids.as_dict() == {"pairs": 4, "judged_relevant": 4, "only_relevant": 3, "kept": False}


def test_beir_without_shared_ids_has_no_note(tmp_path):
    loaded = read_beir(_beir(tmp_path / "plain", [("q1", "d1"), ("q2", "d2")]))
    assert loaded.identical_ids.pairs == 0 and loaded.notes() == []


def test_keeping_identical_ids_finds_the_documents_the_note_says_are_dropped(tmp_path, tiny):
    """The library side of `embedtune eval --keep-identical-ids`: read_beir(keep_identical_ids=True) notes
    it, evaluate_retrieval(ignore_identical_ids=False) counts the pairs (5 documents: all in the top 10)."""
    from embedtune.loading import FastModel
    from embedtune.retrieval import evaluate_retrieval
    from embedtune.st import to_sentence_transformer

    folder = _beir(tmp_path / "same", [(f"x{i}", f"x{i}") for i in range(5)])
    model, tokenizer = FastModel.from_pretrained(str(tiny), max_seq_length=16, device="cpu")
    st_model = to_sentence_transformer(model, tokenizer)
    task = read_beir(folder).task
    assert evaluate_retrieval(st_model, task)["recall@10"] == 0.0  # BEIR's rule: nothing can be found
    kept = read_beir(folder, keep_identical_ids=True)
    assert "counted as retrieved" in kept.notes()[0]
    assert evaluate_retrieval(st_model, kept.task, ignore_identical_ids=False)["recall@10"] == 1.0
