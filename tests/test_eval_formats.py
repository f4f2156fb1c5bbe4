"""`embedtune eval` on pairs files and BEIR folders: the BEIR reader and its one-line errors, the graded
metrics (hand-computed cases, pytrec_eval when installed, sentence-transformers' evaluator on binary
relevance), the chunked exact search, and the CLI with --compare and --output-json."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from embedtune import FastModel, to_sentence_transformer
from embedtune.cli import app
from embedtune.data import build_stdlib_pairs, read_beir, write_jsonl
from embedtune.errors import DataError, EmbedtuneError
from embedtune.evaluate import IRTask, evaluate_model, pairs_to_ir_task
from embedtune.loading import DEFAULT_MODEL_ID
from embedtune.retrieval import (
    RETRIEVAL_METRICS,
    average_precision_at_k,
    evaluate_retrieval,
    ir_metrics,
    ndcg_at_k,
    recall_at_k,
    reciprocal_rank_at_k,
    search,
    streaming_topk,
)
from tiny_models import make_tiny_model

runner = CliRunner()

CORPUS = [
    {"_id": "py", "title": "Python", "text": "Python is a popular programming language created by Guido van Rossum."},
    {"_id": "snake", "title": "Pythons", "text": "Pythons are large non-venomous snakes found in Africa and Asia."},
    {"_id": "eiffel", "title": "Eiffel Tower", "text": "The Eiffel Tower is a wrought-iron tower in Paris, France."},
    {"_id": "louvre", "title": "", "text": "The Louvre in Paris is the world's most visited art museum."},
    {"_id": "bread", "text": "To bake bread, mix flour, water, yeast and salt, knead, let it rise, then bake."},
    {"_id": "cake", "title": "Sponge cake", "text": "A sponge cake is made from flour, sugar and eggs."},
    {"_id": "moon", "title": "Moon", "text": "The Moon is Earth's only natural satellite."},
    {"_id": "mars", "title": "Mars", "text": "Mars is the fourth planet from the Sun, known as the red planet."},
    {"_id": 7, "title": "Football", "text": "Football is a team sport played with a ball between two teams."},
    {"_id": "tennis", "title": "Tennis", "text": "Tennis is a racket sport played on a court."},
]
QUERIES = [
    {"_id": "q1", "text": "which programming language did Guido van Rossum create"},
    {"_id": "q2", "text": "famous landmarks in Paris"},
    {"_id": "q3", "text": "how do I bake bread at home"},
    {"_id": "q4", "text": "what is the red planet"},
    {"_id": "q5", "text": "a query nobody judged"},
]
QRELS = [("q1", "py", 2), ("q1", "snake", 0), ("q2", "eiffel", 2), ("q2", "louvre", 1), ("q3", "bread", 2),
         ("q3", "cake", 1), ("q4", "mars", 1), ("q4", "moon", 0)]


def _write_beir(root: Path, corpus=CORPUS, queries=QUERIES, qrels=QRELS, split="test", header=True) -> Path:
    (root / "qrels").mkdir(parents=True, exist_ok=True)
    (root / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in corpus))
    (root / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    lines = ["query-id\tcorpus-id\tscore"] if header else []
    lines += [f"{q}\t{d}\t{s}" for q, d, s in qrels]
    (root / "qrels" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    return make_tiny_model("bert", tmp_path_factory.mktemp("tiny_eval"))


@pytest.fixture(scope="module")
def stdlib_rows():
    return build_stdlib_pairs(max_pairs=60, seed=1)  # slow-ish (scans the stdlib): built once


@pytest.fixture(scope="module")
def tiny_st(tiny_bert):
    model, tokenizer = FastModel.from_pretrained(str(tiny_bert), max_seq_length=64, device="cpu")
    return to_sentence_transformer(model, tokenizer)


def _one_line_error(result, *needles: str) -> str:
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


# --------------------------------------------------------------------------------------------------
# BEIR reader


def test_beir_reader_builds_graded_task(tmp_path):
    qrels = QRELS + [("q9", "py", 1), ("q1", "gone", 1)]
    loaded = read_beir(_write_beir(tmp_path, qrels=qrels))
    task = loaded.task
    assert loaded.split == "test" and loaded.fallback is None
    assert task.corpus["py"] == "Python Python is a popular programming language created by Guido van Rossum."
    assert task.corpus["louvre"] == CORPUS[3]["text"]  # empty title: the text alone
    assert task.corpus["bread"] == CORPUS[4]["text"]  # no title field
    assert task.corpus["7"].startswith("Football Football")  # integer ids become strings
    assert list(task.queries) == ["q1", "q2", "q3", "q4"]  # only judged queries with a relevant document
    assert task.relevant == {"q1": {"py"}, "q2": {"eiffel", "louvre"}, "q3": {"bread", "cake"}, "q4": {"mars"}}
    assert task.graded["q2"] == {"eiffel": 2, "louvre": 1} and task.graded["q4"] == {"mars": 1, "moon": 0}
    assert task.grades() is task.graded
    assert loaded.judgements == len(qrels)
    assert (loaded.skipped_unknown_query, loaded.skipped_unknown_document) == (1, 1)
    notes = " ".join(loaded.notes())
    assert "1 judgement in qrels/test.tsv name queries missing" in notes and "documents missing" in notes


def test_beir_split_fallback_and_explicit_split(tmp_path):
    dev_only = _write_beir(tmp_path / "a", split="dev", header=False)  # a header-less file reads too
    loaded = read_beir(dev_only)
    assert loaded.split == "dev" and "test.tsv is missing" in loaded.fallback and loaded.task.relevant["q4"] == {"mars"}
    assert loaded.fallback in loaded.notes()
    train_only = _write_beir(tmp_path / "b", split="train")
    with pytest.raises(DataError, match=r"no test.tsv or dev.tsv \(qrels splits found: train\); pass --split"):
        read_beir(train_only)
    assert read_beir(train_only, split="train").split == "train"
    with pytest.raises(DataError, match=r"validation.tsv: no such file \(qrels splits found: train\)"):
        read_beir(train_only, split="validation")


def test_pairs_task_grades_are_binary():
    task = IRTask(queries={"q": "x"}, corpus={"a": "a", "b": "b"}, relevant={"q": {"a", "b"}})
    assert task.graded is None and task.grades() == {"q": {"a": 1, "b": 1}}


def test_scored_pairs_say_their_scores_are_not_judgements(tmp_path):
    from embedtune.retrieval import load_eval_task

    path = tmp_path / "sts.jsonl"
    path.write_text("".join(json.dumps({"sentence1": f"a{i}", "sentence2": f"b{i}", "score": i / 4}) + "\n"
                            for i in range(5)), encoding="utf-8")
    notes = load_eval_task(path).notes
    assert any("'score' column is not used" in note for note in notes), notes
    plain = tmp_path / "pairs.jsonl"
    plain.write_text("".join(json.dumps({"anchor": f"a{i}", "positive": f"b{i}"}) + "\n" for i in range(5)))
    assert load_eval_task(plain).notes == []


BAD_INPUTS = {
    "bad json": (lambda r: (r / "corpus.jsonl").write_text('{"_id": "a", "text": "x"}\n{"_id": "b", "text": \n'),
                 ["corpus.jsonl:2", "invalid JSON"]),
    "missing text": (lambda r: (r / "corpus.jsonl").write_text('{"_id": "a", "body": "x"}\n'),
                     ["corpus.jsonl:1", 'missing "text"', "body"]),
    "duplicate doc": (lambda r: (r / "corpus.jsonl").write_text(
        '{"_id": "py", "text": "x"}\n\n{"_id": "b", "text": "y"}\n{"_id": "py", "text": "z"}\n'),
        ["corpus.jsonl:4", "duplicate _id 'py'", "first on line 1"]),
    "duplicate query": (lambda r: (r / "queries.jsonl").write_text(
        '{"_id": "q1", "text": "x"}\n{"_id": "q1", "text": "y"}\n'), ["queries.jsonl:2", "duplicate _id 'q1'"]),
    "missing id": (lambda r: (r / "queries.jsonl").write_text('{"id": "q1", "text": "x"}\n'),
                   ["queries.jsonl:1", 'missing "_id"']),
    "float score": (lambda r: (r / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\tpy\t1\nq2\teiffel\t1.5\n"),
                    ["test.tsv:3", "'1.5' is not an integer"]),
    "trec columns": (lambda r: (r / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\t0\tpy\t1\n"),
                     ["test.tsv:2", "expected 3 tab-separated columns", "got 4"]),
    "bad header": (lambda r: (r / "qrels" / "test.tsv").write_text("qid docid rel\nq1\tpy\t1\n"),
                   ["test.tsv:1", "expected the header"]),
    "duplicate judgement": (lambda r: (r / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\nq1\tpy\t1\nq1\tpy\t2\n"), ["test.tsv:3", "duplicate judgement", "first on line 2"]),
    "no relevant": (lambda r: (r / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\tpy\t0\nq1\tx\t2\n"),
                    ["test.tsv", "no judged query has a relevant", "1 unknown documents"]),
    "no queries file": (lambda r: (r / "queries.jsonl").unlink(), ["queries.jsonl: no such file"]),
    "empty corpus": (lambda r: (r / "corpus.jsonl").write_text("\n"), ["corpus.jsonl: file is empty"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_malformed_beir_is_one_line_error(tmp_path, case):
    root = _write_beir(tmp_path / "beir")
    damage, needles = BAD_INPUTS[case]
    damage(root)
    # The data validates before any model loads, so the model argument is never touched.
    _one_line_error(runner.invoke(app, ["eval", "no-such-model", str(root)]), *needles)


def test_eval_argument_errors_are_one_line(tmp_path):
    pairs = write_jsonl([{"anchor": "a", "positive": "b"}], tmp_path / "pairs.jsonl")
    _one_line_error(runner.invoke(app, ["eval", "m", str(pairs), "--split", "dev"]), "--split applies to BEIR")
    _one_line_error(runner.invoke(app, ["eval", "m", str(pairs), "--device", "gpu0"]), "--device 'gpu0'")
    _one_line_error(runner.invoke(app, ["eval", "m", str(pairs), "--output-json", str(tmp_path)]), "is a folder")
    if not torch.cuda.is_available():
        _one_line_error(runner.invoke(app, ["eval", "m", str(pairs), "--device", "cuda"]), "CUDA is not available")
    _one_line_error(runner.invoke(app, ["eval", "m", str(_write_beir(tmp_path / "b")), "--split", "../x"]), "--split")


# --------------------------------------------------------------------------------------------------
# Metrics


def test_metrics_hand_computed():
    grades = {"a": 2, "b": 1, "c": 0}
    ranked = ["b", "x", "a", "c"]
    # DCG = 1/log2(2) + 2/log2(4) = 2; ideal = 2/log2(2) + 1/log2(3)
    assert ndcg_at_k(ranked, grades, 10) == pytest.approx(2 / (2 + 1 / math.log2(3)))
    assert ndcg_at_k(ranked, grades, 1) == pytest.approx(0.5)  # 1 of an ideal 2
    assert ndcg_at_k(["a", "b"], grades, 10) == pytest.approx(1.0)
    assert reciprocal_rank_at_k(ranked, grades, 10) == 1.0
    assert reciprocal_rank_at_k(["x", "c", "a"], grades, 10) == pytest.approx(1 / 3)  # grade 0 is not relevant
    assert recall_at_k(ranked, grades, 1) == 0.5 and recall_at_k(ranked, grades, 3) == 1.0
    assert average_precision_at_k(ranked, grades, 100) == pytest.approx((1 / 1 + 2 / 3) / 2)
    assert average_precision_at_k(ranked, grades, 2) == pytest.approx(0.5)  # divides by all relevant (trec_eval)
    late = [f"n{i}" for i in range(10)] + ["a"]  # the only relevant document at rank 11
    assert reciprocal_rank_at_k(late, {"a": 1}, 10) == 0.0 and recall_at_k(late, {"a": 1}, 10) == 0.0
    assert recall_at_k(late, {"a": 1}, 100) == 1.0
    assert average_precision_at_k(late, {"a": 1}, 100) == pytest.approx(1 / 11)
    assert ndcg_at_k(late, {"a": 3}, 10) == 0.0 and ndcg_at_k(["c"], {"c": 0}, 10) == 0.0

    metrics = ir_metrics({"q1": ranked, "q2": late}, {"q1": grades, "q2": {"a": 1}, "q3": {"z": 0}})
    assert list(metrics) == list(RETRIEVAL_METRICS)
    assert metrics["mrr@10"] == pytest.approx((1 + 0) / 2)  # q3 has nothing relevant: not averaged
    assert metrics["recall@100"] == pytest.approx(1.0)
    assert metrics["map@100"] == pytest.approx(((1 + 2 / 3) / 2 + 1 / 11) / 2)
    assert ir_metrics({}, {"q": {"a": 1}})["ndcg@10"] == 0.0  # an unranked query scores zero
    with pytest.raises(EmbedtuneError, match="no query has a relevant"):
        ir_metrics({"q": ["a"]}, {"q": {"a": 0}})


def test_metrics_match_pytrec_eval():
    pytrec_eval = pytest.importorskip("pytrec_eval")
    rng = random.Random(0)
    docs = [f"d{i}" for i in range(300)]
    qrels, rankings = {}, {}
    for q in range(40):
        judged = rng.sample(docs, rng.randint(1, 130))  # some queries have more than 100 relevant documents
        qrels[f"q{q}"] = {d: rng.choice([0, 1, 1, 2, 3]) for d in judged}
        qrels[f"q{q}"][judged[0]] = 2
        rankings[f"q{q}"] = rng.sample(docs, 150)
    ours = ir_metrics(rankings, qrels)
    run = {q: {d: 1000.0 - r for r, d in enumerate(ranked[:100])} for q, ranked in rankings.items()}
    run10 = {q: {d: 1000.0 - r for r, d in enumerate(ranked[:10])} for q, ranked in rankings.items()}
    per_query = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.1,10,100", "map_cut.100"}).evaluate(run)
    rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(run10)

    def mean(values):
        return sum(values) / len(values)

    assert ours["ndcg@10"] == pytest.approx(mean([m["ndcg_cut_10"] for m in per_query.values()]), abs=1e-9)
    for k in (1, 10, 100):
        assert ours[f"recall@{k}"] == pytest.approx(mean([m[f"recall_{k}"] for m in per_query.values()]), abs=1e-9)
    assert ours["map@100"] == pytest.approx(mean([m["map_cut_100"] for m in per_query.values()]), abs=1e-9)
    assert ours["mrr@10"] == pytest.approx(mean([m["recip_rank"] for m in rr.values()]), abs=1e-9)


def _pairs_task(rows):
    import datasets

    # Some anchors get a second positive, so several queries have two relevant documents.
    rows = rows + [{"anchor": rows[i]["anchor"], "positive": rows[i + 30]["positive"]} for i in range(6)]
    return pairs_to_ir_task(datasets.Dataset.from_list(rows), corpus_texts=[r["positive"] for r in rows])


def test_binary_metrics_match_sentence_transformers(tiny_st, stdlib_rows):
    """On binary relevance with <= 100 relevant per query, all six metrics equal ST's evaluator's (its MAP divides
    by min(k, relevant), trec_eval's by relevant: the same here), with the corpus searched in 16-document chunks."""
    task = _pairs_task(stdlib_rows)
    assert max(len(r) for r in task.relevant.values()) == 2
    ours = evaluate_retrieval(tiny_st, task, chunk_size=16)
    theirs = evaluate_model(tiny_st, task)
    assert set(theirs) == set(ours) == set(RETRIEVAL_METRICS)
    assert 0.0 < ours["ndcg@10"] < 1.0 and ours["recall@100"] > ours["recall@1"]  # a ranking, not a trivial one
    for metric in RETRIEVAL_METRICS:
        assert ours[metric] == pytest.approx(theirs[metric], abs=1e-6), metric


# --------------------------------------------------------------------------------------------------
# Search


def test_streaming_topk_equals_full_search():
    torch.manual_seed(0)
    queries = torch.nn.functional.normalize(torch.randn(13, 16), dim=1)
    corpus = torch.nn.functional.normalize(torch.randn(250, 16), dim=1)
    full_scores, full_ids = (queries @ corpus.T).topk(100, dim=1)
    for chunk in (1, 7, 99, 250, 1000):
        scores, ids = streaming_topk(queries, corpus.split(chunk), 100)
        assert torch.equal(ids, full_ids), chunk
        assert torch.allclose(scores, full_scores, atol=1e-6)
    scores, ids = streaming_topk(queries, corpus[:30].split(8), 100)  # fewer documents than k
    assert ids.shape == (13, 30) and torch.equal(ids, (queries @ corpus[:30].T).topk(30, dim=1).indices)


def test_search_with_small_chunks_equals_one_chunk(tiny_st, stdlib_rows):
    task = _pairs_task(stdlib_rows)
    queries, corpus = list(task.queries.values()), list(task.corpus.values())
    scores_small, ids_small = search(tiny_st, queries, corpus, 20, chunk_size=16, batch_size=8)
    scores_one, ids_one = search(tiny_st, queries, corpus, 20, chunk_size=len(corpus))
    assert ids_small.shape == (len(queries), 20)
    assert torch.allclose(scores_small, scores_one, atol=1e-5)
    assert torch.equal(ids_small[:, :5], ids_one[:, :5])


def test_identical_ids_are_not_retrieved(tiny_st):
    """As in BEIR: a document sharing the query's id (same text here, so it ranks first) is ignored."""
    task = IRTask(queries={"q1": "an argument about taxes"},
                  corpus={"q1": "an argument about taxes", "d1": "a counter-argument about taxes"},
                  relevant={"q1": {"d1"}})
    assert evaluate_retrieval(tiny_st, task)["mrr@10"] == 1.0
    assert evaluate_retrieval(tiny_st, task, ignore_identical_ids=False)["mrr@10"] == 0.5


# --------------------------------------------------------------------------------------------------
# The CLI


def test_cli_beir_with_compare_and_json(tmp_path, tiny_bert):
    root = _write_beir(tmp_path / "beir")
    report = tmp_path / "reports" / "metrics.json"
    result = runner.invoke(app, ["eval", DEFAULT_MODEL_ID, str(root), "--compare", str(tiny_bert), "--device", "cpu",
                                 "--max-seq-length", "64", "--batch-size", "4", "--output-json", str(report)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.replace("│", " ").split())  # table cells, separators dropped
    assert "(split test): 4 queries, 10 documents" in text
    data = json.loads(report.read_text())
    model, base = data["metrics"], data["base"]["metrics"]
    assert data["format"] == "beir" and data["split"] == "test" and data["queries"] == 4 and data["documents"] == 10
    assert data["base"]["model"] == str(tiny_bert) and set(model) == set(base) == set(RETRIEVAL_METRICS)
    # The real MiniLM finds the obvious documents; the random tiny model does far worse.
    assert model["ndcg@10"] > 0.9 and model["mrr@10"] == 1.0 and model["recall@10"] == 1.0
    assert base["ndcg@10"] < model["ndcg@10"]
    for metric in RETRIEVAL_METRICS:
        assert data["change"][metric] == pytest.approx(model[metric] - base[metric])
        row = f"{metric} {base[metric]:.4f} {model[metric]:.4f} {model[metric] - base[metric]:+.4f}"
        assert row in text, row


def test_cli_pairs_match_training_evaluator(tmp_path, tiny_bert, tiny_st, stdlib_rows):
    rows = stdlib_rows[:40]
    data = write_jsonl(rows, tmp_path / "pairs.jsonl")
    report = tmp_path / "m.json"
    result = runner.invoke(app, ["eval", str(tiny_bert), str(data), "--output-json", str(report), "--device", "cpu",
                                 "--max-seq-length", "64"])
    assert result.exit_code == 0, result.output
    assert "40 queries, 40 documents" in " ".join(result.output.split())
    got = json.loads(report.read_text())
    assert got["format"] == "pairs" and got["split"] is None and "base" not in got
    import datasets

    expected = evaluate_model(tiny_st, pairs_to_ir_task(datasets.Dataset.from_list(rows),
                                                        corpus_texts=[r["positive"] for r in rows]))
    for metric in RETRIEVAL_METRICS:
        assert got["metrics"][metric] == pytest.approx(expected[metric], abs=1e-6), metric
