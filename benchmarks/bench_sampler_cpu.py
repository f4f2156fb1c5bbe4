"""Host time of the recipe's batch sampler: sentence-transformers' NO_DUPLICATES against the hashed
form the recipe uses (`embedtune.data.sampler`), batch 128, on synthetic pairs of 3.5k and 100k rows
(short queries, function-sized passages). The trainer fetches each batch after the previous step, so
this time is time a GPU waits.

    python benchmarks/bench_sampler_cpu.py
"""

from __future__ import annotations

import time

import torch
from datasets import Dataset
from sentence_transformers.base.sampler import BatchSamplers, NoDuplicatesBatchSampler

from embedtune.data.sampler import batch_sampler


def main() -> None:
    print(f"{'rows':>7s} {'sampler':9s} {'first batch s':>13s} {'then ms/batch':>13s}")
    for rows in (3_500, 100_000):
        dataset = Dataset.from_dict({"anchor": [f"query number {i} about things" for i in range(rows)],
                                     "positive": [f"def f_{i}(x):\n    return x + {i}\n" * 5 for i in range(rows)]})
        for name in ("plain", "hashed"):
            kwargs = dict(batch_size=128, drop_last=True, valid_label_columns=["label"], generator=torch.Generator(),
                          seed=0)
            sampler = (NoDuplicatesBatchSampler(dataset, **kwargs) if name == "plain"
                       else batch_sampler(BatchSamplers.NO_DUPLICATES_HASHED, dataset, **kwargs))
            start = time.perf_counter()
            batches = iter(sampler)
            next(batches)  # the hashed sampler hashes every row here
            first = time.perf_counter()
            for _ in range(20):
                next(batches)
            then = (time.perf_counter() - first) / 20
            print(f"{rows:7d} {name:9s} {first - start:13.3f} {then * 1000:13.2f}")


if __name__ == "__main__":
    main()
