"""How much a training run evaluates: the number of in-training evaluations and the set they score,
sized so that evaluation stays a minor share of the run's wall time (pure functions, deterministic).

Every run that evaluates ends with one exact evaluation of the saved model on the whole eval set. The
base model's score and the in-training evaluations (which pick the weights kept, `best_weights`) share
one set: the whole eval set when it is cheap enough, else a seeded subsample that keeps every kept
query's relevant documents and the same documents-per-query ratio (so its scores stay on the scale of
the whole set's). The plan is the first of these that fits the budget, all evaluation counted
(base + in-training + final) against `share` of the estimated wall time:

  A. everything exact, the requested evaluations (the best one's scores are the final ones);
  B. the final exact, and n <= requested evaluations (most first) on the largest subsample that fits;
  C. the final evaluation only.

Evaluations estimated to cost under `NEVER_CUT_S` in all are never cut (a small set's subsample would
only add noise). The estimates come from a timed encoding probe and the planned steps (`run_eval`),
which also skips a planned evaluation at run time when measured times say it would break the budget.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field

from .ir_task import IRTask

EVAL_SHARE = 0.25  # evaluation's share of the run's wall time, at most
PLAN_MARGIN = 0.9  # the up-front plan spends this much of the budget: its costs are estimates
NEVER_CUT_S = 30.0  # exact plans estimated under this many seconds in all are kept whole: cutting saves little
MIN_QUERIES = 50  # a subsample keeps at least this many queries (fewer: too noisy to pick weights by)


@dataclass(frozen=True)
class EvalSize:
    """Queries and documents of an eval set (the whole one, or a subsample)."""

    queries: int
    documents: int


@dataclass(frozen=True)
class Costs:
    """Estimated seconds: to encode one query, one document, to train one step, and the run's other
    work (start-up, loading, saving) that counts in its wall time."""

    query_s: float
    document_s: float
    step_s: float
    other_s: float = 0.0

    def eval_s(self, size: EvalSize) -> float:
        return size.queries * self.query_s + size.documents * self.document_s


@dataclass
class EvalPlan:
    """What `plan_evals` chose, and why (metrics.json's `eval.plan`)."""

    requested: int  # --evals
    evals: int  # in-training evaluations planned
    full: EvalSize  # the eval set the final evaluation scores, exactly
    during: EvalSize  # the set the base model and the in-training evaluations score
    seed: int  # of the subsample
    share: float
    budget_s: float  # all evaluation may take this long (the wall-time estimate times the share)
    estimate: dict = field(default_factory=dict)  # seconds: train, one exact evaluation, one during, all
    reason: str = ""

    @property
    def subsampled(self) -> bool:
        return self.during != self.full

    @property
    def final_is_best(self) -> bool:
        """The in-training evaluations are exact: the restored best one's scores are the final ones."""
        return self.evals > 0 and not self.subsampled

    def steps(self, total_steps: int) -> list[int]:
        """The steps to evaluate at: spread evenly, the last one at the end."""
        n = min(self.evals, total_steps)
        return sorted({math.ceil(i * total_steps / n) for i in range(1, n + 1)}) if n else []

    def as_dict(self) -> dict:
        out = asdict(self)
        out.update(subsampled=self.subsampled, base="none" if not self.evals else
                   ("subsample" if self.subsampled else "exact"))
        return out


def subsample_size(full: EvalSize, fraction: float, min_queries: int = MIN_QUERIES) -> EvalSize:
    """`fraction` of the queries (at least `min_queries`) and as many documents per query as the whole set."""
    queries = min(full.queries, max(min_queries, math.ceil(fraction * full.queries)))
    ratio = full.documents / max(1, full.queries)
    documents = min(full.documents, max(queries, math.ceil(queries * ratio)))
    return EvalSize(queries, documents)


def _budget(costs: Costs, total_steps: int, share: float) -> float:
    """Seconds all evaluation may take: e <= share * (other + train + e)."""
    if share >= 1:
        return math.inf
    return share / (1 - share) * (costs.other_s + total_steps * costs.step_s)


def plan_evals(requested: int, total_steps: int, full: EvalSize, costs: Costs, share: float = EVAL_SHARE,
               seed: int = 42, margin: float = PLAN_MARGIN, min_queries: int = MIN_QUERIES,
               spent_s: float = 0.0) -> EvalPlan:
    """The first of A (all exact), B (subsampled, most evaluations first), C (final only) that fits;
    `spent_s`: evaluation seconds already spent (the probe), which the budget includes."""
    exact = costs.eval_s(full)
    budget = _budget(costs, total_steps, share)
    spend = budget * margin - spent_s
    estimate = {"train_s": round(total_steps * costs.step_s, 1), "exact_eval_s": round(exact, 1),
                "spent_s": round(spent_s, 1)}

    def plan(evals: int, during: EvalSize, reason: str) -> EvalPlan:
        one = costs.eval_s(during) if evals else 0.0
        final = 0.0 if (evals and during == full) else exact
        total = (evals + 1) * one + final + spent_s
        return EvalPlan(requested, evals, full, during, seed, share, round(budget, 1),
                        {**estimate, "during_eval_s": round(one, 1), "all_evals_s": round(total, 1)}, reason)

    if requested <= 0:
        return plan(0, full, "--evals 0: the final evaluation only")
    requested = min(requested, max(1, total_steps))
    if (requested + 1) * exact <= max(spend, NEVER_CUT_S):
        why = "fits the budget" if (requested + 1) * exact <= spend else f"under {NEVER_CUT_S:g} s in all"
        return plan(requested, full, f"exact: {requested} evaluations and the base take about "
                                     f"{(requested + 1) * exact:.0f} s, {why}")
    floor = subsample_size(full, 0.0, min_queries)
    for evals in range(requested, 0, -1):
        if (evals + 1) * exact <= spend:
            return plan(evals, full, f"exact: {evals} of {requested} evaluations fit the budget")
        per_eval = (spend - exact) / (evals + 1)  # base + evals on the subsample; the final is exact
        if costs.eval_s(floor) > per_eval or floor == full:
            continue
        low, high = 0.0, 1.0  # the largest fraction whose subsample fits (cost grows with it)
        for _ in range(40):
            middle = (low + high) / 2
            low, high = (middle, high) if costs.eval_s(subsample_size(full, middle, min_queries)) <= per_eval \
                else (low, middle)
        during = subsample_size(full, low, min_queries)
        return plan(evals, during, f"subsample: {evals} of {requested} evaluations on {during.queries} of "
                                   f"{full.queries} queries and {during.documents} of {full.documents} documents "
                                   f"(seed {seed}) keep evaluation within {share:.0%} of the run")
    return plan(0, full, f"final only: the exact final evaluation (about {exact:.0f} s) leaves no room within "
                         f"{share:.0%} of the run (about {budget:.0f} s for evaluation)")


def subsample_task(task: IRTask, size: EvalSize, seed: int) -> IRTask:
    """A seeded subsample of `task`: `size.queries` queries with every relevant document of theirs, then
    other documents drawn at random up to `size.documents` (more when the kept queries' relevant
    documents alone exceed it). The same task, size and seed always give the same subsample."""
    grades = task.grades()
    judged = [qid for qid in task.queries if any(g > 0 for g in grades.get(qid, {}).values())]
    rng = random.Random(seed)
    queries = rng.sample(judged, len(judged))[: size.queries]
    relevant = {doc for qid in queries for doc, grade in grades[qid].items() if grade > 0 and doc in task.corpus}
    others = [doc for doc in task.corpus if doc not in relevant]
    others = random.Random(seed + 1).sample(others, len(others))[: max(0, size.documents - len(relevant))]
    keep = relevant | set(others)
    corpus = {doc: text for doc, text in task.corpus.items() if doc in keep}  # the task's order
    kept = set(queries)
    return IRTask(
        queries={qid: text for qid, text in task.queries.items() if qid in kept},
        corpus=corpus,
        relevant={qid: docs & keep for qid, docs in task.relevant.items() if qid in kept},
        graded=({qid: {d: g for d, g in task.graded[qid].items() if d in keep} for qid in task.graded if qid in kept}
                if task.graded is not None else None),
    )
