"""Start the fused norm kernels' build (`kernels.prebuild`) in a child process, early, and wait for it
where the speed choice would use them; and compute Triton's compiler key, which this process needs for
its first kernel, in a thread (`warm_compiler_key`).

Light on purpose (no torch): the CLI calls `start` before its own heavy imports, so the child's build
runs alongside them on another core. `start` is idempotent within a process: `train.run` calls it
again and gets the CLI's child, or starts one itself when called as a library.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .cpus import spare_cpu as _spare_cpu  # a module name the tests replace


@dataclass
class Prebuild:
    """A started build: its process and when it began."""

    process: subprocess.Popen
    started: float = field(default_factory=time.monotonic)

    def running(self) -> bool:
        return self.process.poll() is None

    def wait(self, seconds: float) -> bool:
        """Wait at most `seconds` for the build to end; True if it ended and succeeded."""
        try:
            return self.process.wait(timeout=max(0.0, seconds)) == 0
        except subprocess.TimeoutExpired:
            return False


_started: dict[tuple[str, str], Prebuild] = {}  # per process: (model, weights dtype) -> its child


def _gpu_visible() -> bool:
    """A cheap hint that an NVIDIA GPU is there (the child checks for real, with torch)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", "x").strip() in ("", "-1"):
        return False
    return Path("/dev/nvidiactl").exists() or Path("/proc/driver/nvidia/version").exists()


def wanted(fast: bool, compile: bool | None, cuda_graphs: bool | None, fused_kernels: bool | None) -> bool:
    """Whether a run with these speed settings could use the fused norm: the packed path, not compiled
    layers, CUDA graphs not refused, the kernels not refused, one process (under torchrun every rank
    would build the same kernels into one cache), Triton installed, a GPU visible and a CPU to spare."""
    return (fast and compile is not True and cuda_graphs is not False and fused_kernels is not False
            and os.environ.get("WORLD_SIZE", "1") == "1" and importlib.util.find_spec("triton") is not None
            and _gpu_visible() and _spare_cpu())


def weights_for(lora: bool, dtype: str | None) -> str | None:
    """The LayerNorm weights' dtype a run trains with (`train.load_model`): fp32 for full fine-tuning,
    the loaded dtype under LoRA (bf16 by default on cards that have it); None for fp16, which trains
    without CUDA graphs and so without the fused norm."""
    from .model_facts import DTYPE_ALIASES

    if not lora:
        return "fp32"
    name = DTYPE_ALIASES.get((dtype or "bf16").lower())
    return name if name in ("bf16", "fp32") else None


def start(model: str, weights: str | None, fast: bool = True, compile: bool | None = None,
          cuda_graphs: bool | None = None, fused_kernels: bool | None = None) -> Prebuild | None:
    """Start the build for `model` with LayerNorm weights in `weights` ("fp32" or "bf16"), or return the
    one this process already started; None where the run could not use the kernels. The child is
    silent and ends by itself (an interrupted run leaves it to finish its few seconds)."""
    if weights is None or not wanted(fast, compile, cuda_graphs, fused_kernels):
        return None
    key = (str(model), weights)
    if key not in _started:
        try:
            process = subprocess.Popen([sys.executable, "-m", "embedtune.kernels.prebuild", str(model), "--weights", weights],
                                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        except OSError:
            return None
        _started[key] = Prebuild(process)
    return _started[key]


def triton_key_function():
    """Triton's compiler key function where Triton is imported already and keeps the key it computes
    (an lru_cache: `triton.runtime.cache` from Triton 3.3 on, `triton.compiler.compiler` before), else
    None."""
    for module in ("triton.runtime.cache", "triton.compiler.compiler"):
        key = getattr(sys.modules.get(module), "triton_key", None)
        if callable(key) and hasattr(key, "cache_info"):
            return key
    return None


def quietly(function) -> None:
    """Call `function` for its side effects; a warm-up that fails is no error."""
    try:
        function()
    except Exception:  # noqa: BLE001 - a warm-up that fails leaves the work to Triton, as before
        pass


def warm_compiler_key() -> threading.Thread | None:
    """Compute Triton's compiler key in a thread, for a process about to launch Triton kernels.

    Triton names every kernel by a key that includes a hash of its own compiler (libtriton.so, 415 MB in
    Triton 3.6, read and sha256-hashed: 0.9 s on two CPU cores, more on a cold file cache), computed once
    per process at its first kernel, even when every kernel comes from its cache; that is the first
    step's time. Triton keeps the key it computed, whoever called it, so a thread started while the run
    sets up leaves the step the lookup only (file reads and hashing release the GIL). Only where Triton is
    imported already (the thread imports nothing) and a second CPU is there; None otherwise."""
    key = triton_key_function()
    if key is None or not _spare_cpu():
        return None
    thread = threading.Thread(target=quietly, args=(key,), name="embedtune-triton-key", daemon=True)
    thread.start()
    return thread
