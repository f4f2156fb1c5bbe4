"""embedtune: fine-tune text-embedding models fast, and save folders every serving stack loads.

Importing embedtune changes nothing in other libraries. The narrow compatibility patches the guide's
wrapper code needs (`embedtune.st.install_compat`) are installed when embedtune first builds a model,
and act only on models embedtune built: stock sentence-transformers objects keep stock behaviour.

`import embedtune` itself is cheap (no torch, transformers, peft or sentence-transformers): the
public names below are imported on first use (`__getattr__`), so `embedtune --help` and the CLI's
argument parsing start in a fraction of a second.
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
