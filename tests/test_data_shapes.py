"""Pair files as people export them: a ``negatives`` list column, JSON objects of columns (a dict of
lists, pandas' ``to_json()`` default)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedtune.data import load_pairs
from reader_errors import one_line_error


# ------------------------------------------------------------------ a `negatives` column (plural)


def test_a_negatives_list_column_gives_the_hard_negatives(tmp_path):
    path = tmp_path / "mined.jsonl"
    path.write_text("".join(json.dumps({"anchor": f"a{i}", "positive": f"p{i}", "negatives": [f"n{i}", f"m{i}"]}) + "\n"
                            for i in range(3)), encoding="utf-8")
    loaded = load_pairs(path)
    assert loaded.num_negatives == 2
    assert loaded.dataset.to_dict() == {"anchor": ["a0", "a1", "a2"], "positive": ["p0", "p1", "p2"],
                                        "negative_1": ["n0", "n1", "n2"], "negative_2": ["m0", "m1", "m2"]}


def test_a_negatives_list_column_in_parquet_gives_the_hard_negatives(tmp_path):
    path = tmp_path / "mined.parquet"
    pq.write_table(pa.table({"query": ["a", "b"], "positive": ["x", "y"], "negatives": [["n1"], ["n2"]]}), path)
    loaded = load_pairs(path)
    assert loaded.num_negatives == 1 and loaded.dataset["negative_1"] == ["n1", "n2"]


# ------------------------------------------------------------------ JSON: an object of columns


def test_a_json_object_of_lists_reads_as_columns(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps({"anchor": ["a1", "a2", "a3"], "positive": ["p1", "p2", "p3"],
                                "score": [0.1, 0.5, 0.9]}), encoding="utf-8")
    assert load_pairs(path).dataset.to_dict() == {"anchor": ["a1", "a2", "a3"], "positive": ["p1", "p2", "p3"],
                                                  "score": [0.1, 0.5, 0.9]}


def test_pandas_default_to_json_reads_as_columns(tmp_path):
    pd = pytest.importorskip("pandas")
    path = tmp_path / "pairs.json"
    pd.DataFrame({"query": ["a1", "a2"], "answer": ["p1", "p2"]}).to_json(path)  # {"query": {"0": "a1", ...}, ...}
    assert load_pairs(path).dataset.to_dict() == {"anchor": ["a1", "a2"], "positive": ["p1", "p2"]}


def test_json_columns_of_different_lengths_are_an_error_naming_them(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps({"anchor": ["a1", "a2", "a3"], "positive": ["p1", "p2"]}), encoding="utf-8")
    assert one_line_error(path) == (f"{path}: a JSON object of columns of different lengths: 'anchor' holds 3 values, "
                            "'positive' 2")


def test_a_single_flagembedding_record_in_a_json_file_is_still_one_row(tmp_path):
    path = tmp_path / "one.json"
    path.write_text(json.dumps({"query": "q", "pos": ["p1", "p2"], "neg": ["n1"]}), encoding="utf-8")
    assert load_pairs(path).dataset.to_dict() == {"anchor": ["q", "q"], "positive": ["p1", "p2"],
                                                  "negative_1": ["n1", "n1"]}


# ------------------------------------------------------------------ CSV: a list column written as text


def test_a_list_column_written_by_pandas_to_csv_is_an_error_naming_its_line(tmp_path):
    pd = pytest.importorskip("pandas")
    path = tmp_path / "mined.csv"
    pd.DataFrame({"anchor": ["a", "b"], "positive": ["x", "y"],
                  "neg": [["n1", "n2"], ["n3", "n4"]]}).to_csv(path, index=False)  # the cell: "['n1', 'n2']"
    assert one_line_error(path).startswith(f"{path}:2: column 'neg' holds a list written as text (['n1', 'n2']); CSV keeps "
                                   "no lists: write the file as JSONL or Parquet")


def test_a_written_list_after_a_multiline_cell_names_its_own_line(tmp_path):
    path = tmp_path / "pairs.tsv"
    path.write_text('anchor\tpositive\na\t"two\nlines"\nb\t["p1", "p2"]\n', encoding="utf-8")
    assert one_line_error(path).startswith(f"{path}:4: column 'positive' holds a list written as text")


def test_code_with_brackets_in_a_csv_is_still_text(tmp_path):
    path = tmp_path / "code.csv"
    path.write_text('anchor,positive\nq1,"def f():\n    return [1]"\nq2,[x for x in y]\nq3,[1 2]\n', encoding="utf-8")
    assert load_pairs(path).dataset["positive"] == ["def f():\n    return [1]", "[x for x in y]", "[1 2]"]


# ------------------------------------------------------------------ hard negatives under another name


def _hard_negatives_file(tmp_path) -> Path:
    path = tmp_path / "hard.jsonl"
    path.write_text("".join(json.dumps({"id": i, "anchor": f"a{i}", "positive": f"p{i}", "hard_negatives": [f"n{i}"]})
                            + "\n" for i in range(3)), encoding="utf-8")
    return path


def test_hard_negatives_under_a_name_no_role_reads_are_a_warning_of_the_run(tmp_path):
    from embedtune.run_data import load_parts
    from embedtune.train import TrainConfig

    path = _hard_negatives_file(tmp_path)
    loaded = load_pairs(path)
    assert loaded.num_negatives == 0 and loaded.unread_negatives == ("hard_negatives",)
    (part,) = load_parts(TrainConfig(data=str(path)))  # the choice's warning: logged, in metrics.json and the summary
    assert part.choice.warning == (f"{path}: column 'hard_negatives' not read (hard negatives are read from negative, "
                                   "negatives, neg or negative_1..N); to train on them: --columns negative=hard_negatives")


def test_hard_negatives_named_by_role_are_read_and_not_warned_about(tmp_path):
    from embedtune.run_data import load_parts
    from embedtune.train import TrainConfig

    (part,) = load_parts(TrainConfig(data=str(_hard_negatives_file(tmp_path)), columns="negative=hard_negatives"))
    assert part.loaded.num_negatives == 1 and part.choice.warning is None
    assert part.loaded.dataset["negative_1"] == ["n0", "n1", "n2"]


def test_a_json_object_of_columns_with_a_lone_value_names_that_column(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps({"anchor": ["a1", "a2"], "positive": ["p1", "p2"], "source": "wiki"}), encoding="utf-8")
    assert one_line_error(path) == f"{path}: a JSON object of columns, but column 'source' holds a JSON string, not a list"


# ------------------------------------------------------------------ CSV with another separator


def test_a_semicolon_separated_csv_is_an_error_naming_the_separator(tmp_path):
    pd = pytest.importorskip("pandas")
    path = tmp_path / "pairs.csv"
    pd.DataFrame({"anchor": ["a1", "a2"], "positive": ["p1", "p2"]}).to_csv(path, sep=";", index=False)  # Excel's, in much of Europe
    assert one_line_error(path).endswith("found: anchor;positive (one column: the file separates its columns with ';'; "
                                 "embedtune reads CSV with ',' and TSV with tabs: write it with one of those)")
