"""Pair-file readers, QA round: duplicate columns, wrong-typed values, typed table columns, CSV errors
with line numbers, and rows with fewer hard negatives than most rows."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedtune.data import load_pairs
from reader_errors import one_line_error


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _pairs(n: int, negatives: int = 0) -> list[dict]:
    return [
        {"anchor": f"a{i}", "positive": f"p{i}", **{f"negative_{j}": f"n{i}.{j}" for j in range(1, negatives + 1)}}
        for i in range(1, n + 1)
    ]


# ------------------------------------------------------------------------------- 1. duplicate columns


@pytest.mark.parametrize(
    "header, duplicated",
    [("anchor,positive,positive", "positive"), ("anchor,anchor,positive", "anchor"),
     ("query,pos,neg,neg", "neg"), ("anchor,positive,negative_1,negative_1", "negative_1")],
)
def test_csv_duplicate_column_is_an_error_on_line_1(tmp_path, header, duplicated):
    path = tmp_path / "dup.csv"
    width = header.count(",") + 1
    path.write_text(header + "\n" + ",".join(f"v{i}" for i in range(width)) + "\n", encoding="utf-8")
    assert one_line_error(path) == f"{path}:1: duplicate column '{duplicated}'"


def test_csv_duplicate_unused_columns_still_load(tmp_path):
    """Spreadsheet exports end rows with empty, repeated column names; the readers never use them."""
    path = tmp_path / "export.csv"
    path.write_text("anchor,positive,notes,notes,,\na,p,x,y,,\n", encoding="utf-8")
    assert load_pairs(path).dataset.to_dict() == {"anchor": ["a"], "positive": ["p"]}


def test_parquet_duplicate_column_is_an_error(tmp_path):
    path = tmp_path / "dup.parquet"
    table = pa.Table.from_arrays([pa.array(["a"]), pa.array(["p1"]), pa.array(["p2"])],
                                 names=["anchor", "positive", "positive"])
    pq.write_table(table, path)
    assert one_line_error(path) == f"{path}: duplicate column 'positive'"


# ------------------------------------------------------------------------------- 2. wrong-typed values


@pytest.mark.parametrize(
    "value, held",
    [(42, "a number (42)"), (1.5, "a number (1.5)"), (True, "a boolean (true)"),
     ({"text": "p"}, 'an object ({"text": "p"})'), (["p", 5], "a list holding a number (5)")],
)
def test_jsonl_wrong_typed_positive_names_file_line_column_and_type(tmp_path, value, held):
    rows = _pairs(10)
    rows[6]["positive"] = value
    path = _write_jsonl(tmp_path / "pairs.jsonl", rows)
    assert one_line_error(path) == f"{path}:7: column 'positive' holds {held}, expected text"


@pytest.mark.parametrize(
    "row, column, held",
    [({"anchor": 3, "positive": "p"}, "anchor", "a number (3)"),
     ({"anchor": ["a"], "positive": "p"}, "anchor", 'a list (["a"])'),  # lists are for positives/negatives
     ({"query": "q", "pos": ["p"], "neg": ["n", {}]}, "neg", "a list holding an object ({})"),
     ({"anchor": "a", "positive": "p", "negative_2": False}, "negative_2", "a boolean (false)"),
     ({"anchor": "", "positive": 7}, "positive", "a number (7)")],  # wrong even in a row skipped as blank
)
def test_jsonl_wrong_typed_anchor_or_negative(tmp_path, row, column, held):
    path = _write_jsonl(tmp_path / "pairs.jsonl", [{"anchor": "a", "positive": "p"}, row])
    assert one_line_error(path) == f"{path}:2: column '{column}' holds {held}, expected text"


def test_line_number_is_the_files_line_not_the_record_count(tmp_path):
    path = tmp_path / "gaps.jsonl"
    path.write_text('\n{"anchor": "a", "positive": "p"}\n\n\n{"anchor": "b", "positive": 42}\n', encoding="utf-8")
    assert one_line_error(path) == f"{path}:5: column 'positive' holds a number (42), expected text"


def test_every_value_a_number_fails_on_the_first_line_not_as_empty_text(tmp_path):
    path = _write_jsonl(tmp_path / "numbers.jsonl", [{"anchor": f"a{i}", "positive": i} for i in range(50)])
    assert one_line_error(path) == f"{path}:1: column 'positive' holds a number (0), expected text"


def test_json_list_names_the_item(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps({"data": [{"anchor": "a", "positive": "p"}, {"anchor": "b", "positive": 9}]}))
    assert one_line_error(path) == f"{path}: item 2: column 'positive' holds a number (9), expected text"


def test_long_wrong_typed_value_is_cut_short(tmp_path):
    path = _write_jsonl(tmp_path / "big.jsonl", [{"anchor": "a", "positive": {"x": "y" * 5000}}])
    message = one_line_error(path)
    assert message.startswith(f"{path}:1: column 'positive' holds an object (") and len(message) < len(str(path)) + 120


def test_nulls_blanks_and_lists_of_text_are_still_fine(tmp_path):
    rows = [
        {"anchor": "a", "positive": "p", "negative": [None, "n0"]},
        {"anchor": None, "positive": "x"},
        {"anchor": " ", "positive": "x"},
        {"query": "q", "pos": ["p1", None, ""], "neg": [None, "n"]},
    ]
    loaded = load_pairs(_write_jsonl(tmp_path / "ok.jsonl", rows))
    assert loaded.dataset.to_dict()["positive"] == ["p", "p1"]
    assert loaded.skipped == 4


# ------------------------------------------------------------------------------- 3. typed table columns


@pytest.mark.parametrize(
    "column, array, expected",
    [("positive", pa.array([1, 2]), "has type int64, expected text or a list of text"),
     ("anchor", pa.array([1.5, 2.5]), "has type double, expected text"),
     ("anchor", pa.array([["a"], ["b"]]), "has type list<element: string>, expected text"),
     ("negative", pa.array([True, False]), "has type bool, expected text or a list of text"),
     ("negative", pa.array([[1], [2]]), "has type list<element: int64>, expected text or a list of text")],
)
def test_parquet_non_text_column_names_file_column_and_type(tmp_path, column, array, expected):
    columns = {"anchor": pa.array(["a", "b"]), "positive": pa.array(["p", "q"])}
    columns[column] = array
    path = tmp_path / "typed.parquet"
    pq.write_table(pa.table(columns), path)
    assert one_line_error(path) == f"{path}: column '{column}' {expected}"


def test_saved_dataset_non_text_column(tmp_path):
    folder = tmp_path / "ds"
    datasets.Dataset.from_dict({"query": ["q1", "q2"], "pos": [3, 4]}).save_to_disk(str(folder))
    assert one_line_error(folder) == f"{folder}: column 'pos' has type int64, expected text or a list of text"


def test_typed_tables_keep_working_for_text_nulls_lists_and_unused_columns(tmp_path):
    path = tmp_path / "fine.parquet"
    pq.write_table(pa.table({
        "anchor": pa.array(["a", "b", "c"]).dictionary_encode(),
        "positive": pa.array(["p", None, "r"], pa.large_string()),
        "neg": pa.array([["n1"], ["n2"], ["n3"]]),
        "negative_1": pa.array([None, None, None], pa.null()),
        "score": pa.array([1, 2, 3]),  # a number per row: kept for the losses that train on it
        "note": pa.array([1, 2, 3]),  # not a column embedtune reads: ignored, as before
    }), path)
    loaded = load_pairs(path)
    assert loaded.dataset.to_dict() == {"anchor": ["a", "c"], "positive": ["p", "r"], "negative_1": ["n1", "n3"],
                                        "score": [1.0, 3.0]}
    assert loaded.skipped == 1


def test_csv_numbers_are_still_text(tmp_path):
    path = tmp_path / "n.csv"
    path.write_text("anchor,positive,negative\n1,2,3\n", encoding="utf-8")
    assert load_pairs(path).dataset[0] == {"anchor": "1", "positive": "2", "negative_1": "3"}


# ------------------------------------------------------------------------------- 4. CSV errors with a line


def _csv_lines(n: int) -> list[str]:
    return ["anchor,positive"] + [f"a{i},p{i}" for i in range(1, n + 1)]


def _csv_file(path, n: int, replaced: dict[int, str]):
    """A CSV of n good rows with some lines (0-based, the header is 0) replaced."""
    lines = _csv_lines(n)
    for index, line in replaced.items():
        lines[index] = line
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_ragged_csv_row_names_its_line(tmp_path):
    path = _csv_file(tmp_path / "badline.csv", 19, {11: "a10,p10,extra"})
    assert one_line_error(path) == f"{path}:12: invalid CSV: expected 2 columns, got 3: a10,p10,extra"


def test_ragged_csv_row_is_cut_short(tmp_path):
    path = tmp_path / "long.csv"
    path.write_text("anchor,positive\na,p\n" + ",".join(["x" * 50] * 20) + "\n", encoding="utf-8")
    message = one_line_error(path)
    assert message.startswith(f"{path}:3: invalid CSV: expected 2 columns, got 20: xxx")
    assert message.endswith("...") and len(message) <= len(f"{path}:3: invalid CSV: expected 2 columns, got 20: ") + 80


def test_unbalanced_quote_at_the_end_is_an_error_not_one_huge_value(tmp_path):
    """pyarrow read the rest of the file into one value, silently losing every later row."""
    path = _csv_file(tmp_path / "quote.csv", 19, {5: 'a5,"p5 never closed'})
    assert one_line_error(path) == f"{path}:6: invalid CSV: unbalanced quote: a quoted value that starts here never closes"


def test_unbalanced_quote_that_meets_a_later_quote_names_where_it_opened(tmp_path):
    path = tmp_path / "quote.csv"
    path.write_text('anchor,positive\na1,p1\na2,"p2 open\na3,p3\na4,"p4",extra\na6,p6\n', encoding="utf-8")
    message = one_line_error(path)
    assert message.startswith(f"{path}:3: invalid CSV: ") and "a3,p3" not in message
    assert "line 3 to 5: unbalanced quote?" in message


def test_invalid_utf8_names_its_line(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("anchor,positive\na,p\nb,p\ncafé,p\n".encode("latin-1"))
    assert one_line_error(path) == f"{path}:4: invalid CSV: invalid UTF-8: invalid continuation byte at byte 4"


def test_header_that_never_ends_names_line_1(tmp_path):
    path = tmp_path / "h.csv"
    path.write_text('anchor,"positive\na,p\n', encoding="utf-8")
    assert one_line_error(path).startswith(f"{path}:1: invalid CSV: ")


def test_valid_csv_with_literal_and_multiline_quotes_loads_as_before(tmp_path):
    rows = [{"anchor": 'a 12" pizza', "positive": "def f():\r\n    return '\"'\n"},
            {"anchor": "b", "positive": "x" * 200_000}]  # longer than csv's default field limit
    path = tmp_path / "ok.csv"
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["anchor", "positive"])
        writer.writeheader()
        writer.writerows(rows)
    with path.open("ab") as f:
        f.write(b'c,9" nails\r\n')  # an odd number of quote characters in all, yet valid
    limit = csv.field_size_limit()
    loaded = load_pairs(path)
    assert loaded.dataset.to_dict()["anchor"] == ['a 12" pizza', "b", "c"]
    assert loaded.dataset[0]["positive"] == rows[0]["positive"] and loaded.dataset[2]["positive"] == '9" nails'
    assert csv.field_size_limit() == limit


# ------------------------------------------------------------------------------- 5. rows with fewer negatives


def test_one_row_without_negatives_is_skipped_and_reported(tmp_path):
    rows = _pairs(292, negatives=2)
    rows[16] = {"anchor": "a17", "positive": "p17"}  # line 17
    loaded = load_pairs(_write_jsonl(tmp_path / "negs.jsonl", rows))
    assert loaded.num_negatives == 2 and len(loaded.dataset) == 291
    assert loaded.dataset.column_names == ["anchor", "positive", "negative_1", "negative_2"]
    assert "a17" not in loaded.dataset["anchor"]
    assert (loaded.skipped, loaded.skipped_few_negatives, loaded.first_few_negatives) == (0, 1, "line 17")
    assert loaded.skipped_summary() == (
        "0 rows skipped for empty, null or missing text; 1 row skipped: fewer than 2 hard negatives (first at line 17)"
    )


def test_blank_negatives_count_as_missing_and_summary_counts_both_reasons(tmp_path):
    rows = _pairs(10, negatives=2)
    rows[3]["negative_2"] = " "
    rows[5]["negative_1"] = None
    rows[7]["anchor"] = ""
    loaded = load_pairs(_write_jsonl(tmp_path / "negs.jsonl", rows))
    assert len(loaded.dataset) == 7 and loaded.num_negatives == 2
    assert loaded.skipped_summary() == (
        "1 row skipped for empty, null or missing text; 2 rows skipped: fewer than 2 hard negatives (first at line 4)"
    )


def test_csv_reports_the_files_line_of_the_first_row_with_fewer_negatives(tmp_path):
    path = tmp_path / "negs.csv"
    path.write_text(
        'anchor,positive,negative_1\na1,"multi\nline\npositive",n1\n\na2,p2,n2\na3,p3,\na4,p4,n4\n', encoding="utf-8"
    )
    loaded = load_pairs(path)
    assert loaded.num_negatives == 1 and loaded.dataset["anchor"] == ["a1", "a2", "a4"]
    assert (loaded.skipped_few_negatives, loaded.first_few_negatives) == (1, "line 7")


def test_parquet_and_json_list_report_the_row_and_item(tmp_path):
    rows = _pairs(4, negatives=1)
    rows[2]["negative_1"] = None
    path = tmp_path / "negs.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert load_pairs(path).first_few_negatives == "row 3"
    path = tmp_path / "negs.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    assert load_pairs(path).first_few_negatives == "item 3"


def test_tie_keeps_the_larger_count_and_rows_with_more_are_trimmed(tmp_path):
    rows = [{"anchor": "a", "positive": "p", "neg": ["x", "y", "z"]},
            {"anchor": "b", "positive": "q", "neg": ["x", "y"]},
            {"anchor": "c", "positive": "r", "neg": ["x", "y"]},
            {"anchor": "d", "positive": "s"},
            {"anchor": "e", "positive": "t"}]
    loaded = load_pairs(_write_jsonl(tmp_path / "tie.jsonl", rows))
    assert loaded.num_negatives == 2 and loaded.dataset["anchor"] == ["a", "b", "c"]
    assert loaded.dataset["negative_2"] == ["y", "y", "y"]
    assert (loaded.skipped_few_negatives, loaded.first_few_negatives) == (2, "line 4")


def test_no_negatives_anywhere_reports_nothing_extra(tmp_path):
    loaded = load_pairs(_write_jsonl(tmp_path / "plain.jsonl", _pairs(3)))
    assert loaded.num_negatives == 0 and loaded.skipped_few_negatives == 0 and loaded.first_few_negatives is None
    assert loaded.skipped_summary() == "0 rows skipped for empty, null or missing text"


# ------------------------------------------------------------------------------------------ TSV


def test_tsv_reads_commas_and_quotes_inside_values(tmp_path):
    path = tmp_path / "pairs.tsv"
    path.write_text('query\tdocument\tscore\nsplit a, b\tx.split(",")\t0.5\n'
                    'a 12" pizza\t"def f():\n    return 1"\t1\n', encoding="utf-8")
    table = load_pairs(path, "positive=document").dataset.to_dict()
    assert table == {"anchor": ["split a, b", 'a 12" pizza'], "positive": ['x.split(",")', "def f():\n    return 1"],
                     "score": [0.5, 1.0]}


def test_ragged_tsv_row_names_its_line(tmp_path):
    path = tmp_path / "bad.tsv"
    path.write_text("anchor\tpositive\na1\tp1\na2\tp2\textra\n", encoding="utf-8")
    assert one_line_error(path) == f"{path}:3: invalid TSV: expected 2 columns, got 3: a2\tp2\textra".replace("\t", " ")


def test_a_tsv_row_after_a_multiline_value_is_named_by_its_line(tmp_path):
    path = tmp_path / "scores.tsv"
    path.write_text('anchor\tpositive\tscore\na1\t"two\nlines"\t0.1\na2\tp2\tmuch\n', encoding="utf-8")
    assert one_line_error(path).startswith(f"{path}:4: column 'score' holds text (\"much\")")
