"""A training run's evaluations: the eval set (held-out pairs or `--eval-data`), a timed probe that
prices one evaluation, the plan (`eval_plan`), the base model's score, the in-training schedule, and
the exact final evaluation, with their seconds kept apart from training's (`EvalClock`).

Sizing is adaptive on one process only: under torchrun every rank would time the probe differently
and must agree on when to evaluate, so there the requested evaluations run on the whole set.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import time
from dataclasses import dataclass, field

from . import distributed
from .errors import EmbedtuneError
from .eval_plan import EVAL_SHARE, NEVER_CUT_S, Costs, EvalPlan, EvalSize, plan_evals, subsample_task
from .evaluate import evaluate_model, shared_ir_evaluator, summarize
from .ir_task import IRTask

# One training token (forward and backward, LoRA, the packed path) costs about this many encoded eval
# tokens: on 2 CPU cores all-MiniLM-L6-v2 trains about 1,040 tokens/s and encodes about 4,100. Only
# the up-front estimate of the run's length uses it; the schedule checks against measured step times.
TRAIN_TOKEN_COST = 4.0
PROBE_QUERIES, PROBE_DOCUMENTS = 32, 64
EVAL_BATCH = 64  # texts per encoding batch, as the trainer's evaluator encodes
KINDS = ("probe", "base", "during", "final")


class EvalClock:
    """Seconds spent evaluating, by kind: the probe, the base model, in-training, the final evaluation."""

    def __init__(self):
        self.seconds = dict.fromkeys(KINDS, 0.0)
        self.calls = dict.fromkeys(KINDS, 0)

    @contextlib.contextmanager
    def measure(self, kind: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[kind] += time.perf_counter() - start
            self.calls[kind] += 1

    @property
    def total(self) -> float:
        return sum(self.seconds.values())


@dataclass
class EvalSource:
    """The eval set and where it came from (metrics.json's `eval.source`)."""

    task: IRTask
    kind: str  # "held-out pairs", "pairs" or "beir"
    path: str | None = None
    split: str | None = None
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"kind": self.kind, "path": self.path, "split": self.split, "notes": self.notes,
                "queries": len(self.task.queries), "documents": len(self.task.corpus)}


def read_eval_data(config) -> EvalSource | None:
    """`--eval-data` (a pairs file or a BEIR folder) read and checked before any model loads; None without it."""
    if not config.eval_data:
        return None
    if not config.eval:
        raise EmbedtuneError(f"--eval-data {config.eval_data} with --no-eval: keep one of them")
    from .retrieval import load_eval_task  # heavy: torch

    loaded = load_eval_task(config.eval_data, columns=config.columns)
    return EvalSource(loaded.task, loaded.kind, str(config.eval_data), loaded.split, loaded.notes)


def held_out_source(task: IRTask) -> EvalSource:
    """The held-out pairs as an IR task (`run_data.choose_evaluation`: each anchor finds its positive
    among all positives of the data sets it covers)."""
    return EvalSource(task, "held-out pairs")


class RunEvaluation:
    """One run's evaluations, in the order the recipe calls them: `probe` (after the model loads),
    `plan_and_score_base` (once the run's steps are planned), `evaluator` and `schedule` (for the
    trainer), `final` (after the best weights are restored), then `summary` for metrics.json."""

    def __init__(self, source: EvalSource, requested: int, share: float = EVAL_SHARE, seed: int = 42,
                 query_prompt: str | None = None, document_prompt: str | None = None, name: str = "ir-eval"):
        self.source, self.requested, self.share, self.seed, self.name = source, requested, share, seed, name
        self.prompts = {"query_prompt": query_prompt, "document_prompt": document_prompt}
        self.clock = EvalClock()
        self.costs: Costs | None = None
        self.token_s: float | None = None  # seconds per encoded token, from the probe
        self.plan: EvalPlan | None = None
        self.during: IRTask = source.task
        self.base_metrics: dict = {}
        self.best_during: dict = {}
        self.skipped: list[int] = []
        self.adaptive = distributed.world_size() == 1
        self.never_cut_s = NEVER_CUT_S  # evaluation estimated under this in all is never skipped at run time

    @property
    def full(self) -> EvalSize:
        return EvalSize(len(self.source.task.queries), len(self.source.task.corpus))

    def probe(self, st_model) -> None:
        """Time the encoding of a seeded sample of queries and documents (after one untimed warm-up
        batch): the seconds per query, per document and per token that price an evaluation."""
        if not self.adaptive or self.requested == 0:
            return
        task, rng = self.source.task, random.Random(self.seed)
        queries = rng.sample(list(task.queries.values()), min(PROBE_QUERIES, len(task.queries)))
        documents = rng.sample(list(task.corpus.values()), min(PROBE_DOCUMENTS, len(task.corpus)))
        from .data.token_cache import clip_inputs, model_budget

        budget = model_budget(st_model)  # huge texts cut as the evaluation cuts them (`retrieval`)
        was_training = st_model.training
        st_model.eval()
        try:
            with self.clock.measure("probe"):
                encode = lambda texts, prompt: st_model.encode(  # noqa: E731
                    clip_inputs(texts, budget), batch_size=EVAL_BATCH, show_progress_bar=False,
                    **({"prompt": prompt} if prompt else {}))
                encode(documents[:2], None)  # warm-up: first-call allocations are no evaluation's cost
                started = time.perf_counter()
                encode(queries, self.prompts["query_prompt"])
                query_s = (time.perf_counter() - started) / max(1, len(queries))
                started = time.perf_counter()
                encode(documents, self.prompts["document_prompt"])
                document_s = (time.perf_counter() - started) / max(1, len(documents))
        finally:
            st_model.train(was_training)
        tokens = _token_count(st_model, clip_inputs(queries + documents, budget))
        self.token_s = (query_s * len(queries) + document_s * len(documents)) / max(1, tokens)
        self.costs = Costs(query_s, document_s, step_s=0.0)

    def plan_and_score_base(self, st_model, total_steps: int, tokens_per_step: float, other_s: float) -> dict:
        """Choose the plan for this run's length, build the in-training set, and score the base model on it."""
        if self.costs is None:  # no probe: --evals 0, or several processes (no sizing: the requested evaluations)
            self.plan = plan_evals(self.requested, total_steps, self.full, Costs(0.0, 0.0, 1.0), share=1.0,
                                   seed=self.seed)
            if self.requested:
                self.plan.reason = f"exact: {self.plan.evals} evaluations (not sized under torchrun)"
        else:
            step_s = TRAIN_TOKEN_COST * tokens_per_step * (self.token_s or 0.0)
            probe = self.clock.seconds["probe"]  # evaluation already: counted in the budget, not as other work
            self.costs = Costs(self.costs.query_s, self.costs.document_s, step_s, max(0.0, other_s - probe))
            self.plan = plan_evals(self.requested, total_steps, self.full, self.costs, share=self.share,
                                   seed=self.seed, spent_s=probe)
        if self.plan.subsampled:
            self.during = subsample_task(self.source.task, self.plan.during, self.plan.seed)
        if self.plan.evals:
            with self.clock.measure("base"):
                self.base_metrics = evaluate_model(st_model, self.during, batch_size=EVAL_BATCH,
                                                   show_progress=distributed.is_main(), **self.prompts)
        return self.base_metrics

    def record(self) -> dict:
        """The plan and the base score, kept with the checkpoints: a resumed run goes on with them, so
        it evaluates as the uninterrupted run would, whatever the machine's load when it resumes."""
        return {"plan": dataclasses.asdict(self.plan) if self.plan else None, "base": self.base_metrics,
                "costs": dataclasses.asdict(self.costs) if self.costs else None}

    def restore(self, record: dict) -> bool:
        """Take an interrupted run's `record` instead of planning and scoring the base again; False (and
        nothing changed) where it does not fit this run's eval set."""
        try:
            fields = dict(record["plan"])
            fields["full"], fields["during"] = EvalSize(**fields["full"]), EvalSize(**fields["during"])
            plan = EvalPlan(**fields)
            costs = Costs(**record["costs"]) if record.get("costs") else None
            base = dict(record["base"])
        except (KeyError, TypeError, ValueError):
            return False
        if plan.full != self.full:
            return False
        self.plan, self.costs, self.base_metrics = plan, costs, base
        if plan.subsampled:
            self.during = subsample_task(self.source.task, plan.during, plan.seed)
        return True

    def evaluator(self):
        """The trainer's evaluator over the in-training set, timed; None when the plan has no in-training evaluation."""
        if not self.plan or not self.plan.evals:
            return None
        from .monitoring import ENCODE_BAR_MIN_TEXTS

        big = len(self.during.queries) + len(self.during.corpus) >= ENCODE_BAR_MIN_TEXTS  # bars only if slow
        return shared_ir_evaluator(self.during, name=self.name, batch_size=EVAL_BATCH,
                                   show_progress=big and distributed.is_main(),
                                   clock=self.clock, **self.prompts)

    def schedule(self, total_steps: int):
        """A trainer callback that evaluates at the plan's steps (and nowhere else), skipping one before
        the last when the measured step and evaluation times say it would take evaluation past the share
        of the run. The last always runs: the final weights compete, and the base has its comparison.
        Added after the best-weights callback, it has the last word on `should_evaluate`."""
        from transformers import TrainerCallback

        outer, steps = self, set(self.plan.steps(total_steps))
        last = max(steps, default=None)

        class Schedule(TrainerCallback):
            started = first_step = None
            during_at_start = 0.0

            def on_train_begin(self, args, state, control, **kwargs):
                self.started, self.first_step = time.perf_counter(), state.global_step
                self.during_at_start = outer.clock.seconds["during"]

            def on_step_end(self, args, state, control, **kwargs):
                step = state.global_step
                control.should_evaluate = step in steps and (
                    step == last or not outer._over_budget(self, step, total_steps, steps))
                if step in steps and not control.should_evaluate:
                    outer.skipped.append(step)

        return Schedule()

    def _over_budget(self, schedule, step: int, total_steps: int, steps: set[int]) -> bool:
        """Would evaluating now (and at the later planned steps, and the final evaluation) take evaluation
        past the share of the run's projected wall time? Measured times; never under torchrun, and never
        when all evaluation comes to under `never_cut_s` (the plan's rule: a resumed run of a small job
        then evaluates where the uninterrupted one did, whatever the machine's load)."""
        if not self.adaptive or self.share >= 1 or schedule.started is None or self.costs is None:
            return False
        during_now = self.clock.seconds["during"] - schedule.during_at_start
        trained = time.perf_counter() - schedule.started - during_now
        done = max(1, step - schedule.first_step)
        train_total = trained + (total_steps - step) * trained / done
        runs = self.clock.calls["during"] + self.clock.calls["base"]  # evaluations of the in-training set so far
        estimated = self.costs.eval_s(self.plan.during)
        one = (self.clock.seconds["during"] + self.clock.seconds["base"]) / runs if runs else estimated
        left = len([s for s in steps if s >= step])
        # the final evaluation's estimate, scaled as the measured evaluations came out against theirs
        final = 0.0 if self.plan.final_is_best else self.costs.eval_s(self.full) * (one / estimated if estimated else 1)
        evaluation = self.clock.total + left * one + final
        if evaluation < self.never_cut_s:  # as the plan: cutting saves little, and would make runs differ by timing
            return False
        return evaluation > self.share * (self.costs.other_s + train_total + evaluation)

    def final(self, st_model, best) -> dict:
        """The saved model's exact scores on the whole eval set: the best in-training evaluation's when
        that was exact, else one evaluation now (of the restored best weights, or the last ones)."""
        if best is not None and best.best_step is not None and best.best_metrics:
            self.best_during = summarize(best.best_metrics, self.name)
            if self.plan.final_is_best:
                return dict(self.best_during)
        with self.clock.measure("final"):
            return evaluate_model(st_model, self.source.task, batch_size=EVAL_BATCH,
                                  show_progress=distributed.is_main(), **self.prompts)

    def summary(self) -> dict:
        """metrics.json's `eval`: the source, the plan and why, the seconds by kind, the skipped steps."""
        return {
            "source": self.source.as_dict(),
            "plan": self.plan.as_dict() if self.plan else None,
            "time_s": {kind: round(s, 2) for kind, s in self.clock.seconds.items()},
            "skipped_steps": list(self.skipped),
            "best_during": self.best_during if self.plan and self.plan.subsampled else None,
            "final_exact": True,
        }


def _token_count(st_model, texts: list[str]) -> int:
    """Real tokens of `texts` as the model encodes them (truncated to its max_seq_length)."""
    tokenizer, limit = getattr(st_model, "tokenizer", None), getattr(st_model, "max_seq_length", None)
    if tokenizer is None:
        return sum(len(text.split()) for text in texts)
    ids = tokenizer(texts, truncation=limit is not None, max_length=limit)["input_ids"]
    return sum(len(row) for row in ids)


def build_run_evaluation(config, held_out: IRTask | None, eval_source: EvalSource | None, query_prompt,
                         document_prompt, name: str) -> RunEvaluation | None:
    """The run's evaluations over `--eval-data` when given, else the held-out pairs' task; None without either."""
    source = eval_source or (held_out_source(held_out) if held_out is not None else None)
    if source is None:
        return None
    return RunEvaluation(source, config.evals_per_run, share=config.eval_share,
                         seed=config.seed, query_prompt=query_prompt, document_prompt=document_prompt, name=name)
