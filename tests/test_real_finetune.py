"""A real fine-tune: bundled MiniLM on stdlib code-search pairs must improve held-out nDCG@10,
and the packed fast path must train to the same quality as the plain path."""

from __future__ import annotations

import pytest

import embedtune
from embedtune.data import build_stdlib_pairs, write_jsonl

SETTINGS = dict(max_steps=12, batch_size=32, max_seq_length=32, lora_r=16, lr=3e-4, eval_size=200,
                evals_per_run=1, seed=7, eval_share=1.0)  # every evaluation exact: base and final on one set


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    return write_jsonl(build_stdlib_pairs(max_pairs=500, seed=1), tmp_path_factory.mktemp("real") / "pairs.jsonl")


@pytest.fixture(scope="module")
def fast_run(pairs_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("fast") / "out"
    _, metrics = embedtune.train(str(pairs_file), output_dir=str(out), fast=True, **SETTINGS)
    return out, metrics


def test_finetune_raises_heldout_ndcg(fast_run):
    out, metrics = fast_run
    base, final = metrics["base"]["ndcg@10"], metrics["final"]["ndcg@10"]
    assert final > base + 0.01, (base, final)
    assert (out / "model" / "modules.json").exists()
    assert (out / "metrics.json").exists() and (out / "training_curves.png").stat().st_size > 1000


def test_saved_model_scores_what_training_reported(fast_run, pairs_file):
    """Reload the saved folder with stock sentence-transformers and re-score the same split."""
    from sentence_transformers import SentenceTransformer

    from embedtune.data import column, load_pairs, train_eval_split
    from embedtune.evaluate import evaluate_model, pairs_to_ir_task

    out, metrics = fast_run
    data = load_pairs(pairs_file).dataset
    _, eval_ds = train_eval_split(data, SETTINGS["eval_size"], seed=SETTINGS["seed"])
    task = pairs_to_ir_task(eval_ds, corpus_texts=column(data, "positive"))
    model = SentenceTransformer(str(out / "model"), device="cpu")
    assert abs(evaluate_model(model, task)["ndcg@10"] - metrics["final"]["ndcg@10"]) < 1e-3


def test_fast_path_quality_parity(fast_run, pairs_file):
    _, fast = fast_run
    _, plain = embedtune.train(str(pairs_file), fast=False, **SETTINGS)
    assert abs(fast["final"]["ndcg@10"] - plain["final"]["ndcg@10"]) < 0.005, (fast["final"], plain["final"])
