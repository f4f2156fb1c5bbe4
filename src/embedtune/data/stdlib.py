"""A real, offline code-search dataset mined from the installed Python standard library.

Each pair is (first paragraph of a public function's docstring, that function's source without the
docstring). It needs no download, so tests, demos and benchmarks get genuine natural-language -> code
pairs on any machine that runs Python.
"""

from __future__ import annotations

import ast
import functools
import json
import os
import random
import re
import sysconfig
import textwrap
import tokenize
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

from embedtune.errors import DataError

# Folders that hold tests, GUI/demo code, vendored wheels or generated tables: noisy or not "library code".
_SKIP_DIRS = frozenset(
    {
        "site-packages",
        "dist-packages",
        "test",
        "tests",
        "idlelib",
        "lib2to3",
        "tkinter",
        "turtledemo",
        "ensurepip",
        "__pycache__",
        "encodings",
    }
)
_MIN_ANCHOR_WORDS = 4
_MIN_CODE_LINES = 2
_MAX_POSITIVE_CHARS = 4000
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")

_FunctionNode = ast.FunctionDef | ast.AsyncFunctionDef


def build_stdlib_pairs(max_pairs: int | None = None, seed: int = 0) -> list[dict]:
    """Return ``{"anchor": docstring summary, "positive": code}`` pairs from the standard library.

    All pairs (deduplicated by anchor and by positive, in sorted-file order) unless ``max_pairs`` is
    given, in which case a ``random.Random(seed)`` sample of that size is returned in the same order.
    The walk is memoized, so repeated calls only copy the cached pairs.
    """
    if max_pairs is not None and max_pairs < 1:
        raise DataError(f"max_pairs must be at least 1, got {max_pairs}")
    root = sysconfig.get_paths()["stdlib"]
    pairs = _stdlib_pairs(root)
    if not pairs:
        raise DataError(f"{root}: found no documented public functions in the standard library")
    if max_pairs is not None and max_pairs < len(pairs):
        keep = sorted(random.Random(seed).sample(range(len(pairs)), max_pairs))
        pairs = tuple(pairs[i] for i in keep)
    # Fresh dicts each call so a caller that mutates rows can't corrupt the cache.
    return [{"anchor": anchor, "positive": positive} for anchor, positive in pairs]


def write_jsonl(rows: Iterable[dict], path: str | os.PathLike) -> Path:
    """Write ``rows`` as UTF-8 JSON lines (non-ASCII kept readable), creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False))
            f.write("\n")
    return path


@functools.lru_cache(maxsize=4)
def _stdlib_pairs(root: str) -> tuple[tuple[str, str], ...]:
    """Walk ``root`` once per process; a tuple keeps the cached value immutable."""
    seen_anchors: set[str] = set()
    seen_positives: set[str] = set()
    pairs: list[tuple[str, str]] = []
    for file in _python_files(Path(root)):
        for anchor, positive in _file_pairs(file):
            if anchor in seen_anchors or positive in seen_positives:
                continue
            seen_anchors.add(anchor)
            seen_positives.add(positive)
            pairs.append((anchor, positive))
    return tuple(pairs)


def _python_files(root: Path) -> Iterator[Path]:
    """Yield ``.py`` files under ``root`` in a stable (sorted) order, pruning skipped folders."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in sorted(filenames):
            if name.endswith(".py"):
                yield Path(dirpath, name)


def _file_pairs(file: Path) -> Iterator[tuple[str, str]]:
    """Yield (anchor, positive) for each usable public function or public-class method in ``file``."""
    try:
        # tokenize.open honours PEP 263 coding cookies and translates newlines to "\n", so
        # splitting on "\n" lines up exactly with ast line numbers.
        with tokenize.open(file) as f:
            source = f.read()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # old modules raise SyntaxWarning for bad escapes
            tree = ast.parse(source, filename=str(file))
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return
    lines = source.split("\n")
    for node in _public_functions(tree):
        pair = _pair_for(node, lines)
        if pair is not None:
            yield pair


def _public_functions(tree: ast.Module) -> Iterator[_FunctionNode]:
    """Module-level public functions, then public methods of module-level public classes."""
    for node in tree.body:
        if isinstance(node, _FunctionNode) and not node.name.startswith("_"):
            yield node
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            for item in node.body:
                if isinstance(item, _FunctionNode) and not item.name.startswith("_"):
                    yield item


def _pair_for(node: _FunctionNode, lines: list[str]) -> tuple[str, str] | None:
    """Build one pair, or None when the docstring is too thin or can't be cut out cleanly by lines."""
    docstring = ast.get_docstring(node)
    if not docstring:
        return None
    anchor = " ".join(_PARAGRAPH_BREAK.split(docstring.strip(), maxsplit=1)[0].split())
    if len(anchor.split()) < _MIN_ANCHOR_WORDS:
        return None

    doc_node = node.body[0]
    doc_first, doc_last = doc_node.lineno, doc_node.end_lineno
    # Line-based removal is only exact when the docstring has its own lines: not `def f(): """x"""`
    # and not `"""x"""; stmt`.
    if doc_first == node.lineno or doc_node.col_offset != len(lines[doc_first - 1]) - len(
        lines[doc_first - 1].lstrip()
    ):
        return None
    # ast column offsets count UTF-8 bytes, not characters.
    tail = lines[doc_last - 1].encode("utf-8")[doc_node.end_col_offset :].strip()
    if tail and not tail.startswith(b"#"):
        return None

    start = min([d.lineno for d in node.decorator_list] + [node.lineno])
    before = lines[start - 1 : doc_first - 1]
    after = lines[doc_last : node.end_lineno]
    while after and not after[0].strip():  # drop the blank line that usually follows a docstring
        after = after[1:]
    code = textwrap.dedent("\n".join(before + after)).strip("\n")
    if code[:1].isspace():  # a multi-line string at column 0 blocks dedent; rare, so just skip it
        return None
    if sum(1 for line in code.split("\n") if line.strip()) < _MIN_CODE_LINES:
        return None
    return anchor, code[:_MAX_POSITIVE_CHARS]
