"""Fuzz embedtune's pair-file readers: every input must end in a clean error or a valid dataset.

Hypothesis generates files, writes each one and calls ``embedtune.data.load_pairs`` on it. Inputs:
byte soups under every suffix (.jsonl .ndjson .json .csv .parquet .tsv .txt, any case); token soups
of JSON and CSV/TSV pieces; structured, near-valid files (random records with nulls, numbers,
nested lists and objects, lone surrogates, NaN, BOMs and CRLF; CSV in several dialects, ragged rows
and tab-separated text named .csv; Parquet tables with random column names, duplicate names and
column types, row groups and compression); and byte-level mutations (flips, inserts, deletions,
truncation, repeated slices) of valid files of every format.

The outcome of each input is one of:
  * a valid dataset: columns anchor, positive, negative_1..k, all strings, none blank, at least
    one row, ``num_negatives == k``;
  * a clean error: an EmbedtuneError (DataError) whose message is one printable line (no control
    characters, no line separators) starting with the path;
  * a crash: anything else (another exception, a multi-line or unnamed message, a bad dataset).
Crashes never stop the run: the smallest input per crash signature is kept, written to
``--crash-dir`` and listed in the summary (inputs tried, clean errors by kind, crashes).

    python benchmarks/fuzz_readers.py --minutes 3            # the long run (docs/BENCHMARKS.md)
    python benchmarks/fuzz_readers.py --examples 300 --seed 0   # a short, reproducible run

tests/test_fuzz_readers.py runs a short seeded run of this file in CI.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import re
import signal
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".parquet", ".tsv", ".txt", ".JSONL", ".Csv", "")
PER_INPUT_TIMEOUT_S = 20  # a reader that takes longer than this on a tiny file is counted as a hang


# --------------------------------------------------------------------------------------------------
# Inputs

KEYS = ["anchor", "query", "question", "positive", "pos", "answer", "negative", "neg", "negative_1",
        "negative_2", "negative_10", "negative_0", "negative_x", "text", "data", "train", ""]
KEY = st.one_of(st.sampled_from(KEYS), st.text(max_size=6))
TEXT = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["", " ", "\t\n", "a", "é", "☕", "\x00", "\ud800", "\udfff", "\ufeff", "a,b", '"q"', "1.5",
                     "null", "NaN", "\r\n", "\u2028", "x" * 300]),
)
SCALAR = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(min_value=10**18, max_value=10**30),
                   st.floats(allow_nan=True, allow_infinity=True), TEXT)
VALUE = st.recursive(SCALAR, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                     st.dictionaries(KEY, inner, max_size=3)), max_leaves=8)
RECORD = st.dictionaries(KEY, VALUE, max_size=6)
WORD = st.text(st.characters(codec="utf-8"), min_size=1, max_size=10).filter(str.strip)


@st.composite
def good_records(draw):
    """A record that is usable most of the time: alias keys, mostly non-blank text, optional negatives."""
    record = {
        draw(st.sampled_from(["anchor", "anchor", "query", "question"])): draw(st.one_of(WORD, WORD, TEXT)),
        draw(st.sampled_from(["positive", "positive", "pos", "answer"])):
            draw(st.one_of(WORD, WORD, TEXT, st.lists(st.one_of(WORD, TEXT), max_size=3))),
    }
    for key in draw(st.lists(st.sampled_from(["negative", "neg", "negative_1", "negative_2", "extra"]),
                             max_size=3, unique=True)):
        record[key] = draw(st.one_of(WORD, st.lists(st.one_of(WORD, TEXT), max_size=3), st.none(), TEXT))
    return record


GOOD_RECORD = good_records()
RECORDS = st.lists(st.one_of(GOOD_RECORD, GOOD_RECORD, GOOD_RECORD, RECORD), max_size=8)

HEADERS = st.sampled_from([["anchor", "positive"], ["query", "pos", "neg"], ["question", "answer"],
                           ["anchor", "positive", "negative_1", "negative_2"], ["anchor", "anchor", "positive"]])

JSON_TOKENS = st.sampled_from(
    ['{', '}', '[', ']', ':', ',', ' ', '\n', '\r\n', '"anchor"', '"positive"', '"query"', '"pos"', '"neg"',
     '"negative_1"', '"answer"', '"data"', '"x"', '""', '" "', 'null', '1', '-2.5e3', '1e999', 'NaN', 'Infinity',
     'true', '"\\ud800"', '"\\u0000"', '"é"', '\ufeff', '"\\"', '{"anchor": "a", "positive": "p"}',
     '{"query": "q", "pos": ["p", ""], "neg": ["n"]}', '[{"anchor": "a", "positive": "p"}]', '9' * 5000]
)
CSV_TOKENS = st.sampled_from(
    ['anchor', 'positive', 'question', 'answer', 'negative', 'negative_1', ',', '\t', '\n', '\r\n', '\r', '"',
     '""', ' ', 'x', 'é', '\x00', '\ufeff', ';', '#', '\\']
)


def _json_bytes(value, indent=None) -> bytes:
    return json.dumps(value, indent=indent, ensure_ascii=False, allow_nan=True).encode("utf-8", "surrogatepass")


@st.composite
def jsonl_files(draw):
    rows = draw(RECORDS)
    newline = draw(st.sampled_from(["\n", "\r\n", "\n\n"]))
    text = newline.join(json.dumps(r, ensure_ascii=draw(st.booleans()), allow_nan=True) for r in rows)
    if draw(st.booleans()):
        text += newline
    data = text.encode("utf-8", "surrogatepass")
    if draw(st.booleans()):
        data = b"\xef\xbb\xbf" + data
    if draw(st.booleans()):  # a damaged tail line
        data += draw(st.sampled_from([b"{", b"[1]", b"null", b'{"anchor": ', b"\xff\xfe", b"\n\x00"]))
    return draw(st.sampled_from([".jsonl", ".ndjson", ".json"])), data


@st.composite
def json_files(draw):
    rows = draw(RECORDS)
    shape = draw(st.sampled_from(["list", "data", "other", "one", "two_lists", "scalar", "nested"]))
    document = {
        "list": rows,
        "data": {"version": 1, draw(st.sampled_from(["data", "train", "rows", "items"])): rows},
        "other": {"whatever": rows},
        "one": rows[0] if rows else {},
        "two_lists": {"a": rows, "b": rows},
        "scalar": draw(SCALAR),
        "nested": {"data": {"data": rows}},
    }[shape]
    return ".json", _json_bytes(document, indent=draw(st.sampled_from([None, 2])))


@st.composite
def csv_files(draw):
    header = draw(st.one_of(HEADERS, st.lists(st.one_of(st.sampled_from(KEYS[:10]), st.text(max_size=5)),
                                              min_size=1, max_size=5)))
    width = len(header)
    ragged = draw(st.integers(0, 3)) == 0
    cell = st.one_of(WORD, WORD, TEXT)
    rows = draw(st.lists(st.lists(cell, min_size=1 if ragged else width, max_size=width + 1 if ragged else width),
                         max_size=6))
    buffer = io.StringIO()
    dialect = draw(st.sampled_from(["excel", "excel-tab", "unix"]))
    quoting = draw(st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL, csv.QUOTE_NONNUMERIC]))
    writer = csv.writer(buffer, dialect=dialect, quoting=quoting)
    writer.writerow(header)
    writer.writerows(rows)
    encoding = draw(st.sampled_from(["utf-8", "utf-8", "utf-8-sig", "latin-1", "utf-16"]))
    try:
        data = buffer.getvalue().encode(encoding, "surrogatepass")
    except UnicodeEncodeError:  # latin-1 can't hold every character: fall back to UTF-8
        data = buffer.getvalue().encode("utf-8", "surrogatepass")
    return draw(st.sampled_from([".csv", ".csv", ".tsv"])), data


def _arrow_column(draw, kind: str, n: int):
    import pyarrow as pa

    text = st.one_of(st.none(), TEXT.map(lambda t: t.encode("utf-8", "replace").decode("utf-8")))
    if kind in ("string", "large_string", "dictionary"):
        values = draw(st.lists(text, min_size=n, max_size=n))
        array = pa.array(values, pa.large_string() if kind == "large_string" else pa.string())
        return array.dictionary_encode() if kind == "dictionary" else array
    if kind == "binary":
        return pa.array(draw(st.lists(st.one_of(st.none(), st.binary(max_size=6)), min_size=n, max_size=n)),
                        pa.binary())
    if kind == "int":
        return pa.array(draw(st.lists(st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1)), min_size=n,
                                      max_size=n)), pa.int64())
    if kind == "float":
        return pa.array(draw(st.lists(st.floats(), min_size=n, max_size=n)), pa.float64())
    if kind == "bool":
        return pa.array(draw(st.lists(st.one_of(st.none(), st.booleans()), min_size=n, max_size=n)), pa.bool_())
    if kind == "null":
        return pa.nulls(n)
    if kind == "list":
        return pa.array(draw(st.lists(st.one_of(st.none(), st.lists(text, max_size=3)), min_size=n, max_size=n)),
                        pa.list_(pa.string()))
    if kind == "struct":
        return pa.array(draw(st.lists(st.one_of(st.none(), st.fixed_dictionaries({"anchor": text})), min_size=n,
                                      max_size=n)), pa.struct([("anchor", pa.string())]))
    raise ValueError(kind)


ARROW_KINDS = ["string", "string", "large_string", "dictionary", "binary", "int", "float", "bool", "null", "list",
               "struct"]


@st.composite
def parquet_files(draw):
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = draw(st.integers(0, 6))
    names = draw(st.one_of(HEADERS, st.lists(st.one_of(st.sampled_from(KEYS[:10]), st.text(max_size=5)),
                                             min_size=1, max_size=5)))
    kinds = st.one_of(st.just("string"), st.just("list"), st.sampled_from(ARROW_KINDS))
    columns = [_arrow_column(draw, draw(kinds), n) for _ in names]
    table = pa.Table.from_arrays(columns, names=names)
    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=draw(st.sampled_from([1, 2, 1024])),
                   compression=draw(st.sampled_from(["none", "snappy", "zstd"])))
    return ".parquet", buffer.getvalue()


VALID = st.one_of(jsonl_files(), json_files(), csv_files(), parquet_files())


@st.composite
def mutated_files(draw):
    suffix, data = draw(VALID)
    data = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "repeat", "zero"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and data:
            del data[at : at + draw(st.integers(1, 16))]
        elif op == "truncate":
            del data[at:]
        elif op == "repeat" and data:
            data[at:at] = data[at : at + draw(st.integers(1, 32))]
        elif op == "zero" and data:
            data[at : at + 4] = b"\x00" * len(data[at : at + 4])
    return suffix, bytes(data)


def soups():
    any_suffix = st.sampled_from(SUFFIXES)
    return st.one_of(
        st.tuples(any_suffix, st.binary(max_size=400)),
        st.tuples(st.sampled_from([".jsonl", ".json", ".ndjson"]),
                  st.lists(JSON_TOKENS, max_size=50).map(lambda t: "".join(t).encode("utf-8"))),
        st.tuples(st.sampled_from([".csv", ".tsv"]),
                  st.lists(CSV_TOKENS, max_size=50).map(lambda t: "".join(t).encode("utf-8"))),
        st.tuples(any_suffix, st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass"))),
    )


def inputs():
    """(suffix, bytes) pairs: soups, structured near-valid files, and mutations of valid ones."""
    return st.one_of(soups(), VALID, mutated_files())


# --------------------------------------------------------------------------------------------------
# Checking one input


class Crash(Exception):
    """An input that ended neither in a clean error nor in a valid dataset."""

    def __init__(self, signature: str, detail: str):
        super().__init__(f"{signature}: {detail}")
        self.signature, self.detail = signature, detail


_KIND_PREFIX = re.compile(r"^(?::\d+)?:\s*(?:item \d+:\s*)?")


def error_kind(message: str, path: str) -> str:
    """The kind of a clean error: its message without the path, line and details ('invalid JSON')."""
    rest = _KIND_PREFIX.sub("", message[len(path):])
    return re.split(r"[:;,(]", rest, maxsplit=1)[0].strip() or "(empty message)"


def check_dataset(loaded, path: str) -> None:
    """Raise Crash unless ``loaded`` is a valid LoadedPairs for ``path``."""
    ds = loaded.dataset
    k = loaded.num_negatives
    expected = ["anchor", "positive"] + [f"negative_{i}" for i in range(1, k + 1)]
    if ds.column_names != expected:
        raise Crash("bad columns", f"{ds.column_names} != {expected}")
    if len(ds) == 0:
        raise Crash("empty dataset", "a dataset with no rows was returned")
    if loaded.skipped < 0 or loaded.source != path:
        raise Crash("bad metadata", f"skipped={loaded.skipped} source={loaded.source!r}")
    table = ds.with_format("arrow")[:]
    for name in expected:
        values = table[name].to_pylist()
        if not all(isinstance(v, str) and v.strip() for v in values):
            bad = next(v for v in values if not (isinstance(v, str) and v.strip()))
            raise Crash("bad value", f"column {name} holds {bad!r}")


def check_input(directory: str, suffix: str, content: bytes) -> str:
    """Load one input; returns 'ok' or 'error: KIND'; raises Crash for anything else."""
    from embedtune.data import load_pairs
    from embedtune.errors import DataError, EmbedtuneError

    path = os.path.join(directory, f"fuzz{suffix}")
    with open(path, "wb") as f:
        f.write(content)
    try:
        loaded = load_pairs(path)
    except EmbedtuneError as e:
        message = str(e)
        if len(message.splitlines()) > 1:  # \n, \r, but also U+2028, U+0085, \x1c ...
            raise Crash("multi-line message", repr(message[:200])) from None
        if not message.startswith(path):
            raise Crash("message does not name the file", repr(message[:200])) from None
        if not message[len(path):].isprintable():  # NUL, ESC sequences ... would reach the terminal
            raise Crash("unprintable characters in message", repr(message[:200])) from None
        kind = error_kind(message, path)
        kind = f"error: {kind}" if isinstance(e, DataError) else f"error (non-DataError): {kind}"
        EXAMPLES.setdefault(kind, message[len(directory) + 1:])
        return kind
    except _Hang:
        raise Crash("hang", f"more than {PER_INPUT_TIMEOUT_S} s") from None
    except Exception as e:  # noqa: BLE001 - any other exception is exactly what we are looking for
        frames = traceback.extract_tb(e.__traceback__)
        ours = [f for f in frames if "embedtune" in f.filename] or frames
        where = f"{Path(ours[-1].filename).name}:{ours[-1].lineno}" if ours else "?"
        raise Crash(f"{type(e).__name__} at {where}", " ".join(str(e).split())[:200]) from None
    check_dataset(loaded, path)
    return "ok"


EXAMPLES: dict[str, str] = {}  # error kind -> its first message (path shortened), for the summary


class _Hang(BaseException):
    pass


def _on_alarm(signum, frame):
    raise _Hang()


# --------------------------------------------------------------------------------------------------
# Running


@dataclass
class Summary:
    inputs: int = 0
    valid: int = 0
    errors: Counter = field(default_factory=Counter)
    by_suffix: Counter = field(default_factory=Counter)
    crashes: dict = field(default_factory=dict)  # signature -> (suffix, smallest content, detail)
    seconds: float = 0.0

    def record_crash(self, crash: Crash, suffix: str, content: bytes) -> None:
        known = self.crashes.get(crash.signature)
        if known is None or len(content) < len(known[1]):
            self.crashes[crash.signature] = (suffix, content, crash.detail)


def fuzz(minutes: float | None = None, examples: int | None = None, first_seed: int = 0,
         batch: int = 200) -> Summary:
    """Fuzz for ``minutes`` (wall time) or ``examples`` inputs, in seeded batches of ``batch``."""
    if minutes is None and examples is None:
        raise ValueError("give minutes or examples")
    import embedtune.data  # noqa: F401 - imported up front: the per-input alarm must not time imports

    summary = Summary()
    started = time.monotonic()
    deadline = started + minutes * 60 if minutes is not None else math.inf
    use_alarm = hasattr(signal, "SIGALRM") and os.name == "posix"
    previous = signal.signal(signal.SIGALRM, _on_alarm) if use_alarm else None

    def done() -> bool:
        return time.monotonic() >= deadline or (examples is not None and summary.inputs >= examples)

    try:
        with tempfile.TemporaryDirectory(prefix="embedtune-fuzz-") as directory:
            batch_seed = first_seed
            while not done():
                size = batch if examples is None else max(1, min(batch, examples - summary.inputs))

                @seed(batch_seed)
                @settings(max_examples=size, database=None, deadline=None, phases=[Phase.generate],
                          suppress_health_check=list(HealthCheck))
                @given(case=inputs())
                def one(case):
                    if done():
                        return
                    suffix, content = case
                    summary.inputs += 1
                    summary.by_suffix[suffix or "(none)"] += 1
                    if use_alarm:
                        signal.alarm(PER_INPUT_TIMEOUT_S)
                    try:
                        outcome = check_input(directory, suffix, content)
                    except Crash as crash:
                        summary.record_crash(crash, suffix, content)
                        return
                    finally:
                        if use_alarm:
                            signal.alarm(0)
                    if outcome == "ok":
                        summary.valid += 1
                    else:
                        summary.errors[outcome] += 1

                one()
                batch_seed += 1
    finally:
        if use_alarm:
            signal.signal(signal.SIGALRM, previous)
    summary.seconds = time.monotonic() - started
    return summary


def write_crashes(summary: Summary, crash_dir: Path) -> list[Path]:
    """Save each crash's smallest input as crash_dir/<n>-<signature><suffix>, with a .txt of details."""
    paths = []
    if not summary.crashes:
        return paths
    crash_dir.mkdir(parents=True, exist_ok=True)
    for n, (signature, (suffix, content, detail)) in enumerate(sorted(summary.crashes.items()), 1):
        slug = re.sub(r"[^A-Za-z0-9]+", "-", signature).strip("-")[:60]
        path = crash_dir / f"{n:02d}-{slug}{suffix or '.noext'}"
        path.write_bytes(content)
        path.with_name(path.name + ".txt").write_text(f"{signature}\n{detail}\n{content!r}\n", encoding="utf-8")
        paths.append(path)
    return paths


def report(summary: Summary) -> str:
    errors = sum(summary.errors.values())
    lines = [
        f"inputs tried: {summary.inputs} in {summary.seconds:.0f} s "
        f"({summary.inputs / max(summary.seconds, 1e-9):.1f}/s)",
        f"valid datasets: {summary.valid}",
        f"clean errors: {errors}",
    ]
    for kind, count in summary.errors.most_common():
        example = EXAMPLES.get(kind, "")
        lines.append(f"  {count:6d}  {kind[len('error: '):] if kind.startswith('error: ') else kind}"
                     f"   e.g. {example[:110]}")
    lines.append("by suffix: " + ", ".join(f"{s} {c}" for s, c in summary.by_suffix.most_common()))
    lines.append(f"crashes found: {len(summary.crashes)}")
    for signature, (suffix, content, detail) in sorted(summary.crashes.items()):
        lines.append(f"  {signature} ({suffix or 'no suffix'}, {len(content)} bytes): {detail}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=None, help="wall-time budget (default 3)")
    parser.add_argument("--examples", type=int, default=None, help="stop after this many inputs instead")
    parser.add_argument("--seed", type=int, default=0, help="first batch seed (batches count up from it)")
    parser.add_argument("--crash-dir", default=str(Path(__file__).parent / "results" / "fuzz_crashes"),
                        help="where crash reproducers go (only written if there are crashes)")
    args = parser.parse_args(argv)
    minutes = args.minutes if args.minutes is not None or args.examples is not None else 3.0
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    print(f"fuzzing embedtune.data.load_pairs: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, "
          f"{'%.1f minutes' % minutes if minutes else f'{args.examples} inputs'}, seed {args.seed}", flush=True)
    summary = fuzz(minutes=minutes, examples=args.examples, first_seed=args.seed)
    print(report(summary))
    for path in write_crashes(summary, Path(args.crash_dir)):
        print(f"reproducer: {path}")
    return 1 if summary.crashes else 0


if __name__ == "__main__":
    sys.exit(main())
