"""Which files hold data, by their names: the one table of formats and compressions that the readers
(`readers`) and the hub fetch (`hub`) share."""

from __future__ import annotations

from pathlib import Path

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}
# Text formats may come compressed (pairs.jsonl.gz): the readers read a decompressed temporary copy
COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".xz": "lzma"}
# every file name ending a data file may have: pairs.parquet, pairs.jsonl, pairs.jsonl.gz, ...
DATA_SUFFIXES = tuple(FORMATS) + tuple(text + packed for text, kind in FORMATS.items() if kind != "parquet"
                                       for packed in COMPRESSIONS)


def file_format(p: Path) -> tuple[str | None, str | None]:
    """A data file's format and compression from its name: pairs.jsonl -> ("jsonl", None), pairs.csv.gz ->
    ("csv", ".gz"); (None, ...) for a name embedtune does not read (Parquet compresses itself)."""
    suffixes = [s.lower() for s in p.suffixes]
    compression = suffixes[-1] if suffixes and suffixes[-1] in COMPRESSIONS else None
    inner = suffixes[-2:-1] if compression else suffixes[-1:]
    kind = FORMATS.get(inner[0]) if inner else None
    return (None if kind == "parquet" and compression else kind), compression
