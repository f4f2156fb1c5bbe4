"""Build the fused kernels (`fused_norm`, `join_grads`) ahead of a run, in a process of its own.

Triton compiles a kernel at its first call: about 3 s for the fused norm's forward and backward,
which a short run does not earn back, so the speed choice used to leave them off on a cold cache.
`embedtune.kernel_prebuild` starts this module as a child process before the run's own imports; it
calls the kernel variants a training step calls (`variant_calls`) on the run's card, and so fills
Triton's cache, in parallel with the parent's imports and model load. By the time the parent plans
its speed mode the cache is warm.

    python -m embedtune.kernels.prebuild MODEL --weights fp32|bf16

No torch at this module's top: Triton's own one-time set-up, which needs no torch, starts in a thread
(`warm_triton`) before torch's import, the longest part of this process's start.

Exits 0, quietly, where there is nothing to build: no CUDA device, no Triton, a GPU that one process
holds alone (exclusive compute mode: this process would lock the run out), a model outside the BERT
family, a config it cannot read without the network.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import threading
from pathlib import Path

from ..kernel_prebuild import quietly, triton_key_function

# the model types whose packed layers call the fused norm (`packing.bert`; a test keeps the two equal).
# Named here, not read from `packing`: importing that package brings transformers, which this process
# has no time for.
FUSED_NORM_TYPES = frozenset({"bert", "roberta", "xlm-roberta", "electra"})


def fused_width(config: dict) -> int | None:
    """The hidden width whose kernels a model's packed layers call, or None if they call none."""
    from .fused_norm import MAX_COLUMNS

    width = config.get("hidden_size")
    if config.get("model_type") not in FUSED_NORM_TYPES or not isinstance(width, int) or not 0 < width <= MAX_COLUMNS:
        return None
    return width


def read_config(model: str) -> dict | None:
    """The model's config.json as `FastModel.from_pretrained` finds it (the bundled model, a folder,
    the encoder's folder of a sentence-transformers layout, a cached hub id), without the network and
    without transformers (this process needs two of its fields); None where it cannot be read."""
    from ..model_files import bundled_alias, read_st_layout

    try:
        folder = bundled_alias(model) or Path(model).expanduser()
        if not folder.is_dir():  # a hub id: its files as cached (the run itself downloads them)
            from huggingface_hub import hf_hub_download

            try:
                folder = Path(hf_hub_download(model, "modules.json", local_files_only=True)).parent
            except Exception:
                folder = Path(hf_hub_download(model, "config.json", local_files_only=True)).parent
        if (folder / "modules.json").exists():
            folder = read_st_layout(folder).transformer_dir
        return json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except Exception:  # the run itself reports a bad model; here it only means nothing to build
        return None


def gpus_shared(load=None) -> bool:
    """Whether every GPU is in the default compute mode, read through NVML before any CUDA context
    exists. On a card in exclusive-process mode this process's context would lock the run out of its
    GPU, so then (or when NVML cannot say) nothing is built here. `load`: opens the NVML library
    (tests pass a fake)."""
    import ctypes

    try:
        nvml = (load or (lambda: ctypes.CDLL("libnvidia-ml.so.1")))()
        if nvml.nvmlInit_v2() != 0:
            return False
    except (OSError, AttributeError):
        return False
    try:
        count = ctypes.c_uint(0)
        if nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) != 0 or count.value == 0:
            return False
        for index in range(count.value):
            handle, mode = ctypes.c_void_p(), ctypes.c_int(-1)
            if (nvml.nvmlDeviceGetHandleByIndex_v2(ctypes.c_uint(index), ctypes.byref(handle)) != 0
                    or nvml.nvmlDeviceGetComputeMode(handle, ctypes.byref(mode)) != 0 or mode.value != 0):
                return False  # 0 is NVML_COMPUTEMODE_DEFAULT; the others give one process the card
        return True
    finally:
        nvml.nvmlShutdown()


def warm_triton() -> threading.Thread | None:
    """Start Triton's one-time set-up of a process's first kernel in a thread: its compiler key (a
    sha256 of libtriton.so, 0.3-0.9 s) and its CUDA driver utilities (a C module that the system
    compiler builds on a cold cache). Neither needs torch, so both run beside torch's import; reading,
    hashing and the compiler's subprocess leave the GIL to it. None where Triton is not installed."""
    if importlib.util.find_spec("triton") is None:
        return None

    def work() -> None:
        importlib.import_module("triton")  # the compiler key's module is found among Triton's, by version
        key = triton_key_function()
        if key is not None:
            key()
        from triton.backends.nvidia.driver import CudaUtils  # Triton 3.x: one instance a process, built once

        CudaUtils()

    thread = threading.Thread(target=quietly, args=(work,), name="embedtune-triton-setup", daemon=True)
    thread.start()
    return thread


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--weights", choices=["fp32", "bf16"], default="fp32", help="the run's LayerNorm weights")
    args = parser.parse_args(argv)
    if not gpus_shared():
        return 0
    setup = warm_triton()
    try:
        import torch

        from .fused_norm import can_build
        from .variant_calls import build

        if not (can_build() and torch.cuda.is_available() and torch.cuda.is_bf16_supported()):
            return 0
        config = read_config(args.model)
        width = fused_width(config) if config is not None else None
        if width is None:
            return 0
        device = torch.device("cuda")
        torch.zeros(1, device=device)  # CUDA's context, while the set-up may still run
        if setup is not None:
            setup.join()  # before the calls, whose threads would each start the same set-up
        build(width, torch.float32 if args.weights == "fp32" else torch.bfloat16, device)
        return 0
    finally:
        if setup is not None:
            setup.join()  # its compiler's subprocess and temporary folder end with it, not killed


if __name__ == "__main__":
    raise SystemExit(main())
