"""embedtune: fine-tune text-embedding models fast, and save folders every serving stack loads.

Importing embedtune applies one narrow compatibility patch to sentence-transformers 6 (see
`embedtune.st.install_compat`) so the guide's own wrapper code keeps working.

`import embedtune` itself is cheap (no torch, transformers, peft or sentence-transformers): the
public names below are imported on first use (`__getattr__`), so `embedtune --help` and the CLI's
argument parsing start in a fraction of a second. The compatibility patch is applied the moment
sentence-transformers is imported (at once if it already is), whoever imports it, exactly as if
`import embedtune` had imported it eagerly.
"""

from __future__ import annotations

import importlib
import sys
import types

from .errors import DataError, EmbedtuneError, SaveError

__version__ = "0.1.0"

# public name -> the module that defines it, imported on first access (start-up speed)
_LAZY = {
    "FastModel": ".loading",
    "to_sentence_transformer": ".st",
    "install_compat": ".st",
    "train": ".train",
    "TrainConfig": ".train",
    "save_merged": ".save",
    "save_hf": ".save",
    "save_adapter": ".save",
}

__all__ = [
    "FastModel",
    "to_sentence_transformer",
    "train",
    "TrainConfig",
    "save_merged",
    "save_hf",
    "save_adapter",
    "EmbedtuneError",
    "DataError",
    "SaveError",
    "__version__",
]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    setattr(sys.modules[__name__], name, value)
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _Package(types.ModuleType):
    """`embedtune.train` is the function, as the eager `from .train import train` left it: importing the
    submodule `embedtune.train` (which binds the submodule on its package) keeps the function there."""

    def __setattr__(self, name: str, value) -> None:
        if name == "train" and isinstance(value, types.ModuleType) and value.__name__ == f"{__name__}.train":
            value = value.train
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


class _CompatOnImport:
    """A meta-path finder that applies `st.install_compat` right after sentence-transformers is imported.

    It only finds `sentence_transformers` itself (through the other finders) and wraps its loader, so
    the patch is in place before the importing statement returns, as it was when `import embedtune`
    imported sentence-transformers itself. It leaves `sys.meta_path` after that one import.
    """

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "sentence_transformers":
            return None
        _uninstall_hook()
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                break
        else:
            return None  # not installed: the import fails as usual
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _PatchAfterExec(spec.loader)
        return spec


class _PatchAfterExec:
    """The package's own loader, plus `install_compat` once the package has executed."""

    def __init__(self, loader):
        self.loader = loader

    def __getattr__(self, name):  # everything else (get_resource_reader, is_package, ...) as the real loader
        return getattr(self.loader, name)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        # the module keeps its real loader (what importlib.resources, inspect and pkgutil look at)
        module.__loader__ = self.loader
        if module.__spec__ is not None:
            module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        from .st import install_compat  # heavy (torch): only once sentence-transformers is imported

        install_compat()


_HOOK = _CompatOnImport()


def _uninstall_hook() -> None:
    try:
        sys.meta_path.remove(_HOOK)
    except ValueError:
        pass


def _install_compat_on_import() -> None:
    if "sentence_transformers" in sys.modules:  # imported already: patch now
        from .st import install_compat  # heavy (torch): only once sentence-transformers is imported

        install_compat()
    elif _HOOK not in sys.meta_path:
        sys.meta_path.insert(0, _HOOK)


_install_compat_on_import()
