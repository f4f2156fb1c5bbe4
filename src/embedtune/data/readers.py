"""Read (anchor, positive[, negatives]) training pairs from the file formats people actually have.

Accepted: ``.jsonl``/``.ndjson``, ``.json`` (a list of objects, an object holding one list such as
``{"data": [...]}``, an object of columns such as ``{"anchor": [...], "positive": [...]}`` or pandas'
``to_json()`` default, or JSON lines), ``.csv`` and ``.tsv`` (a header row, every cell read as text), each
of these also compressed (``.gz``, ``.bz2``, ``.xz``: read through a decompressed temporary copy),
``.parquet``, a folder of such files (a dataset repository as the hub keeps it, or an export's shards:
the train split's files where their paths name splits, read in name order as one data set), a dataset's
id on the Hugging Face hub (``owner/name[/subset folder]``, its data files fetched: `data.hub`), and folders written
by ``Dataset.save_to_disk``/``DatasetDict.save_to_disk`` (the "train" split, else the first).
Columns: anchor/query/question (or sentence1/text1), positive/pos/answer (or sentence2/text2),
negative/negatives/neg/negative_<n>, and the scores some losses train on: ``score`` (or ``label``), one number
per row (a pair's similarity, for CoSENT/AnglE; CSV text such as "0.8" is read as a number), or
``scores``, a list of teacher scores, one per candidate: the positive's, then each negative's in order
(for MarginMSE and KL distillation). A row lacking the score the file's other rows have is skipped
and counted; a score that is not a number, a ``scores`` list of the wrong length, or both a
``score`` and a ``scores`` column is an error. Anchors are strings,
positives and negatives strings or lists of strings (FlagEmbedding style), a list of positives giving one
row each. Null, empty and blank texts are skipped and counted; any other value where text is expected
(a number, boolean, object; in a CSV/TSV file, a list written out as text) is an error, since skipping it would
hide a broken export. A row keeps the
number of hard negatives most rows have; rows with fewer are skipped and counted, rows with more keep the
first ones and are counted too. Nothing is chosen silently: a JSON object naming a key twice (JSON keeps
the last value) is an error naming the line and key, and so is a row where two aliases of one column
(e.g. "anchor" and "query") both hold text; where only one of them does, that one is used.

Other column names are given by role (``columns``, the CLI's ``--columns``): e.g.
``{"anchor": "query", "positive": "document"}`` or ``"anchor=query,positive=document"``; a role so named
reads only that column (its aliases are then ordinary columns), ``negative`` may name several. Roles
given by position (``anchor=1,positive=2``) read a CSV/TSV file without a header row. JSON arrays
(``["query", "positive", "negative"]`` per line, or a list of them) have their columns named by
position: anchor, positive, then negatives, unless ``columns`` says otherwise.

Every format is turned into a stream of row dicts and fed through one normaliser (:class:`_Collector`),
so aliases, list-valued columns, skipping and negative handling behave the same everywhere. Any problem
with the user's file surfaces as a one-line :class:`DataError` naming the file (and line, where known).
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from embedtune.data.formats import COMPRESSIONS, file_format
from embedtune.errors import DataError
from embedtune.files import BOM, decode_line, decode_text

if TYPE_CHECKING:  # datasets/pyarrow are imported lazily so `embedtune --help` stays fast
    import datasets

ANCHOR_ALIASES: tuple[str, ...] = ("anchor", "query", "question")
POSITIVE_ALIASES: tuple[str, ...] = ("positive", "pos", "answer")
# Plus numbered columns negative_1, negative_2, ... (see _NUMBERED_NEGATIVE).
NEGATIVE_ALIASES: tuple[str, ...] = ("negative", "negatives", "neg")
# Two-text data (STS style: sentence1, sentence2, score) reads as anchor and positive.
_ANCHOR_KEYS: tuple[str, ...] = ANCHOR_ALIASES + ("sentence1", "text1")
_POSITIVE_KEYS: tuple[str, ...] = POSITIVE_ALIASES + ("sentence2", "text2")
SCORE_ALIASES: tuple[str, ...] = ("score", "label")  # one number per row
TEACHER_SCORES = "scores"  # a list of numbers per row: one per candidate, the positive's first

_NUMBERED_NEGATIVE = re.compile(r"negative_(\d+)")
ROLES = ("anchor", "positive", "negative", "score")  # what --columns names
_SUPPORTED = (".jsonl, .ndjson, .json, .csv, .tsv (each also as .gz, .bz2 or .xz), .parquet, a folder written by "
              "datasets' save_to_disk, or a folder of such files")
# Words in a data file's path that name a split, as the hub's dataset repositories and most exports do
_SPLIT_WORDS = frozenset({"train", "training", "validation", "valid", "val", "dev", "test", "eval", "evaluation"})
_METADATA_FILES = frozenset({"dataset_info.json", "dataset_infos.json", "dataset_dict.json", "state.json"})
# Keys that, in a .json object, hold the list of records (in order of preference).
_JSON_LIST_KEYS = ("data", "train", "rows", "examples", "records", "items")
# A "\uD800"-style escape: the only way json.loads can produce text pyarrow can't encode as UTF-8.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abcdefABCDEF]")
_BATCH_ROWS = 8192  # rows per batch read from Parquet / saved datasets
_FLUSH_ROWS = 65536  # rows buffered as Python strings before conversion to Arrow
_MAX_DETAIL_CHARS = 300
_MAX_QUOTED_CHARS = 80  # file content echoed in a message (a CSV row, a wrong-typed value)
_MAX_PLANS = 4096  # distinct row shapes (key tuples) whose column resolution is cached


@dataclass
class LoadedPairs:
    """A validated pair dataset plus what the loader had to drop, for the CLI to report.

    ``dataset`` has string columns ``anchor``, ``positive``, ``negative_1..negative_{num_negatives}``, and
    ``score`` (a float per row) or ``scores`` (floats, one per candidate) where the file has them;
    ``skipped_no_score`` counts rows dropped for lacking the score the other rows have;
    ``skipped`` counts rows (or list entries of a list-valued positive) dropped for empty/null text;
    ``skipped_few_negatives`` counts rows dropped for holding fewer than ``num_negatives`` hard
    negatives, the first of them at ``first_few_negatives`` (e.g. "line 17"); ``cut_negatives`` counts
    rows kept with only their first ``num_negatives`` hard negatives (they held more), the first of them
    at ``first_cut_negatives``; ``source`` is the path as given; ``unread_negatives`` names the columns
    named like hard negatives (e.g. "hard_negatives") that were not read, for a warning (`unread_warning`).
    """

    dataset: datasets.Dataset
    skipped: int
    source: str
    num_negatives: int
    skipped_few_negatives: int = 0
    first_few_negatives: str | None = None
    cut_negatives: int = 0
    first_cut_negatives: str | None = None
    skipped_no_score: int = 0
    unread_negatives: tuple[str, ...] = ()  # columns named like hard negatives that no role reads

    @property
    def label_column(self) -> str | None:
        """"score" (a number per row), "scores" (teacher scores per candidate) or None."""
        return next((c for c in ("score", TEACHER_SCORES) if c in self.dataset.column_names), None)

    def unread_warning(self) -> str | None:
        """The one-line warning for columns named like hard negatives that no role reads, or None."""
        if not self.unread_negatives:
            return None
        names = ", ".join(f"'{_printable(k)}'" for k in self.unread_negatives)
        example = ",".join(f"negative={k}" for k in self.unread_negatives)
        return (f"{self.source}: column{'s' if len(self.unread_negatives) > 1 else ''} {names} not read (hard "
                f"negatives are read from negative, negatives, neg or negative_1..N); to train on them: --columns {example}")

    def skipped_summary(self) -> str:
        """Every reason rows were dropped or cut, on one line, e.g. for the CLI's end-of-run report."""
        text = f"{_rows(self.skipped)} skipped for empty, null or missing text"
        negatives = f"{self.num_negatives} hard negative{'s' if self.num_negatives != 1 else ''}"
        if self.skipped_few_negatives:
            text += (
                f"; {_rows(self.skipped_few_negatives)} skipped: fewer than {negatives} "
                f"(first at {self.first_few_negatives})"
            )
        if self.cut_negatives:
            used = f"only the first {self.num_negatives} used" if self.num_negatives else "not used"
            held = f"more than {negatives}" if self.num_negatives else "hard negatives, which most rows lack"
            text += f"; {_rows(self.cut_negatives)} held {held}: {used} (first at {self.first_cut_negatives})"
        if self.skipped_no_score:
            text += f"; {_rows(self.skipped_no_score)} skipped for a missing {self.label_column or 'score'}"
        return text


def _rows(n: int) -> str:
    return f"{n} row{'s' if n != 1 else ''}"


def column_roles(columns: str | dict | None) -> dict[str, tuple[str, ...]]:
    """Role -> the file's column names, from ``"anchor=query,positive=document"`` or a mapping (a
    ``negative`` may name a list, or repeat in the text); empty for None. Wrong roles are an error."""
    if columns is None or columns == "" or columns == {}:
        return {}
    if isinstance(columns, str):
        pairs = []
        for item in columns.split(","):
            role, sep, key = item.partition("=")
            if not sep or not role.strip() or not key.strip():
                raise DataError(f"columns {columns!r}: expected ROLE=COLUMN pairs separated by commas, "
                                f"e.g. anchor=query,positive=document; got {item!r}")
            pairs.append((role.strip(), key.strip()))
    elif isinstance(columns, dict):
        pairs = [(role, key) for role, value in columns.items()
                 for key in (value if isinstance(value, (list, tuple)) else [value])]
    else:
        raise DataError(f"columns: expected a mapping of role -> column name, got {columns!r}")
    roles: dict[str, tuple[str, ...]] = {}
    for role, key in pairs:
        if role not in ROLES:
            raise DataError(f"columns: unknown role {role!r}; the roles are {', '.join(ROLES)}")
        if not isinstance(key, str) or not key:
            raise DataError(f"columns: {role}: expected a column name, got {key!r}")
        if role in roles and role != "negative":
            raise DataError(f"columns: {role} named twice ({roles[role][0]!r} and {key!r}); only negative takes several")
        roles[role] = roles.get(role, ()) + (key,)
    named = [key for keys in roles.values() for key in keys]
    twice = next((key for key in named if named.count(key) > 1), None)
    if twice is not None:
        raise DataError(f"columns: column {twice!r} is given two roles")
    by_position = [key.isdigit() and int(key) > 0 for key in named]
    if any(by_position) and not all(by_position):
        raise DataError("columns: name every role by position (anchor=1,positive=2: a CSV/TSV file without a header "
                        "row) or every role by name")
    return roles


def load_pairs(path: str | os.PathLike, columns: str | dict | None = None) -> LoadedPairs:
    """Load and validate a pair file; see the module docstring for the accepted shapes. ``columns``
    names the file's columns by role where they are not the usual names (`column_roles`)."""
    roles = column_roles(columns)
    name = os.fspath(path)
    p = Path(name)
    if not p.exists():
        from embedtune.data.hub import dataset_folder, is_hub_id

        if not is_hub_id(name):
            raise DataError(f"{name}: no such file or directory")
        return _read_folder(dataset_folder(name), name, _Collector(name, roles))

    if not p.is_dir() and not p.is_file():  # a FIFO would be drained by the first of several reads
        raise DataError(f"{name}: not a regular file (a pipe or a device); embedtune reads its data more than "
                        "once (to check it, to hash it for --resume): write it to a file first")
    collector = _Collector(name, roles)
    if p.is_dir() and not _is_saved_dataset(p):
        return _read_folder(p, name, collector)
    if p.is_dir():
        try:
            _read_saved_dataset(p, name, collector)
        except OSError as e:
            raise DataError(f"{name}: cannot read: {one_line(e.strerror or str(e))}") from e
    else:
        _read_file(p, name, collector)
    return collector.finish()


def _read_folder(p: Path, name: str, collector: _Collector) -> LoadedPairs:
    """A folder of data files as one data set (`_folder_files`), each file's problems named by the file."""
    for file in _folder_files(p, name):
        collector.begin_file(os.fspath(file))
        _read_file(file, os.fspath(file), collector, empty_ok=True)  # an export's shards may be empty
    collector.name = name
    if collector.records == 0:
        raise DataError(f"{name}: its data files hold no rows")
    return collector.finish()


def _read_file(p: Path, name: str, collector: _Collector, empty_ok: bool = False) -> None:
    """Feed one data file's rows to ``collector``, by the file's format (decompressed first where it is
    compressed); an empty file is an error unless ``empty_ok``."""
    kind, compression = file_format(p)
    if kind is None:
        shown = "".join(p.suffixes[-2:]) if compression else p.suffix
        raise DataError(f"{name}: unsupported file format '{shown or '(no extension)'}'; use {_SUPPORTED}")
    with _decompressed(p, name, compression) as plain:
        if _is_blank_file(plain):
            if empty_ok:
                return
            raise DataError(f"{name}: file is empty")
        _read_plain(plain, kind, name, collector)


@contextlib.contextmanager
def _decompressed(p: Path, name: str, compression: str | None) -> Iterator[Path]:
    """``p`` itself, or a decompressed temporary copy of it (removed after reading), for the readers
    that read a file more than once (CSV's line lookups) or whole (a JSON document)."""
    if compression is None:
        yield p
        return
    import bz2
    import gzip
    import lzma

    opener = {"gzip": gzip.open, "bz2": bz2.open, "lzma": lzma.open}[COMPRESSIONS[compression]]
    fd, temp = tempfile.mkstemp(prefix="embedtune-decompressed-", suffix=p.suffixes[-2])
    try:
        try:
            with opener(p, "rb") as source, os.fdopen(fd, "wb") as target:
                shutil.copyfileobj(source, target, 1 << 20)
        except (OSError, EOFError, lzma.LZMAError) as e:  # gzip.BadGzipFile is an OSError
            raise DataError(f"{name}: cannot decompress ({COMPRESSIONS[compression]}): {one_line(str(e))}") from None
        yield Path(temp)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(temp)


def _read_plain(p: Path, kind: str, name: str, collector: _Collector) -> None:
    """Feed an uncompressed data file's rows to ``collector``; messages name the file as ``name``."""
    try:
        if kind in ("csv", "tsv"):
            _read_csv(p, name, collector, "\t" if kind == "tsv" else ",")
        else:
            {"jsonl": _read_jsonl, "json": _read_json, "parquet": _read_parquet}[kind](p, name, collector)
    except OSError as e:  # unreadable file, a folder where a file was expected, ...
        raise DataError(f"{name}: cannot read: {one_line(e.strerror or str(e))}") from e


def _is_saved_dataset(p: Path) -> bool:
    """A folder written by `Dataset.save_to_disk` (state.json) or `DatasetDict.save_to_disk`."""
    return (p / "state.json").is_file() or (p / "dataset_dict.json").is_file()


def _folder_files(p: Path, name: str) -> list[Path]:
    """The training files of a folder of data files (a dataset repository as the hub keeps it, a job's
    shards): those whose path names the train split where paths name splits, else all of them; of
    one format and one subset. Hidden files and folders, and those starting with "_", are not data."""
    files = sorted(f for f in p.rglob("*") if file_format(f)[0] is not None and f.name not in _METADATA_FILES
                   and not any(part.startswith((".", "_")) for part in f.relative_to(p).parts) and f.is_file())
    if not files:
        raise DataError(f"{name}: a folder with no data files, not written by datasets' save_to_disk either; "
                        f"use {_SUPPORTED}")

    def words(f: Path) -> set[str]:
        return {w for part in f.relative_to(p).parts for w in re.split(r"[^a-z]+", part.lower())}

    train = [f for f in files if words(f) & {"train", "training"}]
    if not train:
        others = sorted({w for f in files for w in words(f) & _SPLIT_WORDS})
        if others:
            raise DataError(f"{name}: no training files: its files' names give the splits {', '.join(others)}, "
                            "not train")
        train = files
    subsets = {tuple(part for part in f.relative_to(p).parent.parts if part.lower() not in _SPLIT_WORDS) for f in train}
    if len(subsets) > 1:
        shown = ", ".join("/".join(s) or "." for s in sorted(subsets))
        raise DataError(f"{name}: training files of several subsets ({shown}): give the folder of one")
    kinds = sorted({file_format(f)[0] for f in train})
    if len(kinds) > 1:
        raise DataError(f"{name}: training files of several formats ({', '.join(kinds)}): keep one")
    return train


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
    never holds all its text as Python objects. Negatives are kept flat, with each row's end offset (no
    object per row: millions of live lists would slow every garbage collection), and how many rows hold
    each count is tallied; ``finish`` keeps the count most rows have, so one row without negatives can't
    strip them from all the others, and drops (and counts) the rows with fewer.

    Readers pass each record's position (``at``): a line number, a JSON list item or a table row,
    per ``unit``; ``line_of`` turns a CSV row number into its line, only when a message needs it.
    """

    def __init__(self, name: str, roles: dict[str, tuple[str, ...]] | None = None) -> None:
        self.name = name
        self.roles = roles or {}  # role -> the file's column names, given by the user (`column_roles`)
        self._named = {key for keys in self.roles.values() for key in keys}
        # roles given by position (anchor=1): a CSV/TSV file without a header row, its columns named 1, 2, ...
        self.headerless = bool(self._named) and all(key.isdigit() for key in self._named)
        self.unit = "line"  # what ``at`` counts: "line", "item" (JSON list) or "row" (tables)
        self.line_of: Callable[[int], int | None] | None = None  # row -> line, for CSV
        self.anchors: list[str] = []
        self.positives: list[str] = []
        self.negatives: list[str] = []  # every kept row's negatives, flat
        self.negative_ends: list[int] = []  # per row: where its negatives end in ``negatives``
        self.chunks: list[list] = []  # flushed [anchor, positive, negatives] pyarrow arrays
        # negatives per row -> [rows with that count, the first: (record number, position, file number, unit)]
        self.negative_counts: dict[int, list] = {}
        self.files: list[tuple[str, Callable | None]] = []  # a folder's files read so far: (name, line_of)
        self.skipped = 0
        self.records = 0
        self.found: dict[str, None] = {}  # every column name seen, in first-seen order
        self.has_anchor_column = False
        self.has_positive_column = False
        self.scores: list[float] = []  # per kept row: its score, NaN where the row has none
        self.teacher: list[float] = []  # every kept row's teacher scores, flat
        self.teacher_ends: list[int] = []  # per row: where its teacher scores end in ``teacher``
        self.has_score = False
        self.has_teacher = False
        self._score_plans: dict[tuple, tuple[str | None, str | None]] = {}
        self._plans: dict[tuple, tuple[str | None, str | None, tuple[str, ...], tuple]] = {}

    def declare_columns(self, names: Iterable[str], where: str | None = None) -> None:
        """Record a tabular file's columns so the missing-columns message is right even with 0 rows.

        A used column named twice is an error: readers keep one of the two silently.
        """
        names = list(names)
        seen: set[str] = set()
        for key in names:
            if key in seen and self.uses(key):
                raise DataError(f"{where or self.name}: duplicate column '{_printable(key)}'")
            seen.add(key)
            self._plan((key,))

    def check_types(self, schema) -> None:
        """Reject a typed (Parquet, saved dataset) text column that isn't text, before reading any row."""
        anchor, positive, negatives, clash = self._plan(tuple(schema.names))
        groups = dict(clash)
        anchors, positives = groups.get("anchor", (anchor,)), groups.get("positive", (positive,))
        for key, lists_allowed in (*((k, False) for k in anchors), *((k, True) for k in positives),
                                   *((k, True) for k in negatives)):
            if key is None:
                continue
            dtype = schema.field(key).type
            if not _is_text_type(dtype, lists_allowed):
                expected = "text or a list of text" if lists_allowed else "text"
                raise DataError(f"{self.name}: column '{key}' has type {dtype}, expected {expected}")
        if anchor is None or positive is None:
            return
        score, teacher = self._score_plan(tuple(schema.names))
        for key, lists in ((score, False), (teacher, True)):
            if key is not None and not _is_number_type(schema.field(key).type, lists):
                expected = "a list of numbers" if lists else "a number"
                raise DataError(f"{self.name}: column '{key}' has type {schema.field(key).type}, expected {expected}")

    def uses(self, key: str) -> bool:
        """Whether column ``key`` may be read: named by the user, or one of the usual names."""
        return key in self._named or _is_pair_column(key)

    def role_keys(self, keys) -> tuple[tuple, tuple, tuple]:
        """The keys among ``keys`` that may hold the anchor, the positive (each in order of preference)
        and the negatives: the user's names for a role named in ``roles``, else its usual names that
        the user did not name for another role."""
        def present(role: str, usual: tuple) -> tuple:
            if role in self.roles:
                return tuple(k for k in self.roles[role] if k in keys)
            return tuple(k for k in usual if k in keys and k not in self._named)

        if not self.roles and keys and all(isinstance(k, str) and k.isdigit() for k in keys):
            by_position = sorted(keys, key=int)  # a JSON array: anchor, positive, then negatives
            return tuple(by_position[:1]), tuple(by_position[1:2]), tuple(by_position[2:])
        numbered = sorted((int(m.group(1)), k) for k in keys
                          if isinstance(k, str) and (m := _NUMBERED_NEGATIVE.fullmatch(k)))
        return (present("anchor", _ANCHOR_KEYS), present("positive", _POSITIVE_KEYS),
                present("negative", NEGATIVE_ALIASES + tuple(k for _, k in numbered)))

    def _score_plan(self, keys: tuple) -> tuple[str | None, str | None]:
        """The keys holding a row's score and teacher scores (None: absent); cached per key tuple."""
        plan = self._score_plans.get(keys)
        if plan is None:
            candidates = self.roles.get("score", tuple(k for k in SCORE_ALIASES if k not in self._named))
            named = [k for k in candidates if k in keys]
            if len(named) > 1:
                raise DataError(f"{self.name}: both '{named[0]}' and '{named[1]}' given; they name the same "
                                "column (the score), so one would be ignored: keep one")
            plan = (named[0] if named else None, TEACHER_SCORES if TEACHER_SCORES in keys else None)
            if plan[0] and plan[1]:
                raise DataError(f"{self.name}: both '{plan[0]}' (one score per row) and '{TEACHER_SCORES}' (one per "
                                "candidate) given; no loss uses both: keep one")
            if len(self._score_plans) < _MAX_PLANS:
                self._score_plans[keys] = plan
        return plan

    def _plan(self, keys: tuple) -> tuple[str | None, str | None, tuple[str, ...], tuple]:
        """Resolve which keys hold anchor/positive/negatives; cached per distinct key tuple.

        Resolution is per row shape, so in JSON lines a row lacking "anchor" may still use "query". The
        last item lists the roles named by two or more aliases in this shape, with the aliases (e.g.
        ("anchor", ("anchor", "query"))), which `add` resolves per row: one alias holding text is used,
        two are an error.
        """
        plan = self._plans.get(keys)
        if plan is None:
            for key in keys:
                self.found.setdefault(str(key))
            anchors, positives, negatives = self.role_keys(keys)
            anchor = anchors[0] if anchors else None
            positive = positives[0] if positives else None
            self.has_anchor_column |= anchor is not None
            self.has_positive_column |= positive is not None
            clash = tuple((role, group) for role, group in (("anchor", anchors), ("positive", positives)) if len(group) > 1)
            plan = (anchor, positive, negatives, clash)
            if len(self._plans) < _MAX_PLANS:  # rows with ever-new keys must not grow this forever
                self._plans[keys] = plan
        return plan

    def add(self, record: dict, at: int) -> None:
        """Normalise one record; a list-valued positive yields one row per usable positive."""
        self.records += 1
        anchor_key, positive_key, negative_keys, clash = self._plan(tuple(record))
        if clash:  # two names of one column in this row: use the one holding text, refuse two
            anchor_key, positive_key = self._resolve_aliases(record, clash, at, anchor_key, positive_key)
        anchor = record.get(anchor_key)  # .get(None) is None: no anchor column in this row
        if type(anchor) is not str and anchor is not None:
            self._wrong_type(at, anchor_key, anchor)
        positive = record.get(positive_key)
        if type(positive) is str:  # the common case first
            positives = (positive,) if _is_text(positive) else ()
            unusable = 1 - len(positives)
        elif isinstance(positive, (list, tuple)):
            positives = self._texts(positive, at, positive_key)
            # Each unusable list entry counts as a skipped pair; an empty list as one.
            unusable = (len(positive) - len(positives)) or (0 if positives else 1)
        elif positive is None:
            positives, unusable = (), 1
        else:
            self._wrong_type(at, positive_key, positive)

        negatives: list[str] = []
        given = 0  # negative slots in the row, usable or not: teacher scores line up with these
        for key in negative_keys:
            value = record[key]
            if type(value) is str:
                given += 1
                if _is_text(value):
                    negatives.append(value)
            elif isinstance(value, (list, tuple)):
                given += len(value)
                negatives.extend(self._texts(value, at, key))
            elif value is not None:
                self._wrong_type(at, key, value)
            else:
                given += 1

        score, teacher = None, None
        if anchor_key is not None and positive_key is not None:
            score_key, teacher_key = self._score_plan(tuple(record))
            if score_key is not None:
                self.has_score = True
                score = self._number(record[score_key], at, score_key)
            if teacher_key is not None:
                teacher = self._teacher_scores(record[teacher_key], at, given, positive)

        if not _is_text(anchor):
            self.skipped += 1
            return
        self.skipped += unusable
        if not positives:
            return
        if teacher is not None and len(negatives) != given:  # a blank negative: its score would not line up
            self.skipped += len(positives)
            return
        tally = self.negative_counts.get(len(negatives))
        if tally is None:
            self.negative_counts[len(negatives)] = [len(positives), (self.records, at, len(self.files), self.unit)]
        else:
            tally[0] += len(positives)
        for pos in positives:
            self.anchors.append(anchor)
            self.positives.append(pos)
            if negatives:
                self.negatives.extend(negatives)
            self.negative_ends.append(len(self.negatives))
            self.scores.append(float("nan") if score is None else score)
            if teacher:
                self.teacher.extend(teacher)
            self.teacher_ends.append(len(self.teacher))
        if len(self.anchors) >= _FLUSH_ROWS:
            self._flush()

    def _number(self, value: Any, at: int, key: str) -> float | None:
        """A score: a number, or text holding one (CSV cells are text); None for a null or blank."""
        if value is None or (type(value) is str and not value.strip()):
            return None
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                number = None
        else:
            number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
        if number is None or not math.isfinite(number):
            held = f'text ("{_quoted(value, 40)}")' if isinstance(value, str) else _describe(value)
            raise DataError(f"{self.located(at)}: column '{_printable(key)}' holds {held}, "
                            "expected a finite number (a score)")
        return number

    def _teacher_scores(self, value: Any, at: int, negatives: int, positive: Any) -> list[float] | None:
        """A row's teacher scores: one number per candidate (positive first), None for a null."""
        self.has_teacher = True
        if value is None:
            return None
        if not isinstance(value, (list, tuple)):
            raise DataError(f"{self.located(at)}: column '{TEACHER_SCORES}' holds {_describe(value)}, expected a list "
                            "of numbers: the teacher's score of the positive, then of each negative")
        if isinstance(positive, (list, tuple)) and len(positive) > 1:
            raise DataError(f"{self.located(at)}: '{TEACHER_SCORES}' with a list of positives: the scores cannot "
                            "tell them apart; give one positive per row")
        if len(value) != negatives + 1:
            raise DataError(f"{self.located(at)}: '{TEACHER_SCORES}' holds {len(value)} number"
                            f"{'s' if len(value) != 1 else ''}, expected {negatives + 1}: the positive's score, "
                            f"then one per negative ({negatives} in this row)")
        for v in value:
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise DataError(f"{self.located(at)}: column '{TEACHER_SCORES}' holds a list holding {_describe(v)}, "
                                "expected finite numbers")
        return [float(v) for v in value]

    def _resolve_aliases(self, record: dict, clash: tuple, at: int, anchor_key, positive_key) -> tuple:
        """The anchor and positive keys of a row that names a column twice (e.g. both "anchor" and
        "query"): the alias holding something is used; two holding something are an error, since one
        would be ignored."""
        for role, group in clash:
            filled = [key for key in group if _has_content(record[key])]
            if len(filled) > 1:
                raise DataError(
                    f"{self.located(at)}: both '{filled[0]}' and '{filled[1]}' given; they name the same column "
                    f"(the {role}), so one would be ignored: keep one"
                )
            chosen = filled[0] if filled else group[0]
            if role == "anchor":
                anchor_key = chosen
            else:
                positive_key = chosen
        return anchor_key, positive_key

    def _texts(self, values: list | tuple, at: int, key: str) -> list[str]:
        """The usable texts of a list-valued column; nulls and blanks are dropped, other types refused."""
        texts = [v for v in values if _is_text(v)]
        if len(texts) != len(values):
            for v in values:
                if type(v) is not str and v is not None:
                    self._wrong_type(at, key, v, in_list=True)
        return texts

    def _wrong_type(self, at: int, key: str, value: Any, in_list: bool = False) -> NoReturn:
        held = f"a list holding {_describe(value)}" if in_list else _describe(value)
        raise DataError(f"{self.where(at)}: column '{_printable(key)}' holds {held}, expected text")

    def where(self, at: int) -> str:
        """The file and position of record ``at``, as messages start: "f.jsonl:7", "f.json: item 3"."""
        return f"{self.name}:{at}" if self.unit == "line" else f"{self.name}: {self.unit} {at}"

    def located(self, at: int) -> str:
        """Like `where`, with a CSV row's line looked up: "f.csv:7"."""
        if self.line_of is not None:
            line = self.line_of(at)
            if line is not None:
                return f"{self.name}:{line}"
        return self.where(at)

    def begin_file(self, name: str) -> None:
        """The next file of a folder: messages name it, and its positions count from its start."""
        if self.files:
            self.files[-1] = (self.files[-1][0], self.line_of)
        self.files.append((name, None))
        self.name, self.unit, self.line_of = name, "line", None

    def place(self, first: tuple) -> str:
        """A record's position in words, e.g. "line 17" (CSV rows looked up as lines), and its file when
        a folder's files were read; ``first`` is (record number, position, file number, unit)."""
        _, at, file, unit = first
        name, line_of = None, self.line_of
        if file:  # the last file's line lookup is still the collector's own
            name, line_of = self.files[file - 1] if file < len(self.files) else (self.files[-1][0], self.line_of)
        line = line_of(at) if line_of is not None else None
        where = f"line {line}" if line is not None else f"{unit} {at}"
        return f"{where} of {name}" if name else where

    def _flush(self) -> None:
        import pyarrow as pa

        if not self.anchors:
            return
        try:
            # large_string: a chunk's negatives together may pass 2 GiB; one negative_<i> column won't.
            negatives = pa.LargeListArray.from_arrays(
                pa.array([0, *self.negative_ends], pa.int64()), pa.array(self.negatives, pa.large_string())
            )
            teacher = pa.LargeListArray.from_arrays(pa.array([0, *self.teacher_ends], pa.int64()),
                                                    pa.array(self.teacher, pa.float64()))
            self.chunks.append([pa.array(self.anchors, pa.string()), pa.array(self.positives, pa.string()), negatives,
                                pa.array(self.scores, pa.float64()), teacher])
        except DataError:
            raise
        except Exception as e:  # e.g. text that isn't encodable as UTF-8
            raise DataError(f"{self.name}: invalid text: {one_line(str(e))}") from None
        self.anchors, self.positives, self.negatives, self.negative_ends = [], [], [], []
        self.scores, self.teacher, self.teacher_ends = [], [], []

    def _negatives_kept(self) -> int:
        """The number of negatives most rows have; on a tie the larger (rows dropped are reported)."""
        return max(self.negative_counts, key=lambda n: (self.negative_counts[n][0], n), default=0)

    def finish(self) -> LoadedPairs:
        """Check what was collected and assemble the Arrow-backed dataset."""
        name = self.name
        if self.records == 0:
            if self.found:  # a table's header (or a Parquet schema), and no rows under it
                raise _no_rows(name, ", ".join(self.found))
            raise DataError(f"{name}: file is empty")
        absent = [(role, key) for role, keys in self.roles.items() for key in keys if key not in self.found]
        if absent:
            role, key = absent[0]
            raise DataError(f"{name}: no column '{_printable(key)}' (named for the {role}); found: {_show_names(self.found)}")
        if not (self.has_anchor_column and self.has_positive_column):
            (only, *others) = self.found or ("",)
            separator = next((c for c in ";|" if c in only), None) if not others else None
            hint = (f" (one column: the file separates its columns with '{separator}'; embedtune reads CSV with ',' "
                    "and TSV with tabs: write it with one of those)") if separator else ""
            raise DataError(
                f"{name}: missing columns: need one of anchor/query/question and one of "
                f"positive/pos/answer, or name yours with --columns (e.g. anchor=query,positive=document); "
                f"found: {_show_names(self.found)}{hint}"
            )
        self._flush()
        if not self.chunks:
            raise DataError(f"{name}: no usable rows ({self.skipped} skipped for empty, null or missing text)")

        import datasets
        import pyarrow as pa
        import pyarrow.compute as pc

        k = self._negatives_kept()
        few = [tally for n, tally in self.negative_counts.items() if n < k]
        more = [tally for n, tally in self.negative_counts.items() if n > k]  # kept, their extra negatives cut
        columns = [pa.chunked_array([chunk[i] for chunk in self.chunks]) for i in range(5)]
        self.chunks = []
        if few:
            keep = pc.greater_equal(pc.list_value_length(columns[2]), k)
            columns = [c.filter(keep) for c in columns]
        no_score = 0
        if self.has_score and self.has_teacher:  # rows of one kind and rows of the other: no loss reads both
            raise DataError(f"{name}: some rows hold a score ('score'/'label', one per row) and others teacher "
                            f"'{TEACHER_SCORES}' (one per candidate); no loss reads both: keep one kind")
        if self.has_score or self.has_teacher:  # rows without the score the file's other rows have
            keep = (pc.invert(pc.is_nan(columns[3])) if self.has_score
                    else pc.greater(pc.list_value_length(columns[4]), 0))
            no_score = len(columns[3]) - pc.sum(keep.cast(pa.int64())).as_py()
            if no_score:
                columns = [c.filter(keep) for c in columns]
            if not len(columns[0]):
                raise DataError(f"{name}: no usable rows: none holds a {'score' if self.has_score else TEACHER_SCORES}")
        names = ["anchor", "positive"] + [f"negative_{i}" for i in range(1, k + 1)]
        negatives = [pc.list_element(columns[2], i).cast(pa.string()) for i in range(k)]
        table = pa.table(dict(zip(names, columns[:2] + negatives)))
        if self.has_score:
            table = table.append_column("score", columns[3])
        elif self.has_teacher:  # rows cut to k negatives keep the scores of those: k + 1
            teacher = pa.chunked_array([pc.list_slice(c, 0, k + 1).cast(pa.list_(pa.float64())) for c in columns[4].chunks],
                                       pa.list_(pa.float64()))
            table = table.append_column(TEACHER_SCORES, teacher)
        # An explicit fingerprint: by default datasets hashes the whole in-memory table, which for
        # a large file doubles peak memory and takes seconds. A random one can never alias a cache.
        dataset = datasets.Dataset(datasets.table.InMemoryTable(table), fingerprint=uuid.uuid4().hex)
        return LoadedPairs(
            dataset=dataset,
            skipped=self.skipped,
            source=name,
            num_negatives=k,
            skipped_few_negatives=sum(rows for rows, _ in few),
            first_few_negatives=self.place(min(first for _, first in few)) if few else None,
            cut_negatives=sum(rows for rows, _ in more),
            first_cut_negatives=self.place(min(first for _, first in more)) if more else None,
            skipped_no_score=no_score,
            unread_negatives=self.unread_negatives(),
        )

    def unread_negatives(self) -> tuple[str, ...]:
        """Columns named like hard negatives ("hard_negatives", "negative_passages") that no role reads,
        where the user named no negatives of their own: read nowhere, so to be warned about."""
        if "negative" in self.roles:
            return ()
        return tuple(key for key in self.found if "neg" in key.lower() and not self.uses(key))


def _is_pair_column(key: str) -> bool:
    """A column name the readers use (an alias or a numbered negative)."""
    return (
        key in _ANCHOR_KEYS or key in _POSITIVE_KEYS or key in NEGATIVE_ALIASES or key in SCORE_ALIASES
        or key == TEACHER_SCORES or _NUMBERED_NEGATIVE.fullmatch(key) is not None
    )


def _is_number_type(dtype, lists_allowed: bool) -> bool:
    """An Arrow type whose values are numbers (or text holding them, or nulls), or lists of numbers."""
    import pyarrow as pa

    if lists_allowed:
        return (pa.types.is_list(dtype) or pa.types.is_large_list(dtype) or pa.types.is_fixed_size_list(dtype)) and (
            _is_number_type(dtype.value_type, False))
    return (pa.types.is_integer(dtype) or pa.types.is_floating(dtype) or pa.types.is_decimal(dtype)
            or pa.types.is_null(dtype) or pa.types.is_string(dtype) or pa.types.is_large_string(dtype))


def _is_text_type(dtype, lists_allowed: bool) -> bool:
    """An Arrow type whose values are text (or nulls), or lists of text where lists are allowed."""
    import pyarrow as pa

    if pa.types.is_dictionary(dtype):
        dtype = dtype.value_type
    if pa.types.is_null(dtype) or pa.types.is_string(dtype) or pa.types.is_large_string(dtype):
        return True
    if getattr(pa.types, "is_string_view", lambda t: False)(dtype):
        return True
    if lists_allowed and (
        pa.types.is_list(dtype) or pa.types.is_large_list(dtype) or pa.types.is_fixed_size_list(dtype)
    ):
        return _is_text_type(dtype.value_type, False)
    return False


def _describe(value: Any) -> str:
    """A wrong-typed value for an error message: its kind and a short preview, e.g. "a number (42)"."""
    if isinstance(value, bool):
        kind = "a boolean"
    elif isinstance(value, (int, float)):
        kind = "a number"
    elif isinstance(value, dict):
        kind = "an object"
    elif isinstance(value, (list, tuple)):
        kind = "a list"
    else:  # Parquet/Arrow values: bytes, datetime, Decimal, ...
        kind = f"a value of type {type(value).__name__}"
    try:
        preview = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        preview = repr(value)
    return f"{kind} ({_quoted(preview, 40)})"


def _quoted(text: str, limit: int = _MAX_QUOTED_CHARS) -> str:
    """File content echoed into a message: one printable line of at most ``limit`` characters."""
    text = _printable(" ".join(text.split()))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _has_content(value: Any) -> bool:
    """Anything but null, blank text or an empty list: a value that using another alias would ignore."""
    if value is None:
        return False
    if type(value) is str:
        return value != "" and not value.isspace()
    return not (isinstance(value, (list, tuple)) and len(value) == 0)


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
            if first:  # a lone UTF-8 BOM is still empty
                chunk = chunk.removeprefix(BOM)
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
        # some messages already end in "at" ("Unterminated string starting at")
        return f"{e.msg}{'' if e.msg.endswith(' at') else ' at'} column {e.colno}"
    if isinstance(e, RecursionError):
        return "nesting too deep"
    return one_line(str(e))  # e.g. an integer with too many digits


class _DuplicateKey(Exception):
    """An object names a key twice; `json` would keep the last value without a word."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    """object_pairs_hook: the object as a dict, refusing a key named twice (about 5% on parsing)."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return obj


def _duplicate_key_error(where: str, key: str) -> DataError:
    return DataError(f"{where}: duplicate key {_quoted(json.dumps(key, ensure_ascii=False))} in one object "
                     "(JSON keeps only its last value): keep one")


_decode_json = json.JSONDecoder(object_pairs_hook=_unique_keys).decode  # no per-call argument checks


def decode_json_line(name: str, lineno: int, text: str) -> Any:
    """One JSON value from line `lineno` of file `name`; invalid JSON, or an object naming a key twice,
    is a DataError naming both."""
    try:
        return _decode_json(text)
    except (ValueError, RecursionError) as e:
        raise DataError(f"{name}:{lineno}: invalid JSON: {_json_error(e)}") from None
    except _DuplicateKey as e:
        raise _duplicate_key_error(f"{name}:{lineno}", e.key) from None


def _parse_line(name: str, lineno: int, text: str) -> dict:
    value = decode_json_line(name, lineno, text)
    if isinstance(value, list):
        return _positional(value)
    if not isinstance(value, dict):
        raise DataError(f"{name}:{lineno}: expected a JSON object or array, got {_json_type(value)}")
    if "\\u" in text and _SURROGATE_ESCAPE.search(text):
        _check_encodable(value, f"{name}:{lineno}")
    return value


def decode_data_line(name: str, raw: bytes, lineno: int) -> str:
    """Line ``lineno`` of the UTF-8 data file ``name`` (a BOM dropped from line 1, `files.decode_line`);
    bytes that are not UTF-8 are a DataError naming the file, the line and the first bad byte."""
    try:
        return decode_line(raw, lineno)
    except UnicodeDecodeError as e:
        raise DataError(f"{name}:{lineno}: invalid UTF-8: {e.reason} at byte {e.start + 1}") from None


def _check_encodable(value: Any, where: str) -> None:
    """Reject lone-surrogate escapes ("\\ud800"): valid JSON, but not representable in Arrow strings."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(f"{where}: invalid text: a string holds an unpaired UTF-16 surrogate escape") from None


def _jsonl_records(name: str, lines: Iterable[tuple[int, bytes | str]]) -> Iterator[tuple[int, dict]]:
    """(line number, record) for each non-blank line."""
    for lineno, raw in lines:
        text = decode_data_line(name, raw, lineno) if isinstance(raw, bytes) else raw
        if text and not text.isspace():
            yield lineno, _parse_line(name, lineno, text)


def _read_jsonl(p: Path, name: str, collector: _Collector) -> None:
    with p.open("rb") as f:
        for lineno, record in _jsonl_records(name, enumerate(f, 1)):
            collector.add(record, lineno)


def _read_json(p: Path, name: str, collector: _Collector) -> None:
    data = p.read_bytes()
    try:
        text = decode_text(data)
    except UnicodeDecodeError as e:
        lineno = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{name}:{lineno}: invalid UTF-8: {e.reason}") from None
    del data
    try:
        document = json.loads(text, object_pairs_hook=_unique_keys)
    except _DuplicateKey as e:
        raise _duplicate_key_error(f"{name}:{_duplicate_key_line(text, e.key)}", e.key) from None
    except (ValueError, RecursionError) as e:
        # JSON lines saved as .json: accept it when the first non-blank line is a JSON object on its
        # own; otherwise it's a broken JSON document, and that error is the useful one.
        lines = list(enumerate(text.split("\n"), 1))
        first = next(((n, t) for n, t in lines if t.strip()), None)
        if first is not None and _parses_as_record(first[1]):
            for lineno, record in _jsonl_records(name, lines):
                collector.add(record, lineno)
            return
        lineno = e.lineno if isinstance(e, json.JSONDecodeError) else 1
        raise DataError(f"{name}:{lineno}: invalid JSON: {_json_error(e)}") from None
    if _SURROGATE_ESCAPE.search(text):
        _check_encodable(document, name)
    del text
    collector.unit = "item"
    for index, record in enumerate(_json_document_records(document, name, collector), 1):
        if isinstance(record, list):
            record = _positional(record)
        elif not isinstance(record, dict):
            raise DataError(f"{name}: item {index}: expected a JSON object or array, got {_json_type(record)}")
        collector.add(record, index)


def _positional(values: list) -> dict:
    """A JSON array record (["query", "positive", "negative"], as sentence-transformers' training data
    collection stores pairs) as columns named by position: 1, 2, 3, ..."""
    return {str(i): value for i, value in enumerate(values, 1)}


def _duplicate_key_line(text: str, key: str) -> int:
    """The line of the first object in `text` that names `key` twice: where its second `"key":` stands.

    Only on the error path: a second parse with the pure-Python scanner, whose object parser knows
    where each object starts and ends."""
    import json.decoder
    import json.scanner

    found: list[int] = []

    def parse_object(s_and_end, strict, scan_once, object_hook, object_pairs_hook, memo=None):
        s, start = s_and_end
        pairs, end = json.decoder.JSONObject(s_and_end, strict, scan_once, None, list, memo)
        if not found and len({k for k, _ in pairs}) != len(pairs) and any(k == key for k, _ in pairs):
            # the key's second occurrence as a key in this object's text (a nested object naming it is rare)
            hits = [m.start() for m in re.finditer(re.escape(json.dumps(key, ensure_ascii=False)) + r"\s*:",
                                                   s[start:end])]
            found.append(start + hits[1] if len(hits) > 1 else start)
        return dict(pairs), end

    decoder = json.JSONDecoder()
    decoder.parse_object = parse_object
    scan = json.scanner.py_make_scanner(decoder)
    try:
        scan(text, len(text) - len(text.lstrip()))
    except (ValueError, RecursionError, StopIteration):
        pass
    return text.count("\n", 0, found[0]) + 1 if found else 1


def _parses_as_record(text: str) -> bool:
    """Whether ``text`` is one JSON record: an object, or an array of texts."""
    try:
        value = json.loads(text)
        return isinstance(value, dict) or (isinstance(value, list) and all(isinstance(v, str) for v in value))
    except (ValueError, RecursionError):
        return False


def _json_document_records(document: Any, name: str, collector: _Collector) -> list:
    """A list of records, an object holding one (e.g. under "data"), an object of columns, or a single
    record object."""
    if isinstance(document, list):
        return document
    if not isinstance(document, dict):
        raise DataError(f"{name}: expected a JSON list of objects, got {_json_type(document)}")
    anchors, positives, _ = collector.role_keys(document)
    if anchors and positives:
        if isinstance(document[anchors[0]], (list, dict)):  # an anchor is never a list: columns, not a record
            return _json_columns(document, name)
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


def _json_columns(document: dict, name: str) -> list[dict]:
    """A JSON object of columns as records: ``{"anchor": [...], "positive": [...]}`` (a dict of lists) or
    pandas' ``to_json()`` default, ``{"anchor": {"0": ..., "1": ...}, ...}`` (row labels in every column),
    as `datasets` reads both; columns of different lengths or labels are an error."""
    columns = {key: list(value.values()) if isinstance(value, dict) else value for key, value in document.items()}
    labels = {key: tuple(value) for key, value in document.items() if isinstance(value, dict)}
    first = next(iter(document))
    for key, values in columns.items():
        if not isinstance(values, list):
            raise DataError(f"{name}: a JSON object of columns, but column '{_printable(key)}' holds "
                            f"a JSON {_json_type(values)}, not a list")
        if len(values) != len(columns[first]):
            raise DataError(f"{name}: a JSON object of columns of different lengths: '{_printable(first)}' holds "
                            f"{len(columns[first])} values, '{_printable(key)}' {len(values)}")
        if labels and labels.get(key) != labels.get(first):
            raise DataError(f"{name}: a JSON object of columns whose row labels differ: "
                            f"'{_printable(first)}' and '{_printable(key)}'")
    return [dict(zip(columns, row)) for row in zip(*columns.values())]


# --------------------------------------------------------------------------------------------------
# Tabular formats, read with pyarrow / datasets in batches.


def _feed_batches(collector: _Collector, batches: Iterable[dict[str, list]]) -> None:
    """Feed column-major batches (name -> values) to the collector row by row, numbering rows from 1."""
    collector.unit = "row"
    at = 0
    for batch in batches:
        keys = list(batch)
        for values in zip(*batch.values()):
            at += 1
            collector.add(dict(zip(keys, values)), at)


def _read_csv(p: Path, name: str, collector: _Collector, delimiter: str = ",") -> None:
    """A CSV file, or a TSV (``delimiter`` tab) with the same quoting (as pandas and datasets write it)."""
    import pyarrow as pa
    import pyarrow.csv as pa_csv

    kind = _table_kind(delimiter)
    # pyarrow reads a quote that never closes as one value running to the end of the file, silently
    # swallowing every later row; an odd number of quote characters is the cheap sign of one.
    if _odd_quote_count(p) and (problem := _csv_problem(p, name, delimiter)):
        raise DataError(problem)
    header = not collector.headerless  # without one, the columns are named 1, 2, ... (roles by position)
    if not header:
        _refuse_header_row(p, name, delimiter, collector._named)
    collector.line_of = lambda row: _csv_row_line(p, row, delimiter, header)
    # Quoted values may span lines (code snippets do); every column is read as text, because type
    # inference would turn an anchor such as "42" into a number.
    parse = pa_csv.ParseOptions(delimiter=delimiter, newlines_in_values=True)
    try:
        with pa_csv.open_csv(p, parse_options=parse,
                             read_options=pa_csv.ReadOptions(autogenerate_column_names=not header)) as probe:
            names = probe.schema.names if header else [str(i) for i in range(1, len(probe.schema.names) + 1)]
        read = pa_csv.ReadOptions(column_names=None if header else names)
        convert = pa_csv.ConvertOptions(column_types={n: pa.string() for n in names})
        collector.declare_columns(names, where=f"{name}:1")
        _, positives, negatives = collector.role_keys(names)
        listed = [key for key in (*positives, *negatives) if key in names]
        with pa_csv.open_csv(p, parse_options=parse, read_options=read, convert_options=convert) as reader:
            _feed_batches(collector, _refuse_written_lists((batch.to_pydict() for batch in reader), listed,
                                                           collector, kind))
    except (pa.ArrowException, ValueError) as e:  # ValueError covers UnicodeDecodeError too
        if "Empty CSV file" in str(e):  # pyarrow found no complete row
            with p.open("rb") as f:
                head = f.read(1 << 20).rstrip()
            if b"\n" not in head and b"\r" not in head:  # a lone header line: no rows
                raise _no_rows(name, head.decode("utf-8", "replace").replace(delimiter, ", ")) from None
            raise DataError(f"{name}:1: invalid {kind}: the header row never ends (unbalanced quote?)") from None
        # pyarrow's messages name no line and quote whole rows; find the line ourselves.
        problem = _csv_problem(p, name, delimiter) or f"{name}: invalid {kind}: {_quoted(str(e), 120)}"
        raise DataError(problem) from None


def _refuse_written_lists(batches: Iterable[dict[str, list]], keys: list[str], collector: _Collector,
                          kind: str) -> Iterator[dict[str, list]]:
    """``batches`` unchanged, but a positive or negative cell holding a list written out as text
    (``['n1', 'n2']``: pandas' ``to_csv`` of a list column) is an error naming its line: read as
    text, the list's printout would be trained on as one document."""
    import ast

    at = 0
    for batch in batches:
        for key in keys:
            for offset, value in enumerate(batch[key]):
                text = value.strip() if value else ""
                if text[:1] == "[" and text[-1:] == "]":
                    with contextlib.suppress(ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
                        items = ast.literal_eval(text)
                        if isinstance(items, list) and items and all(isinstance(i, str) for i in items):
                            raise DataError(
                                f"{collector.located(at + offset + 1)}: column '{_printable(key)}' holds a list "
                                f"written as text ({_quoted(text)}); {kind} keeps no lists: write the file as "
                                "JSONL or Parquet (e.g. pandas' to_json(orient=\"records\", lines=True)), or "
                                "one negative per column (negative_1, negative_2, ...)")
        at += len(next(iter(batch.values()), []))
        yield batch


def _no_rows(name: str, column_names: str) -> DataError:
    """A table with a header (or a Parquet schema) and no rows under it."""
    return DataError(f"{name}: holds column names ({_quoted(column_names, 80)}) but no rows")


def _refuse_header_row(p: Path, name: str, delimiter: str, positions: set[str]) -> None:
    """Roles given by position read a file without a header row; a first row whose cells there are all
    column names (anchor, query, positive, ...) is a header, which would otherwise train as a pair."""
    import csv

    try:
        with p.open(newline="", encoding="utf-8-sig") as f:
            first = next(csv.reader(f, delimiter=delimiter), [])
    except (UnicodeDecodeError, csv.Error):
        return  # the reader itself names what is wrong with the file
    cells = [first[int(i) - 1].strip() for i in sorted(positions, key=int) if 0 < int(i) <= len(first)]
    if cells and all(_is_pair_column(cell.lower()) for cell in cells):
        raise DataError(f"{name}:1: the first row ({', '.join(cells)}) is a header, but --columns names the columns "
                        "by position, which reads a file without one; name them by the header instead (e.g. "
                        f"--columns anchor={cells[0]},...), or leave --columns out for these names")


class _BadCsv(Exception):
    """A problem found by the line-aware CSV scan: the line it is on and what it is."""

    def __init__(self, line: int, problem: str) -> None:
        super().__init__(problem)
        self.line, self.problem = line, problem


def _odd_quote_count(p: Path) -> bool:
    """True when the file holds an odd number of '"': some quote is unbalanced (or literal, as in 12")."""
    count = 0
    with p.open("rb") as f:
        while chunk := f.read(1 << 20):
            count += chunk.count(b'"')
    return count % 2 == 1


def _table_kind(delimiter: str) -> str:
    return "TSV" if delimiter == "\t" else "CSV"


def _csv_problem(p: Path, name: str, delimiter: str = ",") -> str | None:
    """The first malformed record of a CSV (or TSV) file, as a message naming its line; None if there is
    none. Python's csv module (strict) does the scan: pyarrow's errors carry no line number.
    """
    kind = _table_kind(delimiter)
    width = None
    try:
        for start, end, first, row in _csv_records(p, strict=True, delimiter=delimiter):
            if not row:  # a blank line; pyarrow skips them too
                continue
            if width is None:
                width = len(row)
            elif len(row) != width:
                return (
                    f"{name}:{start}: invalid {kind}: expected {width} columns, got {len(row)}"
                    f"{_span(start, end)}: {_quoted(first)}"
                )
    except _BadCsv as e:
        return f"{name}:{e.line}: invalid {kind}: {e.problem}"
    return None


def _csv_row_line(p: Path, row: int, delimiter: str = ",", header: bool = True) -> int | None:
    """The line on which data row ``row`` (1-based, after the header if any) starts; None if not found."""
    seen = -1 if header else 0  # the header is row 0
    try:
        for start, _, _, values in _csv_records(p, strict=False, delimiter=delimiter):
            if values:
                seen += 1
                if seen == row:
                    return start
    except (_BadCsv, OSError):
        pass
    return None


def _span(start: int, end: int) -> str:
    """A hint for a record that runs over several lines: most likely a quote opened and never closed."""
    return f" (the record runs from line {start} to {end}: unbalanced quote?)" if end > start else ""


def _csv_records(p: Path, strict: bool, delimiter: str = ",") -> Iterator[tuple[int, int, str, list[str]]]:
    """(first line, last line, first line's text, values) for each record, blank lines as empty records."""
    lines = _FirstLine(_csv_lines(p))
    reader = csv.reader(lines, strict=strict, delimiter=delimiter)
    start = 1
    limit = csv.field_size_limit(2**31 - 1)  # code snippets can exceed csv's default 128 KiB per field
    try:
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                if "unexpected end of data" in str(e):
                    raise _BadCsv(start, "unbalanced quote: a quoted value that starts here never closes") from None
                raise _BadCsv(start, f"{_printable(str(e))}{_span(start, reader.line_num)}") from None
            yield start, reader.line_num, lines.first or "", row
            start, lines.first = reader.line_num + 1, None
    finally:
        csv.field_size_limit(limit)


class _FirstLine:
    """An iterator over lines that remembers the first line of the record being read."""

    def __init__(self, lines: Iterator[str]) -> None:
        self.lines, self.first = lines, None

    def __iter__(self) -> _FirstLine:
        return self

    def __next__(self) -> str:
        line = next(self.lines)
        if self.first is None:
            self.first = line
        return line


def _csv_lines(p: Path) -> Iterator[str]:
    """The file's lines, decoded; a line ends at \\n, \\r\\n or a lone \\r, as pyarrow splits them."""
    with p.open("rb") as f:
        lineno = 0
        for raw in f:
            for piece in raw.splitlines(keepends=True):
                lineno += 1
                try:
                    yield decode_line(piece, lineno)
                except UnicodeDecodeError as e:
                    raise _BadCsv(lineno, f"invalid UTF-8: {e.reason} at byte {e.start + 1}") from None


def _read_parquet(p: Path, name: str, collector: _Collector) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with pq.ParquetFile(p) as parquet:
            collector.declare_columns(parquet.schema_arrow.names)
            collector.check_types(parquet.schema_arrow)
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
    collector.declare_columns(loaded.column_names)
    collector.check_types(loaded.data.schema)
    try:
        _feed_batches(collector, loaded.iter(batch_size=_BATCH_ROWS))
    except DataError:
        raise
    except Exception as e:  # corrupt Arrow shards surface only while reading
        raise DataError(f"{name}: cannot read saved dataset: {one_line(str(e))}") from None
