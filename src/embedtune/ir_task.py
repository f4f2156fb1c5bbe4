"""The IR task: queries, a corpus and relevance judgements, what every evaluation scores a model on.

A leaf module (standard library only): BEIR reading (`data.beir`), held-out pairs (`data.pairs_task`),
`retrieval` and `evaluate` all import it from here.
"""

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
