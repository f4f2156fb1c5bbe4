"""A folder of data files as one data set: a dataset repository as the hub keeps it, an export's shards."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedtune.data import load_pairs
from embedtune.errors import DataError


def _rows(prefix: str, n: int, negatives: int = 0) -> list[dict]:
    return [{"anchor": f"{prefix}a{i}", "positive": f"{prefix}p{i}",
             **{f"negative_{j}": f"{prefix}n{i}.{j}" for j in range(1, negatives + 1)}} for i in range(n)]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _parquet(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _anchors(loaded) -> list[str]:
    return loaded.dataset.with_format("arrow")["anchor"].to_pylist()


def _error(path, match: str) -> str:
    with pytest.raises(DataError, match=match) as e:
        load_pairs(path)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_a_hub_repository_reads_its_train_shards_in_order(tmp_path):
    repo = tmp_path / "repo"
    _parquet(repo / "data" / "train-00001-of-00002.parquet", _rows("b", 3))
    _parquet(repo / "data" / "train-00000-of-00002.parquet", _rows("a", 2))
    _parquet(repo / "data" / "test-00000-of-00001.parquet", _rows("t", 4))
    (repo / "README.md").write_text("---\nconfigs: []\n---\n", encoding="utf-8")
    (repo / ".gitattributes").write_text("*.parquet filter=lfs\n", encoding="utf-8")
    (repo / ".cache" / "huggingface").mkdir(parents=True)
    _jsonl(repo / ".cache" / "huggingface" / "train.jsonl", _rows("hidden", 1))
    (repo / "dataset_infos.json").write_text("{}", encoding="utf-8")
    loaded = load_pairs(repo)
    assert _anchors(loaded) == ["aa0", "aa1", "ba0", "ba1", "ba2"]
    assert loaded.source == str(repo)


def test_an_exports_shards_are_all_read_and_an_empty_one_is_skipped(tmp_path):
    out = tmp_path / "export"
    _jsonl(out / "part-00000.json", _rows("x", 2))  # JSON lines named .json, as Spark writes them
    _jsonl(out / "part-00001.json", _rows("y", 2))
    (out / "part-00002.json").write_text("", encoding="utf-8")
    (out / "_SUCCESS").write_text("", encoding="utf-8")
    assert _anchors(load_pairs(out)) == ["xa0", "xa1", "ya0", "ya1"]


def test_split_folders_keep_the_training_one(tmp_path):
    _jsonl(tmp_path / "d" / "train" / "a.jsonl", _rows("tr", 2))
    _jsonl(tmp_path / "d" / "validation" / "a.jsonl", _rows("va", 2))
    _jsonl(tmp_path / "d" / "mnli_dev.jsonl", _rows("dv", 2))
    assert _anchors(load_pairs(tmp_path / "d")) == ["tra0", "tra1"]


def test_several_subsets_are_refused_and_one_subsets_folder_reads(tmp_path):
    _parquet(tmp_path / "nli" / "pair" / "train-00000-of-00001.parquet", _rows("p", 2))
    _parquet(tmp_path / "nli" / "triplet" / "train-00000-of-00001.parquet", _rows("t", 2, negatives=1))
    _error(tmp_path / "nli", r"nli: training files of several subsets \(pair, triplet\): give the folder of one")
    assert load_pairs(tmp_path / "nli" / "triplet").num_negatives == 1


def test_a_folder_without_training_files_or_of_two_formats_is_refused(tmp_path):
    _jsonl(tmp_path / "eval_only" / "test.jsonl", _rows("t", 2))
    _jsonl(tmp_path / "eval_only" / "dev.jsonl", _rows("d", 2))
    _error(tmp_path / "eval_only", r"eval_only: no training files: its files' names give the splits dev, test, not train")
    _jsonl(tmp_path / "mixed" / "train-0.jsonl", _rows("a", 2))
    _parquet(tmp_path / "mixed" / "train-1.parquet", _rows("b", 2))
    _error(tmp_path / "mixed", r"mixed: training files of several formats \(jsonl, parquet\): keep one")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "part-0.jsonl").write_text("", encoding="utf-8")
    _error(tmp_path / "empty", r"empty: its data files hold no rows")


def test_a_bad_row_names_its_own_file_and_line(tmp_path):
    _jsonl(tmp_path / "s" / "part-0.jsonl", _rows("a", 3))
    bad = _jsonl(tmp_path / "s" / "part-1.jsonl", _rows("b", 2))
    bad.write_text(bad.read_text(encoding="utf-8") + '{"anchor": 3, "positive": "p"}\n', encoding="utf-8")
    _error(tmp_path / "s", rf"^{bad}:3: column 'anchor' holds a number \(3\), expected text$")


def test_rows_with_fewer_negatives_are_placed_in_their_file(tmp_path):
    _jsonl(tmp_path / "n" / "part-0.jsonl", _rows("a", 4, negatives=2))
    few = _jsonl(tmp_path / "n" / "part-1.jsonl", _rows("b", 1, negatives=2) + _rows("c", 1, negatives=1))
    loaded = load_pairs(tmp_path / "n")
    assert loaded.num_negatives == 2 and loaded.skipped_few_negatives == 1
    assert loaded.first_few_negatives == f"line 2 of {few}"
    single = load_pairs(few)  # one file: no file in the place, as before (a tie keeps the larger count)
    assert single.num_negatives == 2 and single.first_few_negatives == "line 2"


def test_an_earlier_csv_files_rows_are_placed_by_their_own_lines(tmp_path):
    first = tmp_path / "c" / "part-0.csv"
    first.parent.mkdir()
    first.write_text('anchor,positive,negative_1,negative_2\na0,"two\nlines",n0,m0\na1,p1,n1,\n', encoding="utf-8")
    (tmp_path / "c" / "part-1.csv").write_text(
        "anchor,positive,negative_1,negative_2\n" + "".join(f"b{i},q{i},x{i},y{i}\n" for i in range(3)), encoding="utf-8")
    loaded = load_pairs(tmp_path / "c")
    assert loaded.skipped_few_negatives == 1 and loaded.first_few_negatives == f"line 4 of {first}"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A hub cache holding dataset acme/nli at one commit (pair/ and triplet/ subsets), offline."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    snapshot = cache / "datasets--acme--nli" / "snapshots" / "0123abcd"
    _parquet(snapshot / "pair" / "train-00000-of-00001.parquet", _rows("p", 3))
    _parquet(snapshot / "pair" / "test-00000-of-00001.parquet", _rows("pt", 2))
    _parquet(snapshot / "triplet" / "train-00000-of-00001.parquet", _rows("t", 2, negatives=1))
    (snapshot / "nli.py").write_text("raise SystemExit('a loading script must never run')\n", encoding="utf-8")
    (cache / "datasets--acme--nli" / "refs").mkdir()
    (cache / "datasets--acme--nli" / "refs" / "main").write_text("0123abcd", encoding="utf-8")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # no local folder named acme/...
    return cache


def test_a_hub_dataset_id_reads_its_data_files(hub_cache):
    assert _anchors(load_pairs("acme/nli/pair")) == ["pa0", "pa1", "pa2"]
    triplets = load_pairs("acme/nli/triplet")
    assert triplets.num_negatives == 1 and triplets.source == "acme/nli/triplet"
    _error("acme/nli", r"^acme/nli: training files of several subsets \(pair, triplet\): give the folder of one$")
    _error("acme/nli/pairs", r"^acme/nli/pairs: the hub dataset acme/nli has no data files under pairs$")
    _error("acme/other", r"^acme/other: no such file or directory, nor a dataset on the Hugging Face hub")


def test_a_mistyped_local_file_is_not_looked_up_on_the_hub(hub_cache):
    _error("data/pairs.jsonl", r"^data/pairs.jsonl: no such file or directory$")
    _error("./acme/nli", r"^./acme/nli: no such file or directory$")


# ------------------------------------------------------------------------------ compressed files


def _compress(path: Path, suffix: str) -> Path:
    import bz2
    import gzip
    import lzma

    packed = path.with_name(path.name + suffix)
    opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}[suffix]
    with opener(packed, "wb") as f:
        f.write(path.read_bytes())
    path.unlink()
    return packed


def _temp_copies() -> set[str]:
    """The readers' decompressed copies in the temp folder (only theirs: tests running beside this one
    make temp folders of their own there)."""
    import tempfile

    return {p.name for p in Path(tempfile.gettempdir()).glob("embedtune-decompressed-*")}


@pytest.mark.parametrize("suffix", [".gz", ".bz2", ".xz"])
@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "tsv"])
def test_compressed_files_read_as_the_plain_ones(tmp_path, fmt, suffix):
    import csv as csv_module

    rows = _rows("z", 3, negatives=1)
    plain = tmp_path / f"pairs.{fmt}"
    if fmt in ("csv", "tsv"):
        with plain.open("w", encoding="utf-8", newline="") as f:
            writer = csv_module.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t" if fmt == "tsv" else ",")
            writer.writeheader()
            writer.writerows(rows)
    elif fmt == "json":
        plain.write_text(json.dumps(rows), encoding="utf-8")
    else:
        _jsonl(plain, rows)
    expected = load_pairs(plain).dataset.to_dict()
    before = _temp_copies()
    assert load_pairs(_compress(plain, suffix)).dataset.to_dict() == expected
    assert _temp_copies() == before, "the decompressed copy is removed"


def test_a_compressed_files_errors_name_it_and_its_line(tmp_path):
    path = _jsonl(tmp_path / "pairs.jsonl", _rows("a", 2))
    path.write_text(path.read_text(encoding="utf-8") + '{"anchor": "x", "positive": \n', encoding="utf-8")
    packed = _compress(path, ".gz")
    before = _temp_copies()
    _error(packed, rf"^{packed}:3: invalid JSON")
    assert _temp_copies() == before
    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(b"not gzip at all")
    _error(broken, rf"^{broken}: cannot decompress \(gzip\): ")
    empty = _compress(_jsonl(tmp_path / "empty.jsonl", []), ".gz")
    _error(empty, rf"^{empty}: file is empty$")
    _error(tmp_path / "x.parquet.gz", r"no such file")
    (tmp_path / "pairs.parquet.gz").write_bytes(b"")
    _error(tmp_path / "pairs.parquet.gz", r"unsupported file format '.parquet.gz'")


def test_a_folder_of_compressed_shards(tmp_path):
    _compress(_jsonl(tmp_path / "s" / "train-0.jsonl", _rows("a", 2)), ".gz")
    _jsonl(tmp_path / "s" / "train-1.jsonl", _rows("b", 1))  # plain and compressed JSON lines: one format
    _compress(_jsonl(tmp_path / "s" / "train-2.jsonl", []), ".gz")
    assert _anchors(load_pairs(tmp_path / "s")) == ["aa0", "aa1", "ba0"]


def test_a_hub_datasets_digest_follows_its_snapshot(hub_cache):
    """--resume compares the data's digest: for a hub id, that of the data files the id names now."""
    from embedtune.checkpoint_format import data_digest

    before = data_digest("acme/nli/pair")
    snapshot = hub_cache / "datasets--acme--nli" / "snapshots" / "0123abcd"
    (snapshot / "pair" / "README.md").write_text("a card another tool fetched\n", encoding="utf-8")
    assert before is not None and data_digest("acme/nli/pair") == before
    newer = hub_cache / "datasets--acme--nli" / "snapshots" / "4567ef01"
    _parquet(newer / "pair" / "train-00000-of-00001.parquet", _rows("new", 3))
    (hub_cache / "datasets--acme--nli" / "refs" / "main").write_text("4567ef01", encoding="utf-8")
    assert data_digest("acme/nli/pair") != before
