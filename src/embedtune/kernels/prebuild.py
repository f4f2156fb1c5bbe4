"""Build the fused kernels (`fused_norm`, `join_grads`) ahead of a run, in a process of its own.

Triton compiles a kernel at its first call: about 3 s for the fused norm's forward and backward,
which a short run does not earn back, so the speed choice used to leave them off on a cold cache.
`embedtune.kernel_prebuild` starts this module as a child process before the run's own imports; it
builds the same kernel variants a training step calls (bf16 autocast, fp32 stream, weights in the
run's dtype) on the run's card, and marks Triton's cache, in parallel with the parent's imports and
model load. By the time the parent plans its speed mode the cache is warm.

    python -m embedtune.kernels.prebuild MODEL --weights fp32|bf16

Exits 0, quietly, where there is nothing to build: no CUDA device, no Triton, a GPU that one process
holds alone (exclusive compute mode: this process would lock the run out), a model outside the BERT
family, a config it cannot read without the network.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from .fused_norm import MAX_COLUMNS, can_build, residual_norm
from .join_grads import join_and_sum

# the model types whose packed layers call the fused norm (`packing.bert`; a test keeps the two equal).
# Named here, not read from `packing`: importing that package brings transformers, which this process
# has no time for.
FUSED_NORM_TYPES = frozenset({"bert", "roberta", "xlm-roberta", "electra"})
_ROWS = 256


def fused_width(config: dict) -> int | None:
    """The hidden width whose kernels a model's packed layers call, or None if they call none."""
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


def build(width: int, weights_dtype: torch.dtype, device: torch.device) -> None:
    """Call the fused op forward and backward as a packed BERT layer does under bf16 autocast: the
    attention sub-block's norm (fp32 stream plus its bf16 copy, both read downstream) feeding the
    feed-forward sub-block's norm (stream only), dropout on, each with its dense layer's bias. Full
    fine-tuning (fp32 weights) also joins q, k and v's bf16 gradients (`packing.main_grad`)."""
    torch.manual_seed(0)
    norms = [torch.nn.LayerNorm(width, eps=1e-12, device=device, dtype=weights_dtype) for _ in range(2)]
    dropout = torch.nn.Dropout(0.1)
    stream = torch.randn(_ROWS, width, device=device, requires_grad=True)  # fp32: autocast's LayerNorm output
    branches = [torch.randn(_ROWS, width, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(2)]
    # the dense layers' biases, left to the fused op: trained with fp32 weights (full), frozen in bf16 (LoRA)
    biases = [torch.zeros(width, device=device, dtype=weights_dtype, requires_grad=weights_dtype == torch.float32)
              for _ in range(2)]
    with torch.autocast(device.type, dtype=torch.bfloat16):
        hidden, product_input = residual_norm(norms[0], dropout, branches[0], stream, fused=True, branch_bias=biases[0])
        ffn = branches[1] * product_input  # the copy feeds a product; its gradient comes back in bf16
        out, _ = residual_norm(norms[1], dropout, ffn, hidden, fused=True, product_input=False, branch_bias=biases[1])
    out.float().square().mean().backward()
    if weights_dtype == torch.float32:  # LoRA's frozen bf16 q, k, v weights take no gradient to join
        join_and_sum([torch.randn(_ROWS, width, device=device, dtype=torch.bfloat16) for _ in range(3)])
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--weights", choices=["fp32", "bf16"], default="fp32", help="the run's LayerNorm weights")
    args = parser.parse_args(argv)
    if not (can_build() and gpus_shared() and torch.cuda.is_available() and torch.cuda.is_bf16_supported()):
        return 0
    config = read_config(args.model)
    width = fused_width(config) if config is not None else None
    if width is None:
        return 0
    build(width, torch.float32 if args.weights == "fp32" else torch.bfloat16, torch.device("cuda"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
