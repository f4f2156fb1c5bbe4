"""The contrastive losses: equal to sentence-transformers' reference losses uncached, and cached
equal to uncached (loss and every gradient within 1e-5 in fp32), with hard negatives, symmetric,
Matryoshka, the fast path on and off, and dropout replayed exactly."""

from __future__ import annotations

import pytest
import torch

from embedtune import FastModel
from embedtune.losses import ColumnChunks, ContrastiveLoss, padding_side, plan_chunks, slice_features
from embedtune.st import to_sentence_transformer
from loss_checks import ANCHORS, POSITIVES
from loss_checks import assert_same as _assert_same, features as _features, loss_and_grads as _grads
from tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    return make_tiny_model("bert", tmp_path_factory.mktemp("tiny_losses"))


def _st(path, fast: bool, lora: bool = False):
    torch.manual_seed(0)
    model, tok = FastModel.from_pretrained(str(path), max_seq_length=64, fast=fast)
    if lora:
        model = FastModel.get_peft_model(model, r=4, random_state=0)
        with torch.no_grad():  # non-zero B so LoRA gradients flow everywhere
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
    return to_sentence_transformer(model, tok)


@pytest.mark.parametrize("negatives", [0, 2])
def test_uncached_equals_sentence_transformers_mnrl(tiny_bert, negatives):
    from sentence_transformers.losses import MultipleNegativesRankingLoss

    st = _st(tiny_bert, fast=False).eval()
    features = _features(st, negatives)
    ours = _grads(st, ContrastiveLoss(st, temperature=0.05), features)
    reference = _grads(st, MultipleNegativesRankingLoss(st, scale=20.0), features)
    _assert_same(ours, reference)


def test_temperature_changes_the_loss(tiny_bert):
    st = _st(tiny_bert, fast=False).eval()
    features = _features(st)
    with torch.no_grad():
        warm = ContrastiveLoss(st, temperature=1.0)(features)
        cold = ContrastiveLoss(st, temperature=0.01)(features)
    assert not torch.isclose(warm, cold)


def test_symmetric_equals_sentence_transformers_symmetric(tiny_bert):
    from sentence_transformers.losses import MultipleNegativesSymmetricRankingLoss

    st = _st(tiny_bert, fast=False).eval()
    features = _features(st)
    ours = _grads(st, ContrastiveLoss(st, temperature=0.05, symmetric=True), features)
    reference = _grads(st, MultipleNegativesSymmetricRankingLoss(st, scale=20.0), features)
    _assert_same(ours, reference)


def test_matryoshka_equals_sentence_transformers_matryoshka(tiny_bert):
    from sentence_transformers.losses import MatryoshkaLoss, MultipleNegativesRankingLoss

    st = _st(tiny_bert, fast=False).eval()
    features = _features(st, 1)
    dims, weights = [32, 16, 8], [1.0, 0.5, 0.25]
    ours = _grads(st, ContrastiveLoss(st, matryoshka_dims=dims, matryoshka_weights=weights), features)
    reference = _grads(st, MatryoshkaLoss(st, MultipleNegativesRankingLoss(st, scale=20.0), dims, weights), features)
    _assert_same(ours, reference)


CASES = {
    "plain": dict(),
    "hard-negatives": dict(negatives=2),
    "symmetric": dict(symmetric=True),
    "matryoshka": dict(matryoshka_dims=[32, 16, 8], negatives=1),
    "all": dict(symmetric=True, matryoshka_dims=[32, 8], temperature=0.1, negatives=2),
}


@pytest.mark.parametrize("case,fast", [(c, True) for c in CASES] + [("plain", False), ("all", False)])
def test_cached_equals_uncached(tiny_bert, case, fast):
    options = dict(CASES[case])
    negatives = options.pop("negatives", 0)
    st = _st(tiny_bert, fast=fast, lora=(case == "plain")).eval()
    features = _features(st, negatives)
    uncached = _grads(st, ContrastiveLoss(st, **options), features)
    for budget in (1, 24):  # one row per chunk; a few rows per chunk
        cached = _grads(st, ContrastiveLoss(st, cached=True, token_budget=budget, **options), features)
        _assert_same(uncached, cached)


def test_cached_replays_dropout_masks(tiny_bert):
    """With dropout on, the re-run chunks must see the masks of the first pass, else gradients are wrong."""
    st = _st(tiny_bert, fast=True).train()
    features = _features(st, 1)
    budget = 24
    torch.manual_seed(7)
    cached = _grads(st, ContrastiveLoss(st, cached=True, token_budget=budget), features)

    torch.manual_seed(7)  # the reference draws dropout masks chunk by chunk in the same order, with a graph
    st.zero_grad(set_to_none=True)
    columns = []
    for feats in features:
        parts = [st(slice_features(feats, rows))["sentence_embedding"] for rows in plan_chunks(feats["attention_mask"], budget)]
        columns.append(torch.cat(parts))
    loss = ContrastiveLoss(st).loss_from_embeddings(columns)
    loss.backward()
    reference = loss.detach(), {n: p.grad.clone() for n, p in st.named_parameters() if p.grad is not None}
    _assert_same(cached, reference)
    # and dropout really is on: a different seed gives a different loss
    torch.manual_seed(8)
    other = _grads(st, ContrastiveLoss(st, cached=True, token_budget=budget), features)
    assert not torch.isclose(other[0], cached[0])


def test_cached_chunks_stay_within_the_token_budget(tiny_bert):
    """Memory is flat in the batch size because no forward ever sees more than one chunk."""
    st = _st(tiny_bert, fast=True).eval()
    seen = []
    st[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]["attention_mask"].sum(dim=1).tolist()))
    features = _features(st, 2)
    budget = 30
    ContrastiveLoss(st, cached=True, token_budget=budget)(features).backward()
    assert len(seen) > 2 * len(features)  # chunked, and re-run with a graph
    for lengths in seen:
        assert sum(lengths) <= budget or len(lengths) == 1


def test_default_token_budget_follows_the_free_gpu_memory(tiny_bert, monkeypatch):
    """Without a budget: on a GPU with the packed path, a third of the free memory (cached blocks
    count as free) by 48 bytes per token per layer per hidden unit, clamped; elsewhere 16,384."""
    from embedtune import losses

    assert losses.gpu_token_budget(80 * 10**9, 12, 768) == 58 * 1024  # BERT-base on an 80 GB card
    assert losses.gpu_token_budget(80 * 10**9, 24, 1024) == 22 * 1024  # BERT-large
    assert losses.gpu_token_budget(2 * 10**9, 24, 1024) == 4096  # clamped below
    assert losses.gpu_token_budget(10**13, 2, 32) == 131072  # and above

    st = _st(tiny_bert, fast=True)
    assert ContrastiveLoss(st, cached=True, token_budget=77)._chunk_budget(torch.device("cuda")) == 77
    assert ContrastiveLoss(st, cached=True)._chunk_budget(torch.device("cpu")) == losses.DEFAULT_TOKEN_BUDGET
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (9 * 10**9, 10 * 10**9))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 3 * 10**9)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 2 * 10**9)
    config = st[0].auto_model.config
    expected = losses.gpu_token_budget(10 * 10**9, config.num_hidden_layers, config.hidden_size)
    assert ContrastiveLoss(st, cached=True)._chunk_budget(torch.device("cuda")) == expected
    plain = _st(tiny_bert, fast=False)  # padded chunks: the fixed default
    assert ContrastiveLoss(plain, cached=True)._chunk_budget(torch.device("cuda")) == losses.DEFAULT_TOKEN_BUDGET


def test_plan_chunks_and_slicing():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    assert plan_chunks(mask, 5) == [slice(0, 2), slice(2, 4)]
    assert plan_chunks(mask, 4) == [slice(0, 1), slice(1, 2), slice(2, 3), slice(3, 4)]
    assert plan_chunks(mask, 100) == [slice(0, 4)]
    assert plan_chunks(mask, 1) == [slice(i, i + 1) for i in range(4)]
    ids = torch.arange(16).view(4, 4)
    part = slice_features({"input_ids": ids, "attention_mask": mask}, slice(0, 2))
    assert part["input_ids"].tolist() == [[0, 1, 2], [4, 5, 6]]  # right padding trimmed to the longest row
    left = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]])
    part = slice_features({"input_ids": ids[:2], "attention_mask": left}, slice(0, 1))
    assert part["input_ids"].tolist() == [[2, 3]] and part["attention_mask"].tolist() == [[1, 1]]
    assert padding_side(mask) == "right" and padding_side(left) == "left"
    holes = torch.tensor([[1, 0, 1, 0], [1, 1, 1, 1]])  # not one block per row: never trimmed
    assert padding_side(holes) is None
    assert slice_features({"input_ids": ids[:2], "attention_mask": holes}, slice(0, 1))["input_ids"].shape == (1, 4)
    plan = ColumnChunks.plan({"input_ids": ids, "attention_mask": mask}, 5)
    assert plan.widths == [3, 4] and plan.side == "right"
    assert plan.chunk({"input_ids": ids, "attention_mask": mask}, 0)["input_ids"].tolist() == [[0, 1, 2], [4, 5, 6]]


def test_bad_options_are_refused(tiny_bert):
    st = _st(tiny_bert, fast=False)
    with pytest.raises(ValueError, match="temperature"):
        ContrastiveLoss(st, temperature=0)
    with pytest.raises(ValueError, match="one weight per"):
        ContrastiveLoss(st, matryoshka_dims=[8, 4], matryoshka_weights=[1.0])


def test_cached_replays_under_the_forward_autocast(tiny_bert):
    """Trainers run the loss under autocast and call backward() outside it: the re-run chunks must use
    the first pass's autocast, or they compute other (fp32) embeddings than the ones cached."""
    st = _st(tiny_bert, fast=True).eval()
    features = _features(st, 1)
    dtypes = []
    # a projection run as its own module (under autocast q/k/v run as one stacked product instead)
    dense = next(m for n, m in st.named_modules() if n.endswith("layer.0.attention.output.dense"))
    dense.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = ContrastiveLoss(st, cached=True, token_budget=24)(features)
    first_pass = len(dtypes)
    loss.backward()  # outside autocast, as the HF trainer does
    assert len(dtypes) > first_pass  # chunks were re-run
    assert set(dtypes) == {torch.bfloat16}, dtypes


@pytest.mark.parametrize("arch", ["qwen3", "modernbert"])
def test_cached_equals_uncached_other_architectures(tmp_path_factory, arch):
    """Decoders (last-token pooling, causal packed attention) and ModernBERT through the cached path."""
    path = make_tiny_model(arch, tmp_path_factory.mktemp(f"tiny_losses_{arch}"))
    st = _st(path, fast=True).eval()
    features = _features(st, 1)
    uncached = _grads(st, ContrastiveLoss(st, symmetric=True), features)
    cached = _grads(st, ContrastiveLoss(st, symmetric=True, cached=True, token_budget=24), features)
    _assert_same(uncached, cached)


class _PerColumn(ContrastiveLoss):
    """The same loss with one forward per column (the merge switched off): the reference."""

    def _runs_packed(self) -> bool:
        return False


@pytest.mark.parametrize("arch", ["bert", "qwen3"])
def test_one_forward_for_all_columns_equals_one_per_column(tmp_path_factory, arch):
    """On the packed path all columns (anchors, positives, negatives) run as one token stream; the loss
    and every gradient equal a forward per column (qwen3: left padding, last-token pooling)."""
    path = make_tiny_model(arch, tmp_path_factory.mktemp(f"tiny_merge_{arch}"))
    st = _st(path, fast=True).eval()
    if arch == "qwen3":
        st.tokenizer.padding_side = "left"
    features = _features(st, 2)
    merged_loss = ContrastiveLoss(st)
    calls = []
    hook = st.register_forward_hook(lambda *args: calls.append(1))
    merged = _grads(st, merged_loss, features)
    hook.remove()
    assert merged_loss._runs_packed() and len(calls) == 1  # one forward for the four columns
    _assert_same(_grads(st, _PerColumn(st), features), merged)


def test_columns_that_cannot_merge_run_one_by_one(tiny_bert):
    from embedtune.losses import merge_columns

    st = _st(tiny_bert, fast=True)
    anchors, positives = st.tokenize(ANCHORS), st.tokenize(POSITIVES)
    merged = merge_columns([anchors, positives])
    assert merged["input_ids"].shape == (12, max(anchors["input_ids"].shape[1], positives["input_ids"].shape[1]))
    assert torch.equal(merged["attention_mask"].sum(1)[:6], anchors["attention_mask"].sum(1))
    assert merge_columns([anchors, {**positives, "prompt_length": 3}]) is None  # a per-column setting
    left = {k: v.flip(1) if torch.is_tensor(v) and v.dim() == 2 else v for k, v in positives.items()}
    assert merge_columns([anchors, left]) is None  # mixed padding sides


def test_prompted_and_plain_columns_merge_when_pooling_ignores_prompt_length(tiny_bert):
    """A query prompt puts `prompt_length` on the anchor column only; pooling that includes the prompt
    (the default) never reads it, so the columns still run as one forward, with the same loss."""
    st = _st(tiny_bert, fast=True).eval()
    prompted = st.preprocess(ANCHORS, prompt="query: ") if hasattr(st, "preprocess") else None
    if prompted is None or "prompt_length" not in prompted:
        pytest.skip("this sentence-transformers version marks no prompt length")
    features = [prompted, st.tokenize(POSITIVES)]
    calls = []
    hook = st.register_forward_hook(lambda *args: calls.append(1))
    merged = _grads(st, ContrastiveLoss(st), features)
    hook.remove()
    assert len(calls) == 1
    _assert_same(_grads(st, _PerColumn(st), features), merged)


def test_the_model_card_cites_gradcache_only_for_the_cached_loss(tiny_bert):
    """sentence-transformers' card lists each loss's `citation`: GradCache belongs to the cached mode only."""
    from sentence_transformers.model_card import SentenceTransformerModelCardData

    st = _st(tiny_bert, fast=True)
    for cached in (False, True):
        card = SentenceTransformerModelCardData()
        card.set_losses([ContrastiveLoss(st, cached=cached)])
        cites_gradcache = any("GradCache" in text for text in card.citations.values())
        assert cites_gradcache == cached, card.citations
