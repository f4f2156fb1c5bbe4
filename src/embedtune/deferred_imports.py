"""The CLI's start-up: a third-party import that a run never uses, deferred to its first use.

sentence-transformers' `util.similarity` imports scikit-learn at its top for one function,
`pairwise_distances`, which it calls only for the manhattan similarity of sparse embeddings. That
import pulls in scikit-learn, scipy.stats and scipy.sparse: 0.8-1.2 s of a job's start, every job.

`defer_sklearn_in_similarity` installs a one-shot import hook, in the CLI's own process only (importing
embedtune changes nothing in other libraries). When that one module is executed, and only if its source
imports exactly that one name from scikit-learn and scikit-learn is not loaded yet, it sees stand-ins
for `sklearn` and `sklearn.metrics` whose `pairwise_distances` imports the real one on its first call.
The stand-ins leave `sys.modules` as soon as the module has run, so any later `import sklearn` gets
the real package; with any other source the module is executed untouched.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import sys
import types

TARGET = "sentence_transformers.util.similarity"
IMPORT_LINE = "from sklearn.metrics import pairwise_distances"


def pairwise_distances(*args, **kwargs):
    """scikit-learn's `pairwise_distances`, imported at the first call."""
    from sklearn.metrics import pairwise_distances as real

    return real(*args, **kwargs)


def _stand_ins() -> dict[str, types.ModuleType]:
    package = types.ModuleType("sklearn", "stand-in while sentence_transformers.util.similarity loads")
    package.__path__ = []
    metrics = types.ModuleType("sklearn.metrics", "stand-in while sentence_transformers.util.similarity loads")
    metrics.pairwise_distances = pairwise_distances
    package.metrics = metrics
    return {"sklearn": package, "sklearn.metrics": metrics}


class _WithStandIns(importlib.abc.Loader):
    """The module's own loader, run with the stand-ins in `sys.modules` and without them afterwards."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        stand_ins = _stand_ins()
        sys.modules.update(stand_ins)
        try:
            self.loader.exec_module(module)
        finally:
            for name, stand_in in stand_ins.items():
                if sys.modules.get(name) is stand_in:
                    del sys.modules[name]


class _DeferSklearn(importlib.abc.MetaPathFinder):
    """Finds TARGET as the path finder does, and runs it with the stand-ins where that is safe."""

    def find_spec(self, fullname, path, target=None):
        if fullname != TARGET:
            return None
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self)  # one shot
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or "sklearn" in sys.modules or not _imports_only_that(spec.origin):
            return spec
        spec.loader = _WithStandIns(spec.loader)
        return spec


def _imports_only_that(origin: str | None) -> bool:
    """The module's source names scikit-learn once, in the import line the stand-ins serve."""
    try:
        with open(origin, encoding="utf-8") as f:
            source = f.read()
    except (OSError, TypeError, UnicodeDecodeError):
        return False
    return source.count("sklearn") == 1 and any(line.strip() == IMPORT_LINE for line in source.splitlines())


def defer_sklearn_in_similarity() -> bool:
    """Install the hook if sentence-transformers is not imported yet (True when installed)."""
    if TARGET in sys.modules or "sklearn" in sys.modules or any(isinstance(f, _DeferSklearn) for f in sys.meta_path):
        return False
    sys.meta_path.insert(0, _DeferSklearn())
    return True
