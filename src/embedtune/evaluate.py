"""Retrieval evaluation on held-out pairs: each anchor must find its own positive among all positives."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class IRTask:
    """Queries, a corpus and relevance judgements (`retrieval.evaluate_retrieval` scores a model on them).

    ``relevant`` holds the relevant documents per query (binary);
    ``graded`` optionally holds integer grades per query (e.g. BEIR qrels; grade <= 0: not relevant)
    for graded nDCG (`embedtune.retrieval`). Without it every relevant document has grade 1.
    """

    queries: dict[str, str]
    corpus: dict[str, str]
    relevant: dict[str, set[str]]
    graded: dict[str, dict[str, int]] | None = None

    def grades(self) -> dict[str, dict[str, int]]:
        """Per query, document -> grade: ``graded`` when given, else 1 for every relevant document."""
        if self.graded is not None:
            return self.graded
        return {qid: dict.fromkeys(docs, 1) for qid, docs in self.relevant.items()}

    def identical_ids(self) -> IdenticalIds:
        """The evaluated queries whose id is also a corpus document's id: BEIR's rule (the default of
        `retrieval.evaluate_retrieval`) never counts that document as retrieved for its query."""
        grades = self.grades()
        same = [qid for qid in self.queries if qid in grades and qid in self.corpus]
        judged = [qid for qid in same if grades[qid].get(qid, 0) > 0]
        only = sum(1 for qid in judged if all(g <= 0 for d, g in grades[qid].items() if d != qid))
        return IdenticalIds(pairs=len(same), judged_relevant=len(judged), only_relevant=only)


@dataclass
class IdenticalIds:
    """Query/document pairs sharing one id (`IRTask.identical_ids`): ``pairs`` in all, ``judged_relevant``
    of them judged relevant (those judgements can never be found while the pairs are dropped), and
    ``only_relevant`` of those whose query has no other relevant document (it scores 0)."""

    pairs: int = 0
    judged_relevant: int = 0
    only_relevant: int = 0

    def note(self, kept: bool = False) -> str | None:
        """One line for `embedtune eval`'s notes; None when no query shares its id with a document."""
        if not self.pairs:
            return None
        queries = f"{self.pairs} quer{'y' if self.pairs == 1 else 'ies'}"
        if kept:
            return (f"{queries} share their id with a corpus document: counted as retrieved for them "
                    "(--keep-identical-ids; BEIR drops such pairs)")
        text = f"{queries} share their id with a corpus document: it is dropped from their results, as BEIR does"
        if self.judged_relevant:
            one = self.judged_relevant == 1
            text += (f"; {self.judged_relevant} of these documents {'is' if one else 'are'} judged relevant to "
                     f"{'its' if one else 'their'} query and can never be found ({self.only_relevant} of "
                     f"{'this' if one else 'these'} quer{'y' if one else 'ies'} {'has' if one else 'have'} no other "
                     "relevant document and score 0); --keep-identical-ids counts them")
        return text

    def as_dict(self, kept: bool = False) -> dict:
        return {"pairs": self.pairs, "judged_relevant": self.judged_relevant, "only_relevant": self.only_relevant,
                "kept": kept}


def pairs_to_ir_task(eval_rows, corpus_texts=None) -> IRTask:
    """Build an IR task from held-out (anchor, positive) rows.

    The corpus is every distinct positive text in `corpus_texts` (all positives of the data set,
    as in the guide) plus the eval positives; a repeated anchor keeps all of its positives as relevant.
    """
    corpus_ids: dict[str, str] = {}

    def doc_id(text: str) -> str:
        if text not in corpus_ids:
            corpus_ids[text] = f"d{len(corpus_ids)}"
        return corpus_ids[text]

    for text in corpus_texts or ():
        doc_id(text)
    query_ids: dict[str, str] = {}
    relevant: dict[str, set[str]] = {}
    from .data import column

    for anchor, positive in zip(column(eval_rows, "anchor"), column(eval_rows, "positive")):
        qid = query_ids.setdefault(anchor, f"q{len(query_ids)}")
        relevant.setdefault(qid, set()).add(doc_id(positive))
    return IRTask(
        queries={qid: text for text, qid in query_ids.items()},
        corpus={did: text for text, did in corpus_ids.items()},
        relevant=relevant,
    )


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
    from .retrieval import evaluate_retrieval

    return evaluate_retrieval(st_model, task, batch_size=batch_size, show_progress=show_progress,
                              query_prompt=query_prompt or "", document_prompt=document_prompt or "")


def shared_ir_evaluator(task: IRTask, name: str = "ir-eval", batch_size: int = 64, show_progress: bool = False,
                        query_prompt: str | None = None, document_prompt: str | None = None):
    """The training-time evaluator: `evaluate_model` behind sentence-transformers' evaluator interface.

    It reports under `metric_key`'s keys (named as sentence-transformers' IR evaluator names them);
    its exact chunked search is split across ranks under DDP, and it computes the same numbers as
    `embedtune eval`.
    """
    from sentence_transformers.sentence_transformer.evaluation import SentenceEvaluator

    class SharedIREvaluator(SentenceEvaluator):
        def __init__(self):
            super().__init__()
            self.name = name
            self.primary_metric = metric_key(name)
            self.greater_is_better = True

        def __call__(self, model, output_path=None, epoch: int = -1, steps: int = -1) -> dict[str, float]:
            scores = evaluate_model(model, task, batch_size=batch_size, show_progress=show_progress,
                                    query_prompt=query_prompt, document_prompt=document_prompt)
            metrics = {metric_key(name, m): v for m, v in scores.items()}
            self.store_metrics_in_model_card_data(model, metrics, epoch, steps)
            return metrics

    return SharedIREvaluator()
