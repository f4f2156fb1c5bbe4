"""Tests for embedtune.data: pair-file readers, train/eval split, and the built-in stdlib dataset."""

from __future__ import annotations

import ast
import csv
import io
import json
import tempfile
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from embedtune.data import (
    ANCHOR_ALIASES,
    NEGATIVE_ALIASES,
    POSITIVE_ALIASES,
    LoadedPairs,
    build_stdlib_pairs,
    load_pairs,
    train_eval_split,
    write_jsonl,
)
from embedtune.data import readers
from embedtune.errors import DataError

# Canonical rows, with text that stresses every format: commas, quotes, newlines, non-ASCII, a number.
ROWS = [
    {"anchor": "how to sort a list", "positive": "sorted(xs)", "negative": "len(xs)"},
    {"anchor": 'a "quoted", comma', "positive": "def f():\n    return 1", "negative": "café ☕"},
    {"anchor": "42", "positive": "x, y = y, x", "negative": "pass"},
]
EXPECTED = {
    "anchor": [r["anchor"] for r in ROWS],
    "positive": [r["positive"] for r in ROWS],
    "negative_1": [r["negative"] for r in ROWS],
}


def _write_jsonl(path: Path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _write_csv(path: Path, rows) -> None:
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _column(ds: datasets.Dataset, name: str) -> list:
    """A column as a plain list (fast, and respects a shuffle's indices mapping)."""
    return ds.with_format("arrow")[name].to_pylist()


def _message(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, "DataError messages must be one line"
    return message


# ----------------------------------------------------------------------------------------- formats


def _make_jsonl(tmp: Path) -> Path:
    return write_jsonl(ROWS, tmp / "pairs.jsonl")


def _make_ndjson(tmp: Path) -> Path:
    path = tmp / "pairs.ndjson"
    path.write_text("\n\n".join(json.dumps(r) for r in ROWS) + "\n\n", encoding="utf-8")  # blank lines ignored
    return path


def _make_json_list(tmp: Path) -> Path:
    path = tmp / "pairs.json"
    path.write_text(json.dumps(ROWS, indent=2), encoding="utf-8")
    return path


def _make_json_data_key(tmp: Path) -> Path:
    path = tmp / "pairs.json"
    path.write_text(json.dumps({"version": 1, "data": ROWS}), encoding="utf-8")
    return path


def _make_json_lines_named_json(tmp: Path) -> Path:
    path = tmp / "pairs.json"
    _write_jsonl(path, ROWS)
    return path


def _make_csv(tmp: Path) -> Path:
    path = tmp / "pairs.csv"
    _write_csv(path, ROWS)
    return path


def _make_tsv(tmp: Path) -> Path:
    path = tmp / "pairs.tsv"
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(ROWS[0]), delimiter="\t")
        writer.writeheader()
        writer.writerows(ROWS)
    return path


def _make_parquet(tmp: Path) -> Path:
    path = tmp / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    return path


def _make_saved_dataset(tmp: Path) -> Path:
    path = tmp / "saved"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(path))
    return path


def _make_saved_dataset_dict(tmp: Path) -> Path:
    # "train" is used even when it isn't the first split.
    other = [{"anchor": "other anchor", "positive": "other positive", "negative": "n"}]
    path = tmp / "saved_dict"
    datasets.DatasetDict(
        {"test": datasets.Dataset.from_list(other), "train": datasets.Dataset.from_list(ROWS)}
    ).save_to_disk(str(path))
    return path


def _make_saved_dataset_dict_no_train(tmp: Path) -> Path:
    path = tmp / "saved_dict_no_train"
    datasets.DatasetDict({"validation": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(path))
    return path


@pytest.mark.parametrize(
    "make",
    [
        _make_jsonl,
        _make_ndjson,
        _make_json_list,
        _make_json_data_key,
        _make_json_lines_named_json,
        _make_csv,
        _make_tsv,
        _make_parquet,
        _make_saved_dataset,
        _make_saved_dataset_dict,
        _make_saved_dataset_dict_no_train,
    ],
)
def test_every_format_gives_the_same_canonical_dataset(tmp_path, make):
    path = make(tmp_path)
    loaded = load_pairs(path)
    assert isinstance(loaded, LoadedPairs)
    assert loaded.dataset.column_names == ["anchor", "positive", "negative_1"]
    assert loaded.dataset.to_dict() == EXPECTED
    assert all(v.dtype == "string" for v in loaded.dataset.features.values())
    assert loaded.num_negatives == 1
    assert loaded.skipped == 0
    assert loaded.source == str(path)


def test_accepts_str_path_and_utf8_bom(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes(b"\xef\xbb\xbfanchor,positive\nq,p\n")
    loaded = load_pairs(str(path))
    assert loaded.dataset.to_dict() == {"anchor": ["q"], "positive": ["p"]}


def test_csv_numbers_stay_text(tmp_path):
    path = tmp_path / "n.csv"
    path.write_text("anchor,positive\n1.50,007\n", encoding="utf-8")
    assert load_pairs(path).dataset.to_dict() == {"anchor": ["1.50"], "positive": ["007"]}


# ----------------------------------------------------------------------------------------- aliases


def test_aliases_are_exported():
    assert ANCHOR_ALIASES == ("anchor", "query", "question")
    assert POSITIVE_ALIASES == ("positive", "pos", "answer")
    assert NEGATIVE_ALIASES == ("negative", "negatives", "neg")


def test_flagembedding_style_lists_explode_positives_and_make_negatives_rectangular(tmp_path):
    path = tmp_path / "fe.jsonl"
    _write_jsonl(
        path,
        [
            {"query": "q1", "pos": ["p1", "p2"], "neg": ["n1", "n2", "n3"]},  # 3 negatives: trimmed to 2
            {"query": "q2", "pos": ["p3"], "neg": ["n4", "", None, "n5"]},  # empties dropped -> 2 negatives
            {"query": "q3", "pos": ["p4", "p5"], "neg": ["n6", "n7"]},  # 3 of 5 pairs have 2: the count kept
        ],
    )
    loaded = load_pairs(path)
    assert loaded.num_negatives == 2
    assert loaded.dataset.to_dict() == {
        "anchor": ["q1", "q1", "q2", "q3", "q3"],
        "positive": ["p1", "p2", "p3", "p4", "p5"],
        "negative_1": ["n1", "n1", "n4", "n6", "n6"],
        "negative_2": ["n2", "n2", "n5", "n7", "n7"],
    }
    assert loaded.skipped_few_negatives == 0


def test_question_answer_without_negatives(tmp_path):
    path = tmp_path / "qa.csv"
    _write_csv(path, [{"question": "why?", "answer": "because"}, {"question": "how?", "answer": "so"}])
    loaded = load_pairs(path)
    assert loaded.num_negatives == 0
    assert loaded.dataset.to_dict() == {"anchor": ["why?", "how?"], "positive": ["because", "so"]}


def test_row_with_fewer_negatives_than_most_rows_is_skipped_not_the_negatives(tmp_path):
    path = tmp_path / "mixed.jsonl"
    rows = [{"anchor": "a", "positive": "p", "negative": "n"}, {"anchor": "b", "positive": "q"},
            {"anchor": "c", "positive": "r", "negative": "m"}]
    _write_jsonl(path, rows)
    loaded = load_pairs(path)
    assert loaded.num_negatives == 1
    assert loaded.dataset.to_dict() == {"anchor": ["a", "c"], "positive": ["p", "r"], "negative_1": ["n", "m"]}
    assert (loaded.skipped, loaded.skipped_few_negatives, loaded.first_few_negatives) == (0, 1, "line 2")


def test_numbered_negatives_in_numeric_order_after_plain_negative(tmp_path):
    path = tmp_path / "num.parquet"
    row = {"anchor": "a", "positive": "p", "negative_10": "n10", "negative_2": "n2", "negative": "n0"}
    pq.write_table(pa.Table.from_pylist([row]), path)
    loaded = load_pairs(path)
    assert loaded.num_negatives == 3
    assert loaded.dataset[0] == {
        "anchor": "a",
        "positive": "p",
        "negative_1": "n0",
        "negative_2": "n2",
        "negative_3": "n10",
    }


def test_two_aliases_of_one_column_in_a_row_are_an_error(tmp_path):
    """Both "anchor" and "query" with text: one would be ignored (the first alias used to win silently).
    Tests of the rule itself: tests/test_no_silent_success.py."""
    path = tmp_path / "both.jsonl"
    _write_jsonl(path, [{"query": "from query", "anchor": "from anchor", "answer": "ans", "positive": "pos"}])
    with pytest.raises(DataError, match=r"both.jsonl:1: both 'anchor' and 'query' given"):
        load_pairs(path)


def test_negatives_rectangular_across_flushed_chunks(tmp_path, monkeypatch):
    # Force many small Arrow chunks so the count chosen at the end must trim and filter earlier chunks.
    monkeypatch.setattr(readers, "_FLUSH_ROWS", 2)
    rows = [{"anchor": f"a{i}", "positive": f"p{i}", "neg": [f"x{i}", f"y{i}", f"z{i}"]} for i in range(3)]
    rows += [{"anchor": f"a{i}", "positive": f"p{i}", "neg": [f"x{i}"]} for i in range(3, 7)]
    rows.append({"anchor": "last", "positive": "p", "neg": ["only"]})
    path = tmp_path / "chunks.jsonl"
    _write_jsonl(path, rows)
    loaded = load_pairs(path)
    assert loaded.num_negatives == 1
    assert loaded.dataset.column_names == ["anchor", "positive", "negative_1"]
    assert _column(loaded.dataset, "negative_1") == [f"x{i}" for i in range(7)] + ["only"]
    assert _column(loaded.dataset, "anchor")[-1] == "last"

    _write_jsonl(path, [rows[-1]] + rows[:3] + [dict(r, neg=["u", "v", "w"]) for r in rows[3:7]])
    loaded = load_pairs(path)
    assert loaded.num_negatives == 3 and len(loaded.dataset) == 7
    assert (loaded.skipped_few_negatives, loaded.first_few_negatives) == (1, "line 1")


# ----------------------------------------------------------------------------------------- skipping


def test_skipped_rows_are_counted(tmp_path):
    path = tmp_path / "skips.jsonl"
    _write_jsonl(
        path,
        [
            {"anchor": "ok", "positive": "fine"},
            {"anchor": None, "positive": "x"},  # null anchor
            {"anchor": "  \t", "positive": "x"},  # whitespace anchor
            {"anchor": "a", "positive": ""},  # empty positive
            {"anchor": "a", "positive": None},  # null positive (numbers, lists etc. are errors: test_data_more)
            {"positive": "x"},  # anchor key missing in this row
            {"anchor": "b", "positive": ["good", "", None]},  # two bad list entries
            {"anchor": "c", "positive": []},  # empty list
        ],
    )
    loaded = load_pairs(path)
    assert loaded.dataset.to_dict() == {"anchor": ["ok", "b"], "positive": ["fine", "good"]}
    assert loaded.skipped == 8


def test_csv_empty_cells_are_skipped(tmp_path):
    path = tmp_path / "e.csv"
    path.write_text('anchor,positive\na,p\n,p2\nb,""\nc," "\n', encoding="utf-8")
    loaded = load_pairs(path)
    assert loaded.dataset.to_dict() == {"anchor": ["a"], "positive": ["p"]}
    assert loaded.skipped == 3


# ----------------------------------------------------------------------------------------- errors


def test_missing_path(tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(DataError) as e:
        load_pairs(path)
    assert _message(e) == f"{path}: no such file or directory"


def test_unsupported_format(tmp_path):
    path = tmp_path / "pairs.txt"
    path.write_text("hello", encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_pairs(path)
    message = _message(e)
    assert message.startswith(f"{path}: unsupported file format '.txt'")
    for fmt in (".jsonl", ".json", ".csv", ".parquet", "save_to_disk"):
        assert fmt in message


@pytest.mark.parametrize(
    "name, content",
    [
        ("empty.jsonl", b""),
        ("blank.jsonl", b"\n  \n\t\n"),
        ("empty.json", b""),
        ("empty_list.json", b"[]"),
        ("empty_data.json", b'{"data": []}'),
        ("empty.csv", b""),
        ("empty.parquet", b""),
    ],
)
def test_empty_files(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as e:
        load_pairs(path)
    assert _message(e) == f"{path}: file is empty"


@pytest.mark.parametrize("name, content", [("header_only.csv", b"anchor,positive\n"),
                                           ("header_no_newline.csv", b"anchor,positive"),
                                           ("header_only.tsv", b"anchor\tpositive\r\n"), ("zero.parquet", None)])
def test_column_names_without_rows(tmp_path, name, content):
    path = tmp_path / name
    if content is None:
        pq.write_table(pa.table({"anchor": pa.array([], pa.string()), "positive": pa.array([], pa.string())}), path)
    else:
        path.write_bytes(content)
    with pytest.raises(DataError) as e:
        load_pairs(path)
    assert _message(e) == f"{path}: holds column names (anchor, positive) but no rows"


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_missing_columns_lists_found_columns(tmp_path, suffix):
    path = tmp_path / f"cols{suffix}"
    rows = [{"text": "a", "label": "b"}]
    if suffix == ".jsonl":
        _write_jsonl(path, rows)
    elif suffix == ".csv":
        _write_csv(path, rows)
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(DataError) as e:
        load_pairs(path)
    assert _message(e) == (
        f"{path}: missing columns: need one of anchor/query/question and one of positive/pos/answer, "
        "or name yours with --columns (e.g. anchor=query,positive=document); "
        "found: text, label"
    )


def test_missing_positive_column_only(tmp_path):
    path = tmp_path / "anchor_only.jsonl"
    _write_jsonl(path, [{"query": "q"}, {"query": "r", "extra": 1}])
    with pytest.raises(DataError) as e:
        load_pairs(path)
    assert _message(e).endswith("found: query, extra")


def test_invalid_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"anchor": "a", "positive": "p"}\n\n{"anchor": "b", "positive": }\n', encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_pairs(path)
    assert _message(e).startswith(f"{path}:3: invalid JSON: Expecting value")
    path.write_text('{"anchor": "a", "positive": "p}', encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_pairs(path)
    assert _message(e) == f"{path}:1: invalid JSON: Unterminated string starting at column 29"


@pytest.mark.parametrize("line, problem", [
    ('"text"', "expected a JSON object or array, got string"),
    ("3", "expected a JSON object or array, got number"),
    ("null", "expected a JSON object or array, got null"),
    ("[1, 2]", "column '1' holds a number (1), expected text"),  # an array is read by position
])
def test_non_object_json_line(tmp_path, line, problem):
    path = tmp_path / "list.jsonl"
    path.write_text('{"anchor": "a", "positive": "p"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_pairs(path)
    assert _message(e) == f"{path}:2: {problem}"


def test_binary_garbage_in_jsonl(tmp_path):
    path = tmp_path / "bin.jsonl"
    path.write_bytes(b'{"anchor": "a", "positive": "p"}\n\x89PNG\r\n\x1a\n\x00\xff\xfe')
    with pytest.raises(DataError) as e:
        load_pairs(path)
    assert _message(e).startswith(f"{path}:2: invalid ")


def test_lone_surrogate_escape(tmp_path):
    path = tmp_path / "sur.jsonl"
    path.write_text('{"anchor": "a", "positive": "p"}\n{"anchor": "\\ud800", "positive": "p"}\n', encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_pairs(path)
    assert _message(e).startswith(f"{path}:2: invalid text")


def test_broken_json_document_reports_its_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"anchor": "a", "positive": "p"},\n  {"anchor": "b" "positive": "q"}\n]\n', encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_pairs(path)
    assert _message(e).startswith(f"{path}:3: invalid JSON: Expecting ',' delimiter")


def test_json_lines_named_json_report_jsonl_line(tmp_path):
    path = tmp_path / "lines.json"
    path.write_text('{"anchor": "a", "positive": "p"}\n{"anchor": "b", "positive": "q"}\n{oops\n', encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_pairs(path)
    assert _message(e).startswith(f"{path}:3: invalid JSON: ")


def test_json_without_record_list(tmp_path):
    path = tmp_path / "obj.json"
    path.write_text('{"a": [1], "b": [2]}', encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_pairs(path)
    assert _message(e).startswith(f"{path}: expected a list of objects")
    assert _message(e).endswith("found keys: a, b")


def test_no_usable_rows(tmp_path):
    path = tmp_path / "blank_rows.jsonl"
    rows = [{"anchor": "", "positive": "p"}, {"anchor": "a", "positive": None}, {"anchor": " ", "positive": "x"}]
    _write_jsonl(path, rows)
    with pytest.raises(DataError) as e:
        load_pairs(path)
    assert _message(e) == f"{path}: no usable rows (3 skipped for empty, null or missing text)"


def test_ragged_csv(tmp_path):
    path = tmp_path / "ragged.csv"
    path.write_text("anchor,positive\na,b,c\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_pairs(path)
    assert _message(e) == f"{path}:2: invalid CSV: expected 2 columns, got 3: a,b,c"


def test_invalid_utf8_csv(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("anchor,positive\ncafé,p\n".encode("latin-1"))
    with pytest.raises(DataError) as e:
        load_pairs(path)
    assert _message(e).startswith(f"{path}:2: invalid CSV: invalid UTF-8: ")


def test_garbage_parquet(tmp_path):
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"this is not parquet at all\n")
    with pytest.raises(DataError) as e:
        load_pairs(path)
    assert _message(e).startswith(f"{path}: invalid Parquet file: ")


def test_folder_without_data_files_or_a_saved_dataset(tmp_path):
    (tmp_path / "junk.txt").write_text("x", encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_pairs(tmp_path)
    assert _message(e).startswith(f"{tmp_path}: a folder with no data files, not written by datasets' save_to_disk")


def test_broken_saved_dataset_says_so(tmp_path):
    (tmp_path / "state.json").write_text("{}", encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_pairs(tmp_path)
    assert _message(e).startswith(f"{tmp_path}: not a dataset folder written by datasets' save_to_disk")


# ----------------------------------------------------------------------------------------- fuzz

_JSON_TOKENS = st.sampled_from(
    ['{', '}', '[', ']', ':', ',', ' ', '\n', '\n', '"anchor"', '"positive"', '"query"', '"pos"', '"neg"',
     '"negative_1"', '"answer"', '"x"', '""', '" "', 'null', '1', '-2.5e3', 'true', '"\\ud800"', '"é"', '\ufeff',
     '{"anchor": "a", "positive": "p"}', '{"query": "q", "pos": ["p", ""], "neg": ["n"]}']
)
_CSV_TOKENS = st.sampled_from(
    ['anchor', 'positive', 'question', 'answer', 'negative', ',', '\n', '\r\n', '"', '""', ' ', 'x', 'é', '\x00']
)


# Well-formed records with random keys and values, so the column normaliser (not just the parsers)
# meets nulls, numbers, lists, blanks and missing keys.
_KEYS = st.sampled_from(["anchor", "query", "question", "positive", "pos", "answer", "negative", "neg",
                         "negative_1", "negative_2", "other"])
_SCALARS = st.one_of(st.none(), st.text(max_size=4), st.integers(), st.booleans(), st.just(" "))
_RECORDS = st.lists(
    st.dictionaries(_KEYS, st.one_of(_SCALARS, st.lists(_SCALARS, max_size=3)), max_size=5), max_size=6
)


def _to_csv_bytes(rows: list[list[str]]) -> bytes:
    buffer = io.StringIO()
    csv.writer(buffer).writerows(rows)
    return buffer.getvalue().encode("utf-8", "surrogatepass")


def _fuzz_inputs():
    return st.one_of(
        st.binary(max_size=200),
        st.lists(_JSON_TOKENS, max_size=40).map(lambda t: "".join(t).encode("utf-8")),
        st.lists(_CSV_TOKENS, max_size=40).map(lambda t: "".join(t).encode("utf-8")),
        st.text(max_size=100).map(lambda t: t.encode("utf-8", "surrogatepass")),
        _RECORDS.map(lambda rows: "".join(json.dumps(r) + "\n" for r in rows).encode("utf-8")),
        st.lists(st.lists(st.one_of(_KEYS, st.text(max_size=4)), min_size=2, max_size=2), max_size=5).map(
            _to_csv_bytes
        ),
    )


@settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(content=_fuzz_inputs())
def test_fuzz_load_pairs_returns_valid_pairs_or_data_error(content):
    with tempfile.TemporaryDirectory() as tmp:
        for suffix in (".jsonl", ".json", ".csv"):
            path = Path(tmp) / f"fuzz{suffix}"
            path.write_bytes(content)
            try:
                loaded = load_pairs(path)
            except DataError as e:
                assert "\n" not in str(e) and str(e).startswith(str(path))
                continue
            ds = loaded.dataset
            k = loaded.num_negatives
            assert ds.column_names == ["anchor", "positive"] + [f"negative_{i}" for i in range(1, k + 1)]
            assert len(ds) > 0 and loaded.skipped >= 0
            for column in ds.column_names:
                values = _column(ds, column)
                assert all(isinstance(v, str) and v.strip() for v in values)


# ----------------------------------------------------------------------------------------- split


def _numbers(n: int) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"anchor": [str(i) for i in range(n)], "positive": ["p"] * n})


@pytest.mark.parametrize("n, expected_eval", [(2, 1), (5, 1), (19, 1), (100, 10), (1234, 123), (50_000, 4096)])
def test_default_eval_size(n, expected_eval):
    train, evaluation = train_eval_split(_numbers(n))
    assert len(evaluation) == expected_eval
    assert len(train) == n - expected_eval
    assert sorted(_column(train, "anchor") + _column(evaluation, "anchor"), key=int) == [str(i) for i in range(n)]


def test_single_row_gets_no_eval_split():
    train, evaluation = train_eval_split(_numbers(1))
    assert evaluation is None and len(train) == 1


def test_split_is_deterministic_per_seed():
    ds = _numbers(200)
    a_train, a_eval = train_eval_split(ds, eval_size=20, seed=7)
    b_train, b_eval = train_eval_split(ds, eval_size=20, seed=7)
    c_train, c_eval = train_eval_split(ds, eval_size=20, seed=8)
    assert _column(a_train, "anchor") == _column(b_train, "anchor")
    assert _column(a_eval, "anchor") == _column(b_eval, "anchor")
    assert _column(a_eval, "anchor") != _column(c_eval, "anchor")
    assert not set(_column(a_train, "anchor")) & set(_column(a_eval, "anchor"))


def test_eval_size_zero_shuffles_without_eval():
    ds = _numbers(50)
    train, evaluation = train_eval_split(ds, eval_size=0)
    assert evaluation is None
    assert len(train) == 50 and _column(train, "anchor") != _column(ds, "anchor")
    assert sorted(_column(train, "anchor"), key=int) == _column(ds, "anchor")


@pytest.mark.parametrize("eval_size", [10, 11])
def test_eval_size_too_large(eval_size):
    with pytest.raises(DataError) as e:
        train_eval_split(_numbers(10), eval_size=eval_size)
    assert _message(e).startswith(f"the data has 10 rows, too few for an eval split of {eval_size}")


# ----------------------------------------------------------------------------------------- stdlib


@pytest.fixture(scope="module")
def stdlib_pairs() -> list[dict]:
    return build_stdlib_pairs()


def test_stdlib_pairs_are_many_unique_and_clean(stdlib_pairs):
    assert len(stdlib_pairs) > 1000
    anchors = [p["anchor"] for p in stdlib_pairs]
    positives = [p["positive"] for p in stdlib_pairs]
    assert len(set(anchors)) == len(anchors)
    assert len(set(positives)) == len(positives)
    assert all(set(p) == {"anchor", "positive"} for p in stdlib_pairs)
    assert all("\n" not in a and len(a.split()) >= 4 and a == " ".join(a.split()) for a in anchors)
    assert all(len(p) <= 4000 and sum(1 for line in p.splitlines() if line.strip()) >= 2 for p in positives)
    assert all(p.startswith(("def ", "async def ", "@")) for p in positives)


def test_stdlib_docstring_removed_from_known_function_and_method(stdlib_pairs):
    by_anchor = {p["anchor"]: p["positive"] for p in stdlib_pairs}
    dedent = by_anchor["Remove any common leading whitespace from every line in `text`."]
    assert dedent.startswith("def dedent(text):\n    # Look for the longest leading string")
    assert "tabs and spaces are both" not in dedent and '"""' not in dedent
    assert dedent.endswith("return text")

    # A method: dedented to column 0, docstring gone.
    encode = by_anchor["Return a JSON string representation of a Python data structure."]
    assert encode.startswith("def encode(self, o):\n    # This is for extremely simple cases")
    assert "JSON string representation" not in encode and '"""' not in encode
    assert encode.endswith("return ''.join(chunks)")


def test_stdlib_positives_parse_and_hold_no_docstring(stdlib_pairs):
    import random

    sample = random.Random(0).sample([p for p in stdlib_pairs if len(p["positive"]) < 4000], 200)
    for pair in sample:
        function = ast.parse(pair["positive"]).body[0]
        assert isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef))
        assert pair["anchor"] not in " ".join(pair["positive"].split())


def test_stdlib_is_deterministic_and_samples_by_seed(stdlib_pairs):
    assert build_stdlib_pairs() == stdlib_pairs
    a = build_stdlib_pairs(max_pairs=50, seed=1)
    assert len(a) == 50 and a == build_stdlib_pairs(max_pairs=50, seed=1)
    assert a != build_stdlib_pairs(max_pairs=50, seed=2)
    assert all(p in stdlib_pairs for p in a)
    assert build_stdlib_pairs(max_pairs=10**9) == stdlib_pairs
    with pytest.raises(DataError):
        build_stdlib_pairs(max_pairs=0)


def test_stdlib_cache_returns_fresh_rows(stdlib_pairs):
    rows = build_stdlib_pairs(max_pairs=3)
    rows[0]["anchor"] = "mutated"
    assert build_stdlib_pairs(max_pairs=3)[0]["anchor"] != "mutated"


def test_write_jsonl_round_trips_through_load_pairs(tmp_path, stdlib_pairs):
    rows = build_stdlib_pairs(max_pairs=100, seed=3) + [{"anchor": "naïve café query", "positive": "ünïcode ✓"}]
    path = write_jsonl(rows, tmp_path / "nested" / "dir" / "stdlib.jsonl")
    assert path.is_file()
    assert "naïve café" in path.read_text(encoding="utf-8")  # ensure_ascii=False
    loaded = load_pairs(path)
    assert loaded.dataset.to_list() == rows
    assert loaded.skipped == 0 and loaded.num_negatives == 0


def test_a_pipe_as_data_is_one_line_not_a_drained_read(tmp_path):
    """A FIFO would be drained by the first of the reads a run makes (check, hash, load): refused."""
    import os

    from embedtune.data.readers import DataError as ReaderError, load_pairs

    import threading

    fifo = tmp_path / "pairs.jsonl"
    os.mkfifo(fifo)
    outcome = []

    def read():  # a reader that opens the pipe would wait for a writer forever: run it aside
        try:
            load_pairs(fifo)
        except ReaderError as e:
            outcome.append(str(e))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(60)  # a guard against a hang, not a timing: the check opens nothing
    assert not reader.is_alive(), "load_pairs opened the pipe and waits on it"
    assert outcome and "not a regular file" in outcome[0] and "\n" not in outcome[0]
