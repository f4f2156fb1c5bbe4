"""What embedtune knows about a loaded model, shared by every layer above it.

A leaf module (standard library and `architectures` only): `loading` records a `LoadInfo` on the model
it loads; LoRA (`lora_model`), the packed forward (`packing`), saving and the SentenceTransformer
bridge read it back with `load_info`, looking through peft wrappers (`unwrap_peft`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .architectures import ArchSpec, default_pooling

DEFAULT_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
# dtype names a run accepts -> the one each stands for (torch-free: `kernel_prebuild` reads it before torch loads)
DTYPE_ALIASES = {"bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16", "half": "fp16",
                 "fp32": "fp32", "float32": "fp32", "float": "fp32"}

# The file beside a saved LoRA adapter recording the sentence pipeline around its encoder (pooling,
# prompts, a reloadable base). `save.save_adapter` writes it; save.py still spells the name itself.
ADAPTER_PIPELINE = "embedtune_adapter.json"


@dataclass
class LoadInfo:
    """What `from_pretrained` learned about a checkpoint, kept on the model for later steps."""

    source: str  # what the user asked for (hub id or path)
    weights_path: str  # the folder or hub id the weights came from
    model_type: str
    pooling: str | None  # the checkpoint's own pooling, None when it does not say
    normalize: bool | None  # whether the checkpoint's ST pipeline ends in Normalize
    max_seq_length: int
    spec: ArchSpec | None
    prompts: dict[str, str] | None = None
    # the checkpoint's similarity function (e.g. "dot") and default prompt, when its ST config names them
    similarity_fn_name: str | None = None
    default_prompt_name: str | None = None
    # The SentenceTransformer pipeline, when the checkpoint has one: where its modules load from (a
    # folder, or the hub id) and its modules.json entries, so `to_sentence_transformer` rebuilds it.
    st_folder: str | None = None
    st_modules: list[dict] | None = None
    bundled: bool = False  # served from the bundled all-MiniLM-L6-v2 package: the hub id is the portable name
    full_finetuning: bool = False  # Unsloth's `full_finetuning=True`: every weight trains, no LoRA
    trust_remote_code: bool = False
    allow_pickle: bool = False  # whether the ST modules may load pickled weights (`pytorch_model.bin`)
    token: Any = field(default=None, repr=False)  # the HF token given to from_pretrained (for the ST modules)
    # a SentenceTransformerTrainer's steps as CUDA graphs (`trainer_steps`): None where they pay, or True / False
    cuda_graphs: bool | None = None


def load_info(model) -> LoadInfo | None:
    """The LoadInfo recorded by `from_pretrained`, looking through PEFT wrappers."""
    seen = model
    for _ in range(4):
        info = seen.__dict__.get("embedtune_info") if hasattr(seen, "__dict__") else None
        if info is not None:
            return info
        inner = getattr(seen, "base_model", None)
        if inner is None or inner is seen:
            inner = getattr(seen, "model", None)
        if inner is None or inner is seen:
            break
        seen = inner
    return None


def pooling_for(model, pooling: str | None = None) -> str:
    """The pooling to use: explicit choice, else the checkpoint's own, else cls/lasttoken by family."""
    if pooling:
        return pooling
    info = load_info(model)
    if info and info.pooling:
        return info.pooling
    config = getattr(model, "config", None)
    return default_pooling(getattr(config, "model_type", ""))


def unwrap_peft(model):
    """The plain transformers model inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model
