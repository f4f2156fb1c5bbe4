"""torch.compile bookkeeping for a training run: where compiled code is kept between runs, and how
long this run spent compiling.

Compiling the packed layers costs 20-60 s on a GPU; a later run that finds torch's on-disk caches
filled (TorchInductor's FX graph and AOTAutograd caches) warms up in about 3 s (docs/BENCHMARKS.md).
torch keeps them in /tmp by default, which containers and reboots wipe, so the recipe points them at
the user's cache folder unless the user chose a place.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"  # torch reads it at each cache access; set before compiling
# torch's own timers of a compile: dynamo plus the forward backend, and the backward compiled at the
# first backward pass (names as in torch 2.11-2.13).
_COMPILE_TIMERS = ("_compile.compile_inner", "compile_fx.<locals>.bw_compiler")


def user_cache_dir() -> Path:
    """embedtune's folder in the user's cache: $XDG_CACHE_HOME/embedtune (~/.cache/embedtune by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "embedtune"


def compile_cache_dir() -> str:
    """Where a compiled run keeps torch's compile caches: $TORCHINDUCTOR_CACHE_DIR if set, else
    $XDG_CACHE_HOME/embedtune/torch-compile (~/.cache/... by default)."""
    return os.environ.get(CACHE_ENV) or str(user_cache_dir() / "torch-compile")


def use_persistent_compile_cache() -> str:
    """Point torch's compile caches at `compile_cache_dir()` (unless the user chose a place); returns it."""
    folder = compile_cache_dir()
    os.environ[CACHE_ENV] = folder
    return folder


def compile_seconds() -> float:
    """Seconds this process has spent compiling so far, by torch's own timers (0.0 if none ran)."""
    from torch._dynamo.utils import compilation_time_metrics

    return float(sum(sum(compilation_time_metrics.get(name, ())) for name in _COMPILE_TIMERS))
