"""Read a BEIR-format retrieval benchmark folder into an IR task with graded relevance.

Layout (as BEIR ships its data sets)::

    FOLDER/corpus.jsonl      {"_id": ..., "title": ..., "text": ...} per line (title optional)
    FOLDER/queries.jsonl     {"_id": ..., "text": ...} per line
    FOLDER/qrels/SPLIT.tsv   header "query-id<TAB>corpus-id<TAB>score", then one judgement per line

Documents are encoded as BEIR does: ``"title text"`` when a title is given, else the text. Scores are
integer grades; a grade of 0 or less means judged not relevant. Extra fields (metadata) are ignored.

Malformed input (bad JSON, missing fields, duplicate ids or judgements, non-integer scores) raises a
one-line :class:`DataError` naming the file and line. Judgements naming a query missing from
queries.jsonl or a document missing from corpus.jsonl are skipped and counted rather than fatal,
because BEIR subsets often keep the full qrels; :meth:`LoadedBeir.notes` reports the counts.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from embedtune.data.readers import decode_data_line, decode_json_line, one_line
from embedtune.errors import DataError
from embedtune.ir_task import IdenticalIds, IRTask

CORPUS_FILE = "corpus.jsonl"
QUERIES_FILE = "queries.jsonl"
QRELS_DIR = "qrels"
DEFAULT_SPLITS = ("test", "dev")  # tried in this order when no split is given
QRELS_HEADER = ("query-id", "corpus-id", "score")
_INTEGER = re.compile(r"[+-]?\d+")


@dataclass
class LoadedBeir:
    """A BEIR folder as an :class:`IRTask`, plus what was skipped on the way, for the CLI to report.

    ``task.queries`` holds only the queries that have at least one relevant (grade > 0) judged document
    in the corpus; ``task.corpus`` the whole corpus; ``task.graded`` every usable judgement's grade.
    ``fallback`` says why a split other than the default was used (None when none was needed).
    """

    task: IRTask
    source: str
    split: str
    fallback: str | None = None
    judgements: int = 0
    skipped_unknown_query: int = 0
    skipped_unknown_document: int = 0
    queries_without_relevant: int = 0
    identical_ids: IdenticalIds | None = None  # queries sharing their id with a document (`IRTask.identical_ids`)
    keep_identical_ids: bool = False  # those pairs counted as retrieved (BEIR drops them)

    def notes(self) -> list[str]:
        """One line per thing the user should know: the split fallback, every skip count, and the
        query/document pairs sharing an id (dropped, as BEIR does, unless kept)."""
        lines = [self.fallback] if self.fallback else []
        qrels = f"{QRELS_DIR}/{self.split}.tsv"
        if self.skipped_unknown_query:
            lines.append(f"{_count(self.skipped_unknown_query, 'judgement')} in {qrels} name queries missing from "
                         f"{QUERIES_FILE}: skipped")
        if self.skipped_unknown_document:
            lines.append(f"{_count(self.skipped_unknown_document, 'judgement')} in {qrels} name documents missing "
                         f"from {CORPUS_FILE}: skipped")
        if self.queries_without_relevant:
            lines.append(f"{_count(self.queries_without_relevant, 'judged query', 'judged queries')} without a "
                         "relevant (score > 0) document in the corpus: not evaluated")
        identical = self.identical_ids.note(kept=self.keep_identical_ids) if self.identical_ids else None
        if identical:
            lines.append(identical)
        return lines


def is_beir_folder(path: str | os.PathLike) -> bool:
    """True for a folder that looks like BEIR data (holds corpus.jsonl, queries.jsonl or qrels/)."""
    p = Path(path)
    return p.is_dir() and any((p / name).exists() for name in (CORPUS_FILE, QUERIES_FILE, QRELS_DIR))


def read_beir(folder: str | os.PathLike, split: str | None = None, keep_identical_ids: bool = False) -> LoadedBeir:
    """Read and validate a BEIR folder; ``split=None`` uses qrels/test.tsv, else qrels/dev.tsv (and says so).

    Queries whose id is also a document's id are counted (``identical_ids``) and noted: the evaluation
    drops those pairs as BEIR does, unless ``keep_identical_ids`` (then pass
    ``ignore_identical_ids=False`` to `retrieval.evaluate_retrieval` too; the note says which)."""
    name = os.fspath(folder)
    root = Path(name)
    if not root.exists():
        raise DataError(f"{name}: no such file or directory")
    if not root.is_dir():
        raise DataError(f"{name}: not a folder; BEIR data is a folder with {CORPUS_FILE}, {QUERIES_FILE} and "
                        f"{QRELS_DIR}/<split>.tsv")
    for needed in (CORPUS_FILE, QUERIES_FILE):
        if not (root / needed).is_file():
            raise DataError(f"{root / needed}: no such file (a BEIR folder holds {CORPUS_FILE}, {QUERIES_FILE} "
                            f"and {QRELS_DIR}/<split>.tsv)")
    split, fallback = _pick_split(root, split)

    try:
        qrels = _read_qrels(root / QRELS_DIR / f"{split}.tsv")
        query_text = _read_queries(root / QUERIES_FILE)
        corpus = _read_corpus(root / CORPUS_FILE)
    except OSError as e:
        raise DataError(f"{name}: cannot read: {one_line(e.strerror or str(e))}") from None

    graded: dict[str, dict[str, int]] = {}
    unknown_query = unknown_doc = 0
    for qid, grades in qrels.items():
        if qid not in query_text:
            unknown_query += len(grades)
            continue
        for did, grade in grades.items():
            if did not in corpus:
                unknown_doc += 1
                continue
            graded.setdefault(qid, {})[did] = grade
    relevant = {qid: {d for d, g in grades.items() if g > 0} for qid, grades in graded.items()}
    relevant = {qid: docs for qid, docs in relevant.items() if docs}
    without = sum(1 for qid in qrels if qid in query_text) - len(relevant)
    qrels_name = os.fspath(root / QRELS_DIR / f"{split}.tsv")
    if not relevant:
        raise DataError(
            f"{qrels_name}: no judged query has a relevant (score > 0) document in {CORPUS_FILE} "
            f"({unknown_query} judgements name unknown queries, {unknown_doc} unknown documents)"
        )
    task = IRTask(
        queries={qid: query_text[qid] for qid in relevant},
        corpus=corpus,
        relevant=relevant,
        graded={qid: graded[qid] for qid in relevant},
    )
    return LoadedBeir(
        task=task, source=name, split=split, fallback=fallback, judgements=sum(map(len, qrels.values())),
        skipped_unknown_query=unknown_query, skipped_unknown_document=unknown_doc, queries_without_relevant=without,
        identical_ids=task.identical_ids(), keep_identical_ids=keep_identical_ids,
    )


def _pick_split(root: Path, split: str | None) -> tuple[str, str | None]:
    qrels = root / QRELS_DIR
    available = sorted(p.stem for p in qrels.glob("*.tsv")) if qrels.is_dir() else []
    shown = ", ".join(available) or "none"
    if split is not None:
        if not split or "/" in split or "\\" in split or split.startswith("."):
            raise DataError(f"--split {split!r}: give a split name such as test, dev or train")
        if (qrels / f"{split}.tsv").is_file():
            return split, None
        raise DataError(f"{qrels / (split + '.tsv')}: no such file (qrels splits found: {shown})")
    for candidate in DEFAULT_SPLITS:
        if (qrels / f"{candidate}.tsv").is_file():
            if candidate == DEFAULT_SPLITS[0]:
                return candidate, None
            return candidate, (f"{QRELS_DIR}/{DEFAULT_SPLITS[0]}.tsv is missing: evaluating on "
                               f"{QRELS_DIR}/{candidate}.tsv")
    raise DataError(f"{qrels}: no test.tsv or dev.tsv (qrels splits found: {shown}); pass --split NAME")


# --------------------------------------------------------------------------------------------------
# Files


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text without the line ending) for every non-blank line, decoded as UTF-8."""
    name = os.fspath(path)
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            text = decode_data_line(name, raw, lineno).rstrip("\r\n")
            if text.strip():
                yield lineno, text


def _records(path: Path) -> Iterator[tuple[int, dict]]:
    name = os.fspath(path)
    any_line = False
    for lineno, text in _lines(path):
        any_line = True
        value = decode_json_line(name, lineno, text)
        if not isinstance(value, dict):
            raise DataError(f"{name}:{lineno}: expected a JSON object with \"_id\" and \"text\"")
        yield lineno, value
    if not any_line:
        raise DataError(f"{name}: file is empty")


def _field(name: str, lineno: int, record: dict, key: str) -> object:
    if key not in record:
        keys = ", ".join(map(str, list(record)[:10])) or "none"
        raise DataError(f"{name}:{lineno}: missing \"{key}\" field (found keys: {one_line(keys)})")
    return record[key]


def _record_id(name: str, lineno: int, record: dict) -> str:
    value = _field(name, lineno, record, "_id")
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        raise DataError(f"{name}:{lineno}: \"_id\" must be a non-empty string (or integer), got {value!r:.60}")
    return str(value)


def _check_utf8(name: str, lineno: int, text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(f"{name}:{lineno}: invalid text: an unpaired UTF-16 surrogate escape") from None


def _read_queries(path: Path) -> dict[str, str]:
    name = os.fspath(path)
    queries: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for lineno, record in _records(path):
        qid = _record_id(name, lineno, record)
        text = _field(name, lineno, record, "text")
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{name}:{lineno}: \"text\" must be a non-empty string")
        _check_utf8(name, lineno, text)
        if qid in queries:
            raise DataError(f"{name}:{lineno}: duplicate _id {qid!r} (first on line {first_line[qid]})")
        queries[qid] = text
        first_line[qid] = lineno
    return queries


def _read_corpus(path: Path) -> dict[str, str]:
    """Document id -> "title text" (BEIR's joining); duplicate ids are an error naming both lines."""
    name = os.fspath(path)
    corpus: dict[str, str] = {}
    for lineno, record in _records(path):
        did = _record_id(name, lineno, record)
        text = _field(name, lineno, record, "text")
        title = record.get("title")
        if not isinstance(text, str):
            raise DataError(f"{name}:{lineno}: \"text\" must be a string")
        if title is not None and not isinstance(title, str):
            raise DataError(f"{name}:{lineno}: \"title\" must be a string (or null)")
        doc = f"{title} {text}".strip() if title else text.strip()
        _check_utf8(name, lineno, doc)
        if did in corpus:
            raise DataError(f"{name}:{lineno}: duplicate _id {did!r} (first on line {_first_line(path, did)})")
        corpus[did] = doc
    return corpus


def _first_line(path: Path, did: str) -> int | str:
    """The line of the first record with ``_id == did``; only looked up to word an error."""
    for lineno, text in _lines(path):
        try:
            value = json.loads(text)
        except ValueError:
            continue
        if isinstance(value, dict) and str(value.get("_id")) == did:
            return lineno
    return "?"


def _read_qrels(path: Path) -> dict[str, dict[str, int]]:
    """query id -> {document id: grade}, in file order; a missing header is accepted, a wrong one is not."""
    name = os.fspath(path)
    qrels: dict[str, dict[str, int]] = {}
    first_line: dict[tuple[str, str], int] = {}
    seen_line = False
    for lineno, text in _lines(path):
        fields = text.split("\t")
        if not seen_line:
            seen_line = True
            if tuple(f.strip().lower() for f in fields) == QRELS_HEADER:
                continue
            if len(fields) != 3 or not _INTEGER.fullmatch(fields[2].strip()):
                raise DataError(f"{name}:{lineno}: expected the header query-id<TAB>corpus-id<TAB>score, got "
                                f"{one_line(text)!r}")
        if len(fields) != 3:
            raise DataError(f"{name}:{lineno}: expected 3 tab-separated columns (query-id, corpus-id, score), "
                            f"got {len(fields)}")
        qid, did, score = fields[0].strip(), fields[1].strip(), fields[2].strip()
        if not qid or not did:
            raise DataError(f"{name}:{lineno}: empty {'query-id' if not qid else 'corpus-id'}")
        if not _INTEGER.fullmatch(score):
            raise DataError(f"{name}:{lineno}: score {one_line(score)!r} is not an integer grade")
        grades = qrels.setdefault(qid, {})
        if did in grades:
            raise DataError(f"{name}:{lineno}: duplicate judgement for query {qid!r}, document {did!r} "
                            f"(first on line {first_line[qid, did]})")
        grades[did] = int(score)
        first_line[qid, did] = lineno
    if not qrels:
        raise DataError(f"{name}: no judgements (only a header or blank lines)")
    return qrels


def _count(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else many or one + 's'}"
