"""The losses of each data shape equal sentence-transformers' own (loss and every gradient within
1e-5 in fp32): on the plain path, on the packed path (one merged forward), and cached (GradCache
chunks replayed on backward) equal to uncached."""

from __future__ import annotations

import pytest
import torch

from embedtune import FastModel
from embedtune.shape_losses import AnglELoss, CoSENTLoss, DistillKLLoss, MarginMSELoss, TripletMarginLoss
from embedtune.st import to_sentence_transformer
from loss_checks import assert_same as _assert_same, features as _features, loss_and_grads as _grads
from tiny_models import make_tiny_model

PAIR_SCORES = [0.9, 0.1, 0.5, 0.5, 1.0, 0.0]  # a tie too: ties must not count as ordered pairs
TEACHER = [[9.0, 2.0, 1.0], [7.5, 7.0, 0.5], [3.0, 1.0, 2.0], [8.0, -1.0, 0.0], [6.0, 5.5, 5.0], [4.0, 1.0, 3.0]]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    return make_tiny_model("bert", tmp_path_factory.mktemp("tiny_shape_losses"))


def _st(path, fast: bool):
    torch.manual_seed(0)
    model, tok = FastModel.from_pretrained(str(path), max_seq_length=64, fast=fast)
    return to_sentence_transformer(model, tok).eval()


def _reference(name, st):
    from sentence_transformers import losses

    return {
        "triplet": lambda: losses.TripletLoss(st),
        "cosent": lambda: losses.CoSENTLoss(st),
        "angle": lambda: losses.AnglELoss(st),
        "marginmse": lambda: losses.MarginMSELoss(st),
        "marginmse-margin": lambda: losses.MarginMSELoss(st),
        "kl": lambda: losses.DistillKLDivLoss(st),
    }[name]()


# name -> (our loss class, hard-negative columns, labels)
SHAPES = {
    "triplet": (TripletMarginLoss, 1, None),
    "cosent": (CoSENTLoss, 0, torch.tensor(PAIR_SCORES)),
    "angle": (AnglELoss, 0, torch.tensor(PAIR_SCORES)),
    "marginmse": (MarginMSELoss, 2, torch.tensor(TEACHER)),
    "marginmse-margin": (MarginMSELoss, 1, torch.tensor([t[0] - t[1] for t in TEACHER])),  # one margin per row
    "kl": (DistillKLLoss, 2, torch.tensor(TEACHER)),
}


@pytest.mark.parametrize("name", list(SHAPES))
def test_equals_sentence_transformers_on_the_plain_path(tiny_bert, name):
    cls, negatives, labels = SHAPES[name]
    st = _st(tiny_bert, fast=False)
    features = _features(st, negatives)
    ours = _grads(st, cls(st), features, labels)
    assert ours[0].item() != 0.0  # a loss that is 0 would make the comparison say nothing
    _assert_same(ours, _grads(st, _reference(name, st), features, labels))


@pytest.mark.parametrize("name", list(SHAPES))
def test_packed_path_equals_sentence_transformers(tiny_bert, name):
    """Ours on the packed path, every column in one token stream, against ST's loss on the plain model
    with the same weights."""
    cls, negatives, labels = SHAPES[name]
    packed, plain = _st(tiny_bert, fast=True), _st(tiny_bert, fast=False)
    ours_loss = cls(packed)
    calls = []
    hook = packed.register_forward_hook(lambda *args: calls.append(1))
    ours = _grads(packed, ours_loss, _features(packed, negatives), labels)
    hook.remove()
    assert ours_loss._runs_packed() and len(calls) == 1  # one forward for all columns
    _assert_same(ours, _grads(plain, _reference(name, plain), _features(plain, negatives), labels))


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("name", list(SHAPES))
def test_cached_equals_uncached(tiny_bert, name, fast):
    cls, negatives, labels = SHAPES[name]
    st = _st(tiny_bert, fast=fast)
    features = _features(st, negatives)
    uncached = _grads(st, cls(st), features, labels)
    for budget in (1, 24):  # one row per chunk; a few rows per chunk
        _assert_same(uncached, _grads(st, cls(st, cached=True, token_budget=budget), features, labels))


def test_wrong_scores_are_refused(tiny_bert):
    st = _st(tiny_bert, fast=False)
    with pytest.raises(ValueError, match="needs scores of shape"):
        MarginMSELoss(st)(_features(st, 2), torch.tensor([[1.0, 2.0]] * 6))
    with pytest.raises(ValueError, match="needs scores"):
        CoSENTLoss(st)(_features(st, 0), None)
    with pytest.raises(ValueError, match="one negative"):
        TripletMarginLoss(st)(_features(st, 2), None)
