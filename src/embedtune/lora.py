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
from .errors import SettingError
from .loading import DEFAULT_MODEL_ID


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


# Per family: the attention and the MLP projections, as peft regexes (full match on the module name),
# for Unsloth's `finetune_attention_modules` / `finetune_mlp_modules`. Together they are the registry's
# default targets (`architectures.default_lora_targets`).
_BERT_ATTENTION = r".*\.attention\.(self\.(query|key|value)|output\.dense)"
_BERT_MLP = r".*\.(intermediate\.dense|layer\.\d+\.output\.dense)"
_DECODER_SPLIT = (r".*\.(q_proj|k_proj|v_proj|o_proj)", r".*\.(gate_proj|up_proj|down_proj)")
_TARGET_SPLIT = {
    "bert": (_BERT_ATTENTION, _BERT_MLP),
    "roberta": (_BERT_ATTENTION, _BERT_MLP),
    "xlm-roberta": (_BERT_ATTENTION, _BERT_MLP),
    "electra": (_BERT_ATTENTION, _BERT_MLP),
    "distilbert": (r".*\.(q_lin|k_lin|v_lin|out_lin)", r".*\.(lin1|lin2)"),
    "mpnet": (r".*\.attn\.(q|k|v|o)", r".*\.(intermediate|output)\.dense"),
    "deberta-v2": (r".*\.attention\.(self\.(query_proj|key_proj|value_proj)|output\.dense)", _BERT_MLP),
    "modernbert": (r".*\.attn\.(Wqkv|Wo)", r".*\.mlp\.(Wi|Wo)"),
    "qwen2": _DECODER_SPLIT, "qwen3": _DECODER_SPLIT, "llama": _DECODER_SPLIT, "mistral": _DECODER_SPLIT,
    "gemma3_text": _DECODER_SPLIT,
}


def default_targets(model_type: str, attention: bool = True, mlp: bool = True, language: bool = True):
    """LoRA targets for `target_modules=None`: the registry's default, or its attention or MLP half."""
    from .errors import EmbedtuneError

    if not language or not (attention or mlp):
        raise EmbedtuneError("finetune_language_layers / finetune_attention_modules / finetune_mlp_modules leave "
                             "nothing to fine-tune in a text model; enable at least one")
    if attention and mlp:
        return default_lora_targets(model_type)
    split = _TARGET_SPLIT.get(model_type)
    if split is None:
        raise EmbedtuneError(f"no attention/MLP split known for model_type {model_type!r}; pass target_modules=[...]")
    return split[0] if attention else split[1]


def _loftq(config: Any) -> None:
    """Unsloth passes `loftq_config={}` by default: empty is no LoftQ; LoftQ itself quantizes, which we do not."""
    from .errors import EmbedtuneError

    if config:
        raise EmbedtuneError("loftq_config: LoftQ initialisation quantizes the base model, which embedtune does "
                             "not support; leave it None")


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
    finetune_vision_layers: bool = True,
    finetune_language_layers: bool = True,
    finetune_attention_modules: bool = True,
    finetune_mlp_modules: bool = True,
    loftq_config: Any = None,
    **kwargs: Any,
) -> LoraEmbeddingModel:
    """Add LoRA to `model`; `target_modules=None` picks the architecture's attention+MLP projections
    (only one half with `finetune_attention_modules=False` or `finetune_mlp_modules=False`, as in
    Unsloth; `finetune_vision_layers` has nothing to act on in a text model).

    `use_gradient_checkpointing` takes True, False or "unsloth" (checkpointing with the saved
    layer inputs offloaded to CPU on GPU machines), also as strings. `random_state` seeds the LoRA
    init; `use_rslora` and peft's other LoraConfig fields pass through. A model loaded with
    `full_finetuning=True` gets no adapters (as in Unsloth): it is returned, fully trainable.
    """
    import warnings

    import torch

    from .checkpointing import parse_mode
    from .loading import load_info

    try:
        use_gradient_checkpointing = parse_mode(use_gradient_checkpointing)
    except ValueError as exc:
        from .errors import EmbedtuneError

        raise EmbedtuneError(str(exc)) from None
    info = load_info(model)
    if info is not None and info.full_finetuning:
        warnings.warn("full_finetuning=True: get_peft_model adds no adapters; every weight trains", stacklevel=2)
        model.embedtune_checkpointing = enable_checkpointing(model, use_gradient_checkpointing)
        return model
    if random_state is not None:
        torch.manual_seed(random_state)
    _loftq(loftq_config)
    if target_modules is None:
        target_modules = default_targets(model.config.model_type, finetune_attention_modules, finetune_mlp_modules,
                                         finetune_language_layers)
    if task_type not in (TaskType.FEATURE_EXTRACTION, "FEATURE_EXTRACTION", None):
        raise SettingError(f"embedding models train as TaskType.FEATURE_EXTRACTION, not {task_type}")
    for name in ("max_seq_length", "temporary_location"):  # Unsloth's; the tokenizer holds the length
        kwargs.pop(name, None)
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
        if info.bundled:  # the bundled package IS the hub model: record the portable name
            config.base_model_name_or_path = DEFAULT_MODEL_ID
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


def read_adapter_config(folder):
    """The adapter's `adapter_config.json` as peft reads it; a missing or broken file is one line naming it."""
    from pathlib import Path

    from peft import PeftConfig

    from .loading import ModelFileError, first_line

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
    from pathlib import Path

    from .loading import ModelFileError, _read_json
    from .save import ADAPTER_PIPELINE

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
    from pathlib import Path

    from peft.utils import load_peft_weights

    from .loading import ModelFileError, check_weight_files, first_line

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
    import torch

    from transformers import AutoModel

    from .loading import ModelFileError

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
    from pathlib import Path

    from peft.utils import set_peft_model_state_dict

    from .errors import EmbedtuneError
    from .loading import FastModel, ModelFileError, first_line, load_info

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
