"""Tokenize-once cache: batches padded from cached ids equal the model's own preprocessing, with and
without prompts, right and left padding; the training recipe serves every batch from the cache."""

from __future__ import annotations

import json
import random

import pytest
import torch

from embedtune import FastModel, to_sentence_transformer
from embedtune.data.token_cache import CachedPreprocess, TokenCache, pad_values

TEXTS = ["def f(x):\n    return x", "Return the sum.", "a " * 300, "x", "  spaced  text  ", "Ünïcödé ✓ text", ""]


@pytest.fixture(scope="module")
def st_model():
    model, tok = FastModel.from_pretrained(max_seq_length=64)
    return to_sentence_transformer(model, tok)


@pytest.mark.parametrize("side", ["right", "left"])
def test_cached_batches_equal_preprocessing(st_model, side):
    tokenizer = st_model.tokenizer
    old = tokenizer.padding_side
    tokenizer.padding_side = side
    try:
        preprocess = st_model.preprocess
        cache = TokenCache(preprocess, pad_values(tokenizer), side)
        cache.add(TEXTS)
        cache.add(TEXTS, prompt="query: ")
        served = CachedPreprocess(cache, preprocess)
        rng = random.Random(0)
        for prompt in (None, "query: "):
            for _ in range(5):
                batch = rng.sample(TEXTS, rng.randint(1, len(TEXTS)))
                got = served(batch, prompt=prompt, task=None)
                want = preprocess(batch, prompt=prompt) if prompt else preprocess(batch)
                assert got.keys() == want.keys()
                for key, value in want.items():
                    assert torch.equal(got[key], value) if torch.is_tensor(value) else got[key] == value, key
        assert served.misses == 0 and served.hits == 10
        assert served(["never seen"], prompt=None)["input_ids"].shape[0] == 1 and served.misses == 1  # falls back
    finally:
        tokenizer.padding_side = old


def test_training_serves_every_batch_from_the_cache(tmp_path):
    from embedtune.train import TrainConfig, run

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"anchor": f"how to do thing {i}", "positive": f"def thing_{i}(): pass"}) + "\n"
                            for i in range(64)))
    result = run(TrainConfig(data=str(data), max_steps=8, batch_size=8, eval=False, max_seq_length=32,
                             query_prompt="query: "))  # 8 x 8 rows: the whole set
    cache = result.metrics["token_cache"]
    assert cache["texts"] == 128 and cache["batches_served"] >= 8 and cache["batches_tokenized"] == 0


def test_short_runs_on_large_sets_tokenize_as_they_go(tmp_path):
    """Two steps of 4 read 8 of 64 pairs: tokenizing all 128 texts up front would cost more."""
    from embedtune.train import TrainConfig, run

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"anchor": f"how to do thing {i}", "positive": f"def thing_{i}(): pass"}) + "\n"
                            for i in range(64)))
    result = run(TrainConfig(data=str(data), max_steps=2, batch_size=4, eval=False, max_seq_length=32))
    assert result.metrics["token_cache"] is None
