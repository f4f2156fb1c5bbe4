"""The recipe's data sets, one or several: each read, given its loss (`loss_choice`), split and checked
for full batches; the training set the trainer reads (a `Dataset`, or a `DatasetDict` whose batches
the multi-dataset sampler draws one data set at a time); and the held-out evaluation that fits them.

Evaluation: the held-out rows of every data set whose positives are relevant documents (pairs,
triplets, distillation data) make one retrieval task, scored by nDCG@10 as ever; scored pairs (CoSENT,
AnglE) are not retrieval data, since a low score means "not similar". A run whose data sets are all
scored pairs is evaluated by sentence-transformers' EmbeddingSimilarityEvaluator (Spearman correlation
of the cosine similarities with the held-out scores) instead. The summary says which data sets were
evaluated and how.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

from . import distributed
from .errors import DataError, EmbedtuneError
from .loss_choice import LossChoice, check_options, choose_loss
from .multi_data import DataSource, batches_per_epoch, data_sources, sampler_name

logger = logging.getLogger(__name__)

STS_NAME = "sts-eval"
STS_METRICS = ("spearman_cosine", "pearson_cosine")


@dataclass
class Part:
    """One data set of the run: where it came from, what the reader made of it, its loss, its split
    and the batches the sampler will yield over its training rows."""

    source: DataSource
    loaded: Any
    choice: LossChoice
    train_ds: Any = None
    eval_ds: Any | None = None
    batches: dict | None = None

    @property
    def name(self) -> str:
        return self.source.name

    def summary(self) -> dict:
        """metrics.json's entry for this data set (its file named as config.yaml names it: no absolute local path)."""
        from .config_file import portable_path

        return {"name": self.name, "path": portable_path(self.source.path), "loss": self.choice.loss,
                "columns": self.choice.columns, "train_rows": len(self.train_ds),
                "eval_rows": len(self.eval_ds) if self.eval_ds is not None else 0,
                "skipped_rows": self.loaded.skipped, "warning": self.choice.warning, "batches": self.batches}


def load_parts(config) -> list[Part]:
    """Read every data set and choose its loss; any problem is one line naming the file, before a model
    loads. A column a loss leaves out is logged as a one-line warning."""
    from .data import load_pairs

    sources = data_sources(config.data, config.loss, config.columns)
    sampler_name(config.multi_dataset)  # a wrong --multi-dataset is refused before any file is read
    parts = []
    for source in sources:
        loaded = load_pairs(source.path, source.columns)
        choice = choose_loss(source.path, loaded.dataset.column_names, source.loss)
        unread = loaded.unread_warning()  # hard negatives under a name no role reads: never dropped silently
        if unread:
            choice = dataclasses.replace(choice, warning=f"{choice.warning}; {unread}" if choice.warning else unread)
        check_options(config, choice.loss, source.path)
        if choice.warning and distributed.is_main():
            logger.warning("embedtune: %s", choice.warning)
        parts.append(Part(source, loaded, choice))
    return parts


def split_parts(config, parts: list[Part], eval_size: int | None) -> None:
    """Split each data set (the same --eval-size for each), refuse one too small for a batch, and count
    its full batches (`run_checks.check_batches`, on its text columns)."""
    from .data import train_eval_split
    from .run_checks import check_batches

    for part in parts:
        try:
            part.train_ds, part.eval_ds = train_eval_split(part.loaded.dataset, eval_size, seed=config.seed)
        except DataError as e:  # several data sets: say which one is too small
            raise (DataError(f"{part.source.path}: {e}") if len(parts) > 1 else e) from None
        if len(part.train_ds) < config.batch_size:
            raise EmbedtuneError(f"{part.source.path}: {len(part.train_ds)} training pairs, fewer than one batch "
                                 f"of {config.batch_size}")
        part.batches = check_batches(dataclasses.replace(config, data=part.source.path),
                                     part.train_ds.select_columns(list(part.choice.text_columns)), alone=len(parts) == 1)


def trainer_dataset(parts: list[Part]):
    """What the trainer reads: each data set's columns for its loss; a `DatasetDict` for several."""
    if len(parts) == 1:
        return parts[0].train_ds.select_columns(parts[0].choice.columns)
    from datasets import DatasetDict

    return DatasetDict({part.name: part.train_ds.select_columns(part.choice.columns) for part in parts})


class TextColumns:
    """Every data set's texts by column name (anchor, positive, negative_1, ...), concatenated: what the
    token cache (`data.token_cache.install_token_cache`) reads of a dataset (`column_names`, a column's
    texts, the row count), so that one cache serves the batches of every data set."""

    def __init__(self, parts: list[Part]):
        self.parts = parts
        self.column_names = text_columns(parts)

    def __len__(self) -> int:
        return sum(len(part.train_ds) for part in self.parts)

    def __getitem__(self, name: str) -> list[str]:
        from .data import column

        return [text for part in self.parts if name in part.choice.text_columns for text in column(part.train_ds, name)]


def cached_texts(parts: list[Part]):
    """What the token cache tokenizes: the one data set's text columns, or every data set's (`TextColumns`)."""
    if len(parts) == 1:
        return parts[0].train_ds.select_columns(list(parts[0].choice.text_columns))
    return TextColumns(parts)


def text_columns(parts: list[Part]) -> list[str]:
    """Every text column of the run's data sets, in order (anchor, positive, negative_1, ...)."""
    seen: dict[str, None] = {}
    for part in parts:
        seen.update(dict.fromkeys(part.choice.text_columns))
    return list(seen)


def steps_per_epoch(config, parts: list[Part], rows_per_step: int, accumulation: int) -> int:
    """Optimizer steps in one epoch: rows over rows per step for one data set; for several, the
    batches the multi-dataset sampler yields over the batches one step takes."""
    if len(parts) == 1:
        return max(1, len(parts[0].train_ds) // rows_per_step)
    batches = batches_per_epoch([len(p.train_ds) for p in parts], config.batch_size * distributed.world_size(),
                                config.multi_dataset)
    return max(1, batches // accumulation)


def build_losses(parts: list[Part], build):
    """The trainer's loss: `build(name)` for one data set; for several, a dict of data set name -> loss
    (sentence-transformers picks each batch's loss by the data set it came from)."""
    if len(parts) == 1:
        return build(parts[0].choice.loss)
    return {part.name: build(part.choice.loss) for part in parts}


@dataclass
class Evaluation:
    """The held-out evaluation that fits the run's data: the task (an IR task, or the scored pairs), the
    metric the best weights follow, and which data sets it covers."""

    kind: str  # "retrieval", "similarity" or "none"
    task: Any
    metric: str  # the evaluator's key of the followed metric (the trainer adds "eval_")
    evaluated: list[str]
    not_evaluated: list[str]

    def as_dict(self) -> dict:
        return {"kind": self.kind, "metric": self.metric, "evaluated": self.evaluated,
                "not_evaluated": self.not_evaluated}

    def describe(self) -> str:
        what = {"retrieval": "held-out retrieval (nDCG@10)", "similarity": "held-out similarity (Spearman of "
                "cosine vs score)", "none": "no evaluation"}[self.kind]
        text = f"{what} on {', '.join(self.evaluated)}" if self.evaluated else what
        if self.not_evaluated:
            text += f"; not evaluated: {', '.join(self.not_evaluated)} (scored pairs are not retrieval data)"
        return text


def choose_evaluation(parts: list[Part], ir_name: str, ir_metric: str) -> Evaluation:
    """Retrieval over the held-out rows of the data sets with relevant positives; for scored pairs only,
    their similarity; `kind` "none" when nothing is held out."""
    held = [p for p in parts if p.eval_ds is not None and len(p.eval_ds)]
    retrieval = [p for p in held if p.choice.retrieval]
    others = [p.name for p in held if not p.choice.retrieval]
    if retrieval:
        from .data import column
        from .evaluate import pairs_to_ir_task

        if len(retrieval) == 1:
            rows = retrieval[0].eval_ds
        else:
            from datasets import concatenate_datasets

            rows = concatenate_datasets([p.eval_ds.select_columns(["anchor", "positive"]) for p in retrieval])
        corpus = [text for p in retrieval for text in column(p.loaded.dataset, "positive")]
        task = pairs_to_ir_task(rows, corpus_texts=corpus)
        return Evaluation("retrieval", task, ir_metric, [p.name for p in retrieval], others)
    if held:
        from .data import column

        task = ([t for p in held for t in column(p.eval_ds, "anchor")],
                [t for p in held for t in column(p.eval_ds, "positive")],
                [float(s) for p in held for s in column(p.eval_ds, "score")])
        return Evaluation("similarity", task, f"{STS_NAME}_spearman_cosine", [p.name for p in held], [])
    return Evaluation("none", None, ir_metric, [], [])


def similarity_evaluator(evaluation: Evaluation, batch_size: int = 64):
    """sentence-transformers' EmbeddingSimilarityEvaluator over the held-out scored pairs."""
    from sentence_transformers.evaluation import EmbeddingSimilarityEvaluator

    first, second, scores = evaluation.task
    return EmbeddingSimilarityEvaluator(first, second, scores, batch_size=batch_size, name=STS_NAME,
                                        similarity_fn_names=["cosine"], show_progress_bar=False)


def similarity_summary(raw: dict) -> dict[str, float]:
    """Spearman and Pearson correlation (cosine) from the evaluator's (or trainer's) output."""
    out = {}
    for metric in STS_METRICS:
        for key in (f"{STS_NAME}_{metric}", f"eval_{STS_NAME}_{metric}"):
            if key in raw:
                out[metric] = float(raw[key])
    return out
