"""Data whose columns have other names than the usual ones, named by role (`--columns`, `columns=`)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedtune.data import load_pairs
from embedtune.data.readers import column_roles
from embedtune.errors import DataError
from embedtune.multi_data import data_sources

# The same rows under the usual names and under a retrieval export's own names.
USUAL = [
    {"anchor": "how to sort a list", "positive": "sorted(xs)", "negative": "len(xs)", "score": 0.9},
    {"anchor": 'a "quoted", comma', "positive": "def f():\n    return 1", "negative": "café ☕", "score": 0.1},
    {"anchor": "42", "positive": "x, y = y, x", "negative": "pass", "score": 0.5},
]
RENAMED = [{"q": r["anchor"], "document": r["positive"], "hard": r["negative"], "sim": r["score"], "id": i}
           for i, r in enumerate(USUAL)]
ROLES = "anchor=q,positive=document,negative=hard,score=sim"


def _table(loaded) -> dict:
    return loaded.dataset.with_format("arrow")[:].to_pydict()


def _write(path: Path, rows: list[dict]) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif path.suffix == ".json":
        path.write_text(json.dumps({"data": rows}), encoding="utf-8")
    elif path.suffix == ".csv":
        with path.open("w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet", ""])
def test_named_columns_read_as_the_usual_names(tmp_path, suffix):
    expected = _table(load_pairs(_write(tmp_path / f"usual{suffix}", USUAL)))
    loaded = load_pairs(_write(tmp_path / f"renamed{suffix}", RENAMED), ROLES)
    assert _table(loaded) == expected
    assert loaded.num_negatives == 1


def test_a_mapping_and_the_text_form_agree(tmp_path):
    path = _write(tmp_path / "renamed.jsonl", RENAMED)
    mapping = {"anchor": "q", "positive": "document", "negative": ["hard"], "score": "sim"}
    assert _table(load_pairs(path, mapping)) == _table(load_pairs(path, ROLES))


def test_without_the_names_the_file_is_refused_with_a_hint(tmp_path):
    path = _write(tmp_path / "renamed.jsonl", RENAMED)
    with pytest.raises(DataError, match=r"renamed.jsonl: missing columns: .*--columns") as e:
        load_pairs(path)
    assert "\n" not in str(e.value)


def test_several_negatives_keep_the_order_given(tmp_path):
    rows = [{"query": f"q{i}", "doc": f"d{i}", "n_a": f"a{i}", "n_b": f"b{i}"} for i in range(3)]
    path = _write(tmp_path / "negs.jsonl", rows)
    table = _table(load_pairs(path, "positive=doc,negative=n_b,negative=n_a"))
    assert table["negative_1"] == ["b0", "b1", "b2"] and table["negative_2"] == ["a0", "a1", "a2"]
    assert table["anchor"] == ["q0", "q1", "q2"]  # an unnamed role keeps its usual names


def test_a_named_role_leaves_its_usual_names_as_ordinary_columns(tmp_path):
    # "query" and "question" both hold text: two aliases of the anchor would be refused, but with the
    # anchor named, "query" is just another column; and a usual anchor name may serve as the positive.
    rows = [{"question": f"Q{i}", "query": f"log {i}", "positive": f"P{i}", "negative": f"N{i}"} for i in range(3)]
    path = _write(tmp_path / "aliases.jsonl", rows)
    with pytest.raises(DataError, match="both 'query' and 'question'"):
        load_pairs(path)
    table = _table(load_pairs(path, "anchor=question"))
    assert table["anchor"] == ["Q0", "Q1", "Q2"] and table["positive"] == ["P0", "P1", "P2"]
    swapped = _table(load_pairs(path, "anchor=positive,positive=query,negative=negative"))
    assert swapped["anchor"] == ["P0", "P1", "P2"] and swapped["positive"] == ["log 0", "log 1", "log 2"]
    # a usual anchor name given to the positive is no longer a candidate anchor: "question" alone is
    aside = _table(load_pairs(path, "positive=query,negative=positive"))
    assert aside["anchor"] == ["Q0", "Q1", "Q2"] and aside["positive"] == ["log 0", "log 1", "log 2"]
    assert aside["negative_1"] == ["P0", "P1", "P2"] and "negative_2" not in aside


def test_a_named_negative_role_drops_the_usual_negatives(tmp_path):
    rows = [{"anchor": f"a{i}", "positive": f"p{i}", "negative": f"usual{i}", "mined": f"m{i}"} for i in range(3)]
    table = _table(load_pairs(_write(tmp_path / "n.jsonl", rows), "negative=mined"))
    assert table["negative_1"] == ["m0", "m1", "m2"] and "negative_2" not in table


def test_a_single_json_record_is_found_by_its_named_columns(tmp_path):
    path = tmp_path / "one.json"
    path.write_text(json.dumps({"q": "a query", "document": "a document"}), encoding="utf-8")
    assert _table(load_pairs(path, "anchor=q,positive=document")) == {"anchor": ["a query"], "positive": ["a document"]}


@pytest.mark.parametrize("columns, message", [
    ("anchor=q,postive=document", "unknown role 'postive'"),
    ("anchor=q,anchor=document", "anchor named twice"),
    ("anchor=q,positive=q", "column 'q' is given two roles"),
    ("anchor q", "expected ROLE=COLUMN pairs"),
    ("anchor=,positive=document", "expected ROLE=COLUMN pairs"),
    ({"anchor": 3}, "anchor: expected a column name"),
    (["anchor=q"], "expected a mapping"),
])
def test_wrong_roles_are_one_line_errors(tmp_path, columns, message):
    path = _write(tmp_path / "renamed.jsonl", RENAMED)
    with pytest.raises(DataError, match=message) as e:
        load_pairs(path, columns)
    assert "\n" not in str(e.value)


def test_a_named_column_the_file_lacks_names_the_file(tmp_path):
    path = _write(tmp_path / "renamed.csv", RENAMED)
    with pytest.raises(DataError, match=r"renamed.csv: no column 'passage' \(named for the positive\); found: q, "):
        load_pairs(path, "anchor=q,positive=passage")
    with pytest.raises(DataError, match=r"no column 'mined' \(named for the negative\)"):
        load_pairs(path, "anchor=q,positive=document,negative=mined")


def test_column_roles_parses_and_normalises():
    assert column_roles(None) == {} and column_roles("") == {}
    assert column_roles(" anchor = q , negative=a,negative=b") == {"anchor": ("q",), "negative": ("a", "b")}


def test_data_sets_take_the_run_columns_or_their_own():
    sources = data_sources({"a": "a.jsonl", "b": {"path": "b.jsonl", "columns": {"anchor": "x"}}}, None, ROLES)
    assert [s.columns for s in sources] == [ROLES, {"anchor": "x"}]
    assert data_sources("c.jsonl", None, ROLES)[0].columns == ROLES


def _renamed_pairs(path: Path, rows: int, seed: int) -> Path:
    from embedtune.data import build_stdlib_pairs

    pairs = build_stdlib_pairs(max_pairs=rows, seed=seed)
    return _write(path, [{"id": i, "query": p["anchor"], "document": p["positive"]} for i, p in enumerate(pairs)])


def test_cli_train_eval_and_mine_read_named_columns(tmp_path, monkeypatch):
    """`--columns` reaches the training data, --eval-data, the saved config (a replay reads it) and the
    eval and mine commands; a wrong one is one line and writes nothing."""
    import yaml
    from typer.testing import CliRunner

    from embedtune.cli import app

    runner = CliRunner()
    monkeypatch.chdir(tmp_path)  # config.yaml names the data relative to the folder the run started in
    data = _renamed_pairs(tmp_path / "pairs.csv", 48, seed=6)
    held_out = _renamed_pairs(tmp_path / "held_out.jsonl", 16, seed=7)
    out = tmp_path / "run"
    common = ["--batch-size", "8", "--max-seq-length", "32", "--max-steps", "2"]
    result = runner.invoke(app, ["train", str(data), "--output", str(out), *common, "--eval-data", str(held_out),
                                 "--evals", "0", "--columns", "positive=document"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_pairs"] == 48 and "ndcg@10" in metrics["final"]
    assert yaml.safe_load((out / "config.yaml").read_text())["columns"] == "positive=document"

    replay = runner.invoke(app, ["train", "--config", str(out / "config.yaml"), "--output", str(tmp_path / "again")])
    assert replay.exit_code == 0, replay.output

    scored = runner.invoke(app, ["eval", str(out / "model"), str(held_out), "--max-seq-length", "32",
                                 "--columns", "positive=document"])
    assert scored.exit_code == 0 and "16 queries" in " ".join(scored.output.split()), scored.output

    mined = tmp_path / "mined.jsonl"
    result = runner.invoke(app, ["mine", str(data), "--output", str(mined), "--num-negatives", "1", "--range", "1:20",
                                 "--max-seq-length", "32", "--columns", "positive=document"])
    assert result.exit_code == 0, result.output
    assert load_pairs(mined).num_negatives == 1

    bad = runner.invoke(app, ["train", str(data), "--output", str(tmp_path / "bad"), *common, "--columns", "positive"])
    assert bad.exit_code != 0 and "expected ROLE=COLUMN" in " ".join(bad.output.split()) and "Traceback" not in bad.output
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.partial").exists()
    missing = runner.invoke(app, ["train", str(data), "--output", str(tmp_path / "bad"), *common])
    assert missing.exit_code != 0 and "--columns" in " ".join(missing.output.split())
    assert not (tmp_path / "bad").exists()


def test_each_data_set_of_a_run_reads_its_own_column_names(tmp_path):
    from embedtune.run_data import load_parts
    from embedtune.train import TrainConfig

    a = _write(tmp_path / "a.jsonl", RENAMED)
    b = _write(tmp_path / "b.jsonl", [{"question": r["anchor"], "doc": r["positive"]} for r in USUAL])
    config = TrainConfig(data={"a": str(a), "b": {"path": str(b), "columns": {"positive": "doc"}}},
                         columns="anchor=q,positive=document")
    parts = load_parts(config)
    assert [p.name for p in parts] == ["a", "b"]
    for part in parts:
        assert _table(part.loaded)["anchor"] == [r["anchor"] for r in USUAL]
        assert _table(part.loaded)["positive"] == [r["positive"] for r in USUAL]


@pytest.mark.parametrize("delimiter, suffix", [("\t", ".tsv"), (",", ".csv")])
def test_roles_by_position_read_a_file_without_a_header_row(tmp_path, delimiter, suffix):
    # MS MARCO's triples: query, positive, negative, and no header; the first row is data
    path = tmp_path / f"triples{suffix}"
    path.write_text(delimiter.join(["how to sort", "sorted(xs)", "len(xs)"]) + "\n"
                    + delimiter.join(['split "words"', '"two\nlines"', "pass"]) + "\n", encoding="utf-8")
    table = _table(load_pairs(path, "anchor=1,positive=2,negative=3"))
    assert table == {"anchor": ["how to sort", 'split "words"'], "positive": ["sorted(xs)", "two\nlines"],
                     "negative_1": ["len(xs)", "pass"]}


@pytest.mark.parametrize("header", ["anchor,positive", "Query,Answer,extra", "text1,text2"])
def test_roles_by_position_refuse_a_header_row(tmp_path, header):
    """A header read by position would train as a pair: refused in one line naming the file's first line."""
    path = tmp_path / "pairs.csv"
    path.write_text(header + "\n" + "how to sort,sorted(xs),x\nsplit words,s.split(),y\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"pairs.csv:1: the first row \(.*\) is a header, but --columns names the "
                                        "columns by position"):
        load_pairs(path, "anchor=1,positive=2")


def test_roles_by_position_name_lines_as_the_file_has_them(tmp_path):
    path = tmp_path / "scored.tsv"
    path.write_text('a1\t"p\n1"\t0.5\na2\tp2\tnot a number\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"scored.tsv:3: column '3' holds text"):
        load_pairs(path, "anchor=1,positive=2,score=3")


def test_roles_by_position_are_all_by_position_and_name_what_is_missing(tmp_path):
    with pytest.raises(DataError, match="name every role by position .* or every role by name"):
        column_roles("anchor=1,positive=document")
    with pytest.raises(DataError, match=r"renamed.jsonl: no column '1' \(named for the anchor\); found: q, document"):
        load_pairs(_write(tmp_path / "renamed.jsonl", RENAMED), "anchor=1,positive=2")
    with pytest.raises(DataError, match=r"no column '4' \(named for the positive\); found: 1, 2, 3"):
        load_pairs(_write(tmp_path / "renamed.csv", [{k: r[k] for k in ("q", "document", "hard")} for r in RENAMED]),
                   "anchor=1,positive=4")


def test_json_arrays_read_by_position(tmp_path):
    """sentence-transformers' training data collection stores pairs as JSON arrays, gzipped."""
    import gzip

    path = tmp_path / "gooaq_pairs.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write('["what is a list", "a sequence"]\n["sort?", "sorted(xs)", "len(xs)"]\n["q3", "p3", "n3"]\n')
    loaded = load_pairs(path)
    assert _table(loaded) == {"anchor": ["sort?", "q3"], "positive": ["sorted(xs)", "p3"], "negative_1": ["len(xs)", "n3"]}
    assert loaded.skipped_few_negatives == 1 and loaded.first_few_negatives == "line 1"
    as_document = tmp_path / "pairs.json"
    as_document.write_text(json.dumps([["a1", "p1"], ["a2", "p2"]]), encoding="utf-8")
    assert _table(load_pairs(as_document)) == {"anchor": ["a1", "a2"], "positive": ["p1", "p2"]}
    swapped = _table(load_pairs(as_document, "anchor=2,positive=1"))
    assert swapped == {"anchor": ["p1", "p2"], "positive": ["a1", "a2"]}
    lines_named_json = tmp_path / "lines.json"
    lines_named_json.write_text('["a1", "p1"]\n["a2", "p2"]\n', encoding="utf-8")
    assert _table(load_pairs(lines_named_json)) == {"anchor": ["a1", "a2"], "positive": ["p1", "p2"]}
