"""The recipe's batch sampler: in-batch negatives must not be duplicates of a row's own texts.

sentence-transformers' NO_DUPLICATES sampler builds each batch by reading candidate rows from the
Arrow table one by one and comparing their texts: 4-10 ms per 128-row batch on a 2-core CPU, host
time a GPU step waits for (the trainer fetches the next batch after each step). Its hashed mode
(NO_DUPLICATES_HASHED) hashes every row's texts once (xxhash, which `datasets` already depends on)
and compares hashes: the same batches (equal texts, equal hashes), ~1 ms per batch after ~5 s per
million rows up front. sentence-transformers hashes with `datasets.map` in a pool of up to 8
processes; the recipe hashes in this process (`batch_sampler`: num_proc 0, which datasets >= 5 maps
in process, while 1 still starts a pool and a manager process): forking a process that holds a CUDA
context is best avoided, and a pool costs more than it saves on the pair files read here. With an
older datasets, or sentence-transformers 5.x (whose hashed mode hands xxhash `str`, which xxhash 3
refuses), the recipe keeps the plain sampler.
"""

from __future__ import annotations

import functools
import inspect

try:  # sentence-transformers >= 6
    from sentence_transformers.base.sampler import BatchSamplers, NoDuplicatesBatchSampler
except ImportError:  # 5.x
    from sentence_transformers.sampler import NoDuplicatesBatchSampler
    from sentence_transformers.training_args import BatchSamplers


@functools.cache  # the installed versions do not change within a process
def _can_hash() -> bool:
    import datasets
    import sentence_transformers

    try:
        import xxhash  # noqa: F401
    except ImportError:
        return False
    if int(datasets.__version__.split(".")[0]) < 5:  # num_proc=0 read as "no pool" is what 5.x does
        return False
    if int(sentence_transformers.__version__.split(".")[0]) < 6:  # its hashed mode fails on xxhash 3
        return False
    return (hasattr(BatchSamplers, "NO_DUPLICATES_HASHED")
            and "precompute_hashes" in inspect.signature(NoDuplicatesBatchSampler.__init__).parameters)


def no_duplicates_sampler():
    """The trainer's `batch_sampler` argument (what the model card records): NO_DUPLICATES_HASHED where
    this sentence-transformers has it and xxhash is installed, else NO_DUPLICATES."""
    return BatchSamplers.NO_DUPLICATES_HASHED if _can_hash() else BatchSamplers.NO_DUPLICATES


def batch_sampler(choice, dataset, **kwargs) -> NoDuplicatesBatchSampler | None:
    """The sampler for `choice` when it is the hashed one, hashing in this process; None otherwise (the
    trainer then builds its own)."""
    from datasets import IterableDataset

    if isinstance(dataset, IterableDataset):  # streamed: no sampler at all (the trainer says so)
        return None
    if _can_hash() and choice == BatchSamplers.NO_DUPLICATES_HASHED:
        return NoDuplicatesBatchSampler(dataset, precompute_hashes=True, precompute_num_proc=0, **kwargs)
    return None
