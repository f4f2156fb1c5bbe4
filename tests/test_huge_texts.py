"""Huge texts cost what their first max_seq_length tokens cost: every path that tokenizes cuts a text to a
character budget first (`embedtune.data.token_cache.clip_text`), and the cut never changes the
truncated token ids of real text.

No timing is asserted: a spy on the tokenizer checks what it is handed.
"""

from __future__ import annotations

import inspect
import json
import math
import random
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from embedtune import FastModel, to_sentence_transformer
from embedtune.data.token_cache import (
    MAX_BLANK_SHARE, char_budget, chars_per_token, clip_inputs, clip_text, model_budget,
)
from embedtune.loading import bundled_model_path
from embedtune.mine import mine_hard_negatives
from embedtune.train import TrainConfig, run
from tiny_models import make_tiny_model

ROOT = Path(__file__).resolve().parents[1]
LENGTHS = (3, 8, 32, 64, 128, 256, 512)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(bundled_model_path()))


def _words_text(chars: int, seed: int = 0) -> str:
    """Prose-like text of about `chars` characters from the project's own documentation."""
    words = (ROOT / "README.md").read_text(encoding="utf-8").split()
    rng = random.Random(seed)
    out, size = [], 0
    while size < chars:
        word = rng.choice(words)
        out.append(word)
        size += len(word) + 1
    return " ".join(out)


def _real_texts() -> dict[str, str]:
    import argparse
    import collections
    import json as json_module

    docs = "\n\n".join(p.read_text(encoding="utf-8") for p in sorted((ROOT / "docs").glob("*.md")))
    code = "\n\n".join(inspect.getsource(m) for m in (argparse, collections, json_module.decoder))
    indented = "\n".join(" " * (4 * (i % 9)) + line.strip() for i, line in enumerate(code.splitlines()))
    cjk = "自然言語処理は、人間の言語をコンピュータで処理する技術です。" * 400
    mixed = " ".join(f"{w} Größe café naïve 東京 😀 x={i}" for i, w in enumerate(_words_text(20_000).split()))
    return {
        "readme": (ROOT / "README.md").read_text(encoding="utf-8"),
        "docs": docs,
        "code": code,
        "indented-code": indented,
        "cjk": cjk,
        "mixed-unicode": mixed,
        "long-words": " ".join("x" * n for n in range(1, 120)) * 20,  # up to and past WordPiece's 100-char limit
        "huge": _words_text(1_000_000, seed=1),
    }


def _ids(tokenizer, texts: list[str], length: int) -> list[list[int]]:
    return tokenizer(texts, truncation=True, max_length=length)["input_ids"]


def test_bundled_tokenizer_bound(tokenizer):
    assert tokenizer.backend_tokenizer.model.max_input_chars_per_word == 100
    assert chars_per_token(tokenizer) == 100
    assert char_budget(64, tokenizer) == 66 * 100
    assert char_budget(None, tokenizer) is None and char_budget(int(1e30), tokenizer) is None


@pytest.mark.parametrize("name", list(_real_texts()))
def test_cut_texts_keep_their_truncated_ids(tokenizer, name):
    """The ids after truncation are those of the whole text, for every length, with and without a prompt."""
    text = _real_texts()[name]
    for length in LENGTHS:
        budget = char_budget(length, tokenizer)
        cut = clip_text(text, budget)
        assert len(cut) <= max(len(text), 0) and text.startswith(cut)
        if len(text) > MAX_BLANK_SHARE * budget:
            assert len(cut) < len(text), "a long text is cut"
        assert _ids(tokenizer, [cut], length) == _ids(tokenizer, [text], length), (name, length)
        prompt = "Represent this document for retrieval: "
        assert _ids(tokenizer, [prompt + cut], length) == _ids(tokenizer, [prompt + text], length), (name, length)


def test_short_texts_pass_untouched_and_blanks_do_not_count():
    short = "a short text"
    assert clip_text(short, 100) is short
    batch = [short, ("a", "pair")]
    assert clip_inputs(batch, 100) is batch
    assert clip_inputs(batch, None) is batch
    # Blanks are not counted against the budget (WordPiece drops them), up to MAX_BLANK_SHARE times it.
    blanky = ("word" + " " * 12) * 1000
    cut = clip_text(blanky, 400)
    assert len(cut.replace(" ", "")) >= 400 and len(cut) <= MAX_BLANK_SHARE * 400
    assert clip_text(" " * 100_000, 400) == " " * (MAX_BLANK_SHARE * 400)
    assert clip_inputs([{"image": 1}, ("x" * 1000, 3)], 100) == [{"image": 1}, ("x" * 100, 3)]


def test_model_preprocessing_cuts_and_gives_the_same_features(tokenizer):
    """The Transformer module of a wrapped model cuts before its tokenizer, with identical features."""
    model, tok = FastModel.from_pretrained(str(bundled_model_path()), max_seq_length=64, fast=False, device="cpu")
    st = to_sentence_transformer(model, tok)
    texts = [_words_text(300_000, seed=2), "short", _words_text(5_000, seed=3)]
    stock = type(st[0]).preprocess(st[0], texts)
    seen = []
    original = st[0].preprocess.original
    st[0].preprocess.original = lambda inputs, *a, **k: (seen.append(max(map(len, inputs))), original(inputs, *a, **k))[1]
    ours = st.preprocess(texts)
    assert seen and seen[0] <= MAX_BLANK_SHARE * model_budget(st)
    assert set(ours) == set(stock) and all(torch.equal(ours[k], stock[k]) for k in stock if torch.is_tensor(stock[k]))


# ---------------------------------------------------------------- the whole path, with a spy on the tokenizer


class TokenizerSpy:
    """Records, per calling embedtune function, the longest text any tokenizer was handed."""

    def __init__(self):
        self.longest: dict[str, int] = defaultdict(int)

    def install(self, monkeypatch):
        original = PreTrainedTokenizerBase.__call__
        spy = self

        def __call__(tok, text=None, *args, **kwargs):
            texts = text if isinstance(text, (list, tuple)) else [text]
            flat = [t for item in texts for t in (item if isinstance(item, tuple) else (item,)) if isinstance(t, str)]
            if flat:
                caller = spy.caller()
                spy.longest[caller] = max(spy.longest[caller], max(map(len, flat)))
            return original(tok, text, *args, **kwargs)

        monkeypatch.setattr(PreTrainedTokenizerBase, "__call__", __call__)
        return self

    @staticmethod
    def caller() -> str:
        frame = sys._getframe(2)
        names = []
        while frame is not None:
            module = frame.f_globals.get("__name__", "")
            if module.startswith("embedtune.") and frame.f_code.co_name != "__call__":
                names.append(f"{module}.{frame.f_code.co_name}")
            frame = frame.f_back
        # the throughput sample's tokenizing, also from its helpers (a thread pool's workers)
        sample = [n for n in names if n.endswith("._tokens_per_row") or n == "embedtune.train.tokens"]
        return "embedtune.train._tokens_per_row" if sample else (names or ["other"])[0]


HUGE_CHARS = 2_500_000
MAX_LEN = 32


@pytest.fixture(scope="module")
def huge_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("huge")
    base = make_tiny_model("bert", root)
    rows = [{"anchor": f"question {i} about topic {i % 7}", "positive": f"answer {i}: topic {i % 7}, number {i}"}
            for i in range(40)]
    rows[3]["positive"] = _words_text(HUGE_CHARS, seed=4)
    rows[17]["anchor"] = _words_text(HUGE_CHARS, seed=5)
    rows[17]["positive"] = _words_text(HUGE_CHARS, seed=6)
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch = pytest.MonkeyPatch()
    spy = TokenizerSpy().install(monkeypatch)
    try:
        result = run(TrainConfig(data=str(data), model=str(base), output_dir=str(root / "run"), max_steps=3,
                                 batch_size=8, max_seq_length=MAX_LEN, lora_r=4, eval_size=8, evals_per_run=1,
                                 query_prompt="query: ", logging_steps=1))
        mined = mine_hard_negatives(result.model, data, root / "mined.jsonl", num_negatives=1, rank_range=(0, 10),
                                    margin=-1.0, show_progress=False, use_faiss=False)
    finally:
        monkeypatch.undo()
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    return {"result": result, "mined": mined, "spy": spy, "limit": MAX_BLANK_SHARE * char_budget(MAX_LEN, tokenizer)}


def test_huge_texts_train_evaluate_and_mine(huge_run):
    result = huge_run["result"]
    assert result.metrics["steps"] == 3
    losses = [e["loss"] for e in result.metrics["history"] if "loss" in e]
    assert losses and all(math.isfinite(x) for x in losses)
    assert result.metrics["final"] and result.metrics["token_cache"]["batches_served"] >= 1
    assert huge_run["mined"].rows > 0


def test_tokenizer_never_sees_more_than_the_budget(huge_run):
    """Token cache, collator, sentence-transformers' card statistics, evaluation and mining: all cut first."""
    longest = {k: v for k, v in huge_run["spy"].longest.items() if not k.endswith("._tokens_per_row")}
    assert longest, "the spy saw the tokenizer calls"
    assert max(longest.values()) > char_budget(MAX_LEN) // 2, "the huge texts did reach the tokenizer, cut"
    too_long = {k: v for k, v in longest.items() if v > huge_run["limit"] + 100}
    assert not too_long, too_long


def test_throughput_sample_is_cut_too(huge_run):
    assert huge_run["spy"].longest.get("embedtune.train._tokens_per_row", 0) <= huge_run["limit"] + 100


def test_card_examples_are_cut_before_a_save(tmp_path):
    """`st.clip_card_examples`: the training texts sentence-transformers copies into the card (widget,
    usage snippet) are cut to 1,000 characters, so a save writes (and PyYAML re-reads) no megabytes."""
    from embedtune.st import CARD_EXAMPLE_CHARS, clip_card_examples

    model, tok = FastModel.from_pretrained(str(bundled_model_path()), max_seq_length=32, fast=False, device="cpu")
    st = to_sentence_transformer(model, tok)
    huge = _words_text(300_000, seed=7)
    st.model_card_data.widget = [{"source_sentence": huge, "sentences": [huge, "short"]}]
    st.model_card_data.usage_examples = [huge, "short", huge]
    clip_card_examples(st)
    assert st.model_card_data.widget[0]["source_sentence"] == huge[:CARD_EXAMPLE_CHARS] + "..."
    assert st.model_card_data.widget[0]["sentences"][1] == "short"
    assert [len(t) for t in st.model_card_data.usage_examples] == [CARD_EXAMPLE_CHARS + 3, 5, CARD_EXAMPLE_CHARS + 3]
    st.save(str(tmp_path / "model"))
    assert (tmp_path / "model" / "README.md").stat().st_size < 100_000


def test_saved_model_card_holds_no_megabyte_examples(tmp_path):
    """What the trainer put in the card (`set_widget_examples` picks the shortest rows, which in a file of
    only huge texts are huge) is cut when the recipe saves the model."""
    from embedtune.save import save_merged

    model, tok = FastModel.from_pretrained(str(bundled_model_path()), max_seq_length=32, fast=False, device="cpu")
    st = to_sentence_transformer(model, tok)
    huge = _words_text(300_000, seed=8)
    st.model_card_data.widget = [{"source_sentence": huge, "sentences": [huge, huge]}]
    st.model_card_data.usage_examples = [huge, huge, huge]
    save_merged(st, tmp_path / "model")
    assert (tmp_path / "model" / "README.md").stat().st_size < 100_000
