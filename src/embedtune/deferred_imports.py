"""The CLI's start-up: a third-party import that a run never uses, deferred to its first use.

Two modules a run imports load scikit-learn at their top for one function each that a run never
calls: sentence-transformers' `util.similarity` (`pairwise_distances`, for the manhattan similarity of
sparse embeddings) and, in transformers before 5.2x, `generation.candidate_generator` (`roc_curve`, for
assisted generation). That import pulls in scikit-learn and scipy.stats: 0.5-1 s of a job's start.

`defer_sklearn` installs a one-shot import hook, in the CLI's own process only (importing embedtune
changes nothing in other libraries). When one of those modules is executed, and only if every import
of scikit-learn in its source is exactly the line served here and scikit-learn is not loaded yet, it
sees stand-ins for `sklearn` and `sklearn.metrics` whose function imports the real one at its first
call. The stand-ins leave `sys.modules` as soon as the module has run, so any later `import sklearn`
gets the real package; a module whose source differs is executed untouched.
"""

from __future__ import annotations

import contextlib
import re
import importlib.abc
import importlib.machinery
import sys
import types

# module -> the one import of scikit-learn it makes at its top, and the name that import binds
DEFERRED = {
    "sentence_transformers.util.similarity": ("from sklearn.metrics import pairwise_distances", "pairwise_distances"),
    "transformers.generation.candidate_generator": ("from sklearn.metrics import roc_curve", "roc_curve"),
}
SKLEARN_IMPORT = re.compile(r"\s*(from\s+sklearn[\s.]|import\s+sklearn\b)")


def _deferred(name: str):
    def function(*args, **kwargs):
        from sklearn import metrics

        return getattr(metrics, name)(*args, **kwargs)

    function.__name__ = function.__qualname__ = name
    function.__doc__ = f"scikit-learn's `sklearn.metrics.{name}`, imported at the first call."
    return function


def _stand_ins(name: str, module: str) -> dict[str, types.ModuleType]:
    why = f"stand-in while {module} loads (embedtune.deferred_imports)"
    package, metrics = types.ModuleType("sklearn", why), types.ModuleType("sklearn.metrics", why)
    package.__path__ = []
    setattr(metrics, name, _deferred(name))
    package.metrics = metrics
    return {"sklearn": package, "sklearn.metrics": metrics}


class _WithStandIns(importlib.abc.Loader):
    """The module's own loader, run with the stand-ins in `sys.modules` and without them afterwards."""

    def __init__(self, loader, name: str):
        self.loader, self.name = loader, name

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        stand_ins = _stand_ins(self.name, module.__name__)
        sys.modules.update(stand_ins)
        try:
            self.loader.exec_module(module)
        finally:
            for name, stand_in in stand_ins.items():
                if sys.modules.get(name) is stand_in:
                    del sys.modules[name]


class _DeferSklearn(importlib.abc.MetaPathFinder):
    """Finds the DEFERRED modules as the path finder does, and runs each with the stand-ins where that
    is safe; it leaves `sys.meta_path` once it has seen them all, or once scikit-learn is loaded."""

    def __init__(self, waiting: set[str]):
        self.waiting = waiting

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.waiting:
            return None
        self.waiting.discard(fullname)
        if not self.waiting or "sklearn" in sys.modules:
            with contextlib.suppress(ValueError):
                sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        line, name = DEFERRED[fullname]
        if spec is None or spec.loader is None or "sklearn" in sys.modules or not _imports_only(spec.origin, line):
            return spec
        spec.loader = _WithStandIns(spec.loader, name)
        return spec


def _imports_only(origin: str | None, line: str) -> bool:
    """Every import of scikit-learn in the module's source is `line` (the one the stand-ins serve)."""
    try:
        with open(origin, encoding="utf-8") as f:
            source = f.read()
    except (OSError, TypeError, UnicodeDecodeError):
        return False
    imports = [text.strip() for text in source.splitlines() if SKLEARN_IMPORT.match(text)]
    return line in imports and all(text == line for text in imports)


def defer_sklearn() -> bool:
    """Install the hook unless scikit-learn is loaded already or no DEFERRED module is left to load
    (True when installed)."""
    waiting = {name for name in DEFERRED if name not in sys.modules}
    if "sklearn" in sys.modules or not waiting or any(isinstance(f, _DeferSklearn) for f in sys.meta_path):
        return False
    sys.meta_path.insert(0, _DeferSklearn(waiting))
    return True
