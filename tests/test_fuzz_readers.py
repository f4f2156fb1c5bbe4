"""A short, seeded run of benchmarks/fuzz_readers.py (the same generators as the long fuzz), and the
inputs the long fuzz found, kept as fixed reproducers."""

from __future__ import annotations

import importlib.util
import io
import struct
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedtune.data import load_pairs
from embedtune.errors import DataError

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "fuzz_readers.py"


@pytest.fixture(scope="module")
def fuzz_readers():
    spec = importlib.util.spec_from_file_location("fuzz_readers", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_readers"] = module  # dataclasses look their module up while the file executes
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("fuzz_readers", None)


def test_seeded_fuzz_finds_no_crash(fuzz_readers):
    summary = fuzz_readers.fuzz(examples=200, first_seed=0, batch=100)
    assert summary.crashes == {}, fuzz_readers.report(summary)
    assert summary.inputs == 200
    # Not vacuous: the generators reach valid datasets, several error kinds and every main format.
    assert summary.valid >= 5, fuzz_readers.report(summary)
    assert len(summary.errors) >= 6, fuzz_readers.report(summary)
    assert {".jsonl", ".json", ".csv", ".parquet"} <= set(summary.by_suffix), summary.by_suffix


def test_fuzz_checker_reports_a_crash(fuzz_readers, tmp_path, monkeypatch):
    """The harness must catch what it is for: a reader raising something other than a DataError."""
    import embedtune.data

    def broken(path):
        raise KeyError("boom")

    monkeypatch.setattr(embedtune.data, "load_pairs", broken)
    with pytest.raises(fuzz_readers.Crash, match="KeyError"):
        fuzz_readers.check_input(str(tmp_path), ".jsonl", b"{}")


def test_fuzz_checker_rejects_an_invalid_dataset(fuzz_readers, tmp_path, monkeypatch):
    import datasets

    import embedtune.data
    from embedtune.data import LoadedPairs

    def blank_rows(path):
        return LoadedPairs(datasets.Dataset.from_dict({"anchor": ["a"], "positive": [" "]}), 0, path, 0)

    monkeypatch.setattr(embedtune.data, "load_pairs", blank_rows)
    with pytest.raises(fuzz_readers.Crash, match="bad value"):
        fuzz_readers.check_input(str(tmp_path), ".jsonl", b"{}")


# ------------------------------------------------------------------------- reproducers from the long fuzz


def _parquet_with_garbage_footer() -> bytes:
    """A Parquet file whose footer metadata is overwritten: pyarrow raises an errno-less OSError."""
    buffer = io.BytesIO()
    pq.write_table(pa.table({"anchor": ["a"], "positive": ["p"]}), buffer)
    data = bytearray(buffer.getvalue())
    length = struct.unpack("<I", data[-8:-4])[0]
    data[len(data) - 8 - length : len(data) - 8] = b"\xff" * length
    return bytes(data)


def test_corrupt_parquet_metadata_is_an_invalid_parquet_error(tmp_path):
    path = tmp_path / "corrupt.parquet"
    path.write_bytes(_parquet_with_garbage_footer())
    with pytest.raises(DataError) as e:
        load_pairs(path)
    assert str(e.value).startswith(f"{path}: invalid Parquet file: ")  # was "cannot read: Couldn't deserialize"
    assert "\n" not in str(e.value)


def _parquet_with_column_names(*names: str) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.table({name: ["x"] for name in names}), buffer)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "name, content, escaped",
    [
        # pyarrow quotes the offending row: a NUL reached the message
        ("nul.csv", b"anchor,positive,x\n\x00\n", "\\x00"),
        # a header of NUL + BOM (U+FEFF is a format character, not printable)
        ("bom.csv", b"\x00\xef\xbb\xbf0\r\n0\r\n", "\\ufeff"),
        # U+0085 and U+2028 split a message into lines for str.splitlines() and some terminals
        ("nel.parquet", _parquet_with_column_names("H\x03}", "\xf3\x08\x85", "negative"), "\\x85"),
        ("ls.json", '{"a\\u2028": [1], "b": [2]}'.encode(), "\\u2028"),
        ("esc.jsonl", '{"x\\u001b[2J": 1}\n'.encode(), "\\u001b[2J"),
    ],
)
def test_error_messages_escape_control_characters_from_the_file(tmp_path, name, content, escaped):
    """Found by the fuzz (before the fix): file bytes quoted into a message reached the terminal raw."""
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as e:
        load_pairs(path)
    message = str(e.value)
    assert message.startswith(str(path)) and message.isprintable() and len(message.splitlines()) == 1
    assert escaped in message, message


def test_cli_prints_file_content_in_errors_verbatim_not_as_markup(tmp_path):
    """A column named like rich markup ("[/x]") used to crash the CLI's error printer with a traceback."""
    from typer.testing import CliRunner

    from embedtune.cli import app

    data = tmp_path / "markup.csv"
    data.write_text("[/x],[bold]y\nq,p\n", encoding="utf-8")
    result = CliRunner().invoke(app, ["train", str(data), "--output", str(tmp_path / "out")])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "found: [/x], [bold]y" in " ".join(result.output.split())
