"""Tokenize once, up front: the training texts' token ids, cached, and batches padded from them.

sentence-transformers tokenizes every batch in the training loop, on the main process, while the GPU
waits. For the packed fast path that is a large share of a step. `TokenCache` runs the model's own
preprocessing (`model.preprocess` of sentence-transformers 6: same prompts, lower-casing, truncation,
special tokens) over all texts of the training columns once, in large batches, and keeps
each text's unpadded ids in one flat int32 array. The collator then only looks ids up and pads them,
which yields exactly the tensors the model's preprocessing would have produced for that batch
(tested). Anything the cache did not see (other columns, prompts or options) goes to the original
preprocessing unchanged.

Huge texts: every text is cut to a character budget before it reaches the tokenizer (`clip_text`,
`char_budget`), so a 4 MB text costs what its first max_seq_length tokens cost, not seconds and
gigabytes of token offsets that truncation throws away. The budget is large enough that the
truncated token ids do not change (see `char_budget`). `clip_inputs` is the one helper every path
uses: the cache's fill, the model's own preprocessing (`clip_module_inputs`, installed on the
Transformer module of every model embedtune wraps: the trainer's collator, sentence-transformers'
model-card statistics and `encode`), and the encoders of `retrieval` and `mine`.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

ENCODE_CHUNK = 512  # texts preprocessed per call while filling the cache (a thread's share of work)
PROGRESS_MIN_TEXTS = 20_000  # show a progress bar for fills at least this large
MIN_READ_FRACTION = 0.25  # fill up front only if the run reads at least this share of the rows

# ---------------------------------------------------------------- cutting huge texts before tokenizing
#
# Why the budget keeps the truncated ids unchanged. The tokenizers of the supported families split the
# text into words at whitespace (and, for WordPiece, punctuation) before their model runs, and
# tokenize each word on its own (WordPiece: BERT, MiniLM, MPNet...; byte-level BPE with a split regex:
# RoBERTa, ModernBERT, Qwen, Llama 3...; SentencePiece with Metaspace: XLM-R, Gemma...). So cutting
# the text changes only the tokens of the word the cut falls in; every token before that word is the
# same. A token covers at most P characters of a word: the longest piece in the vocabulary, or for
# WordPiece a whole unknown word of up to `max_input_chars_per_word` (100) characters, which becomes
# one [UNK]. We take P = max(100, those two), at most 1024. Keeping (n + 2) * P non-whitespace
# characters therefore keeps at least n + 1 whole tokens before the last (cut) word, for n =
# max_seq_length: the tokenizer's truncation to n tokens (prompt and special tokens included, which
# only take room) then sees exactly the ids it would have seen in the whole text. Whitespace is not
# counted (WordPiece drops it, and runs of blanks in code would otherwise eat the budget), up to 4x
# the budget in all. What this does not cover, and nothing short of tokenizing the whole text could:
# text whose first n tokens span more than that, i.e. words of over P characters that become a
# single token (a 10,000-letter unbroken [UNK] "word" in WordPiece) or kilobytes of blanks.
MIN_CHARS_PER_TOKEN = 100
MAX_CHARS_PER_TOKEN = 1024
SPARE_TOKENS = 2  # the cut (last) word, and one token of margin
MAX_BLANK_SHARE = 4  # at most this multiple of the budget is kept, blanks included
_WHITESPACE = (" ", "\n", "\t", "\r")

_per_token: "weakref.WeakKeyDictionary[Any, int]" = weakref.WeakKeyDictionary()


def chars_per_token(tokenizer) -> int:
    """P above: the most characters of a word one token of `tokenizer` covers (at least 100, at most
    1024), from its WordPiece `max_input_chars_per_word` and its longest vocabulary piece. Cached."""
    if tokenizer is None:
        return MIN_CHARS_PER_TOKEN
    try:
        return _per_token[tokenizer]
    except (KeyError, TypeError):
        pass
    bound = MIN_CHARS_PER_TOKEN
    backend = getattr(tokenizer, "backend_tokenizer", None)
    model = getattr(backend, "model", None)
    limit = getattr(model, "max_input_chars_per_word", None) or getattr(tokenizer, "max_input_chars_per_word", None)
    if isinstance(limit, int):
        bound = max(bound, limit)
    try:
        vocab = tokenizer.get_vocab()
        longest = max((len(piece) for piece in vocab), default=0)
    except Exception:  # noqa: BLE001 - a tokenizer without a readable vocabulary: the default bound
        longest = 0
    bound = min(max(bound, longest), MAX_CHARS_PER_TOKEN)
    try:
        _per_token[tokenizer] = bound
    except TypeError:
        pass
    return bound


def char_budget(max_seq_length: int | None, tokenizer=None) -> int | None:
    """Non-whitespace characters of a text that are sure to hold its first `max_seq_length` tokens
    (see above); None when there is no length limit (then no text is cut)."""
    if not isinstance(max_seq_length, int) or max_seq_length <= 0 or max_seq_length >= 1_000_000:
        return None
    return (max_seq_length + SPARE_TOKENS) * chars_per_token(tokenizer)


def _blanks(text: str, start: int, end: int) -> int:
    return sum(text.count(ch, start, end) for ch in _WHITESPACE)


def clip_text(text: str, budget: int | None) -> str:
    """`text` cut after `budget` non-whitespace characters (at most `MAX_BLANK_SHARE * budget`
    characters in all); shorter texts come back as they are (the same object)."""
    if budget is None or len(text) <= budget:
        return text
    limit = min(len(text), MAX_BLANK_SHARE * budget)
    end = budget
    solid = budget - _blanks(text, 0, end)
    while solid < budget and end < limit:
        step = min(max(budget - solid, 64), limit - end)
        solid += step - _blanks(text, end, end + step)
        end += step
    return text[:end]


def clip_inputs(inputs, budget: int | None):
    """`inputs` (a batch of texts, or of text pairs) with every text cut to `budget`; anything that is
    not text (dicts, images, ...) passes unchanged. The batch itself comes back when nothing was cut."""
    if budget is None:
        return inputs
    out, changed = [], False
    for item in inputs:
        if isinstance(item, str):
            cut = clip_text(item, budget)
        elif isinstance(item, tuple) and any(isinstance(part, str) for part in item):
            cut = tuple(clip_text(part, budget) if isinstance(part, str) else part for part in item)
            cut = item if all(a is b for a, b in zip(cut, item)) else cut
        else:
            cut = item
        changed |= cut is not item
        out.append(cut)
    return out if changed else inputs


def model_budget(st_model) -> int | None:
    """The character budget for a SentenceTransformer's texts: its max_seq_length and tokenizer."""
    return char_budget(getattr(st_model, "max_seq_length", None), getattr(st_model, "tokenizer", None))


class ClippedPreprocess:
    """A Transformer module's own `preprocess` (`tokenize` on sentence-transformers 5), with every text
    cut to the module's character budget first (`max_length` of the call, else its max_seq_length).
    Installed per module instance by `clip_module_inputs`; picklable like the bound method it wraps."""

    def __init__(self, module, original: Callable):
        self.module = module
        self.original = original

    def __call__(self, inputs, *args, **kwargs):
        length = kwargs.get("max_length")
        if not isinstance(length, int):  # the longest the module may use (ST 6: per-task query/document lengths)
            lengths = [getattr(self.module, name, None) for name in ("max_seq_length", "query_length", "document_length")]
            length = max((n for n in lengths if isinstance(n, int) and n > 0), default=None)
        budget = char_budget(length, getattr(self.module, "tokenizer", None))
        if budget is not None and isinstance(inputs, (list, tuple)):
            inputs = clip_inputs(inputs, budget)
        return self.original(inputs, *args, **kwargs)


def clip_module_inputs(module) -> None:
    """Make a sentence-transformers Transformer module cut huge texts before its tokenizer sees them
    (see `ClippedPreprocess`). On this module instance only; idempotent."""
    for name in ("preprocess", "tokenize"):
        current = module.__dict__.get(name)
        if isinstance(current, ClippedPreprocess):
            return
        original = getattr(module, name, None)
        if callable(original):
            object.__setattr__(module, name, ClippedPreprocess(module, original))
            return


def _key(prompt: str | None, text: str) -> bytes:
    # a 16-byte digest instead of the text: the cache must not hold a second copy of the corpus
    return hashlib.blake2b(f"{prompt or ''}\x00{text}".encode("utf-8", "surrogatepass"), digest_size=16).digest()


class TokenCache:
    """Unpadded token ids (and aligned per-token features such as token_type_ids) per (prompt, text)."""

    def __init__(self, preprocess: Callable, pad_values: dict[str, int], padding_side: str,
                 budget: int | None = None, threads: int = 1):
        self.preprocess = preprocess
        self.threads = threads  # preprocessing calls at once: >1 only for a fast (Rust) tokenizer
        self.budget = budget  # texts are cut to this many characters before preprocessing (`clip_text`)
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
        self.stopped = threading.Event()  # set to end a fill early (`CachedPreprocess.stop`)

    def _call(self, texts: list[str], prompt: str | None) -> dict[str, Any]:
        texts = clip_inputs(texts, self.budget)
        return self.preprocess(texts, prompt=prompt) if prompt else self.preprocess(texts)

    def _call_unless_stopped(self, texts: list[str], prompt: str | None) -> dict[str, Any] | None:
        # queued chunks of a stopped fill return at once: the pool's threads are joined at exit
        return None if self.stopped.is_set() else self._call(texts, prompt)

    def _encoded(self, chunks: list[list[str]], prompt: str | None) -> Iterator[dict[str, Any]]:
        """Each chunk's features, in order. A fast tokenizer encodes with the GIL released, so after the
        first chunk (alone: its call settles the tokenizer's truncation settings) the rest go through
        `threads` threads: the same features, a fraction of the wait at start-up."""
        if not chunks:
            return
        yield self._call(chunks[0], prompt)
        if self.threads < 2 or len(chunks) < 3:
            for chunk in chunks[1:]:
                yield self._call(chunk, prompt)
            return
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(self.threads, thread_name_prefix="embedtune-tokens") as pool:
            futures = [pool.submit(self._call_unless_stopped, chunk, prompt) for chunk in chunks[1:]]
            try:
                for future in futures:
                    yield future.result()
            finally:
                for future in futures:  # the cache stopped early (not usable): drop what has not started
                    future.cancel()

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
        # Chunks of texts of like length: each call pads to its longest text, and turning the padded
        # lists into tensors (under the GIL) is most of a fill's time.
        todo.sort(key=len)
        chunks = [todo[start : start + ENCODE_CHUNK] for start in range(0, len(todo), ENCODE_CHUNK)]
        for chunk, features in zip(chunks, self._encoded(chunks, prompt)):
            self._store(chunk, prompt, features)
            if progress is not None:
                progress.update(len(chunk))
            if self.stopped.is_set():
                self.usable = False  # left half-filled: never served
            if not self.usable:
                return
        self._flat = {}
        self._offset_cache = None

    def _store(self, texts: list[str], prompt: str | None, features: dict[str, Any] | None) -> None:
        mask = features.get("attention_mask") if features is not None else None
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
    """A drop-in for the collator's preprocessing function that answers from a `TokenCache`.

    With `fill` (a background fill, see `install_token_cache`), batches are tokenized as usual until
    the fill has finished, then served from the cache: the same tensors either way, so which batch
    was the first served changes nothing but speed."""

    def __init__(self, cache: TokenCache, original: Callable, fill: Callable[[], None] | None = None):
        self.cache = cache
        self.original = original
        self.hits = 0
        self.misses = 0
        self.budget = cache.budget
        self.fill_s: float | None = None  # how long the fill took
        self.ready = threading.Event()  # set once the fill is over (usable or not)
        self._thread: threading.Thread | None = None
        if fill is None:
            self.ready.set()
        else:
            self._thread = threading.Thread(target=self._fill, args=(fill,), name="embedtune-token-cache", daemon=True)
            self._thread.start()

    def _fill(self, fill: Callable[[], None]) -> None:
        started = time.perf_counter()
        try:
            fill()
        except Exception:  # noqa: BLE001 - a fill that fails leaves the batches to the model's own preprocessing
            self.cache.usable = False
        finally:
            self.fill_s = round(time.perf_counter() - started, 2)
            self.ready.set()

    def stop(self) -> None:
        """End a fill still running (the run is over): it stops after its current chunk."""
        self.cache.stopped.set()

    def summary(self) -> dict[str, Any]:
        """metrics.json's `token_cache`: texts cached, batches served from the cache and tokenized."""
        return {"texts": len(self.cache.index) if self.cache.usable else 0, "batches_served": self.hits,
                "batches_tokenized": self.misses, "fill": "background" if self._thread else "up front",
                "fill_s": self.fill_s}

    def __call__(self, texts, prompt: str | None = None, **kwargs):
        options = {k: v for k, v in kwargs.items() if v is not None}  # ST 6 always passes task=None
        if not options and self.ready.is_set() and all(isinstance(t, str) for t in texts):
            features = self.cache.batch(texts, prompt)
            if features is not None:
                self.hits += 1
                return features
        self.misses += 1
        if kwargs.get("max_length") is None:  # a call's own max_length: the module's preprocessing cuts for it
            texts = clip_inputs(texts, self.budget)
        return self.original(texts, prompt=prompt, **kwargs) if prompt is not None else self.original(texts, **kwargs)


def tokenizer_threads() -> int:
    """Threads worth giving a fast tokenizer: the CPUs this process may use, at most 8."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(8, cpus))


def install_token_cache(trainer, st_model, dataset, column_prompts: dict[str, str],
                        rows_needed: int | None = None, background: bool = False) -> CachedPreprocess | None:
    """Tokenize the training columns of `dataset` once and make the trainer's collator use the cache.

    Returns the installed preprocessing function (its hit/miss counts say how it served), or None
    when the collator or the model's preprocessing is of a kind the cache does not cover, or when
    the run reads (`rows_needed`) under a quarter of the rows: for a short run on a large set,
    tokenizing all of it up front would cost more than tokenizing the batches it reads.

    `background`: fill on a thread while training starts (the first batches are tokenized as they
    come), instead of before the first step. Worth it where the CPU is idle while the accelerator
    trains; on a CPU-only run both would compete for the same cores.
    """
    from tqdm.auto import tqdm

    collator = trainer.data_collator
    original = getattr(collator, "preprocess_fn", None)  # sentence-transformers 6 (5.x prefixes prompts itself)
    if original is None or getattr(collator, "router_mapping", None) or getattr(collator, "max_length", None):
        return None
    if rows_needed is not None and rows_needed < MIN_READ_FRACTION * len(dataset):
        return None
    tokenizer = st_model.tokenizer
    cache = TokenCache(original, pad_values(tokenizer), tokenizer.padding_side, budget=model_budget(st_model),
                       threads=tokenizer_threads() if getattr(tokenizer, "is_fast", False) else 1)
    columns = {name: dataset[name] for name in dataset.column_names}  # read on this thread: datasets is not shared
    total = len(dataset) * len(columns)

    def fill() -> None:
        with tqdm(total=total, desc="Tokenizing once", unit="text",
                  disable=background or total < PROGRESS_MIN_TEXTS) as bar:
            for name, texts in columns.items():
                cache.add(texts, column_prompts.get(name), progress=bar)
                if not cache.usable:
                    return

    if background:
        # One text through the preprocessing first, here: it sets the tokenizer's truncation and padding
        # as every later call wants them, so that the fill's calls and the trainer's own only read them
        # (a fast tokenizer refuses to change its settings while another thread encodes).
        name = next(iter(columns), None)
        first = next(iter(columns[name]), None) if name is not None else None
        if isinstance(first, str):
            cache._call([first], column_prompts.get(name))
        cached = CachedPreprocess(cache, original, fill=fill)
    else:
        fill()
        if not cache.usable:
            return None
        cached = CachedPreprocess(cache, original)
    collator.preprocess_fn = cached
    return cached
