"""Small file primitives every writer and reader shares: atomic file writes and BOM-tolerant lines.

A leaf module (standard library only): anything in embedtune may import it.
"""

from __future__ import annotations

import codecs
import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's or a folder's entry to disk (best effort: some filesystems refuse folders)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w", durable: bool = False) -> Iterator[IO]:
    """Open a temp file beside `path`; when the block ends without error it replaces `path` in one rename,
    otherwise it is deleted. Readers see the old file or the whole new one, never a half-written one.

    `durable`: flush the data and the folder entry to disk (what a checkpoint that must survive a power
    cut needs; costs a sync)."""
    out = Path(path)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    text = "b" not in mode
    try:
        with open(tmp, mode, **({"encoding": "utf-8", "newline": "\n"} if text else {})) as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_path(out.parent)


def write_text_atomic(path: str | os.PathLike, text: str, durable: bool = False) -> Path:
    """`text` as UTF-8 at `path`, atomically (see `atomic_file`)."""
    with atomic_file(path, "w", durable=durable) as f:
        f.write(text)
    return Path(path)


BOM = codecs.BOM_UTF8  # what Windows editors put at the start of a UTF-8 file


def decode_text(raw: bytes) -> str:
    """A whole UTF-8 text (or its first line), without the byte-order mark it may start with.
    Raises UnicodeDecodeError for bytes that are not UTF-8."""
    return raw.decode("utf-8-sig")


def decode_line(raw: bytes, lineno: int) -> str:
    """One line of a UTF-8 text file; a byte-order mark is dropped from the first line (files saved by
    Windows editors start with one). Raises UnicodeDecodeError for bytes that are not UTF-8."""
    return decode_text(raw) if lineno == 1 else raw.decode("utf-8")
