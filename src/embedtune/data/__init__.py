"""Training data: reading user pair files into a canonical dataset, and a built-in real dataset;
BEIR-format retrieval benchmarks for evaluation."""

from embedtune.data.beir import LoadedBeir, is_beir_folder, read_beir
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
    "LoadedBeir",
    "LoadedPairs",
    "build_stdlib_pairs",
    "column",
    "is_beir_folder",
    "load_pairs",
    "read_beir",
    "train_eval_split",
    "write_jsonl",
]
