"""The training-time evaluator (`shared_ir_evaluator`) and the keys it reports metrics under.

It scores with `retrieval` (exact search, trec_eval-style metrics) on an `ir_task.IRTask`, typically
the held-out pairs (`data.pairs_task.pairs_to_ir_task`); both names are re-exported here, where the
recipe imports them.
"""

from __future__ import annotations

from .data.pairs_task import pairs_to_ir_task  # noqa: F401 - re-exported: train.py imports it from here
from .ir_task import IdenticalIds, IRTask  # noqa: F401 - re-exported: the IR task's old home
from .retrieval import evaluate_retrieval


def metric_key(name: str = "ir-eval", metric: str = "ndcg@10") -> str:
    """The key the evaluator (and the trainer, with an 'eval_' prefix) reports `metric` under."""
    return f"{name}_cosine_{metric}"


def summarize(raw: dict, name: str = "ir-eval") -> dict[str, float]:
    """nDCG@10, MRR@10, Recall@1/10/100 and MAP@100 from the evaluator's raw output."""
    wanted = ["ndcg@10", "mrr@10", "recall@1", "recall@10", "recall@100", "map@100"]
    out = {}
    for metric in wanted:
        key = metric_key(name, metric)
        for candidate in (key, f"eval_{key}"):
            if candidate in raw:
                out[metric] = float(raw[candidate])
    return out


def evaluate_model(st_model, task: IRTask, batch_size: int = 64, show_progress: bool = False,
                   query_prompt: str | None = None, document_prompt: str | None = None) -> dict[str, float]:
    """IR metrics of `st_model` on `task` (eval mode; encoding split across ranks under DDP)."""
    return evaluate_retrieval(st_model, task, batch_size=batch_size, show_progress=show_progress,
                              query_prompt=query_prompt or "", document_prompt=document_prompt or "")


def shared_ir_evaluator(task: IRTask, name: str = "ir-eval", batch_size: int = 64, show_progress: bool = False,
                        query_prompt: str | None = None, document_prompt: str | None = None, clock=None):
    """The training-time evaluator: `evaluate_model` behind sentence-transformers' evaluator interface.

    It reports under `metric_key`'s keys (named as sentence-transformers' IR evaluator names them);
    its exact chunked search is split across ranks under DDP, and it computes the same numbers as
    `embedtune eval`. A `clock` (`run_eval.EvalClock`) counts its seconds as in-training evaluation.
    """
    import contextlib

    # heavy: sentence-transformers is imported when a training run builds its evaluator
    from sentence_transformers.sentence_transformer.evaluation import SentenceEvaluator

    class SharedIREvaluator(SentenceEvaluator):
        def __init__(self):
            super().__init__()
            self.name = name
            self.primary_metric = metric_key(name)
            self.greater_is_better = True

        def __call__(self, model, output_path=None, epoch: int = -1, steps: int = -1) -> dict[str, float]:
            with clock.measure("during") if clock is not None else contextlib.nullcontext():
                scores = evaluate_model(model, task, batch_size=batch_size, show_progress=show_progress,
                                        query_prompt=query_prompt, document_prompt=document_prompt)
            metrics = {metric_key(name, m): v for m, v in scores.items()}
            self.store_metrics_in_model_card_data(model, metrics, epoch, steps)
            return metrics

    return SharedIREvaluator()
