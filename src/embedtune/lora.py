"""LoRA adapters for embedding models, wrapped with peft directly.

Recent transformers' `add_adapter` refuses the peft versions on the registry, so we build the
peft model ourselves. Our wrapper class also mends a trap in the guide's step 6: after
`model.merge_and_unload()` (return value ignored), peft's `save_pretrained` on the wrapper writes
an empty adapter. `LoraEmbeddingModel` remembers that it was merged and then saves the plain
merged encoder instead.
"""

from __future__ import annotations

from typing import Any

from peft import LoraConfig, PeftModelForFeatureExtraction, TaskType

from .architectures import default_lora_targets
from .checkpointing import enable_checkpointing


class LoraEmbeddingModel(PeftModelForFeatureExtraction):
    """A peft feature-extraction model that saves the merged encoder once it has been merged."""

    _embedtune_merged = False

    def merge_and_unload(self, *args: Any, **kwargs: Any):
        """Merge LoRA into the base weights in place and return the plain base model."""
        base = self.base_model.merge_and_unload(*args, **kwargs)
        self._embedtune_merged = True
        return base

    @property
    def is_merged(self) -> bool:
        return self._embedtune_merged

    def save_pretrained(self, save_directory, *args: Any, **kwargs: Any):
        """Before merging: the adapter (peft's behaviour). After merging: the full encoder."""
        if self._embedtune_merged:
            return self.get_base_model().save_pretrained(save_directory, **kwargs)
        return super().save_pretrained(save_directory, *args, **kwargs)


def get_peft_model(
    model,
    r: int = 16,
    lora_alpha: int = 16,
    lora_dropout: float = 0.0,
    target_modules: list[str] | str | None = None,
    bias: str = "none",
    use_gradient_checkpointing: bool | str = False,
    task_type: Any = TaskType.FEATURE_EXTRACTION,
    random_state: int | None = None,
    **kwargs: Any,
) -> LoraEmbeddingModel:
    """Add LoRA to `model`; `target_modules=None` picks the architecture's attention+MLP projections.

    `use_gradient_checkpointing` takes True, False or "unsloth" (checkpointing with the saved
    layer inputs offloaded to CPU on GPU machines).
    """
    import torch

    if random_state is not None:
        torch.manual_seed(random_state)
    if target_modules is None:
        target_modules = default_lora_targets(model.config.model_type)
    if task_type not in (TaskType.FEATURE_EXTRACTION, "FEATURE_EXTRACTION", None):
        raise ValueError(f"embedding models train as TaskType.FEATURE_EXTRACTION, not {task_type}")
    kwargs.pop("max_seq_length", None)  # accepted by the guide's library; the tokenizer holds it
    config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=target_modules,
        bias=bias,
        task_type=TaskType.FEATURE_EXTRACTION,
        **kwargs,
    )
    info = model.__dict__.get("embedtune_info")
    peft_model = LoraEmbeddingModel(model, config)
    if info is not None:
        peft_model.embedtune_info = info
    peft_model.embedtune_checkpointing = enable_checkpointing(peft_model, use_gradient_checkpointing)
    return peft_model


def unwrap_peft(model):
    """The plain transformers model inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def merge_lora(model):
    """Merge LoRA into the base weights if `model` carries unmerged adapters; return the plain model."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        if not getattr(model, "_embedtune_merged", False):
            model.merge_and_unload()
        return model.get_base_model()
    return model


def load_adapter(adapter_dir, base_model: str | None = None, **kwargs: Any):
    """Load a saved LoRA adapter onto its base: `(LoraEmbeddingModel, tokenizer)`, ready for
    `to_sentence_transformer` (or more training).

    The base is `base_model`, else the one recorded in `adapter_config.json`, else the name kept in
    `embedtune_adapter.json` (so a hub id served from a local copy still resolves when the recorded
    folder has moved). The pooling and prompts recorded there become the model's own, so
    `to_sentence_transformer(model, tokenizer)` rebuilds the sentence pipeline the adapter was
    trained in. `kwargs` go to `FastModel.from_pretrained`.
    """
    import json
    from pathlib import Path

    from peft import PeftConfig
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    from .errors import EmbedtuneError
    from .loading import FastModel, load_info
    from .save import ADAPTER_PIPELINE

    folder = Path(adapter_dir)
    if not (folder / "adapter_config.json").is_file():
        raise EmbedtuneError(f"{folder}: not an adapter folder (no adapter_config.json)")
    config = PeftConfig.from_pretrained(str(folder))
    pipeline = {}
    if (folder / ADAPTER_PIPELINE).is_file():
        pipeline = json.loads((folder / ADAPTER_PIPELINE).read_text(encoding="utf-8"))
    if base_model is None:
        recorded = config.base_model_name_or_path
        fallback = pipeline.get("base_model")
        base_model = recorded if recorded and (Path(recorded).exists() or not fallback) else fallback
    if not base_model:
        raise EmbedtuneError(f"{folder}: the adapter records no base model; pass base_model=...")
    kwargs.setdefault("max_seq_length", pipeline.get("max_seq_length") or 512)
    model, tokenizer = FastModel.from_pretrained(base_model, **kwargs)
    info = load_info(model)
    if info is not None:
        info.pooling = pipeline.get("pooling") or info.pooling
        info.prompts = pipeline.get("prompts") or info.prompts
    peft_model = LoraEmbeddingModel(model, config)
    if info is not None:
        peft_model.embedtune_info = info
    result = set_peft_model_state_dict(peft_model, load_peft_weights(str(folder), device="cpu"))
    if result.unexpected_keys:
        raise EmbedtuneError(
            f"{folder}: adapter weights do not fit {base_model} (e.g. {result.unexpected_keys[0]})"
        )
    peft_model.eval()
    return peft_model, tokenizer
