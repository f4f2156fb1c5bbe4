"""Training data: reading user pair files into a canonical dataset, and a built-in real dataset."""

from embedtune.data.readers import (
    ANCHOR_ALIASES,
    NEGATIVE_ALIASES,
    POSITIVE_ALIASES,
    LoadedPairs,
    column,
    load_pairs,
    train_eval_split,
)
from embedtune.data.stdlib import build_stdlib_pairs, write_jsonl

__all__ = [
    "ANCHOR_ALIASES",
    "NEGATIVE_ALIASES",
    "POSITIVE_ALIASES",
    "LoadedPairs",
    "build_stdlib_pairs",
    "column",
    "load_pairs",
    "train_eval_split",
    "write_jsonl",
]
