"""Saving: merged SentenceTransformer folders, plain HF encoders and adapters, all written atomically.

Every save writes into a temporary sibling folder and renames it into place, so a crash never
leaves a half-written model, and a non-empty target is refused unless `overwrite=True`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import SaveError
from .files import atomic_folder
from .hf_quiet import quiet_transformers
from .loading import load_info
from .lora import merge_lora
from .model_facts import ADAPTER_PIPELINE  # written next to a saved adapter (read by lora.load_adapter)
from .st import clip_card_examples, set_backbone


def _split_st(model_or_st):
    """(backbone, tokenizer or None, SentenceTransformer or None) for an ST or a transformers/peft model."""
    from sentence_transformers import SentenceTransformer

    if isinstance(model_or_st, SentenceTransformer):
        return model_or_st[0].auto_model, model_or_st[0].tokenizer, model_or_st
    return model_or_st, None, None


def save_merged(st_model, output_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Merge LoRA into the encoder (in place) and write a complete SentenceTransformer folder.

    After this call `st_model` runs the merged plain encoder, so what is saved is what is in memory.
    """
    backbone, _, st = _split_st(st_model)
    if st is None:
        raise SaveError("save_merged needs a SentenceTransformer; use save_hf for a plain encoder")
    merged = merge_lora(backbone)
    if merged is not backbone:
        set_backbone(st[0], merged)

    clip_card_examples(st)  # the card keeps short examples, not megabyte texts
    with atomic_folder(output_dir, overwrite) as tmp, quiet_transformers(logs=False, progress_bars=True):
        st.save(str(tmp), safe_serialization=True)  # (transformers' per-save bar says nothing a caller needs)
    return Path(output_dir)


def save_hf(model, tokenizer=None, output_dir: str | os.PathLike = None, overwrite: bool = False) -> Path:
    """Write a plain merged encoder + tokenizer; refuses a folder that holds a SentenceTransformer."""
    backbone, st_tokenizer, _ = _split_st(model)
    tokenizer = tokenizer or st_tokenizer
    target = Path(output_dir)
    if (target / "modules.json").exists():
        raise SaveError(
            f"{target}: holds a SentenceTransformer model; save the plain encoder to a different folder"
        )
    merged = merge_lora(backbone)
    with atomic_folder(target, overwrite) as tmp, quiet_transformers(logs=False, progress_bars=True):
        merged.save_pretrained(str(tmp), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return target


def save_adapter(model, output_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write only the LoRA adapter, recording the base model it belongs to."""
    from peft import PeftModel

    backbone, tokenizer, st = _split_st(model)
    if not isinstance(backbone, PeftModel):
        raise SaveError("save_adapter needs a model with LoRA adapters (FastModel.get_peft_model)")
    if getattr(backbone, "_embedtune_merged", False):
        raise SaveError("the adapters were already merged into the encoder; there is no adapter left to save")
    info = load_info(backbone)
    if info is not None:
        for config in backbone.peft_config.values():
            config.base_model_name_or_path = reloadable_base(info)
    with atomic_folder(output_dir, overwrite) as tmp, quiet_transformers(logs=False, progress_bars=True):
        backbone.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if st is not None:
            write_adapter_pipeline(st, info, tmp)
    return Path(output_dir)


def reloadable_base(info) -> str:
    """The base to record in an adapter: the local weights folder when there is one, else the hub id.

    The bundled MiniLM is recorded by its installed folder, so plain peft + transformers load the
    adapter offline without embedtune; its hub id, the portable name of the same weights, stays in
    `embedtune_adapter.json` (`base_model`) and the card.
    """
    if getattr(info, "bundled", False):
        from .loading import bundled_model_path

        return str(bundled_model_path())
    weights = Path(info.weights_path)
    return str(weights.resolve()) if weights.is_dir() else info.source


def write_adapter_pipeline(st, info, folder: Path) -> Path:
    """Record what an adapter alone does not hold: the base's name, pooling, normalisation, prompts."""
    from .loading import pooling_from_config

    pooling, normalize = None, False
    for module in st:
        name = type(module).__name__
        if name == "Pooling":
            pooling = pooling_from_config(module.get_config_dict())
        elif name == "Normalize":
            normalize = True
    pipeline = {
        "base_model": info.source if info is not None else None,
        "pooling": pooling,
        "normalize": normalize,
        "max_seq_length": st.max_seq_length,
        "prompts": {k: v for k, v in (st.prompts or {}).items() if v} or None,
    }
    path = Path(folder) / ADAPTER_PIPELINE
    path.write_text(json.dumps(pipeline, indent=2), encoding="utf-8")
    return path
