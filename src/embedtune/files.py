"""Small file primitives every writer and reader shares: atomic file writes, folders written whole or
not at all (`atomic_folder`), and BOM-tolerant lines.

A leaf module (the standard library and `errors` only): anything in embedtune may import it.
"""

from __future__ import annotations

import codecs
import contextlib
import glob
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from .errors import SaveError


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


# ------------------------------------------------------------------ folders written whole or not at all


def _is_nonempty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def sheltering_folder(target: str | os.PathLike) -> str | None:
    """"current" or "home" where `target` (links followed, "~" expanded) is the current or the home
    folder or a parent of either, which no save may replace, overwrite or not; else None."""
    real = Path(os.path.realpath(Path(target).expanduser()))
    for kind, folder in (("current", Path.cwd()), ("home", Path.home())):
        folder = Path(os.path.realpath(folder))
        if real == folder or real in folder.parents:
            return kind
    return None


def check_target(target: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse a target that exists as a file, or as a non-empty folder unless overwriting, or that is
    the current or the home folder or a parent of either (`sheltering_folder`) in any case."""
    path = Path(target)
    kind = sheltering_folder(path)
    if kind is not None:
        raise SaveError(f"{path}: is the {kind} folder or one of its parents, which saving there would replace; "
                        "choose a new folder")
    if path.exists() and not path.is_dir():
        raise SaveError(f"{path}: exists and is not a folder")
    if _is_nonempty_dir(path) and not overwrite:
        raise SaveError(f"{path}: folder exists and is not empty; pass overwrite=True (CLI: --overwrite)")
    return path


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process there; never clean up
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process
        return True
    return True


def clear_stale(target: str | os.PathLike) -> list[Path]:
    """Remove the temp folders a killed save left next to `target`, restoring the previous folder if a
    crash came between the two renames of `replace_folder`. Folders of live processes are left alone.
    Returns the set-aside folders that were put back."""
    path = Path(target)
    restored = []
    if not path.parent.is_dir():
        return restored
    for stray in sorted(path.parent.glob(f".{glob.escape(path.name)}.*-*-*")):
        kind, _, tag = stray.name[len(path.name) + 2:].partition("-")
        pid = tag.split("-", 1)[0]
        if kind not in ("tmp", "old") or not pid.isdigit() or _pid_alive(int(pid)):
            continue
        if kind == "old" and not path.exists():
            os.replace(stray, path)  # the previous folder, moved aside just before the crash
            restored.append(stray)
        else:
            shutil.rmtree(stray, ignore_errors=True)
    return restored


def replace_folder(source: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Move the finished folder `source` to `target`, replacing what is there. At every instant either
    the previous folder or the new one is in place or set aside (`clear_stale` puts it back)."""
    source, path = Path(source), Path(target)
    old = None
    if path.exists():
        old = path.parent / f".{path.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.replace(path, old)
    os.replace(source, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return path


def _umask() -> int:
    """The process's umask, read without setting it (os.umask would, for a moment, for every thread)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_modes(folder: Path) -> None:
    """Give everything in `folder` the modes a plain new file or folder gets (0644 / 0755 under the
    usual umask): libraries write some files through mkstemp (0600, e.g. transformers' safetensors
    shards), which would leave a result unreadable to whoever may read the rest of it."""
    mask = _umask()
    for root, dirs, files in os.walk(folder):
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
    os.chmod(folder, 0o777 & ~mask)


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike, overwrite: bool = False):
    """Yield a temp folder next to `target`; on success it replaces `target` in one rename.

    A process killed mid-save leaves `target` as it was plus a hidden temp folder, which the next
    save to `target` removes (`clear_stale`).
    """
    clear_stale(target)
    path = check_target(target, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = path.parent / f".{path.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    default_modes(tmp)
    replace_folder(tmp, path)
