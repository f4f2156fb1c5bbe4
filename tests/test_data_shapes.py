"""Pair files as people export them: a ``negatives`` list column, JSON objects of columns (a dict of
lists, pandas' ``to_json()`` default)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedtune.data import load_pairs
from embedtune.errors import DataError


def _error(path) -> str:
    with pytest.raises(DataError) as e:
        load_pairs(path)
    message = str(e.value)
    assert "\n" not in message and message.isprintable(), message
    return message


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
