"""Which loss each data shape trains with: the readers keep scores (a `score` per row, `scores` per
candidate) and read STS-style sentence1/sentence2; the loss follows the columns or --loss; a column the
loss does not read is a one-line warning or error, never dropped silently."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedtune.data import load_pairs
from embedtune.errors import DataError, EmbedtuneError
from embedtune.loss_choice import choose_loss, loss_name

PAIRS = ["anchor", "positive"]
TRIPLETS = ["anchor", "positive", "negative_1"]
TWO_NEGATIVES = ["anchor", "positive", "negative_1", "negative_2"]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------- the table


@pytest.mark.parametrize("columns,requested,loss,trained", [
    (PAIRS, None, "mnrl", PAIRS),
    (TWO_NEGATIVES, None, "mnrl", TWO_NEGATIVES),
    (TRIPLETS, "triplet", "triplet", TRIPLETS),
    (PAIRS + ["score"], None, "cosent", PAIRS + ["score"]),
    (PAIRS + ["score"], "angle", "angle", PAIRS + ["score"]),
    (TWO_NEGATIVES + ["scores"], None, "marginmse", TWO_NEGATIVES + ["scores"]),
    (TWO_NEGATIVES + ["scores"], "KL", "kl", TWO_NEGATIVES + ["scores"]),
    (TRIPLETS + ["scores"], "margin-mse", "marginmse", TRIPLETS + ["scores"]),
    (TRIPLETS + ["score"], None, "marginmse", TRIPLETS + ["score"]),  # the teacher's margin (ST's format)
])
def test_columns_choose_the_loss(columns, requested, loss, trained):
    choice = choose_loss("f.jsonl", columns, requested)
    assert (choice.loss, choice.columns, choice.warning) == (loss, trained, None)


@pytest.mark.parametrize("columns,requested,label", [
    (PAIRS + ["score"], "mnrl", "score"),
    (TWO_NEGATIVES + ["scores"], "mnrl", "scores"),
    (TRIPLETS + ["score"], "triplet", "score"),
])
def test_a_column_the_loss_leaves_out_is_a_warning(columns, requested, label):
    choice = choose_loss("f.jsonl", columns, requested)
    assert label not in choice.columns
    assert choice.warning == f"f.jsonl: column '{label}' is not used by the {requested} loss: it trains on the texts only"


@pytest.mark.parametrize("columns,requested,needle", [
    (PAIRS, "triplet", "--loss triplet needs anchor, positive and exactly one negative; the file has columns: "
                       "anchor, positive"),
    (TWO_NEGATIVES, "triplet", "exactly one negative"),
    (PAIRS, "cosent", "--loss cosent needs two texts and a score per row"),
    (TRIPLETS + ["score"], "angle", "no negatives"),
    (PAIRS + ["score"], "kl", "--loss kl needs a query, a positive, negatives and 'scores'"),
    (TWO_NEGATIVES + ["score"], None, "a score per row and 2 hard negatives (columns: anchor, positive, negative_1, "
                                      "negative_2, score)"),
    (TRIPLETS + ["score"], "kl", "--loss kl needs a query, a positive, negatives and 'scores'"),
    (PAIRS + ["scores"], None, "teacher scores need hard negatives"),
])
def test_a_loss_that_does_not_fit_is_one_line_naming_file_and_columns(columns, requested, needle):
    with pytest.raises(EmbedtuneError, match="^f.jsonl: ") as e:
        choose_loss("f.jsonl", columns, requested)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_unknown_loss_names_the_choices():
    with pytest.raises(EmbedtuneError, match="not one of mnrl, triplet, cosent, angle, marginmse, kl"):
        loss_name("softmax")


def test_infonce_options_on_another_loss_are_refused():
    from embedtune.loss_choice import check_options

    config = SimpleNamespace(symmetric=True, matryoshka_dims=None, temperature=0.05)
    with pytest.raises(EmbedtuneError, match="--symmetric applies to the mnrl loss only; s.jsonl trains with cosent"):
        check_options(config, "cosent", "s.jsonl")
    check_options(config, "mnrl", "s.jsonl")


# ----------------------------------------------------------------------------------------- the readers


def test_sts_shape_reads_as_two_texts_and_a_score(tmp_path):
    """sentence1/sentence2/score, refused as "missing columns" before, is a CoSENT data set."""
    path = _jsonl(tmp_path / "sts.jsonl", [{"sentence1": "a cat sits", "sentence2": "a cat is sitting", "score": 4.5},
                                           {"sentence1": "a dog", "sentence2": "stocks fell", "score": 0},
                                           {"sentence1": "x", "sentence2": "y", "score": None}])
    loaded = load_pairs(path)
    assert loaded.dataset.to_dict() == {"anchor": ["a cat sits", "a dog"], "positive": ["a cat is sitting", "stocks fell"],
                                        "score": [4.5, 0.0]}
    assert loaded.label_column == "score" and loaded.skipped_no_score == 1
    assert "1 row skipped for a missing score" in loaded.skipped_summary()
    assert choose_loss(str(path), loaded.dataset.column_names).loss == "cosent"


def test_csv_scores_are_numbers_and_label_is_a_score(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("text1,text2,label\nq1,p1,0.5\nq2,p2,1\n", encoding="utf-8")
    assert load_pairs(path).dataset.to_dict() == {"anchor": ["q1", "q2"], "positive": ["p1", "p2"], "score": [0.5, 1.0]}


def test_teacher_scores_follow_the_negatives(tmp_path):
    """One teacher score per candidate; a row cut to the common number of negatives keeps the scores of
    those it keeps."""
    path = _jsonl(tmp_path / "kd.jsonl", [
        {"query": "q1", "positive": "p1", "negative": ["n1", "n2"], "scores": [9, 2, 1.5]},
        {"query": "q2", "positive": "p2", "negative": ["n3", "n4", "n5"], "scores": [8, 3, 1, 0]},
        {"query": "q3", "positive": "p3", "negative": ["n6", "n7"], "scores": [3, 2, 1]},
    ])
    loaded = load_pairs(path)
    assert loaded.dataset["scores"] == [[9.0, 2.0, 1.5], [8.0, 3.0, 1.0], [3.0, 2.0, 1.0]]
    assert loaded.dataset["negative_2"] == ["n2", "n4", "n7"] and loaded.cut_negatives == 1
    assert choose_loss(str(path), loaded.dataset.column_names).loss == "marginmse"


def test_parquet_scores_are_typed(tmp_path):
    path = tmp_path / "s.parquet"
    pq.write_table(pa.table({"anchor": ["a", "b"], "positive": ["p", "q"], "score": pa.array([1, 0], pa.int8())}), path)
    assert load_pairs(path).dataset["score"] == [1.0, 0.0]
    pq.write_table(pa.table({"anchor": ["a"], "positive": ["p"], "score": pa.array([True])}), path)
    with pytest.raises(DataError, match="column 'score' has type bool, expected a number"):
        load_pairs(path)


@pytest.mark.parametrize("row,needle", [
    ({"anchor": "a", "positive": "p", "score": "high"}, ':1: column \'score\' holds text ("high"), expected a finite number'),
    ({"anchor": "a", "positive": "p", "score": 1, "label": 2}, "both 'score' and 'label' given"),
    ({"anchor": "a", "positive": "p", "negative": ["n"], "scores": [1]}, "'scores' holds 1 number, expected 2"),
    ({"anchor": "a", "positive": "p", "negative": ["n"], "scores": [1, "x"]}, "holds a list holding"),
    ({"anchor": "a", "positive": "p", "score": 1, "scores": [1]}, "both 'score' (one score per row) and 'scores'"),
    ([{"anchor": "a", "positive": "p", "score": 1}, {"anchor": "b", "positive": "q", "scores": [1]}],
     "some rows hold a score ('score'/'label', one per row) and others teacher 'scores'"),
])
def test_bad_scores_are_one_line(tmp_path, row, needle):
    path = _jsonl(tmp_path / "bad.jsonl", [row] if isinstance(row, dict) else row)
    with pytest.raises(DataError) as e:
        load_pairs(path)
    assert str(e.value).startswith(str(path)) and needle in str(e.value), str(e.value)


# ----------------------------------------------------------------------------------------- CUDA graphs


def test_graphs_are_off_with_a_reason_for_other_losses_and_several_data_sets(tmp_path):
    from embedtune.loss_choice import graphs_off_reason
    from embedtune.losses import ContrastiveLoss
    from embedtune.shape_losses import CoSENTLoss
    from embedtune.speed_choice import graph_step_for
    from embedtune.train import TrainConfig

    model = SimpleNamespace(device=SimpleNamespace(type="cuda"), max_seq_length=32)
    for loss, needle in ((CoSENTLoss(None), "the CoSENTLoss loss is not captured"),
                         ({"a": ContrastiveLoss(None)}, "several data sets")):
        trainer = SimpleNamespace(loss=loss, model=model, args=SimpleNamespace(fp16=False, bf16=True))
        assert needle in graph_step_for(trainer, TrainConfig(data="x"))
    assert graphs_off_reason(ContrastiveLoss(None)) is None  # graphs.unsupported_reason decides as before


def test_a_real_run_says_which_column_it_leaves_out(tmp_path):
    """`--loss mnrl` on scored pairs trains, and the score column left out is a warning in the log, the
    summary and metrics.json: a score is never dropped silently."""
    from typer.testing import CliRunner

    from embedtune.cli import app
    from embedtune.data import build_stdlib_pairs

    pairs = build_stdlib_pairs(max_pairs=40, seed=5)
    data = _jsonl(tmp_path / "sts.jsonl", [{"sentence1": p["anchor"], "sentence2": p["positive"], "score": i % 5}
                                           for i, p in enumerate(pairs)])
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", str(data), "--loss", "mnrl", "--output", str(out), "--max-steps", "2",
                                      "--batch-size", "8", "--max-seq-length", "32", "--eval-size", "4", "--evals", "1"])
    assert result.exit_code == 0, result.output
    line = f"{data}: column 'score' is not used by the mnrl loss: it trains on the texts only"
    assert f"warning: {line}" in " ".join(result.output.split())
    metrics = json.loads((out / "metrics.json").read_text())
    assert line in metrics["warnings"] and metrics["datasets"][0]["columns"] == ["anchor", "positive"]
