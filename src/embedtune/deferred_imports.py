"""The CLI's start-up: third-party imports that a run never uses, deferred to their first use.

Modules a run imports load scikit-learn or scipy.stats at their top for functions a run never calls:
sentence-transformers' `util.similarity` (`pairwise_distances`, for the manhattan similarity of sparse
embeddings) and, in transformers 5.17, `generation.candidate_generator` (`roc_curve`, for assisted
generation) and `data.metrics` (GLUE's scores). Those imports pull in scikit-learn, scipy.stats and
pandas: 0.5-1 s of every job's start.

`defer_imports` installs an import hook, in the CLI's own process only (importing embedtune changes
nothing in other libraries). When one of those modules is executed, and only if every import of those
packages in its source is exactly one of the lines served here and scikit-learn and scipy.stats are
not loaded yet, it sees stand-in modules (carrying the real modules' specs) whose functions import the
real ones at their first call. The stand-ins leave `sys.modules` as soon as the module has run, so any
later import gets the real package; a module whose source differs is executed untouched, and one
that meanwhile imports anything else of those packages (which the stand-ins do not have) is executed
again without them.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import re
import sys
import types

# module -> the imports it makes at its top of functions a run never calls
DEFERRED = {
    "sentence_transformers.util.similarity": ("from sklearn.metrics import pairwise_distances",),
    "transformers.generation.candidate_generator": ("from sklearn.metrics import roc_curve",),
    "transformers.data.metrics": ("from scipy.stats import pearsonr, spearmanr",
                                  "from sklearn.metrics import f1_score, matthews_corrcoef"),
}
HEAVY = ("sklearn", "scipy.stats")  # loaded already: nothing left to save
PACKAGE_IMPORT = re.compile(r"\s*(from\s+(sklearn|scipy)[\s.]|import\s+(sklearn|scipy)\b)")
FROM_IMPORT = re.compile(r"from\s+([\w.]+)\s+import\s+([\w\s,]+)$")


def _deferred(module: str, name: str):
    def function(*args, **kwargs):
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    function.__name__ = function.__qualname__ = name
    function.__doc__ = f"`{module}.{name}`, imported at the first call (embedtune.deferred_imports)."
    return function


def _find_spec(name: str):
    """The spec the path finder gives `name`, its parents looked up the same way (nothing is executed)."""
    parent, _, _ = name.rpartition(".")
    if not parent:
        return importlib.machinery.PathFinder.find_spec(name)
    loaded = sys.modules.get(parent)
    parent_spec = loaded.__spec__ if loaded is not None else _find_spec(parent)
    locations = getattr(parent_spec, "submodule_search_locations", None)
    return importlib.machinery.PathFinder.find_spec(name, list(locations)) if locations else None


def _stand_ins(lines: tuple[str, ...], importer: str) -> dict[str, types.ModuleType] | None:
    """For each `from A.B import f, g` line: A.B (and A, unless loaded) as empty modules with the real
    specs (what `importlib.util.find_spec`, and so transformers' `is_*_available`, reads), A.B holding
    deferred f and g. None when one of them is not installed."""
    made: dict[str, types.ModuleType] = {}
    for line in lines:
        module, names = FROM_IMPORT.fullmatch(line).groups()
        parts = module.split(".")
        for depth in range(1, len(parts) + 1):
            name = ".".join(parts[:depth])
            if name in made or (name in sys.modules and depth < len(parts)):
                continue
            spec = _find_spec(name)
            if spec is None:
                return None
            stand_in = types.ModuleType(name, f"stand-in while {importer} loads (embedtune.deferred_imports)")
            stand_in.__spec__ = spec
            if spec.submodule_search_locations is not None:
                stand_in.__path__ = []  # a submodule imported meanwhile fails (and the module runs again, plainly)
            made[name] = stand_in
        for name in (n.strip() for n in names.split(",")):
            setattr(made[module], name, _deferred(module, name))
    return made


class _WithStandIns(importlib.abc.Loader):
    """The module's own loader, run with the stand-ins in `sys.modules` and without them afterwards."""

    def __init__(self, loader, stand_ins: dict[str, types.ModuleType]):
        self.loader, self.stand_ins = loader, stand_ins

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        sys.modules.update(self.stand_ins)
        try:
            self.loader.exec_module(module)
            return
        except ImportError:  # something it imports wanted more of those packages: run it as it would have run
            pass
        finally:
            for name, stand_in in self.stand_ins.items():
                if sys.modules.get(name) is stand_in:
                    del sys.modules[name]
        self.loader.exec_module(module)


class _DeferImports(importlib.abc.MetaPathFinder):
    """Finds the DEFERRED modules as the path finder does, and runs each with the stand-ins where that
    is safe; it leaves `sys.meta_path` once it has seen them all, or once a HEAVY module is loaded."""

    def __init__(self, waiting: set[str]):
        self.waiting = waiting

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.waiting:
            return None
        self.waiting.discard(fullname)
        heavy_loaded = any(name in sys.modules for name in HEAVY)
        if not self.waiting or heavy_loaded:
            with contextlib.suppress(ValueError):
                sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        lines = DEFERRED[fullname]
        if spec is None or spec.loader is None or heavy_loaded or not _imports_only(spec.origin, lines):
            return spec
        stand_ins = _stand_ins(lines, fullname)
        if stand_ins is not None:
            spec.loader = _WithStandIns(spec.loader, stand_ins)
        return spec


def _imports_only(origin: str | None, lines: tuple[str, ...]) -> bool:
    """The module's source imports scikit-learn and scipy by exactly `lines` (the ones served here)."""
    try:
        with open(origin, encoding="utf-8") as f:
            source = f.read()
    except (OSError, TypeError, UnicodeDecodeError):
        return False
    imports = [text.strip() for text in source.splitlines() if PACKAGE_IMPORT.match(text)]
    return set(imports) == set(lines)


def defer_imports() -> bool:
    """Install the hook unless a HEAVY module is loaded already or no DEFERRED module is left to load
    (True when installed)."""
    waiting = {name for name in DEFERRED if name not in sys.modules}
    if any(name in sys.modules for name in HEAVY) or not waiting or \
            any(isinstance(f, _DeferImports) for f in sys.meta_path):
        return False
    sys.meta_path.insert(0, _DeferImports(waiting))
    return True
