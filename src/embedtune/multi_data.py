"""Several data sets in one run: `embedtune train a.jsonl b.parquet ...`, or `data:` in the YAML config
as a list of files or a name -> file mapping (a file, or {path: FILE, loss: NAME, columns: ROLES}).

Each data set keeps its own columns and loss (`loss_choice`), and the trainer draws every batch from
one data set at a time (sentence-transformers' multi-dataset batch sampler over a `DatasetDict`, one
NO_DUPLICATES sampler per data set): in-batch negatives never mix data sets. `proportional` (the
default) draws each data set's batches in proportion to its size, every batch of every data set once
per epoch; `round-robin` takes one batch of each in turn and ends the epoch when the smallest runs out.
This module only resolves the sources and counts batches; it imports no torch.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import EmbedtuneError

SAMPLERS = ("proportional", "round-robin")
_SOURCE_KEYS = ("path", "loss", "columns")


@dataclass(frozen=True)
class DataSource:
    """One data set of the run: its name (the `DatasetDict` key and the summary's label), its file, the
    loss it asked for (None: chosen from its columns) and its column names by role (None: the usual
    names; `data.readers.column_roles`)."""

    name: str
    path: str
    loss: str | None = None
    columns: str | dict | None = None


def data_sources(data: Any, loss: str | None = None, columns: str | dict | None = None) -> list[DataSource]:
    """The run's data sets from `TrainConfig.data`: one path, a list of paths, or a mapping of name ->
    path or {path, loss, columns}. `loss` (--loss) and `columns` (--columns) apply to those that name
    none. Names come from the mapping, else from the file names (made unique: a, a_2)."""
    if data is None or data == [] or data == {}:
        raise EmbedtuneError("no training data: give one or more data files (or `data:` in --config)")
    if isinstance(data, (str, os.PathLike)):
        return [DataSource(_name(data, set()), os.fspath(data), loss, columns)]
    if isinstance(data, (list, tuple)):
        taken: set[str] = set()
        sources = []
        for item in data:
            if not isinstance(item, (str, os.PathLike)):
                raise EmbedtuneError(f"data: expected file paths, got {item!r}")
            name = _name(item, taken)
            taken.add(name)
            sources.append(DataSource(name, os.fspath(item), loss, columns))
        return sources
    if isinstance(data, dict):
        sources = []
        for name, value in data.items():
            if not isinstance(name, str) or not name.strip():
                raise EmbedtuneError(f"data: data set names must be text, got {name!r}")
            if isinstance(value, (str, os.PathLike)):
                sources.append(DataSource(name, os.fspath(value), loss, columns))
                continue
            if not isinstance(value, dict) or not isinstance(value.get("path"), str):
                raise EmbedtuneError(f"data: {name}: expected a file path or {{path: FILE, loss: NAME}}, got {value!r}")
            unknown = sorted(set(value) - set(_SOURCE_KEYS))
            if unknown:
                raise EmbedtuneError(f"data: {name}: unknown key {unknown[0]!r}; a data set takes path, loss and columns")
            given = value.get("loss")
            if given is not None and not isinstance(given, str):
                raise EmbedtuneError(f"data: {name}: loss must be a name, got {given!r}")
            own = value.get("columns")
            sources.append(DataSource(name, value["path"], given or loss, columns if own is None else own))
        return sources
    raise EmbedtuneError(f"data: expected a file, a list of files or a mapping of name: file, got {data!r}")


def _name(path, taken: set[str]) -> str:
    """A data set's name from its file name: the stem, with characters other than letters, digits, '-'
    and '_' replaced; a_2, a_3 for repeats."""
    stem = re.sub(r"[^\w-]+", "_", Path(os.fspath(path)).stem).strip("_") or "data"
    name, n = stem, 1
    while name in taken:
        n += 1
        name = f"{stem}_{n}"
    return name


def sampler_name(choice: str) -> str:
    """sentence-transformers' `multi_dataset_batch_sampler` value for `--multi-dataset`."""
    key = choice.strip().lower().replace("_", "-")
    if key not in SAMPLERS:
        raise EmbedtuneError(f"--multi-dataset {choice!r}: not one of {', '.join(SAMPLERS)}")
    return key.replace("-", "_")


def batches_per_epoch(sizes: list[int], batch_size: int, sampler: str) -> int:
    """Batches the multi-dataset sampler yields in one epoch over data sets of `sizes` rows (drop_last):
    every full batch of each (proportional), or one of each in turn until the smallest runs out
    (round-robin)."""
    full = [size // batch_size for size in sizes]
    if sampler_name(sampler) == "round_robin":
        return min(full) * len(full)
    return sum(full)


def describe(parts: list[dict]) -> list[str]:
    """One summary line per data set: name, file, rows for training and held out, its loss."""
    lines = []
    for part in parts:
        line = (f"{part['name']} ({part['path']}): {part['train_rows']} training rows, {part['eval_rows']} held out, "
                f"loss {part['loss']}")
        lines.append(line)
    return lines
