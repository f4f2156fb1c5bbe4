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

Rows that share a text cannot share a batch, so a data set with repeated texts yields fewer full
batches than rows / batch size (64 identical rows: none). `plan_batches` counts them before the run
(`train.check_batches` refuses a run with no step and warns of a shortfall): texts dictionary-encoded
by Arrow, the sampler's pass replayed only over rows that conflict. The trainer's hashed sampler then
takes those codes instead of hashing every row again (`batch_sampler`).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

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
        sampler = NoDuplicatesBatchSampler(dataset, precompute_hashes=True, precompute_num_proc=0, **kwargs)
        codes = _known_codes(dataset)
        if codes is not None and getattr(sampler, "_row_hashes", False) is None:
            # The run's `plan_batches` already encoded these rows' texts: equal texts, equal codes, which
            # is all the sampler compares (its xxhash pass over every row is skipped).
            sampler._row_hashes = codes
        return sampler
    return None


# --------------------------------------------------------------------------------------------------
# How many full batches the sampler really yields: known before the run starts.


@dataclass
class BatchPlan:
    """What the NO_DUPLICATES sampler makes of a training set (`plan_batches`).

    A batch holds no text twice (its rows are each other's negatives), so rows that share a text with
    another row (``shared_rows`` of ``rows``) cannot all be placed: one pass over the shuffled rows
    fills ``per_pass`` full batches of ``batch_size`` where ``rows // batch_size`` (``planned``) were
    counted on. sentence-transformers >= 6.3 then reshuffles (up to ``resample_passes`` more passes,
    repeating rows) until an epoch has ``planned`` batches; ``per_epoch`` is what the epoch really
    yields. Counted for the first epoch's order (each epoch shuffles anew: later ones differ slightly).
    """

    rows: int
    batch_size: int
    shared_rows: int
    per_pass: int
    per_epoch: int
    planned: int
    resample_passes: int = 0

    @property
    def short(self) -> bool:
        """Fewer full batches of distinct rows than the row count promises."""
        return self.per_pass < self.planned

    def describe(self) -> str:
        """One line: how many rows share texts and the batches the sampler can fill."""
        return (f"{self.shared_rows} of {self.rows} training rows share texts with other rows; the no-duplicates "
                f"sampler (a batch holds no text twice) can fill {self.per_pass} batch"
                f"{'es' if self.per_pass != 1 else ''} of {self.batch_size} per pass over the data, not {self.planned}")

    def as_dict(self) -> dict:
        return {"rows": self.rows, "batch_size": self.batch_size, "rows_sharing_texts": self.shared_rows,
                "full_batches_per_pass": self.per_pass, "batches_per_epoch": self.per_epoch,
                "batches_planned_per_epoch": self.planned}


def plan_batches(dataset, batch_size: int, seed: int, columns: list[str] | None = None, epoch: int = 0) -> BatchPlan:
    """The full batches the NO_DUPLICATES sampler yields over `dataset` (drop_last, as the recipe trains)
    in epoch `epoch`, with the trainer's seed: exact, from the sampler's own rule.

    Every text is dictionary-encoded by Arrow (equal texts, equal codes: what the sampler's hashes
    compare); a text in two or more rows makes those rows conflict. Without any, every batch fills
    (the common case: one Arrow pass, no Python loop over rows). Otherwise the sampler's pass is
    replayed on the codes of the conflicting rows, in the permutation the sampler draws
    (`_one_pass`), and its resampling passes likewise.
    """
    rows = len(dataset)
    planned = rows // batch_size
    resample = _resample_passes()
    keys = _conflict_keys(dataset, columns)
    if keys is None:
        return BatchPlan(rows, batch_size, 0, planned, planned, planned, resample)
    per_pass, per_epoch = _epoch_batches(keys, batch_size, seed + epoch, resample)
    shared = sum(1 for key in keys if key is not None)
    return BatchPlan(rows, batch_size, shared, per_pass, per_epoch, planned, resample)


def fitting_batch_size(dataset, batch_size: int, seed: int, columns: list[str] | None = None,
                       batches: int = 1) -> int | None:
    """The largest of batch_size/2, /4, ... (at least 2) whose epoch yields at least `batches` full
    batches (what an error message can suggest); None if none does."""
    keys = _conflict_keys(dataset, columns)
    size = batch_size // 2
    while size >= 2:
        if keys is None or _epoch_batches(keys, size, seed, _resample_passes())[1] >= batches:
            return size
        size //= 2
    return None


def _epoch_batches(keys: list, batch_size: int, seed: int, resample: int) -> tuple[int, int]:
    """(full batches of the first pass, full batches of the epoch): the sampler's epoch replayed, its
    generator seeded as it seeds it (seed + epoch), each pass on a fresh permutation from it."""
    import numpy as np
    import torch

    rows = len(keys)
    planned = rows // batch_size
    generator = torch.Generator()
    generator.manual_seed(seed)
    dtype = torch.int32 if rows <= np.iinfo(np.int32).max else torch.int64
    per_pass = _one_pass(keys, batch_size, torch.randperm(rows, generator=generator, dtype=dtype).tolist(), planned)
    per_epoch = per_pass
    if 0 < per_pass < planned:  # sentence-transformers >= 6.3: more shuffled passes to reach `planned`
        for _ in range(resample):
            order = torch.randperm(rows, generator=generator, dtype=dtype).tolist()
            per_epoch += _one_pass(keys, batch_size, order, planned - per_epoch)
            if per_epoch >= planned:
                break
    return per_pass, min(per_epoch, planned)


def _resample_passes() -> int:
    """Extra shuffled passes the installed sampler runs when one pass falls short (0 before ST 6.3)."""
    import sys

    module = sys.modules[NoDuplicatesBatchSampler.__module__]
    return int(getattr(module, "_MAX_RESAMPLE_PASSES", 0))


def _conflict_keys(dataset, columns: list[str] | None) -> list[frozenset | None] | None:
    """Per row, the codes of its texts that also occur in another row (None: no shared text); None
    when no row shares a text with another. The code matrix is kept for the run's sampler
    (`batch_sampler`), so that it need not hash the same texts again."""
    import numpy as np

    columns = list(columns or dataset.column_names)
    rows = len(dataset)
    if rows == 0 or not columns:
        return None
    codes = _text_codes(dataset, columns)
    _CODES[:] = [(_dataset_key(dataset.select_columns(columns)), codes)] if _can_hash() else []
    ordered = np.sort(codes, axis=1)
    repeat = np.zeros_like(ordered, dtype=bool)
    repeat[:, 1:] = ordered[:, 1:] == ordered[:, :-1]  # a text twice in one row is one text of that row
    counted = ordered[~repeat & (ordered >= 0)]
    shared_code = np.bincount(counted, minlength=int(codes.max()) + 1 if codes.size else 0) >= 2
    shared_code = np.append(shared_code, False)  # code -1 (null, no text) -> the appended False
    shared_cells = shared_code[ordered]
    conflicted = np.flatnonzero(shared_cells.any(axis=1))
    if len(conflicted) == 0:
        return None
    keys: list[frozenset | None] = [None] * rows
    for row in conflicted.tolist():
        keys[row] = frozenset(ordered[row][shared_cells[row]].tolist())
    return keys


def _text_codes(dataset, columns: list[str]):
    """(rows, columns) int64: every text's code in one Arrow dictionary (equal texts, equal codes; null
    -1), rows in the dataset's order. Encoded from the table under the dataset, then put in the
    dataset's order (its shuffle/select indices), which is much cheaper than taking the texts."""
    import numpy as np
    import pyarrow as pa

    table = dataset.data
    chunks = [chunk for name in columns for chunk in table.column(name).chunks]
    if len({chunk.type for chunk in chunks}) > 1 or sum(chunk.nbytes for chunk in chunks) > 2**31 - 2**27:
        chunks = [chunk.cast(pa.large_string()) for chunk in chunks]  # one type; offsets past 2 GiB
    texts = pa.chunked_array(chunks, chunks[0].type).combine_chunks()  # one array: encoding chunks is slow
    encoded = texts.dictionary_encode()
    codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    if encoded.indices.null_count:  # a null is no text: it never conflicts
        codes[encoded.indices.is_null().to_numpy(zero_copy_only=False)] = -1
    codes = codes.reshape(len(columns), len(table)).T
    indices = getattr(dataset, "_indices", None)
    if indices is not None:
        codes = codes[indices.column(0).to_numpy(zero_copy_only=False).astype(np.int64)]
    return np.ascontiguousarray(codes)


# The last plan's text codes, for the trainer's sampler over the same rows: ((fingerprint, rows,
# columns), codes); one entry, replaced by the next plan, handed over once.
_CODES: list[tuple[tuple, object]] = []


def _dataset_key(dataset) -> tuple:
    return (getattr(dataset, "_fingerprint", None), len(dataset), tuple(dataset.column_names))


def _known_codes(dataset):
    """The codes `plan_batches` computed for exactly these rows (handed over once: not kept), else None."""
    if _CODES and _CODES[0][0][0] is not None and _CODES[0][0] == _dataset_key(dataset):
        return _CODES.pop()[1]
    return None


def _one_pass(keys: list[frozenset | None], batch_size: int, order: list[int], limit: int) -> int:
    """Full batches of one pass of sentence-transformers' NoDuplicatesBatchSampler over rows visited in
    `order`: each batch walks the remaining rows in order, takes every row that shares no text with the
    rows taken so far, skips (defers) the others, and is yielded once it holds `batch_size` rows; a
    pass ends when every row is taken (batches that do not fill are dropped). Stops counting at
    `limit`, or when too few rows remain to fill another batch."""
    visit = [keys[i] for i in order]
    following = list(range(1, len(visit) + 1))
    following[-1] = -1
    head, left, full = 0, len(visit), 0
    while head != -1 and full < limit and left >= batch_size:
        taken: set = set()
        count, current, previous = 0, head, -1
        while current != -1:
            after = following[current]
            key = visit[current]
            if key is not None and not taken.isdisjoint(key):
                previous, current = current, after
                continue
            count += 1
            left -= 1
            if previous == -1:
                head = after
            else:
                following[previous] = after
            if count == batch_size:
                full += 1
                break
            if key is not None:
                taken.update(key)
            current = after
    return full
