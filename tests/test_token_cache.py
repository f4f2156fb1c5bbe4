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


def _toy_preprocess(texts, prompt=None):
    """Char codes, right-padded; `segment` is 0 everywhere except in texts starting with "b"."""
    texts = [(prompt or "") + t for t in texts]
    width = max(len(t) for t in texts)
    ids = torch.zeros(len(texts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    segment = torch.zeros_like(ids)
    for i, t in enumerate(texts):
        ids[i, : len(t)] = torch.tensor([ord(c) for c in t])
        mask[i, : len(t)] = 1
        segment[i, : len(t)] = int(t.startswith("b"))
    return {"input_ids": ids, "attention_mask": mask, "segment": segment}


def test_features_with_one_value_are_not_stored_per_token(monkeypatch):
    """attention_mask (all 1) is kept as one number; `segment` too until a later chunk breaks its
    uniformity, when the tokens stored before are filled in: batches still equal preprocessing."""
    import embedtune.data.token_cache as token_cache

    monkeypatch.setattr(token_cache, "ENCODE_CHUNK", 2)
    cache = TokenCache(_toy_preprocess, {"input_ids": 0}, "right")
    texts = ["aa", "abc", "a", "bb", "bcd", "ab"]  # chunks: [aa, abc] [a, bb] [bcd, ab]
    cache.add(texts)
    assert cache._uniform["attention_mask"] == 1 and cache._uniform["segment"] is None
    assert "attention_mask" not in cache._arrays() or not len(cache._arrays()["attention_mask"])
    served = CachedPreprocess(cache, _toy_preprocess)
    for batch in (texts, texts[::-1], ["bb", "aa"]):
        got, want = served(batch), _toy_preprocess(batch)
        for key in want:
            assert torch.equal(got[key], want[key]), key
    assert served.misses == 0


def test_filling_on_threads_stores_what_one_thread_stores(st_model, monkeypatch):
    """The cache fills chunk by chunk on several threads (a fast tokenizer drops the GIL); the result
    must not depend on it: same index, same ids, same batches served."""
    import embedtune.data.token_cache as token_cache

    monkeypatch.setattr(token_cache, "ENCODE_CHUNK", 3)  # many chunks from a few texts
    texts = [f"{t} {i}" for i in range(7) for t in TEXTS]  # 49 texts, 17 chunks
    tokenizer = st_model.tokenizer
    caches = {}
    for threads in (1, 4):
        cache = TokenCache(st_model.preprocess, pad_values(tokenizer), tokenizer.padding_side, threads=threads)
        calls = []
        original = cache._call
        cache._call = lambda chunk, prompt, original=original, calls=calls: calls.append(len(chunk)) or original(chunk, prompt)
        cache.add(texts, prompt="query: ")
        assert sum(calls) == len(texts) and len(calls) == 17
        caches[threads] = cache
    one, many = caches[1], caches[4]
    assert one.index == many.index
    served = [CachedPreprocess(c, st_model.preprocess)(texts[::-1], prompt="query: ", task=None) for c in (one, many)]
    for key, value in served[0].items():
        assert torch.equal(value, served[1][key]) if torch.is_tensor(value) else value == served[1][key]


def _equal(got, want):
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert torch.equal(got[key], value) if torch.is_tensor(value) else got[key] == value, key


def test_background_fill_serves_only_once_complete_and_the_same_batches(st_model):
    """Until the fill is over, batches go through the model's own preprocessing; afterwards they come
    from the cache. Both give the tensors preprocessing gives."""
    import threading

    preprocess = st_model.preprocess
    tokenizer = st_model.tokenizer
    cache = TokenCache(preprocess, pad_values(tokenizer), tokenizer.padding_side)
    release = threading.Event()

    def fill():
        release.wait(timeout=60)
        cache.add(TEXTS)

    served = CachedPreprocess(cache, preprocess, fill=fill)
    batch = TEXTS[::-1]
    _equal(served(batch, task=None), preprocess(batch))
    assert (served.hits, served.misses) == (0, 1) and not served.ready.is_set()
    release.set()
    assert served.ready.wait(timeout=60)
    _equal(served(batch, task=None), preprocess(batch))
    assert (served.hits, served.misses) == (1, 1)
    assert served.summary()["fill"] == "background" and served.summary()["texts"] == len(TEXTS)


def test_a_stopped_or_failed_background_fill_is_never_served(st_model):
    import threading

    preprocess = st_model.preprocess
    tokenizer = st_model.tokenizer
    for outcome in ("stopped", "failed"):
        cache = TokenCache(preprocess, pad_values(tokenizer), tokenizer.padding_side)
        release = threading.Event()

        def fill(outcome=outcome, cache=cache, release=release):
            release.wait(timeout=60)
            if outcome == "failed":
                raise RuntimeError("tokenizer broke")
            cache.add(TEXTS)

        served = CachedPreprocess(cache, preprocess, fill=fill)
        if outcome == "stopped":
            served.stop()
        release.set()
        assert served.ready.wait(timeout=60)
        _equal(served(TEXTS, task=None), preprocess(TEXTS))
        assert served.hits == 0 and served.misses == 1 and served.summary()["texts"] == 0, outcome


def test_install_in_background_while_the_trainer_tokenizes(st_model, monkeypatch):
    """The installed background fill runs on several threads while this thread keeps calling the
    collator's preprocessing (as the first training steps do): no error from the shared tokenizer,
    every batch equal to preprocessing, and the cache serves once ready."""
    from types import SimpleNamespace

    import embedtune.data.token_cache as token_cache
    from datasets import Dataset

    monkeypatch.setattr(token_cache, "ENCODE_CHUNK", 4)
    monkeypatch.setattr(token_cache, "tokenizer_threads", lambda: 4)
    anchors = [f"query {i} {TEXTS[i % len(TEXTS)]}" for i in range(400)]
    positives = [f"def f_{i}(x): return x * {i}" + " pad" * (i % 37) for i in range(400)]
    dataset = Dataset.from_dict({"anchor": anchors, "positive": positives})
    preprocess = st_model.preprocess
    st_model.tokenizer(["settings the fill must not fight over"], truncation=True, max_length=8)  # no padding
    collator = SimpleNamespace(preprocess_fn=preprocess, router_mapping=None, max_length=None)
    served = token_cache.install_token_cache(SimpleNamespace(data_collator=collator), st_model, dataset,
                                             {"anchor": "query: "}, background=True)
    assert collator.preprocess_fn is served
    rng = random.Random(0)
    while True:
        done = served.ready.is_set()
        rows = rng.sample(range(400), 16)
        for column, texts, prompt in (("anchor", anchors, "query: "), ("positive", positives, None)):
            batch = [texts[i] for i in rows]
            got = served(batch, prompt=prompt, task=None)
            _equal(got, preprocess(batch, prompt=prompt) if prompt else preprocess(batch))
        if done:
            break
    assert served.hits >= 2 and served.summary()["texts"] == 800
