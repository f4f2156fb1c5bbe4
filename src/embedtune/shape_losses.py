"""The losses for data shapes other than anchor/positive(/negatives) pairs: a triplet margin loss,
CoSENT and AnglE for pairs with a similarity score, MarginMSE and KL distillation for candidates with
teacher scores.

Each equals sentence-transformers' loss of the same name at its defaults (tests/test_losses_by_shape.py
compares loss and gradients), and each is a `losses.ColumnLoss`: the columns go through one merged
forward on the packed path, and `cached=True` runs the GradCache mode, as for the contrastive loss.
The similarity functions are sentence-transformers' own (`sentence_transformers.util`), so the math
cannot drift from theirs. Scores arrive as the collator's `labels`: one number per row (CoSENT,
AnglE; MarginMSE's teacher margin with one negative) or one teacher score per candidate column,
positive first (MarginMSE, KL).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .losses import ColumnLoss


def _need_labels(labels: Tensor | None, shape: tuple[int, ...], loss: str) -> Tensor:
    """The batch's scores as float32, checked to have `shape` (a wrong one is the data's fault)."""
    if labels is None:
        raise ValueError(f"the {loss} loss needs scores, and this batch has none")
    labels = labels.detach().float()
    if labels.numel() == shape[0] and len(shape) == 1:
        labels = labels.reshape(shape)
    if tuple(labels.shape) != shape:
        raise ValueError(f"the {loss} loss needs scores of shape {shape}, got {tuple(labels.shape)}")
    return labels


class TripletMarginLoss(ColumnLoss):
    """max(d(anchor, positive) - d(anchor, negative) + margin, 0), averaged: sentence-transformers'
    TripletLoss with its defaults (Euclidean distance, margin 5). Columns: anchor, positive, negative."""

    def __init__(self, model, margin: float = 5.0, cached: bool = False, token_budget: int | None = None):
        if margin < 0:
            raise ValueError(f"the triplet margin must be 0 or more, got {margin}")
        super().__init__(model, cached=cached, token_budget=token_budget)
        self.margin = float(margin)

    def loss_from_embeddings(self, embeddings: Sequence[Tensor], labels: Tensor | None = None) -> Tensor:
        from sentence_transformers.util import pairwise_euclidean_sim

        if len(embeddings) != 3:
            raise ValueError(f"the triplet loss takes anchor, positive and one negative, got {len(embeddings)} columns")
        anchor, positive, negative = (e.float() for e in embeddings)
        distance_pos = -pairwise_euclidean_sim(anchor, positive)
        distance_neg = -pairwise_euclidean_sim(anchor, negative)
        return F.relu(distance_pos - distance_neg + self.margin).mean()


class CoSENTLoss(ColumnLoss):
    """CoSENT: for every two pairs (i, j) with score_i < score_j, log(1 + sum exp(s * (sim_i - sim_j)));
    sentence-transformers' CoSENTLoss (cosine similarity, scale 20). Columns: two texts and a score."""

    name = "CoSENT"

    def __init__(self, model, scale: float = 20.0, cached: bool = False, token_budget: int | None = None):
        if scale <= 0:
            raise ValueError(f"the {self.name} scale must be positive, got {scale}")
        super().__init__(model, cached=cached, token_budget=token_budget)
        self.scale = float(scale)

    @staticmethod
    def similarity(a: Tensor, b: Tensor) -> Tensor:
        from sentence_transformers.util import pairwise_cos_sim

        return pairwise_cos_sim(a, b)

    def loss_from_embeddings(self, embeddings: Sequence[Tensor], labels: Tensor | None = None) -> Tensor:
        if len(embeddings) != 2:
            raise ValueError(f"the {self.name} loss takes two text columns, got {len(embeddings)}")
        labels = _need_labels(labels, (embeddings[0].shape[0],), self.name)
        scores = self.similarity(embeddings[0].float(), embeddings[1].float()) * self.scale
        differences = scores[:, None] - scores[None, :]  # [i, j]: sim_i - sim_j
        lower = (labels[:, None] < labels[None, :]).float()  # pairs where i should score below j
        differences = differences - (1 - lower) * 1e12
        differences = torch.cat((differences.new_zeros(1), differences.reshape(-1)))
        return torch.logsumexp(differences, dim=0)


class AnglELoss(CoSENTLoss):
    """AnglE: CoSENT over the angle similarity |cos + sin| of the complex-split embeddings;
    sentence-transformers' AnglELoss (scale 20). Columns: two texts and a score."""

    name = "AnglE"

    @staticmethod
    def similarity(a: Tensor, b: Tensor) -> Tensor:
        from sentence_transformers.util import pairwise_angle_sim

        return pairwise_angle_sim(a, b)


def _candidate_scores(embeddings: Sequence[Tensor], loss: str) -> Tensor:
    """[B, candidates]: the dot product of each query with its positive and each negative."""
    from sentence_transformers.util import pairwise_dot_score

    if len(embeddings) < 3:
        raise ValueError(f"the {loss} loss takes a query, a positive and at least one negative, "
                         f"got {len(embeddings)} columns")
    query = embeddings[0].float()
    return torch.stack([pairwise_dot_score(query, other.float()) for other in embeddings[1:]], dim=1)


class MarginMSELoss(ColumnLoss):
    """MSE between the student's margins dot(q, pos) - dot(q, neg_i) and the teacher's; sentence-
    transformers' MarginMSELoss. The teacher's margins come as its scores (one per candidate, positive
    first: score_pos - score_neg_i), or, with one negative, as the margin itself (one number per row,
    sentence-transformers' triplet format). Columns: query, positive, negatives, scores (or score)."""

    def loss_from_embeddings(self, embeddings: Sequence[Tensor], labels: Tensor | None = None) -> Tensor:
        student = _candidate_scores(embeddings, "MarginMSE")
        student_margins = student[:, :1] - student[:, 1:]
        if labels is not None and labels.dim() == 1 and student.shape[1] == 2:  # the margin itself
            teacher_margins = _need_labels(labels, (student.shape[0],), "MarginMSE")[:, None]
        else:
            teacher = _need_labels(labels, tuple(student.shape), "MarginMSE")
            teacher_margins = teacher[:, :1] - teacher[:, 1:]
        return F.mse_loss(student_margins, teacher_margins)


class DistillKLLoss(ColumnLoss):
    """KL(teacher || student) of the softmaxes over each query's candidates (dot products over a
    temperature, x temperature^2); sentence-transformers' DistillKLDivLoss (temperature 1). Columns:
    query, positive, negatives, scores (the teacher's, one per candidate, positive first)."""

    def __init__(self, model, temperature: float = 1.0, cached: bool = False, token_budget: int | None = None):
        if not 0 < temperature < float("inf"):
            raise ValueError(f"the KL temperature must be a positive number, got {temperature}")
        super().__init__(model, cached=cached, token_budget=token_budget)
        self.temperature = float(temperature)

    def loss_from_embeddings(self, embeddings: Sequence[Tensor], labels: Tensor | None = None) -> Tensor:
        student = _candidate_scores(embeddings, "KL") / self.temperature
        teacher = _need_labels(labels, tuple(student.shape), "KL") / self.temperature
        loss = F.kl_div(torch.log_softmax(student, dim=1), torch.softmax(teacher, dim=1), reduction="batchmean")
        return loss * self.temperature ** 2
