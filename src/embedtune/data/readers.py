"""Read (anchor, positive[, negatives]) training pairs from the file formats people actually have.

Accepted: ``.jsonl``/``.ndjson``, ``.json`` (a list of objects, an object holding one list such as
``{"data": [...]}``, or JSON lines), ``.csv`` (every cell read as text), ``.parquet``, and folders written
by ``Dataset.save_to_disk``/``DatasetDict.save_to_disk`` (the "train" split, else the first).
Columns: anchor/query/question, positive/pos/answer, negative/neg/negative_<n>; values may be strings or
lists of strings (FlagEmbedding style), a list of positives giving one row each.

Every format is turned into a stream of row dicts and fed through one normaliser (:class:`_Collector`),
so aliases, list-valued columns, skipping and negative handling behave the same everywhere. Any problem
with the user's file surfaces as a one-line :class:`DataError` naming the file (and line, where known).
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from embedtune.errors import DataError

if TYPE_CHECKING:  # datasets/pyarrow are imported lazily so `embedtune --help` stays fast
    import datasets

ANCHOR_ALIASES: tuple[str, ...] = ("anchor", "query", "question")
POSITIVE_ALIASES: tuple[str, ...] = ("positive", "pos", "answer")
# Plus numbered columns negative_1, negative_2, ... (see _NUMBERED_NEGATIVE).
NEGATIVE_ALIASES: tuple[str, ...] = ("negative", "neg")

_NUMBERED_NEGATIVE = re.compile(r"negative_(\d+)")
_JSON_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
_SUPPORTED = ".jsonl, .ndjson, .json, .csv, .parquet, or a folder written by datasets' save_to_disk"
# Keys that, in a .json object, hold the list of records (in order of preference).
_JSON_LIST_KEYS = ("data", "train", "rows", "examples", "records", "items")
# A "\uD800"-style escape: the only way json.loads can produce text pyarrow can't encode as UTF-8.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abcdefABCDEF]")
_BATCH_ROWS = 8192  # rows per batch read from Parquet / saved datasets
_FLUSH_ROWS = 65536  # rows buffered as Python strings before conversion to Arrow
_MAX_DETAIL_CHARS = 300
_MAX_PLANS = 4096  # distinct row shapes (key tuples) whose column resolution is cached


@dataclass
class LoadedPairs:
    """A validated pair dataset plus what the loader had to drop, for the CLI to report.

    ``dataset`` has string columns ``anchor``, ``positive``, ``negative_1..negative_{num_negatives}``;
    ``skipped`` counts rows (or list entries of a list-valued positive) dropped for empty/null/non-string
    text; ``source`` is the path as given.
    """

    dataset: datasets.Dataset
    skipped: int
    source: str
    num_negatives: int


def load_pairs(path: str | os.PathLike) -> LoadedPairs:
    """Load and validate a pair file; see the module docstring for the accepted shapes."""
    name = os.fspath(path)
    p = Path(name)
    if not p.exists():
        raise DataError(f"{name}: no such file or directory")

    collector = _Collector(name)
    try:
        if p.is_dir():
            _read_saved_dataset(p, name, collector)
        else:
            kind = _JSON_SUFFIXES.get(p.suffix.lower())
            if kind is None:
                raise DataError(f"{name}: unsupported file format '{p.suffix or '(no extension)'}'; use {_SUPPORTED}")
            if _is_blank_file(p):
                raise DataError(f"{name}: file is empty")
            {"jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv, "parquet": _read_parquet}[kind](
                p, name, collector
            )
    except OSError as e:  # unreadable file, a folder where a file was expected, ...
        raise DataError(f"{name}: cannot read: {one_line(e.strerror or str(e))}") from e
    return collector.finish()


def column(dataset, name: str) -> list[str]:
    """One column as a Python list, read through Arrow (iterating a `datasets` Column is slow)."""
    return dataset.with_format("arrow")[name].to_pylist()


def train_eval_split(
    dataset: datasets.Dataset, eval_size: int | None = None, seed: int = 42
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """Shuffle ``dataset`` (deterministically for ``seed``) and cut off the first ``eval_size`` rows.

    The default eval size is min(4096, 10% of rows), at least 1 when there are 2+ rows, so small
    datasets still get a signal without starving training; ``eval_size=0`` means no eval split.
    """
    n = len(dataset)
    if eval_size is None:
        eval_size = min(4096, n // 10)
        if n >= 2:
            eval_size = max(1, eval_size)
    if eval_size < 0:
        raise DataError(f"eval size must be 0 or more, got {eval_size}")
    # keep_in_memory: never write an indices cache file next to a dataset the user gave us.
    shuffled = dataset.shuffle(seed=seed, keep_in_memory=True)
    if eval_size == 0:
        return shuffled, None
    if eval_size >= n:
        raise DataError(
            f"the data has {n} rows, too few for an eval split of {eval_size}; "
            "use a smaller eval size, or 0 for no evaluation"
        )
    return shuffled.select(range(eval_size, n)), shuffled.select(range(eval_size))


# --------------------------------------------------------------------------------------------------
# Normalisation shared by all formats


class _Collector:
    """Turn row dicts into rectangular Arrow string columns, streaming.

    Rows are buffered as Python lists and flushed to Arrow every ``_FLUSH_ROWS`` rows, so a large file
    never holds all its text as Python objects. Negatives are kept column-wise and only up to the
    smallest per-row count seen so far: the final ``negative_1..k`` must be rectangular, so anything
    beyond the running minimum can never be used.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.anchors: list[str] = []
        self.positives: list[str] = []
        self.negatives: list[list[str]] = []  # one list per kept negative position
        self.neg_limit: int | None = None  # running minimum of negatives per row; None before any row
        self.chunks: list[list] = []  # flushed [anchor, positive, *negative] pyarrow arrays
        self.skipped = 0
        self.records = 0
        self.found: dict[str, None] = {}  # every column name seen, in first-seen order
        self.has_anchor_column = False
        self.has_positive_column = False
        self._plans: dict[tuple, tuple[str | None, str | None, tuple[str, ...]]] = {}

    def declare_columns(self, names: Iterable[str]) -> None:
        """Record a tabular file's columns so the missing-columns message is right even with 0 rows."""
        for key in names:
            self._plan((key,))

    def _plan(self, keys: tuple) -> tuple[str | None, str | None, tuple[str, ...]]:
        """Resolve which keys hold anchor/positive/negatives; cached per distinct key tuple.

        Resolution is per row shape, so in JSON lines a row lacking "anchor" may still use "query".
        """
        plan = self._plans.get(keys)
        if plan is None:
            for key in keys:
                self.found.setdefault(str(key))
            anchor = next((a for a in ANCHOR_ALIASES if a in keys), None)
            positive = next((a for a in POSITIVE_ALIASES if a in keys), None)
            numbered = sorted(
                (int(m.group(1)), k) for k in keys if isinstance(k, str) and (m := _NUMBERED_NEGATIVE.fullmatch(k))
            )
            negatives = tuple(a for a in NEGATIVE_ALIASES if a in keys) + tuple(k for _, k in numbered)
            self.has_anchor_column |= anchor is not None
            self.has_positive_column |= positive is not None
            plan = (anchor, positive, negatives)
            if len(self._plans) < _MAX_PLANS:  # rows with ever-new keys must not grow this forever
                self._plans[keys] = plan
        return plan

    def add(self, record: dict) -> None:
        """Normalise one record; a list-valued positive yields one row per usable positive."""
        self.records += 1
        anchor_key, positive_key, negative_keys = self._plan(tuple(record))
        anchor = record.get(anchor_key)  # .get(None) is None: no anchor column in this row
        if not _is_text(anchor):
            self.skipped += 1
            return
        positive = record.get(positive_key)
        if type(positive) is str:  # the common case first
            if not _is_text(positive):
                self.skipped += 1
                return
            positives = (positive,)
        elif isinstance(positive, (list, tuple)):
            positives = [p for p in positive if _is_text(p)]
            # Each unusable list entry counts as a skipped pair; an empty list as one.
            self.skipped += (len(positive) - len(positives)) or (0 if positives else 1)
        else:
            self.skipped += 1
            return

        negatives: list[str] = []
        for key in negative_keys:
            value = record[key]
            if isinstance(value, (list, tuple)):
                negatives.extend(v for v in value if _is_text(v))
            elif _is_text(value):
                negatives.append(value)

        for pos in positives:
            if self.neg_limit is None or len(negatives) < self.neg_limit:
                self.neg_limit = len(negatives)
                del self.negatives[self.neg_limit :]
                while len(self.negatives) < self.neg_limit:  # only on the very first row
                    self.negatives.append([])
            self.anchors.append(anchor)
            self.positives.append(pos)
            for column, negative in zip(self.negatives, negatives):
                column.append(negative)
        if len(self.anchors) >= _FLUSH_ROWS:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if not self.anchors:
            return
        try:
            self.chunks.append([pa.array(c, pa.string()) for c in (self.anchors, self.positives, *self.negatives)])
        except Exception as e:  # e.g. text that isn't encodable as UTF-8
            raise DataError(f"{self.name}: invalid text: {one_line(str(e))}") from None
        self.anchors, self.positives = [], []
        self.negatives = [[] for _ in self.negatives]

    def finish(self) -> LoadedPairs:
        """Check what was collected and assemble the Arrow-backed dataset."""
        name = self.name
        if self.records == 0:
            raise DataError(f"{name}: file is empty")
        if not (self.has_anchor_column and self.has_positive_column):
            raise DataError(
                f"{name}: missing columns: need one of anchor/query/question and one of "
                f"positive/pos/answer; found: {_show_names(self.found)}"
            )
        self._flush()
        if not self.chunks:
            raise DataError(f"{name}: no usable rows ({self.skipped} skipped for empty or null text)")

        import datasets
        import pyarrow as pa

        # Earlier chunks may carry more negative columns than the final minimum; keep the first k.
        k = self.neg_limit or 0
        names = ["anchor", "positive"] + [f"negative_{i}" for i in range(1, k + 1)]
        table = pa.table(
            {n: pa.chunked_array([chunk[i] for chunk in self.chunks], pa.string()) for i, n in enumerate(names)}
        )
        self.chunks = []
        # An explicit fingerprint: by default datasets hashes the whole in-memory table, which for
        # a large file doubles peak memory and takes seconds. A random one can never alias a cache.
        dataset = datasets.Dataset(datasets.table.InMemoryTable(table), fingerprint=uuid.uuid4().hex)
        return LoadedPairs(dataset=dataset, skipped=self.skipped, source=name, num_negatives=k)


def _is_text(value: Any) -> bool:
    """A usable text: a non-empty string that isn't only whitespace."""
    return type(value) is str and value != "" and not value.isspace()


def _printable(text: str) -> str:
    """Escape characters a terminal would act on or show as a line break (NUL, ESC, U+2028, U+0085, ...)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def one_line(text: str) -> str:
    """Collapse a library's (possibly multi-line, very long) message into a short printable line.

    Library messages can quote the file's bytes (pyarrow's CSV errors do), so control characters are escaped.
    """
    text = _printable(" ".join(text.split()))
    return text if len(text) <= _MAX_DETAIL_CHARS else text[: _MAX_DETAIL_CHARS - 3] + "..."


def _show_names(names: Iterable[str], limit: int = 20) -> str:
    """List column names on one line: odd names (empty, padded, control characters) JSON-quoted."""
    names = list(names)
    shown = [
        n if n and n == n.strip() and n.isprintable() else _printable(json.dumps(n, ensure_ascii=False))
        for n in names[:limit]
    ]
    if len(names) > limit:
        shown.append(f"... ({len(names) - limit} more)")
    return ", ".join(shown) or "none"


def _is_blank_file(p: Path) -> bool:
    """True for a 0-byte or whitespace-only file; reads only until the first non-space byte."""
    with p.open("rb") as f:
        first = True
        while chunk := f.read(1 << 16):
            if first and chunk.startswith(b"\xef\xbb\xbf"):  # a lone UTF-8 BOM is still empty
                chunk = chunk[3:]
            first = False
            if chunk.strip():
                return False
    return True


# --------------------------------------------------------------------------------------------------
# JSON and JSON lines: parsed here (not by pyarrow) so errors can name the exact line.


def _json_type(value: Any) -> str:
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if value is None:
        return "null"
    return "number"


def _json_error(e: Exception) -> str:
    if isinstance(e, json.JSONDecodeError):
        return f"{e.msg} at column {e.colno}"
    if isinstance(e, RecursionError):
        return "nesting too deep"
    return one_line(str(e))  # e.g. an integer with too many digits


_decode_json = json.JSONDecoder().decode  # skips json.loads' per-call argument checks


def decode_json_line(name: str, lineno: int, text: str) -> Any:
    """One JSON value from line `lineno` of file `name`; invalid JSON is a DataError naming both."""
    try:
        return _decode_json(text)
    except (ValueError, RecursionError) as e:
        raise DataError(f"{name}:{lineno}: invalid JSON: {_json_error(e)}") from None


def _parse_line(name: str, lineno: int, text: str) -> dict:
    value = decode_json_line(name, lineno, text)
    if not isinstance(value, dict):
        raise DataError(f"{name}:{lineno}: expected a JSON object, got {_json_type(value)}")
    if "\\u" in text and _SURROGATE_ESCAPE.search(text):
        _check_encodable(value, f"{name}:{lineno}")
    return value


def _check_encodable(value: Any, where: str) -> None:
    """Reject lone-surrogate escapes ("\\ud800"): valid JSON, but not representable in Arrow strings."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(f"{where}: invalid text: a string holds an unpaired UTF-16 surrogate escape") from None


def _jsonl_records(name: str, lines: Iterable[tuple[int, bytes | str]]) -> Iterator[dict]:
    for lineno, raw in lines:
        if isinstance(raw, bytes):
            try:
                text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{name}:{lineno}: invalid UTF-8: {e.reason} at byte {e.start + 1}") from None
        else:
            text = raw
        if text and not text.isspace():
            yield _parse_line(name, lineno, text)


def _read_jsonl(p: Path, name: str, collector: _Collector) -> None:
    with p.open("rb") as f:
        for record in _jsonl_records(name, enumerate(f, 1)):
            collector.add(record)


def _read_json(p: Path, name: str, collector: _Collector) -> None:
    data = p.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        lineno = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{name}:{lineno}: invalid UTF-8: {e.reason}") from None
    del data
    try:
        document = json.loads(text)
    except (ValueError, RecursionError) as e:
        # JSON lines saved as .json: accept it when the first non-blank line is a JSON object on its
        # own; otherwise it's a broken JSON document, and that error is the useful one.
        lines = list(enumerate(text.split("\n"), 1))
        first = next(((n, t) for n, t in lines if t.strip()), None)
        if first is not None and _parses_as_object(first[1]):
            for record in _jsonl_records(name, lines):
                collector.add(record)
            return
        lineno = e.lineno if isinstance(e, json.JSONDecodeError) else 1
        raise DataError(f"{name}:{lineno}: invalid JSON: {_json_error(e)}") from None
    if _SURROGATE_ESCAPE.search(text):
        _check_encodable(document, name)
    del text
    for index, record in enumerate(_json_document_records(document, name), 1):
        if not isinstance(record, dict):
            raise DataError(f"{name}: item {index}: expected a JSON object, got {_json_type(record)}")
        collector.add(record)


def _parses_as_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except (ValueError, RecursionError):
        return False


def _json_document_records(document: Any, name: str) -> list:
    """A list of records, an object holding one (e.g. under "data"), or a single record object."""
    if isinstance(document, list):
        return document
    if not isinstance(document, dict):
        raise DataError(f"{name}: expected a JSON list of objects, got {_json_type(document)}")
    if any(k in document for k in ANCHOR_ALIASES) and any(k in document for k in POSITIVE_ALIASES):
        return [document]  # one record, e.g. a one-line FlagEmbedding file named .json
    for key in _JSON_LIST_KEYS:
        if isinstance(document.get(key), list):
            return document[key]
    lists = [key for key, value in document.items() if isinstance(value, list)]
    if len(lists) == 1:
        return document[lists[0]]
    raise DataError(
        f"{name}: expected a list of objects, or an object holding one list (e.g. under \"data\"); "
        f"found keys: {_show_names(document)}"
    )


# --------------------------------------------------------------------------------------------------
# Tabular formats, read with pyarrow / datasets in batches.


def _feed_batches(collector: _Collector, batches: Iterable[dict[str, list]]) -> None:
    """Feed column-major batches (name -> values) to the collector row by row."""
    for batch in batches:
        keys = list(batch)
        for values in zip(*batch.values()):
            collector.add(dict(zip(keys, values)))


def _read_csv(p: Path, name: str, collector: _Collector) -> None:
    import pyarrow as pa
    import pyarrow.csv as pa_csv

    # Quoted values may span lines (code snippets do); every column is read as text, because type
    # inference would turn an anchor such as "42" into a number.
    parse = pa_csv.ParseOptions(newlines_in_values=True)
    try:
        with pa_csv.open_csv(p, parse_options=parse) as probe:
            names = probe.schema.names
        convert = pa_csv.ConvertOptions(column_types={n: pa.string() for n in names})
        collector.declare_columns(names)
        with pa_csv.open_csv(p, parse_options=parse, convert_options=convert) as reader:
            _feed_batches(collector, (batch.to_pydict() for batch in reader))
    except (pa.ArrowException, ValueError) as e:  # ValueError covers UnicodeDecodeError too
        if "Empty CSV file" in str(e):  # pyarrow found no complete row
            with p.open("rb") as f:
                head = f.read(1 << 20).rstrip()
            if b"\n" not in head and b"\r" not in head:  # a lone header line: no rows
                raise DataError(f"{name}: file is empty") from None
            raise DataError(f"{name}: invalid CSV: the header row never ends (unbalanced quote?)") from None
        raise DataError(f"{name}: invalid CSV: {one_line(str(e))}") from None


def _read_parquet(p: Path, name: str, collector: _Collector) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with pq.ParquetFile(p) as parquet:
            collector.declare_columns(parquet.schema_arrow.names)
            _feed_batches(collector, (b.to_pydict() for b in parquet.iter_batches(batch_size=_BATCH_ROWS)))
    except OSError as e:
        if e.errno is not None:  # a real I/O failure: load_pairs reports "cannot read"
            raise
        # pyarrow reports corrupt metadata (e.g. "Couldn't deserialize thrift") as an errno-less OSError
        raise DataError(f"{name}: invalid Parquet file: {one_line(str(e))}") from None
    except (pa.ArrowException, ValueError) as e:  # ValueError covers UnicodeDecodeError too
        raise DataError(f"{name}: invalid Parquet file: {one_line(str(e))}") from None


def _read_saved_dataset(p: Path, name: str, collector: _Collector) -> None:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(p))
    except Exception as e:  # datasets raises FileNotFoundError, ValueError, Arrow errors, ...
        raise DataError(
            f"{name}: not a dataset folder written by datasets' save_to_disk ({one_line(str(e))})"
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        if not loaded:
            raise DataError(f"{name}: file is empty")
        loaded = loaded["train"] if "train" in loaded else next(iter(loaded.values()))
    try:
        collector.declare_columns(loaded.column_names)
        _feed_batches(collector, loaded.iter(batch_size=_BATCH_ROWS))
    except DataError:
        raise
    except Exception as e:  # corrupt Arrow shards surface only while reading
        raise DataError(f"{name}: cannot read saved dataset: {one_line(str(e))}") from None
