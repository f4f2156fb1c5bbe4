"""Evaluation that informs without dominating: the sizing (pure, deterministic), the seeded subsample,
the run's evaluations wired through the recipe, `--evals 0`, `--eval-data` (pairs file, BEIR folder),
and train and evaluation seconds reported apart. No test reads the clock: they assert on the plan and
the recorded fields."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from embedtune.config_file import portable_path
from typer.testing import CliRunner

from embedtune.cli import app
from embedtune.eval_plan import (
    MIN_QUERIES, NEVER_CUT_S, PLAN_MARGIN, Costs, EvalPlan, EvalSize, plan_evals, subsample_size, subsample_task,
)
from embedtune.ir_task import IRTask

runner = CliRunner()
FULL = EvalSize(queries=338, documents=3383)  # the stdlib pairs' held-out set: 10% of anchors, every positive
CPU = dict(query_s=0.003, document_s=0.022, other_s=15.0)  # all-MiniLM-L6-v2 on 2 CPU cores, about


def _costs(step_s: float = 3.4, **changes) -> Costs:
    return Costs(**{**CPU, "step_s": step_s, **changes})


# ------------------------------------------------------------------------------------------- sizing


def test_evals_zero_is_the_final_evaluation_only():
    plan = plan_evals(0, 1000, FULL, _costs())
    assert plan.evals == 0 and not plan.subsampled and plan.steps(1000) == []
    assert plan.as_dict()["base"] == "none" and "--evals 0" in plan.reason


def test_a_long_run_keeps_every_evaluation_exact():
    plan = plan_evals(4, 5000, FULL, _costs())
    assert plan.evals == 4 and not plan.subsampled and plan.final_is_best
    assert plan.estimate["all_evals_s"] == pytest.approx(5 * _costs().eval_s(FULL), abs=0.1)  # base + 4, final reused
    assert plan.as_dict()["base"] == "exact"


def test_a_medium_run_subsamples_within_the_budget():
    costs = _costs()
    plan = plan_evals(4, 300, FULL, costs, seed=7)
    assert plan.subsampled and plan.evals == 4 and plan.seed == 7 and "seed 7" in plan.reason
    assert MIN_QUERIES <= plan.during.queries < FULL.queries
    # the same documents per query as the whole set, so the subsample's scores stay on its scale
    assert plan.during.documents / plan.during.queries == pytest.approx(FULL.documents / FULL.queries, rel=0.02)
    # base + 4 in-training evaluations on the subsample, then the exact final one: within the margin of the budget
    spent = 5 * costs.eval_s(plan.during) + costs.eval_s(FULL)
    assert spent <= PLAN_MARGIN * plan.budget_s + 1e-6
    assert plan.budget_s == pytest.approx(0.25 / 0.75 * (costs.other_s + 300 * costs.step_s), abs=0.1)
    # ... and not needlessly small: one more query's worth would not fit
    bigger = subsample_size(FULL, (plan.during.queries + 1) / FULL.queries)
    assert 5 * costs.eval_s(bigger) + costs.eval_s(FULL) > PLAN_MARGIN * plan.budget_s


def test_evaluation_already_spent_counts_in_the_budget():
    costs = _costs()
    free, probed = plan_evals(4, 300, FULL, costs), plan_evals(4, 300, FULL, costs, spent_s=20.0)
    assert (probed.evals, probed.during.queries) < (free.evals, free.during.queries)
    assert probed.estimate["all_evals_s"] <= PLAN_MARGIN * probed.budget_s + 1e-6 and probed.estimate["spent_s"] == 20


def test_a_shorter_run_evaluates_less_often_before_giving_up():
    counts = [plan_evals(4, steps, FULL, _costs()).evals for steps in (60, 95, 150, 200, 300, 5000)]
    assert counts == sorted(counts) and counts[0] == 0 and counts[-1] == 4
    assert 0 < counts[1] < 4  # the default one-epoch run on the stdlib pairs: some, on a subsample


def test_a_short_run_keeps_only_the_exact_final_evaluation():
    plan = plan_evals(4, 30, FULL, _costs())
    assert plan.evals == 0 and "final only" in plan.reason and plan.estimate["all_evals_s"] == pytest.approx(
        _costs().eval_s(FULL), abs=0.1)


def test_cheap_evaluations_are_never_cut():
    tiny = EvalSize(8, 40)
    costs = _costs(step_s=0.001, query_s=0.001, document_s=0.001, other_s=0.0)
    assert (4 + 1) * costs.eval_s(tiny) < NEVER_CUT_S
    plan = plan_evals(4, 2, tiny, costs)
    assert plan.evals == 2 and not plan.subsampled  # at most one evaluation per step
    assert plan.steps(2) == [1, 2]


def test_share_one_never_cuts():
    plan = plan_evals(4, 2, FULL, _costs(), share=1.0)
    assert plan.evals == 2 and not plan.subsampled


def test_planned_steps_are_spread_and_end_at_the_last():
    plan = EvalPlan(4, 4, FULL, FULL, 0, 0.25, 0.0)
    assert plan.steps(95) == [24, 48, 72, 95]
    assert plan.steps(3) == [1, 2, 3]


def test_the_plan_is_deterministic():
    assert plan_evals(4, 300, FULL, _costs(), seed=3) == plan_evals(4, 300, FULL, _costs(), seed=3)


# ---------------------------------------------------------------------------------------- subsample


def _task(queries: int = 40, extra_docs: int = 200, graded: bool = False) -> IRTask:
    corpus = {f"d{i}": f"document {i}" for i in range(queries * 2 + extra_docs)}
    relevant = {f"q{i}": {f"d{2 * i}", f"d{2 * i + 1}"} for i in range(queries)}
    grades = {q: {d: 2 for d in docs} | {"d999999": 0} for q, docs in relevant.items()} if graded else None
    return IRTask({f"q{i}": f"query {i}" for i in range(queries)}, corpus, relevant, grades)


def test_subsample_keeps_every_kept_querys_relevant_documents():
    task = _task()
    small = subsample_task(task, EvalSize(10, 60), seed=5)
    assert len(small.queries) == 10 and len(small.corpus) == 60
    for qid in small.queries:
        assert task.relevant[qid] <= set(small.corpus) and small.relevant[qid] == task.relevant[qid]
    assert set(small.corpus) <= set(task.corpus) and all(small.corpus[d] == task.corpus[d] for d in small.corpus)


def test_subsample_is_seeded():
    task = _task()
    one, again, other = (subsample_task(task, EvalSize(10, 60), seed=s) for s in (5, 5, 6))
    assert one == again
    assert (set(one.queries), set(one.corpus)) != (set(other.queries), set(other.corpus))


def test_subsample_keeps_relevant_documents_past_its_size_and_grades():
    task = _task(graded=True)
    small = subsample_task(task, EvalSize(10, 5), seed=1)  # 10 queries x 2 relevant documents > 5
    assert len(small.corpus) == 20 and set(small.graded) == set(small.queries)
    assert all(g == 2 for grades in small.graded.values() for g in grades.values())


# ------------------------------------------------------------------------------ the run's evaluations


@pytest.fixture(scope="module")
def tiny_st(tmp_path_factory):
    from embedtune.loading import FastModel
    from embedtune.st import to_sentence_transformer
    from tiny_models import make_tiny_model

    model, tokenizer = FastModel.from_pretrained(str(make_tiny_model("bert", tmp_path_factory.mktemp("tiny"))),
                                                 max_seq_length=32)
    return to_sentence_transformer(model, tokenizer)


def test_run_evaluation_subsamples_base_and_in_training_and_keeps_the_final_exact(tiny_st):
    """Costs as a probe would have measured them on a slow machine: the plan subsamples, the base model
    is scored on the subsample, the trainer's evaluator scores it too, and the final is exact."""
    from embedtune.run_eval import EvalSource, RunEvaluation

    task = _task(queries=200, extra_docs=1000)
    evaluation = RunEvaluation(EvalSource(task, "held-out pairs"), requested=3, seed=11)
    evaluation.costs, evaluation.token_s = Costs(query_s=0.01, document_s=0.1, step_s=0.0), 1e-3
    base = evaluation.plan_and_score_base(tiny_st, total_steps=300, tokens_per_step=1000.0, other_s=10.0)
    plan = evaluation.plan
    assert plan.subsampled and plan.evals == 3 and "ndcg@10" in base
    assert len(evaluation.during.queries) == plan.during.queries < len(task.queries)
    assert evaluation.clock.calls["base"] == 1
    evaluator = evaluation.evaluator()
    scores = evaluator(tiny_st)
    assert evaluation.clock.calls["during"] == 1 and any(key.endswith("ndcg@10") for key in scores)
    final = evaluation.final(tiny_st, best=None)  # nothing to restore: the last weights, exactly
    assert evaluation.clock.calls["final"] == 1 and set(final) == set(base)
    summary = evaluation.summary()
    assert summary["plan"]["during"]["queries"] == plan.during.queries and summary["plan"]["base"] == "subsample"
    assert summary["source"]["queries"] == 200 and summary["final_exact"] is True


def test_the_schedule_evaluates_at_the_planned_steps_only(tiny_st):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from embedtune.run_eval import EvalSource, RunEvaluation

    evaluation = RunEvaluation(EvalSource(_task(), "held-out pairs"), requested=3, share=1.0)
    evaluation.plan_and_score_base(tiny_st, total_steps=12, tokens_per_step=100.0, other_s=0.0)
    schedule = evaluation.schedule(12)
    args, state, control = TrainingArguments(output_dir="unused", report_to="none"), TrainerState(), TrainerControl()
    schedule.on_train_begin(args, state, control)
    evaluated = []
    for step in range(1, 13):
        state.global_step, control.should_evaluate = step, True  # as the trainer's own eval_steps might ask
        schedule.on_step_end(args, state, control)
        if control.should_evaluate:
            evaluated.append(step)
    assert evaluated == [4, 8, 12] == evaluation.plan.steps(12)


def _scheduled(evaluation, total_steps: int) -> list[int]:
    """The steps at which the run's schedule evaluates over a run of `total_steps` steps."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    schedule = evaluation.schedule(total_steps)
    args, state, control = TrainingArguments(output_dir="unused", report_to="none"), TrainerState(), TrainerControl()
    schedule.on_train_begin(args, state, control)
    evaluated = []
    for step in range(1, total_steps + 1):
        state.global_step = step
        schedule.on_step_end(args, state, control)
        if control.should_evaluate:
            evaluated.append(step)
    return evaluated


@pytest.mark.parametrize("never_cut", [False, True])
def test_over_budget_evaluations_are_skipped_but_the_last_runs(tiny_st, never_cut):
    """With no room for evaluation at all, every planned evaluation but the last is skipped and recorded,
    unless all evaluation comes to under the never-cut time, as these milliseconds do: the plan's rule
    holds at run time too (a small job's evaluations then do not depend on timing, and a resumed run
    evaluates where the uninterrupted one did)."""
    from embedtune.eval_plan import NEVER_CUT_S
    from embedtune.run_eval import EvalSource, RunEvaluation

    evaluation = RunEvaluation(EvalSource(_task(), "held-out pairs"), requested=3, share=1.0)
    evaluation.costs, evaluation.token_s = Costs(query_s=0.01, document_s=0.01, step_s=0.0), 1e-4
    evaluation.plan_and_score_base(tiny_st, total_steps=12, tokens_per_step=100.0, other_s=0.0)
    assert evaluation.plan.steps(12) == [4, 8, 12] and evaluation.clock.seconds["base"] > 0
    evaluation.share = 1e-9  # the budget as it would be if the measured training were nearly instant
    assert evaluation.never_cut_s == NEVER_CUT_S
    if not never_cut:
        evaluation.never_cut_s = 0.0
    evaluated = _scheduled(evaluation, 12)
    skipped = [] if never_cut else [4, 8]
    assert evaluated == ([4, 8, 12] if never_cut else [12]) and evaluation.skipped == skipped
    assert evaluation.summary()["skipped_steps"] == skipped


# ------------------------------------------------------------------------------------------ the CLI


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    from embedtune.data import build_stdlib_pairs, write_jsonl

    return write_jsonl(build_stdlib_pairs(max_pairs=48, seed=21), tmp_path_factory.mktemp("pairs") / "pairs.jsonl")


def _train(data, out, *flags):
    result = runner.invoke(app, ["train", str(data), "--output", str(out), "--max-steps", "2", "--batch-size", "8",
                                 "--max-seq-length", "32", *flags])
    assert result.exit_code == 0, result.output
    return json.loads((Path(out) / "metrics.json").read_text()), " ".join(result.output.split())


def _times_apart(metrics: dict, text: str) -> None:
    """Train and evaluation seconds recorded apart, and both in the summary."""
    times = metrics["eval"]["time_s"]
    assert metrics["eval_time_s"] == pytest.approx(sum(times.values()), abs=0.02)
    plan = metrics["eval"]["plan"]
    assert (times["final"] > 0) == (not plan["evals"] or plan["subsampled"] or bool(metrics["eval"]["skipped_steps"]))
    phases = metrics["phases_s"]
    training = sum(phases.get(name, 0.0) for name in ("first_step", "train", "final_checkpoint"))
    # each figure is rounded to 0.01 s, and the phases' sums at every mark: 0.05 s covers their rounding
    assert metrics["train_time_s"] <= phases["trainer_setup"] + training - times["during"] + 0.05
    assert metrics["train_time_s"] + metrics["eval_time_s"] <= metrics["total_time_s"] + 0.05
    assert f"in {metrics['train_time_s']:.1f} s (evaluation not included" in text
    assert f"evaluation took {metrics['eval_time_s']:.1f} s" in text and "evaluation plan:" in text


def test_evals_zero_trains_then_evaluates_once_exactly(pairs, tmp_path):
    metrics, text = _train(pairs, tmp_path / "run", "--eval-size", "12", "--evals", "0")
    plan = metrics["eval"]["plan"]
    assert plan["evals"] == 0 and plan["requested"] == 0 and plan["base"] == "none"
    assert metrics["base"] == {} and "ndcg@10" in metrics["final"] and metrics["best_step"] is None
    assert metrics["eval"]["time_s"]["during"] == 0 and metrics["eval"]["time_s"]["base"] == 0
    assert not any(key.startswith("eval_") for entry in metrics["history"] for key in entry)
    assert metrics["eval_pairs"] == 12 and metrics["train_pairs"] == 36
    assert metrics["config"]["evals_per_run"] == 0
    _times_apart(metrics, text)
    assert "--evals 0: the final evaluation only" in text


def test_eval_data_pairs_file_trains_on_every_pair(pairs, tmp_path):
    from embedtune.data import build_stdlib_pairs, write_jsonl

    eval_file = write_jsonl(build_stdlib_pairs(max_pairs=20, seed=99), tmp_path / "eval.jsonl")
    metrics, text = _train(pairs, tmp_path / "run", "--eval-data", str(eval_file), "--evals", "1")
    source = metrics["eval"]["source"]
    assert source["kind"] == "pairs" and source["path"] == str(eval_file) and source["queries"] == 20
    assert metrics["train_pairs"] == 48 and metrics["eval_pairs"] == 0  # no held-out split
    assert "ndcg@10" in metrics["final"] and "retrieval on eval.jsonl" in text
    assert f"evaluated on {eval_file}: 20 queries, 20 documents" in text
    assert metrics["config"]["eval_data"] == portable_path(eval_file)  # as config.yaml names every local path
    _times_apart(metrics, text)

    held, _ = _train(pairs, tmp_path / "held", "--eval-data", str(eval_file), "--evals", "0", "--eval-size", "8")
    assert held["train_pairs"] == 40 and held["eval"]["source"]["queries"] == 20  # asked for: 8 held out of training


def _beir(folder: Path) -> Path:
    """A tiny BEIR folder: 6 queries, 18 documents, graded test judgements (one judged irrelevant)."""
    (folder / "qrels").mkdir(parents=True)
    topics = ["sort a list", "read a file", "parse json", "open a socket", "format a date", "hash a string"]
    docs = [{"_id": f"doc{i}", "title": f"t{i}", "text": f"how to {topics[i % 6]} in python, variant {i}"}
            for i in range(18)]
    (folder / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": t}) + "\n"
                                                  for i, t in enumerate(topics)))
    rows = ["query-id\tcorpus-id\tscore"] + [f"q{i}\tdoc{i}\t2\nq{i}\tdoc{i + 6}\t1" for i in range(6)] + ["q0\tdoc12\t0"]
    (folder / "qrels" / "test.tsv").write_text("\n".join(rows) + "\n")
    return folder


def test_eval_data_beir_folder(pairs, tmp_path):
    folder = _beir(tmp_path / "beir")
    metrics, text = _train(pairs, tmp_path / "run", "--eval-data", str(folder), "--evals", "2")
    source = metrics["eval"]["source"]
    assert (source["kind"], source["split"], source["queries"], source["documents"]) == ("beir", "test", 6, 18)
    assert metrics["train_pairs"] == 48 and set(metrics["final"]) >= {"ndcg@10", "map@100"}
    assert "retrieval on beir (split test)" in text and f"evaluated on {folder} (split test): 6 queries" in text
    plan = metrics["eval"]["plan"]
    assert plan["full"] == {"queries": 6, "documents": 18} and plan["requested"] == 2
    assert len([e for e in metrics["history"] if any(k.startswith("eval_") for k in e)]) == plan["evals"] - len(
        metrics["eval"]["skipped_steps"])
    _times_apart(metrics, text)


def test_bad_eval_data_is_one_line_before_anything_is_written(pairs, tmp_path):
    out = tmp_path / "out"
    for flags, needle in ((["--eval-data", str(tmp_path / "missing.jsonl")], "missing.jsonl"),
                          (["--eval-data", str(pairs), "--no-eval"], "--no-eval")):
        result = runner.invoke(app, ["train", str(pairs), "--output", str(out), "--max-steps", "1", *flags])
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        assert needle in " ".join(result.output.split())
        assert not out.exists() and not Path(f"{out}.partial").exists()


def _subsampled_metrics() -> dict:
    """metrics.json of a run whose base and in-training evaluations ran on a subsample (as a long CPU
    run's would): written by hand, so the summary and the report are checked on a known plan."""
    plan = plan_evals(4, 300, FULL, _costs(), seed=9)
    assert plan.subsampled
    scores = lambda v: {m: v for m in ("ndcg@10", "mrr@10", "recall@1", "recall@10", "recall@100", "map@100")}  # noqa: E731
    history = [{"loss": 1.0, "step": 1}, {"eval_ir-eval_cosine_ndcg@10": 0.61, "step": 75}]
    return {"base": scores(0.5), "final": scores(0.58), "steps": 300, "train_pairs": 3045, "eval_pairs": 338,
            "train_time_s": 900.0, "eval_time_s": 210.0, "total_time_s": 1130.0, "tokens_per_s": 1000.0,
            "skipped_rows": 0, "best_step": 75, "history": history, "config": {"model": "m", "lora_r": 16},
            "eval": {"source": {"kind": "held-out pairs", "path": None, "split": None, "notes": [],
                                "queries": FULL.queries, "documents": FULL.documents},
                     "plan": plan.as_dict(), "time_s": {"probe": 2.0, "base": 30.0, "during": 100.0, "final": 78.0},
                     "skipped_steps": [], "best_during": scores(0.61), "final_exact": True}}


def test_summary_and_report_compare_base_on_its_own_set(tmp_path, capsys):
    from embedtune.cli import print_summary

    metrics = _subsampled_metrics()
    during = metrics["eval"]["plan"]["during"]
    print_summary(metrics)
    text = " ".join(capsys.readouterr().out.split())
    assert f"{during['queries']} of {FULL.queries} queries, {during['documents']} of {FULL.documents} documents (seed 9)" \
        in text
    assert "+0.1100" in text and "final, exact: 338 queries, 3383 documents" in text and "0.5800" in text
    assert "+0.0800" not in text  # base (subsample) never set against the final (whole set)
    assert "in 900.0 s (evaluation not included" in text and "evaluation took 210.0 s" in text
    assert "base 30.0 s, during 100.0 s, final 78.0 s" in text

    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    result = runner.invoke(app, ["report", str(tmp_path), "--png", str(tmp_path / "r.png")])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "in-training subsample" in text and "final, exact" in text and "+0.1100" in text and "+0.0800" not in text
    assert "eval time" in text and "210.0 s" in text and "subsample: 4 of 4 evaluations" in text
