"""Held-out training pairs as an IR task: every anchor must find its own positive among all positives."""

from __future__ import annotations

from embedtune.data.readers import column
from embedtune.ir_task import IRTask


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
    for anchor, positive in zip(column(eval_rows, "anchor"), column(eval_rows, "positive")):
        qid = query_ids.setdefault(anchor, f"q{len(query_ids)}")
        relevant.setdefault(qid, set()).add(doc_id(positive))
    return IRTask(
        queries={qid: text for text, qid in query_ids.items()},
        corpus={did: text for text, did in corpus_ids.items()},
        relevant=relevant,
    )
