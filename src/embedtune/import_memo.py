"""The CLI's start-up: transformers' scans of the installed files, remembered from one run to the next.

Importing transformers 5.x reads the file list of every installed distribution
(`importlib.metadata.packages_distributions()`, in `transformers.utils.import_utils`) and the source of
every model file under `transformers/models`, once for the package and once for `transformers.models`
(`define_import_structure`, which looks for each file's `__all__`), to build its lazy module tables.
On a GPU image of 200 distributions that was 1-2 s of every job's start. Both results are functions of
files on disk, so `remember_import_scans` installs an import hook, in the CLI's own process only, that
serves them from JSON files in the user's cache when what they read has not changed since:

- the distributions map, keyed by the name and modification time of every distribution's metadata
  folder (`*.dist-info`, `*.egg-info`) in each `sys.path` folder that has any (what that function
  reads; so runs from any working folder share it), and the Python version;
- each import structure, keyed by the size and modification time of every file under the scanned folder.

A memo that is missing, stale or unreadable is computed as transformers computes it and written
(atomically); one that cannot be written is simply not kept. Where the distributions map is missing
(a first run, or one after an install), the CLI starts a child process that writes both memos
(`warm_ahead`, `python -m embedtune.import_memo`) while it imports torch, which it does before
transformers; a miss then waits for the child's file, at most as long as computing it would take. Only `transformers.utils.import_utils` is
touched: `packages_distributions` is replaced while that module runs and restored after it, and the
module's `define_import_structure` is wrapped. `EMBEDTUNE_IMPORT_MEMO_DIR` names another folder, or
`off` turns the memo off.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.metadata
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from .cpus import spare_cpu as _spare_cpu
from .files import write_text_atomic

TARGET = "transformers.utils.import_utils"
DIR_ENV = "EMBEDTUNE_IMPORT_MEMO_DIR"


def memo_dir() -> Path | None:
    """$EMBEDTUNE_IMPORT_MEMO_DIR, or the user's cache ($XDG_CACHE_HOME/embedtune/import-scans); None when off."""
    chosen = os.environ.get(DIR_ENV)
    if chosen is not None and chosen.strip().lower() in ("", "0", "off", "false", "no"):
        return None
    if chosen:
        return Path(chosen)
    from .compile_cache import user_cache_dir

    return user_cache_dir() / "import-scans"


def _digest(parts) -> str:
    return hashlib.sha1(json.dumps(parts, separators=(",", ":")).encode()).hexdigest()


def _metadata_stats(entry: str):
    """What `importlib.metadata` finds in one `sys.path` entry: its distributions' metadata folders
    (name, modification time), or an archive's modification time."""
    path = entry or "."
    try:
        if not os.path.isdir(path):
            return os.stat(path).st_mtime_ns
        with os.scandir(path) as entries:
            return sorted((e.name, e.stat().st_mtime_ns) for e in entries if e.name.endswith((".dist-info", ".egg-info")))
    except OSError:
        return None


def _tree_stats(folder: str) -> list:
    """(relative path, size, modification time) of every file under `folder`, in a stable order,
    skipping `__pycache__` as transformers' scan does."""
    found = []

    def walk(path: str, prefix: str) -> None:
        with os.scandir(path) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                if entry.name == "__pycache__":
                    continue
                if entry.is_dir():
                    walk(entry.path, prefix + entry.name + "/")
                else:
                    stat = entry.stat()
                    found.append((prefix + entry.name, stat.st_size, stat.st_mtime_ns))

    walk(folder, "")
    return found


def _read(folder: Path, name: str, key: str):
    """The memo's value if it was written for `key`, else None."""
    try:
        with open(folder / name, encoding="utf-8") as f:
            stored = json.load(f)
        return stored["value"] if stored.get("key") == key else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _write(folder: Path, name: str, key: str, value) -> None:
    """Write the memo in one rename (`files.write_text_atomic`: readers see the old file or the new
    one); a memo that cannot be written is not kept."""
    with contextlib.suppress(OSError, TypeError, ValueError):
        folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(folder / name, json.dumps({"key": key, "value": value}))


# How long the misses of a run wait for the warming child's files, all together: about what computing
# the map takes on a large environment (2.1 s for 202 distributions on a GPU image), so that a slow
# child costs little more than no child.
WAIT_S = 2.5


def _distributions_memo() -> tuple[str, str]:
    """The distributions map's memo file name and key for this environment. Only the `sys.path`
    entries that hold distributions count: the first entry is the working folder or the script's,
    which a run from another folder changes and which holds none as a rule."""
    found = [(os.path.abspath(entry or "."), stats) for entry in sys.path if (stats := _metadata_stats(entry))]
    name = f"packages_distributions-{_digest([sys.version, [entry for entry, _ in found]])[:16]}.json"  # one per environment
    return name, _digest([sys.version, found])


def _valid_map(value) -> bool:
    return isinstance(value, dict) and all(isinstance(v, list) for v in value.values())


class Warming:
    """The warming child (`start_warming`) and how long the run may still wait for its files, all misses
    together (`WAIT_S`)."""

    def __init__(self, process, seconds: float | None = None):
        self.process = process
        self.left_s = WAIT_S if seconds is None else seconds

    def poll(self):
        return self.process.poll()

    def wait(self, timeout=None):
        return self.process.wait(timeout)


def _await(child: Warming | None, read):
    """`read()`'s value once it is not None, polled while the warming child runs and its wait lasts;
    None if the child ended or the wait ran out without it."""
    value = read()
    if child is None or value is not None:
        return value
    started = time.monotonic()
    try:
        while child.poll() is None and time.monotonic() - started < child.left_s:
            time.sleep(0.02)
            value = read()
            if value is not None:
                return value
        return read()
    finally:
        child.left_s = max(0.0, child.left_s - (time.monotonic() - started))


def remembered_packages_distributions(folder: Path, compute=None, child=None) -> dict[str, list[str]]:
    """`importlib.metadata.packages_distributions()`, from the memo when the distributions on
    `sys.path` are unchanged; on a miss, from the warming child's file where one is writing it."""
    compute = compute or importlib.metadata.packages_distributions
    name, key = _distributions_memo()
    value = _await(child, lambda: (found if _valid_map(found := _read(folder, name, key)) else None))
    if value is not None:
        return value
    value = compute()
    _write(folder, name, key, {k: list(v) for k, v in value.items()})
    return value


def _encode_structure(structure) -> list | None:
    """[[backends, [[module, names], ...]], ...]; None where the structure is not the shape this
    reads back (frozensets of strings mapping module names to sets of strings)."""
    encoded = []
    for backends, modules in structure.items():
        if not isinstance(backends, frozenset) or not all(isinstance(b, str) for b in backends) \
                or not isinstance(modules, dict):
            return None
        rows = []
        for module, names in modules.items():
            if not isinstance(module, str) or type(names) is not set or not all(isinstance(n, str) for n in names):
                return None
            rows.append([module, sorted(names)])
        encoded.append([sorted(backends), rows])
    return encoded


def _decode_structure(encoded) -> dict:
    return {frozenset(backends): {module: set(names) for module, names in rows} for backends, rows in encoded}


def _call(define, module_path, prefix):
    """transformers 4.x's `define_import_structure` takes no prefix: pass one only where given."""
    return define(module_path) if prefix is None else define(module_path, prefix)


def remembering_define_import_structure(define, folder: Path, child=None):
    """`define` (transformers' `define_import_structure(module_path, prefix=None)`), its results kept
    in the memo under the scanned folder's file stats; on a miss, read from the warming child's file
    where one is writing it."""

    @functools.wraps(define)
    def define_import_structure(module_path, prefix=None):
        try:
            scanned = os.path.abspath(os.fspath(module_path))
            if os.path.isfile(scanned):
                scanned = os.path.dirname(scanned)
            key = _digest([scanned, prefix, _tree_stats(scanned)])
        except (OSError, TypeError):
            return _call(define, module_path, prefix)
        name = f"import_structure-{_digest([scanned, prefix])[:16]}.json"
        encoded = _await(child, lambda: _read(folder, name, key))
        if encoded is not None:
            with contextlib.suppress(TypeError, ValueError):
                return _decode_structure(encoded)
        structure = _call(define, module_path, prefix)
        encoded = _encode_structure(structure)
        if encoded is not None:
            _write(folder, name, key, encoded)
        return structure

    define_import_structure.remembered_by = __name__
    return define_import_structure


class _RememberingLoader(importlib.abc.Loader):
    """Runs `transformers.utils.import_utils` with the memo'd distributions map, and wraps its scan."""

    def __init__(self, loader, folder: Path, child=None):
        self.loader, self.folder, self.child = loader, folder, child

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        compute = importlib.metadata.packages_distributions
        importlib.metadata.packages_distributions = functools.partial(remembered_packages_distributions,
                                                                      self.folder, compute, self.child)
        try:
            self.loader.exec_module(module)
        finally:
            importlib.metadata.packages_distributions = compute
        define = getattr(module, "define_import_structure", None)
        if callable(define):
            module.define_import_structure = remembering_define_import_structure(define, self.folder, self.child)


class _RememberImportScans(importlib.abc.MetaPathFinder):
    """Finds `transformers.utils.import_utils` as the path finder does and gives it the loader above;
    leaves `sys.meta_path` once it has."""

    def __init__(self, folder: Path, module: str, child=None):
        self.folder, self.module, self.child = folder, module, child

    def find_spec(self, fullname, path, target=None):
        if fullname != self.module:
            return None
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _RememberingLoader(spec.loader, self.folder, self.child)
        return spec


def remember_import_scans(module: str = TARGET, warm_ahead: bool = False) -> bool:
    """Install the hook unless `module` is imported already or the memo is off (True when installed).
    With `warm_ahead`, where the distributions map is not in the memo, first start the child that
    writes the memos (`start_warming`), whose files the hook then waits for."""
    if module in sys.modules or any(isinstance(f, _RememberImportScans) for f in sys.meta_path):
        return False
    folder = memo_dir()
    if folder is None:
        return False
    child = start_warming(folder) if warm_ahead else None
    sys.meta_path.insert(0, _RememberImportScans(folder, module, child))
    return True


def start_warming(folder: Path) -> Warming | None:
    """Where the distributions map of this environment is not in the memo (a first run, or one after
    an install), start `python -m embedtune.import_memo`, which writes it and transformers' import
    structures while this process imports torch; None where the memo holds it, or with no CPU to spare
    (the child would slow this process by what it saves), or where it cannot start. The child is
    silent and ends by itself."""
    name, key = _distributions_memo()
    if _valid_map(_read(folder, name, key)) or not _spare_cpu() or os.environ.get("LOCAL_RANK", "0") != "0":
        return None  # (under torchrun, one child per machine: the other ranks compute as before)
    try:
        # this process's sys.path, which the memo's names and keys read (the child's own would start
        # with its working folder rather than this process's script folder)
        return Warming(subprocess.Popen([sys.executable, "-m", __name__, json.dumps(sys.path)],
                                        env={**os.environ, DIR_ENV: str(folder)}, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    except OSError:
        return None


def warm(folder: Path) -> None:
    """The child's work: the distributions map first (what the CLI's import of transformers needs
    first), then transformers' import structures through the hook, with transformers imported as the
    CLI imports it."""
    remembered_packages_distributions(folder)
    sys.meta_path.insert(0, _RememberImportScans(folder, TARGET))
    with contextlib.suppress(Exception):  # a failed warm-up leaves the work to the run, as before
        importlib.import_module("transformers")
        importlib.import_module("transformers.models")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        sys.path[:] = json.loads(sys.argv[1])  # the parent's, for its names and keys
    chosen = memo_dir()
    if chosen is not None:
        warm(chosen)
