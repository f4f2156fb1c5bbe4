"""Pieces of the recipe that need no model: best-weight restoration and the IR task."""

from __future__ import annotations

import torch
from datasets import Dataset

from embedtune.evaluate import pairs_to_ir_task
from embedtune.train import BestWeights


def test_best_weights_restores_the_best_eval():
    model = torch.nn.Linear(3, 2)
    frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)
    model.register_parameter("frozen", frozen)
    best = BestWeights(model, "eval_score")
    scores = [0.3, 0.7, 0.5]
    snapshots = []
    for step, score in enumerate(scores):
        with torch.no_grad():
            model.weight.add_(1.0)
        snapshots.append(model.weight.detach().clone())
        best.offer({"eval_score": score}, step)
    best.restore()
    assert torch.equal(model.weight, snapshots[1])
    assert best.best_step == 1 and best.best_value == 0.7
    assert "frozen" not in best._weights, "only trainable weights are copied"


def test_best_weights_tie_goes_to_the_later_step():
    """Same score, more training: the later weights are kept (the first of a tie was kept before)."""
    model = torch.nn.Linear(3, 2)
    best = BestWeights(model, "eval_score")
    for step, score in enumerate([0.5, 0.8, 0.8, 0.6]):
        with torch.no_grad():
            model.weight.fill_(step)
        best.offer({"eval_score": score}, step)
    best.restore()
    assert best.best_step == 2 and torch.all(model.weight == 2)


def test_ir_task_corpus_is_all_positives_and_merges_repeated_anchors():
    eval_rows = Dataset.from_dict({"anchor": ["q1", "q2", "q1"], "positive": ["d1", "d2", "d3"]})
    task = pairs_to_ir_task(eval_rows, corpus_texts=["d0", "d1", "d2", "d3", "d1"])
    assert sorted(task.corpus.values()) == ["d0", "d1", "d2", "d3"]
    assert len(task.queries) == 2
    by_text = {text: qid for qid, text in task.queries.items()}
    docs = {text: did for did, text in task.corpus.items()}
    assert task.relevant[by_text["q1"]] == {docs["d1"], docs["d3"]}


def test_logs_print_as_readable_lines():
    from embedtune.monitoring import log_line

    line = log_line({"loss": 0.29861, "grad_norm": 0.94, "learning_rate": 2e-4, "epoch": 0.2, "tokens_per_s": 2348.0},
                    5, 10)
    assert line == "step 5/10  loss 0.2986  lr 0.0002  grad norm 0.94  2,348 tok/s"
    line = log_line({"eval_ir-eval_cosine_ndcg@10": 0.82174, "eval_ir-eval_cosine_mrr@10": 0.78,
                     "eval_ir-eval_cosine_recall@10": 0.95, "eval_runtime": 2.21, "epoch": 0.4}, 10, 10)
    assert line == "step 10/10  eval  ndcg@10 0.8217  mrr@10 0.7800  recall@10 0.9500  (2.2 s)"
    assert log_line({"train_runtime": 7.0, "train_loss": 0.2}, 10, 10) is None
