"""LoRA for embedding models: the public home of `get_peft_model` and `merge_lora` (made in
`lora_model`), and saved adapters: reading and checking their files, and `load_adapter`, which puts a
saved adapter back on its base.

Above `loading` (`load_adapter` loads the base with `FastModel.from_pretrained`), which in turn sits
above `lora_model`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from peft import PeftConfig
from peft.utils import load_peft_weights, set_peft_model_state_dict
from transformers import AutoModel

from .errors import EmbedtuneError
from .loading import FastModel, ModelFileError, _read_json, check_weight_files, first_line
# re-exported: embedtune.lora stays where users, save.py, sharding.py and train.py find these names
from .lora_model import LoraEmbeddingModel, default_targets, get_peft_model, merge_lora  # noqa: F401
from .model_facts import ADAPTER_PIPELINE, load_info, unwrap_peft  # noqa: F401


def read_adapter_config(folder):
    """The adapter's `adapter_config.json` as peft reads it; a missing or broken file is one line naming it."""
    path = Path(folder) / "adapter_config.json"
    if not path.is_file():
        raise ModelFileError(f"{Path(folder)}: not an adapter folder (no adapter_config.json)")
    try:
        return PeftConfig.from_pretrained(str(folder))
    except Exception as exc:  # noqa: BLE001 - JSON errors, unknown peft types, bad fields: all the file's fault
        raise ModelFileError(f"{path}: not a readable peft adapter config ({first_line(exc)}); re-export the adapter "
                             "or re-download it") from None


def read_adapter_pipeline(folder) -> dict:
    """`embedtune_adapter.json` (the sentence pipeline around the encoder), or {} where there is none."""
    path = Path(folder) / ADAPTER_PIPELINE
    if not path.is_file():
        return {}
    pipeline = _read_json(path)
    if not isinstance(pipeline, dict):
        raise ModelFileError(f"{path}: not a JSON object; re-export the adapter")
    return pipeline


def check_adapter_files(folder, config=None, allow_pickle: bool = False) -> dict:
    """Check a saved LoRA adapter on its own, without its base: the config reads, the weights file is a
    whole safetensors file (a pickle only with `allow_pickle`), it loads with peft's own
    `load_peft_weights`, and holds a LoRA A/B pair for every adapted module, with the rank the config
    gives. Returns the weights (on the CPU). Any problem is one line naming the file."""
    folder = Path(folder)
    config = config if config is not None else read_adapter_config(folder)
    check_weight_files(folder, allow_pickle, required=True)
    weights_file = folder / "adapter_model.safetensors"
    if not weights_file.is_file():
        weights_file = folder / "adapter_model.bin"
    try:
        weights = load_peft_weights(str(folder), device="cpu")
    except Exception as exc:  # noqa: BLE001 - whatever the file is, it is not an adapter peft can load
        raise ModelFileError(f"{weights_file}: peft cannot load it ({first_line(exc)}); re-export the adapter") from None
    if not weights:
        raise ModelFileError(f"{weights_file}: holds no adapter weights; re-export the adapter")
    pairs: dict[str, dict[str, Any]] = {}
    for key, tensor in weights.items():
        for part in ("lora_A", "lora_B"):
            if f".{part}." in key:
                pairs.setdefault(key.split(f".{part}.")[0], {})[part] = tensor
    if getattr(config, "peft_type", None) == "LORA" or str(getattr(config, "peft_type", "")).endswith("LORA"):
        if not pairs:
            raise ModelFileError(f"{weights_file}: holds no LoRA weights (lora_A / lora_B); re-export the adapter")
        rank = getattr(config, "r", None)
        patterned = bool(getattr(config, "rank_pattern", None))
        for module, pair in pairs.items():
            if set(pair) != {"lora_A", "lora_B"}:
                missing = ({"lora_A", "lora_B"} - set(pair)).pop()
                raise ModelFileError(f"{weights_file}: {module} has no {missing} weight; re-export the adapter")
            a, b = pair["lora_A"], pair["lora_B"]
            inner = (a.shape[0] if a.dim() >= 1 else None, b.shape[1] if b.dim() >= 2 else None)
            if inner[0] != inner[1] or (not patterned and rank is not None and inner[0] != rank):
                raise ModelFileError(f"{weights_file}: {module} has LoRA weights of shapes {tuple(a.shape)} and "
                                     f"{tuple(b.shape)}, not rank r={rank} as adapter_config.json says; re-export "
                                     "the adapter")
    return weights


def check_adapter_fits(weights: dict, base, where: str) -> None:
    """Check that an adapter's LoRA pairs sit on layers its base has, with those layers' input and output
    sizes. `base` is the loaded base model, or its config: then the base is built on the meta device
    (no weights loaded, no memory taken)."""
    if not isinstance(base, torch.nn.Module):
        try:
            with torch.device("meta"):
                base = AutoModel.from_config(base)
        except Exception:  # noqa: BLE001 - a base we cannot build from its config: loading it will tell
            return
    modules = dict(base.named_modules())
    prefix = "base_model.model."
    for key, tensor in weights.items():
        if ".lora_A." not in key:
            continue
        name = key.split(".lora_A.")[0]
        name = name[len(prefix):] if name.startswith(prefix) else name
        module = modules.get(name)
        if module is None:
            raise ModelFileError(f"{where}: the adapter adapts {name}, which its base model does not have; it was "
                                 "trained on another base (set base_model_name_or_path in adapter_config.json)")
        in_features = getattr(module, "in_features", None)
        out_features = getattr(module, "out_features", None)
        b = weights.get(key.replace(".lora_A.", ".lora_B."))
        if (in_features is not None and tensor.dim() == 2 and tensor.shape[1] != in_features) or (
                out_features is not None and b is not None and b.dim() == 2 and b.shape[0] != out_features):
            raise ModelFileError(f"{where}: the adapter's weights for {name} do not fit its base model's layer "
                                 f"({in_features} -> {out_features}); it was trained on another base")


def load_adapter(adapter_dir, base_model: str | None = None, **kwargs: Any):
    """Load a saved LoRA adapter onto its base: `(LoraEmbeddingModel, tokenizer)`, ready for
    `to_sentence_transformer` (or more training).

    The base is `base_model`, else the one recorded in `adapter_config.json`, else the name kept in
    `embedtune_adapter.json` (so a hub id served from a local copy still resolves when the recorded
    folder has moved). The pooling and prompts recorded there become the model's own, so
    `to_sentence_transformer(model, tokenizer)` rebuilds the sentence pipeline the adapter was
    trained in. `kwargs` go to `FastModel.from_pretrained`. The adapter's files are checked before
    the base loads (`check_adapter_files`); every broken file is one line naming it.
    """
    folder = Path(adapter_dir)
    if not (folder / "adapter_config.json").is_file():
        raise EmbedtuneError(f"{folder}: not an adapter folder (no adapter_config.json)")
    config = read_adapter_config(folder)
    pipeline = read_adapter_pipeline(folder)
    weights = check_adapter_files(folder, config, allow_pickle=bool(kwargs.get("allow_pickle")))
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
    weights_file = folder / "adapter_model.safetensors"
    check_adapter_fits(weights, model, str(weights_file))
    try:
        peft_model = LoraEmbeddingModel(model, config)
    except ValueError as exc:  # e.g. target_modules that the base does not have
        raise ModelFileError(f"{folder / 'adapter_config.json'}: the adapter does not fit {base_model} "
                             f"({first_line(exc)}); it was trained on another base") from None
    if info is not None:
        peft_model.embedtune_info = info
    try:
        result = set_peft_model_state_dict(peft_model, weights)
    except RuntimeError as exc:  # shapes that differ from the base's layers
        raise ModelFileError(f"{weights_file}: the adapter weights do not fit {base_model} "
                             f"({first_line(exc)})") from None
    if result.unexpected_keys:
        raise EmbedtuneError(
            f"{folder}: adapter weights do not fit {base_model} (e.g. {result.unexpected_keys[0]})"
        )
    missing = [k for k in result.missing_keys if ".lora_" in k]
    if missing:
        raise ModelFileError(f"{weights_file}: lacks {len(missing)} of the adapter's LoRA weights (e.g. {missing[0]}); "
                             "re-export the adapter")
    peft_model.eval()
    return peft_model, tokenizer
