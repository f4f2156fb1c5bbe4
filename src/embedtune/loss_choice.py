"""Which loss a data set trains with: chosen from its columns, or named with `--loss` (`loss:` in the
YAML config, `TrainConfig.loss`), and checked against them.

    columns                                          default loss      other losses that fit
    anchor, positive                                 mnrl              -
    anchor, positive, negative_1..n                  mnrl              triplet (n = 1)
    anchor, positive, score                          cosent            angle
    anchor, positive, negative_1, score (a margin)   marginmse         -
    anchor, positive, negative_1..n, scores (n+1)    marginmse         kl

A column the chosen loss does not read is never dropped silently: a `score`/`scores` column under
mnrl or triplet is a one-line warning (the column is left out), and a loss that lacks a column it needs
(or has more than it can use) is a one-line error naming the file and its columns. The loss objects
themselves are built by `build_loss`; this module imports no torch at import time.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import EmbedtuneError

# name -> what it is, for messages and the README
LOSSES: dict[str, str] = {
    "mnrl": "InfoNCE / MultipleNegativesRankingLoss over in-batch and hard negatives",
    "triplet": "triplet margin loss (anchor, positive, one negative)",
    "cosent": "CoSENT over pairs with a similarity score",
    "angle": "AnglE over pairs with a similarity score",
    "marginmse": "MarginMSE distillation from teacher scores",
    "kl": "KL-divergence distillation from teacher scores",
}
ALIASES = {"infonce": "mnrl", "margin-mse": "marginmse", "margin_mse": "marginmse", "distill-kl": "kl",
           "kldiv": "kl", "kl-div": "kl"}
# losses whose data has relevant positives: the held-out rows make a retrieval task
RETRIEVAL_LOSSES = ("mnrl", "triplet", "marginmse", "kl")
INFONCE_ONLY = {"symmetric": "--symmetric", "matryoshka_dims": "--matryoshka-dims"}


@dataclass(frozen=True)
class LossChoice:
    """The loss one data set trains with, the columns the trainer reads for it (texts, then the score
    column where the loss uses one), and the warning for a column it leaves out (or None)."""

    loss: str
    text_columns: tuple[str, ...]
    label: str | None
    warning: str | None = None

    @property
    def columns(self) -> list[str]:
        return [*self.text_columns, *([self.label] if self.label else [])]

    @property
    def retrieval(self) -> bool:
        """Whether the data's positives are relevant documents (the held-out rows make an IR task)."""
        return self.loss in RETRIEVAL_LOSSES


def loss_name(requested: str | None) -> str | None:
    """The canonical name of `requested` (aliases and case allowed), None for None; unknown is an error."""
    if requested is None:
        return None
    key = requested.strip().lower()
    key = ALIASES.get(key, key)
    if key not in LOSSES:
        raise EmbedtuneError(f"--loss {requested!r}: not one of {', '.join(LOSSES)}")
    return key


def choose_loss(source: str, column_names: list[str], requested: str | None = None) -> LossChoice:
    """The loss for a data set with these columns (as `data.load_pairs` names them): `requested` if
    given and it fits, else the default for the shape (module docstring)."""
    texts = tuple(c for c in column_names if c in ("anchor", "positive") or c.startswith("negative_"))
    negatives = len(texts) - 2
    label = "score" if "score" in column_names else "scores" if "scores" in column_names else None
    found = ", ".join(column_names)
    name = loss_name(requested)
    if name is None:
        if label == "score" and negatives > 1:
            raise EmbedtuneError(f"{source}: a score per row and {negatives} hard negatives (columns: {found}): no "
                                 "loss reads both; give 'scores' (one per candidate), or pick a loss with --loss (mnrl "
                                 "leaves the score out)")
        if label == "scores" and not negatives:
            raise EmbedtuneError(f"{source}: teacher scores need hard negatives to compare the positive with "
                                 f"(columns: {found})")
        name = {"score": "marginmse" if negatives else "cosent", "scores": "marginmse"}.get(label, "mnrl")

    def refuse(needs: str) -> EmbedtuneError:
        return EmbedtuneError(f"{source}: --loss {name} needs {needs}; the file has columns: {found}")

    if name in ("mnrl", "triplet"):
        if name == "triplet" and negatives != 1:
            raise refuse("anchor, positive and exactly one negative")
        warning = (f"{source}: column '{label}' is not used by the {name} loss: it trains on the texts only"
                   if label else None)
        return LossChoice(name, texts, None, warning)
    if name in ("cosent", "angle"):
        if label != "score" or negatives:
            raise refuse("two texts and a score per row (sentence1, sentence2, score), no negatives")
        return LossChoice(name, texts, "score")
    if name == "marginmse" and label == "score" and negatives == 1:  # the teacher's margin, one per row
        return LossChoice(name, texts, "score")
    if label != "scores" or not negatives:
        raise refuse("a query, a positive, negatives and 'scores' (the teacher's, one per candidate)"
                     + (", or one negative and the teacher's margin as 'score'" if name == "marginmse" else ""))
    return LossChoice(name, texts, "scores")


def check_options(config, loss: str, source: str) -> None:
    """Refuse InfoNCE's own options (--symmetric, --matryoshka-dims, a --temperature of its own) on a
    data set that trains with another loss: they would change nothing."""
    if loss == "mnrl":
        return
    for field, flag in INFONCE_ONLY.items():
        if getattr(config, field):
            raise EmbedtuneError(f"{flag} applies to the mnrl loss only; {source} trains with {loss}")
    if config.temperature != 0.05:
        raise EmbedtuneError(f"--temperature applies to the mnrl loss only; {source} trains with {loss}")


def build_loss(name: str, st_model, config):
    """The torch loss `name` for `st_model`, with the run's cached-loss settings (and InfoNCE's options
    for mnrl); every loss is an `embedtune.losses.ColumnLoss`."""
    if name == "mnrl":
        from .losses import ContrastiveLoss

        return ContrastiveLoss(st_model, temperature=config.temperature, symmetric=config.symmetric,
                               matryoshka_dims=config.matryoshka_dims, cached=config.cached_loss,
                               token_budget=config.token_budget)
    from . import shape_losses

    cls = {"triplet": shape_losses.TripletMarginLoss, "cosent": shape_losses.CoSENTLoss,
           "angle": shape_losses.AnglELoss, "marginmse": shape_losses.MarginMSELoss,
           "kl": shape_losses.DistillKLLoss}[name]
    return cls(st_model, cached=config.cached_loss, token_budget=config.token_budget)


def graphs_off_reason(loss) -> str | None:
    """Why the CUDA-graph step (which captures the contrastive loss alone) is off for this loss, or
    None where `graphs.unsupported_reason` decides."""
    if isinstance(loss, dict):
        return "the run trains several data sets, each with its own loss"
    from .losses import ContrastiveLoss

    if not isinstance(loss, ContrastiveLoss):
        return f"the {type(loss).__name__} loss is not captured (the graph step covers the mnrl loss only)"
    return None
