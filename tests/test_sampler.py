"""The recipe's batch sampler: NO_DUPLICATES with rows hashed once gives the batches of the plain
sampler, duplicates kept apart, and the recipe's trainer builds it hashing in process."""

from __future__ import annotations

import json
import random

import torch
from datasets import Dataset
from sentence_transformers.base.sampler import BatchSamplers, NoDuplicatesBatchSampler

from embedtune.data.sampler import batch_sampler, no_duplicates_sampler


def _pairs(n: int, seed: int = 0) -> Dataset:
    """Pairs whose texts repeat: across rows, and across columns (an anchor that is another row's positive)."""
    rng = random.Random(seed)
    texts = [f"text {i}" for i in range(n // 3)]
    return Dataset.from_dict({"anchor": [rng.choice(texts) for _ in range(n)],
                              "positive": [rng.choice(texts) for _ in range(n)]})


def _kwargs():
    return dict(batch_size=8, drop_last=True, valid_label_columns=["label"], generator=torch.Generator(), seed=3)


def _has_duplicate(dataset, batch) -> bool:
    seen = set()
    for i in batch:
        values = {dataset[i]["anchor"], dataset[i]["positive"]}
        if values & seen:
            return True
        seen |= values
    return False


def test_hashed_sampler_gives_the_plain_samplers_batches(monkeypatch):
    import multiprocess

    def no_pool(*args, **kwargs):
        raise AssertionError("hashing started a process pool")

    monkeypatch.setattr(multiprocess, "Pool", no_pool)  # what datasets.map starts for num_proc >= 1
    monkeypatch.setattr(multiprocess, "Manager", no_pool)
    dataset = _pairs(300)
    order = list(range(len(dataset)))
    random.Random(1).shuffle(order)
    assert any(_has_duplicate(dataset, order[i:i + 8]) for i in range(0, 296, 8))  # batches drawn blindly would
    hashed = batch_sampler(BatchSamplers.NO_DUPLICATES_HASHED, dataset, **_kwargs())
    plain = NoDuplicatesBatchSampler(dataset, **_kwargs())
    assert hashed.precompute_hashes and hashed.precompute_num_proc == 0
    for epoch in (0, 1):
        hashed.set_epoch(epoch)
        plain.set_epoch(epoch)
        batches = list(hashed)
        assert batches == list(plain) and len(batches) > 10
        assert not any(_has_duplicate(dataset, batch) for batch in batches)
    assert batch_sampler(BatchSamplers.NO_DUPLICATES, dataset, **_kwargs()) is None  # the trainer's own
    streamed = dataset.to_iterable_dataset()
    assert batch_sampler(BatchSamplers.NO_DUPLICATES_HASHED, streamed, **_kwargs()) is None


def test_the_recipe_samples_with_the_hashed_sampler(tmp_path, monkeypatch):
    from embedtune.data import sampler as module
    from embedtune.train import TrainConfig, run

    assert no_duplicates_sampler() == BatchSamplers.NO_DUPLICATES_HASHED
    built = []
    monkeypatch.setattr(module, "batch_sampler", lambda choice, dataset, **kw: built.append((choice, len(dataset)))
                        or batch_sampler(choice, dataset, **kw))
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"anchor": f"how to do thing {i}", "positive": f"def thing_{i}(): pass"}) + "\n"
                            for i in range(32)))
    run(TrainConfig(data=str(data), max_steps=2, batch_size=4, eval=False, max_seq_length=32,
                    output_dir=str(tmp_path / "out")))
    assert built and all(b == (BatchSamplers.NO_DUPLICATES_HASHED, 32) for b in built)
    card = (tmp_path / "out" / "model" / "README.md").read_text()
    assert "`batch_sampler`: no_duplicates_hashed" in card
