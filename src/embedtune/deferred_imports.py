"""The CLI's start-up: third-party imports that a run never uses, deferred to their first use.

Modules a run imports load packages at their top for functions a run never calls:
sentence-transformers' `util.similarity` (scikit-learn's `pairwise_distances`, for the manhattan
similarity of sparse embeddings) and its evaluators beside the retrieval one (their scores);
transformers 5.17's `generation.candidate_generator` (`roc_curve`, for assisted generation),
`data.metrics` (GLUE's scores), object-detection losses (scipy.optimize's Hungarian matching) and,
where timm is installed, TimmWrapper config (timm's ImageNet labels, for image models), which
sentence-transformers' Transformer module imports. Those imports pull in scikit-learn, scipy.stats,
scipy.optimize, pandas and timm's model zoo: 0.7-2 s of every job's start.

`defer_imports` installs an import hook, in the CLI's own process only (importing embedtune changes
nothing in other libraries). When one of those modules is executed, and only if its source imports
the packages served to it by exactly the lines served here and those packages (HEAVY) are not loaded
yet, it sees stand-in modules (carrying the real modules' specs) whose functions import the real ones
at their first call. The stand-ins leave `sys.modules` as soon as the module has run, so any later
import gets the real package; a module whose source differs is executed untouched, and one that
meanwhile imports anything else of those packages (which the stand-ins do not have) is executed again
without them.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import re
import sys
import types

EVALUATION = "sentence_transformers.sentence_transformer.evaluation"  # its package imports every evaluator
DETECTION_LOSSES = ("loss_for_object_detection", "loss_deformable_detr", "loss_rt_detr", "loss_rf_detr",
                    "loss_grounding_dino", "loss_lw_detr")  # all imported by transformers' loss registry

# module -> the imports it makes at its top of functions a run never calls
DEFERRED = {
    "sentence_transformers.util.similarity": ("from sklearn.metrics import pairwise_distances",),
    f"{EVALUATION}.binary_classification": ("from sklearn.metrics import average_precision_score, matthews_corrcoef",),
    f"{EVALUATION}.reranking": ("from sklearn.metrics import average_precision_score, ndcg_score",),
    f"{EVALUATION}.embedding_similarity": ("from scipy.stats import pearsonr, spearmanr",),
    "transformers.generation.candidate_generator": ("from sklearn.metrics import roc_curve",),
    "transformers.data.metrics": ("from scipy.stats import pearsonr, spearmanr",
                                  "from sklearn.metrics import f1_score, matthews_corrcoef"),
    **{f"transformers.loss.{name}": ("from scipy.optimize import linear_sum_assignment",) for name in DETECTION_LOSSES},
    "transformers.models.timm_wrapper.configuration_timm_wrapper": (
        "from timm.data import ImageNetInfo, infer_imagenet_subset",),  # called only by from_dict of image configs
}
HEAVY = ("sklearn", "scipy.stats", "scipy.optimize", "timm")  # one loaded already: its modules' stand-ins save nothing
FROM_IMPORT = re.compile(r"from\s+([\w.]+)\s+import\s+([\w\s,]+)$")


def _served(lines: tuple[str, ...]) -> list[str]:
    """The modules that `from M import ...` lines import."""
    return [FROM_IMPORT.fullmatch(line).group(1) for line in lines]


def _heavy(lines: tuple[str, ...]) -> list[str]:
    """The HEAVY packages these lines would load."""
    return [h for h in HEAVY if any(m == h or m.startswith(h + ".") for m in _served(lines))]


def _heavy_loaded(module: str) -> bool:
    return any(name in sys.modules for name in _heavy(DEFERRED[module]))


def _package_import(lines: tuple[str, ...]) -> re.Pattern:
    """Any import line of the top-level packages these lines import from."""
    names = "|".join(sorted({re.escape(m.split(".")[0]) for m in _served(lines)}))
    return re.compile(rf"\s*(from\s+({names})[\s.]|import\s+({names})\b)")


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
    is safe; it leaves `sys.meta_path` once it has seen them all, or once every one left waits for
    a HEAVY package that is loaded."""

    def __init__(self, waiting: set[str]):
        self.waiting = waiting

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.waiting:
            return None
        self.waiting.discard(fullname)
        heavy_loaded = _heavy_loaded(fullname)
        if all(_heavy_loaded(name) for name in self.waiting):
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
    """The module's source imports the packages `lines` import from by exactly `lines` (the ones
    served here)."""
    try:
        with open(origin, encoding="utf-8") as f:
            source = f.read()
    except (OSError, TypeError, UnicodeDecodeError):
        return False
    package_import = _package_import(lines)
    imports = [text.strip() for text in source.splitlines() if package_import.match(text)]
    return set(imports) == set(lines)


def defer_imports() -> bool:
    """Install the hook unless every DEFERRED module left to load would wait for a HEAVY package that
    is loaded already, or none is left (True when installed)."""
    waiting = {name for name in DEFERRED if name not in sys.modules and not _heavy_loaded(name)}
    if not waiting or \
            any(isinstance(f, _DeferImports) for f in sys.meta_path):
        return False
    sys.meta_path.insert(0, _DeferImports(waiting))
    return True
