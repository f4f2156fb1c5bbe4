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
