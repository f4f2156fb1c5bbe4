"""Tokenize once, up front: the training texts' token ids, cached, and batches padded from them.

sentence-transformers tokenizes every batch in the training loop, on the main process, while the GPU
waits. For the packed fast path that is a large share of a step. `TokenCache` runs the model's own
preprocessing (`model.preprocess` of sentence-transformers 6: same prompts, lower-casing, truncation,
special tokens) over all texts of the training columns once, in large batches, and keeps
each text's unpadded ids in one flat int32 array. The collator then only looks ids up and pads them,
which yields exactly the tensors the model's preprocessing would have produced for that batch
(tested). Anything the cache did not see (other columns, prompts or options) goes to the original
preprocessing unchanged.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch

ENCODE_CHUNK = 1024  # texts preprocessed per call while filling the cache
PROGRESS_MIN_TEXTS = 20_000  # show a progress bar for fills at least this large
MIN_READ_FRACTION = 0.25  # fill up front only if the run reads at least this share of the rows


def _key(prompt: str | None, text: str) -> bytes:
    # a 16-byte digest instead of the text: the cache must not hold a second copy of the corpus
    return hashlib.blake2b(f"{prompt or ''}\x00{text}".encode("utf-8", "surrogatepass"), digest_size=16).digest()


class TokenCache:
    """Unpadded token ids (and aligned per-token features such as token_type_ids) per (prompt, text)."""

    def __init__(self, preprocess: Callable, pad_values: dict[str, int], padding_side: str):
        self.preprocess = preprocess
        self.pad_values = pad_values  # feature -> value at padding, e.g. input_ids -> pad_token_id
        self.padding_side = padding_side
        self.index: dict[bytes, int] = {}
        self.keys: list[str] | None = None  # the per-token features, in the order preprocessing returns them
        self.constants: dict[str | None, dict[str, Any]] = {}  # per prompt: features that do not vary per text
        self._offsets: list[int] = [0]
        self._parts: dict[str, list[np.ndarray]] = {}
        self._flat: dict[str, np.ndarray] = {}
        # per feature: the one value all its real tokens have had so far (attention_mask 1, usually
        # token_type_ids 0), kept as that number instead of an array; None once values differ
        self._uniform: dict[str, int | None] = {}
        self._offset_cache: np.ndarray | None = None
        self.usable = True

    def _call(self, texts: list[str], prompt: str | None) -> dict[str, Any]:
        return self.preprocess(texts, prompt=prompt) if prompt else self.preprocess(texts)

    def add(self, texts: Iterable[str], prompt: str | None = None, progress=None) -> None:
        """Preprocess and store every text not cached yet (with `prompt`, as its column will use it).
        `progress` (a tqdm bar) advances by the texts handled."""
        todo, seen, count = [], set(), 0
        for text in texts:
            count += 1
            key = _key(prompt, text)
            if key not in self.index and key not in seen:
                seen.add(key)
                todo.append(text)
        if progress is not None:
            progress.update(count - len(todo))  # cached already, or repeated
        for start in range(0, len(todo), ENCODE_CHUNK):
            chunk = todo[start : start + ENCODE_CHUNK]
            self._store(chunk, prompt, self._call(chunk, prompt))
            if progress is not None:
                progress.update(len(chunk))
            if not self.usable:
                return
        self._flat = {}
        self._offset_cache = None

    def _store(self, texts: list[str], prompt: str | None, features: dict[str, Any]) -> None:
        mask = features.get("attention_mask")
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.shape[0] != len(texts):
            self.usable = False
            return
        per_token = [k for k, v in features.items() if isinstance(v, torch.Tensor) and v.shape == mask.shape]
        others = {k: v for k, v in features.items() if k not in per_token}
        if self.keys is None:
            self.keys = per_token
            self._parts = {k: [] for k in per_token}
        known = self.constants.setdefault(prompt, others)  # e.g. prompt_length: one value per prompt
        if per_token != self.keys or not _same(others, known):
            self.usable = False  # preprocessing varies in a way a cache cannot replay
            return
        real = mask.bool()
        lengths = real.sum(dim=1).tolist()
        for key in per_token:
            self._keep(key, features[key][real].to(torch.int32).numpy())
        for text, length in zip(texts, lengths):
            self.index[_key(prompt, text)] = len(self._offsets) - 1
            self._offsets.append(self._offsets[-1] + length)

    def _keep(self, key: str, values: np.ndarray) -> None:
        """Append one batch's real-token values of `key`, or only note them while they are all one value."""
        uniform = self._uniform.get(key, "first")
        if uniform == "first":
            if values.size and (values == values[0]).all():
                self._uniform[key] = int(values[0])
                return
            self._uniform[key] = None
        elif uniform is not None:
            if not values.size or (values == uniform).all():
                return
            self._parts[key] = [np.full(self._offsets[-1], uniform, np.int32)]  # the tokens stored before
            self._uniform[key] = None
        self._parts[key].append(values)

    def _arrays(self) -> dict[str, np.ndarray]:
        if not self._flat:
            self._flat = {k: np.concatenate(v) if v else np.zeros(0, np.int32) for k, v in self._parts.items()}
            self._parts = {k: [a] for k, a in self._flat.items()}
        return self._flat

    def batch(self, texts: Sequence[str], prompt: str | None = None) -> dict[str, Any] | None:
        """The padded features of `texts`, or None if any text is not cached."""
        if not self.usable or self.keys is None:
            return None
        if prompt not in self.constants:
            return None
        rows = []
        for text in texts:
            row = self.index.get(_key(prompt, text))
            if row is None:
                return None
            rows.append(row)
        arrays = self._arrays()
        offsets = self._offsets_array()
        index = np.asarray(rows, dtype=np.int64)
        starts = offsets[index]
        lengths = offsets[index + 1] - starts
        width = int(lengths.max()) if len(rows) else 0
        columns = np.arange(width)[None, :]
        if self.padding_side == "left":
            columns = columns - (width - lengths)[:, None]  # real tokens at the right end
        real = (columns >= 0) & (columns < lengths[:, None])
        gather = np.where(real, starts[:, None] + columns, 0)
        out: dict[str, Any] = {}
        for key in self.keys:
            uniform = self._uniform.get(key)
            if uniform is not None:
                values = uniform
            else:
                values = arrays[key][gather] if len(arrays[key]) else np.zeros(gather.shape, np.int32)
            out[key] = torch.from_numpy(np.where(real, values, self.pad_values.get(key, 0)).astype(np.int64))
        out.update(self.constants[prompt])
        return out

    def _offsets_array(self) -> np.ndarray:
        if self._offset_cache is None or len(self._offset_cache) != len(self._offsets):
            self._offset_cache = np.asarray(self._offsets, dtype=np.int64)
        return self._offset_cache


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if a.keys() != b.keys():
        return False
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and torch.equal(x, y)):
                return False
        elif x != y:
            return False
    return True


def pad_values(tokenizer) -> dict[str, int]:
    return {"input_ids": tokenizer.pad_token_id or 0, "attention_mask": 0, "token_type_ids": tokenizer.pad_token_type_id}


class CachedPreprocess:
    """A drop-in for the collator's preprocessing function that answers from a `TokenCache`."""

    def __init__(self, cache: TokenCache, original: Callable):
        self.cache = cache
        self.original = original
        self.hits = 0
        self.misses = 0

    def __call__(self, texts, prompt: str | None = None, **kwargs):
        options = {k: v for k, v in kwargs.items() if v is not None}  # ST 6 always passes task=None
        if not options and all(isinstance(t, str) for t in texts):
            features = self.cache.batch(texts, prompt)
            if features is not None:
                self.hits += 1
                return features
        self.misses += 1
        return self.original(texts, prompt=prompt, **kwargs) if prompt is not None else self.original(texts, **kwargs)


def install_token_cache(trainer, st_model, dataset, column_prompts: dict[str, str],
                        rows_needed: int | None = None) -> CachedPreprocess | None:
    """Tokenize the training columns of `dataset` once and make the trainer's collator use the cache.

    Returns the installed preprocessing function (its hit/miss counts say how it served), or None
    when the collator or the model's preprocessing is of a kind the cache does not cover, or when
    the run reads (`rows_needed`) under a quarter of the rows: for a short run on a large set,
    tokenizing all of it up front would cost more than tokenizing the batches it reads.
    """
    from tqdm.auto import tqdm

    collator = trainer.data_collator
    original = getattr(collator, "preprocess_fn", None)  # sentence-transformers 6 (5.x prefixes prompts itself)
    if original is None or getattr(collator, "router_mapping", None) or getattr(collator, "max_length", None):
        return None
    if rows_needed is not None and rows_needed < MIN_READ_FRACTION * len(dataset):
        return None
    tokenizer = st_model.tokenizer
    cache = TokenCache(original, pad_values(tokenizer), tokenizer.padding_side)
    total = len(dataset) * len(dataset.column_names)
    with tqdm(total=total, desc="Tokenizing once", unit="text", disable=total < PROGRESS_MIN_TEXTS) as bar:
        for name in dataset.column_names:
            cache.add(dataset[name], column_prompts.get(name), progress=bar)
            if not cache.usable:
                return None
    cached = CachedPreprocess(cache, original)
    collator.preprocess_fn = cached
    return cached
