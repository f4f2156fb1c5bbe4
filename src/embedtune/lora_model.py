"""Adding LoRA to a loaded encoder (`get_peft_model`) and merging it back (`merge_lora`), with peft directly.

Recent transformers' `add_adapter` refuses the peft versions on the registry, so we build the
peft model ourselves. Our wrapper class also mends a trap in the guide's step 6: after
`model.merge_and_unload()` (return value ignored), peft's `save_pretrained` on the wrapper writes
an empty adapter. `LoraEmbeddingModel` remembers that it was merged and then saves the plain
merged encoder instead.

Below `loading` (whose `FastModel.get_peft_model` is this module's function); `embedtune.lora`, the
public home of these names, re-exports them beside the saved-adapter readers.
"""

from __future__ import annotations

import types
import warnings
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, PeftModelForFeatureExtraction, TaskType
from peft.tuners.lora import LoraLayer
from peft.tuners.lora import Linear as LoraLinear

from .architectures import default_lora_targets
from .checkpointing import enable_checkpointing, parse_mode
from .errors import EmbedtuneError, SettingError
from .files import atomic_folder
from .hf_quiet import ignoring_warnings, quiet_transformers
from .model_facts import DEFAULT_MODEL_ID, load_info


_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
_FULL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors", "pytorch_model.bin",
                 "pytorch_model.bin.index.json", "pytorch_model-*-of-*.bin")


def _files(folder, patterns: tuple[str, ...]) -> list[Path]:
    folder = Path(folder)
    return sorted({p for pattern in patterns for p in folder.glob(pattern) if p.is_file()}) if folder.is_dir() else []


def _remove_earlier_saves(folder, patterns: tuple[str, ...], why: str) -> None:
    """Remove the files matching `patterns` that an earlier save left in `folder`, saying so."""
    folder = Path(folder)
    stale = _files(folder, patterns)
    for path in stale:
        path.unlink()
    if stale:
        warnings.warn(f"{folder}: removed {', '.join(p.name for p in stale)}, left there by an earlier save; {why}",
                      stacklevel=4)


class LoraEmbeddingModel(PeftModelForFeatureExtraction):
    """A peft feature-extraction model that saves the merged encoder once it has been merged."""

    _embedtune_merged = False

    def __init__(self, model, peft_config, *args: Any, **kwargs: Any):
        # peft reads transformers' deprecated `is_gradient_checkpointing` (a FutureWarning for every
        # wrap); checkpointing itself is set up by embedtune (`enable_checkpointing`).
        with ignoring_warnings("`is_gradient_checkpointing` is deprecated", category=FutureWarning):
            super().__init__(model, peft_config, *args, **kwargs)

    def merge_and_unload(self, *args: Any, **kwargs: Any):
        """Merge LoRA into the base weights in place and return the plain base model."""
        base = self.base_model.merge_and_unload(*args, **kwargs)
        self._embedtune_merged = True
        return base

    @property
    def is_merged(self) -> bool:
        return self._embedtune_merged

    def save_pretrained(self, save_directory, *args: Any, **kwargs: Any):
        """Before merging: the adapter (peft's behaviour), refused in a folder holding a full model's
        weights (a load would take them as the adapter's base). After merging: the full encoder, and an
        adapter that an earlier save left in the folder is removed (a load would add it to the merged
        weights again)."""
        if self._embedtune_merged:
            _remove_earlier_saves(save_directory, _ADAPTER_FILES,
                                  "a load would add that adapter to the merged weights again")
            return self.get_base_model().save_pretrained(save_directory, **kwargs)
        full = _files(save_directory, _FULL_WEIGHTS)
        if full:
            raise EmbedtuneError(f"{Path(save_directory)}: holds a full model's weights ({full[0].name}), which a load would "
                                 "take as the adapter's base; save the adapter to a different folder, or merge first "
                                 "(model.merge_and_unload())")
        # Offline, peft's look-up of a hub-named base's config.json fails with a note; the check it
        # serves (was the vocabulary resized?) does not apply: embedtune never resizes it.
        with ignoring_warnings("Could not find a config file"):
            return super().save_pretrained(save_directory, *args, **kwargs)


    def merged_state_dict(self) -> dict:
        """The base model's weights with every LoRA layer's delta added, and `modules_to_save`'s trained
        copies in place of their originals, under the plain model's names; the adapters stay in place
        (no merge and unmerge, which would round the weights twice)."""
        from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper

        state: dict = {}
        wrapped: list[str] = []  # modules_to_save wrappers: their trained copy is the module
        for name, module in self.get_base_model().named_modules():
            if isinstance(module, AuxiliaryTrainingWrapper):
                if type(module) is not ModulesToSaveWrapper:
                    raise EmbedtuneError(f"{name}: a {type(module).__name__}; merge it with merge_and_unload() and "
                                         "save_pretrained instead")
                inner = module.unload_and_optionally_merge_module(merge=False, safe_merge=False, adapter_names=None)
                if isinstance(inner, LoraLayer):
                    raise EmbedtuneError(f"{name}: LoRA inside modules_to_save; merge it with merge_and_unload() "
                                         "and save_pretrained instead")
                state.update({f"{name}.{key}": value.detach() for key, value in inner.state_dict().items()})
                wrapped.append(name + ".")
                continue
            if not isinstance(module, LoraLayer):
                continue
            if type(module) is not LoraLinear or getattr(module, "use_dora", {}).get("default"):
                raise EmbedtuneError(f"{name}: a {type(module).__name__} layer; merge it with merge_and_unload() "
                                     "and save_pretrained instead")
            base = module.get_base_layer()
            weight = base.weight.detach()
            for adapter in module.active_adapters:
                weight = weight + module.get_delta_weight(adapter).to(weight.dtype)
            state[f"{name}.weight"] = weight
            if base.bias is not None:
                state[f"{name}.bias"] = base.bias.detach()
        for key, value in self.get_base_model().state_dict().items():
            if ".lora_" in key or ".base_layer." in key or key.startswith(tuple(wrapped)):
                continue
            state[key] = value
        return state

    def save_pretrained_merged(self, save_directory, tokenizer=None, save_method: str = "merged_16bit",
                               **kwargs: Any):
        """Unsloth's save of the merged encoder (with `tokenizer`) as a plain HF folder, leaving this model's
        adapters as they are: each LoRA layer's weight plus its delta, written in the model's own dtype.
        `save_method="lora"` saves the adapter instead. Not into a SentenceTransformer's folder (the guide's
        warning): that is refused."""
        if save_method == "lora":
            self.save_pretrained(save_directory, **kwargs)
        elif save_method in ("merged_16bit", "merged_32bit"):
            _write_merged(save_directory, tokenizer, lambda folder: self.get_base_model().save_pretrained(
                folder, state_dict=self.merged_state_dict(), safe_serialization=True))
        else:
            raise EmbedtuneError(f"save_method={save_method!r}: embedtune saves 'merged_16bit' (the merged encoder, "
                                 "in the model's dtype) or 'lora' (the adapter); quantised saves are not supported")

    def push_to_hub_merged(self, repo_id: str, tokenizer=None, save_method: str = "merged_16bit", token=None,
                           private: bool | None = None, commit_message: str = "Upload model", **kwargs: Any):
        """Unsloth's upload of what `save_pretrained_merged` writes, to the hub repository `repo_id`."""
        return _push_merged(self.save_pretrained_merged, repo_id, tokenizer, save_method, token, private,
                            commit_message)


def _write_merged(save_directory, tokenizer, save) -> None:
    """`save(folder)` and the tokenizer into `save_directory`, whole or not at all; not into a
    SentenceTransformer's folder (the guide's warning: its config.json would be overwritten)."""
    if (Path(save_directory) / "modules.json").exists():
        raise EmbedtuneError(f"{save_directory}: holds a SentenceTransformer model; save the merged encoder "
                             "to a different folder")
    with atomic_folder(save_directory, overwrite=True) as tmp, quiet_transformers(logs=False, progress_bars=True):
        save(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))


def _push_merged(save_merged, repo_id: str, tokenizer, save_method: str, token, private, commit_message: str):
    """`save_merged` into a temporary folder, uploaded as the hub repository `repo_id` (created if missing)."""
    import tempfile

    from huggingface_hub import HfApi

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        save_merged(str(folder), tokenizer, save_method=save_method)
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        return api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message)


def _full_save_pretrained_merged(model, save_directory, tokenizer=None, save_method: str = "merged_16bit",
                                 **kwargs: Any):
    """Unsloth's `save_pretrained_merged` of a fully fine-tuned model: nothing to merge, the model and
    `tokenizer` as a plain HF folder (refused in a SentenceTransformer's folder, as with LoRA)."""
    if save_method not in ("merged_16bit", "merged_32bit"):
        raise EmbedtuneError(f"save_method={save_method!r}: a fully fine-tuned model has no adapter; embedtune saves "
                             "it as 'merged_16bit' (the whole encoder, in the model's dtype)")
    _write_merged(save_directory, tokenizer, lambda folder: model.save_pretrained(folder, safe_serialization=True))


def _full_push_to_hub_merged(model, repo_id: str, tokenizer=None, save_method: str = "merged_16bit", token=None,
                             private: bool | None = None, commit_message: str = "Upload model", **kwargs: Any):
    return _push_merged(model.save_pretrained_merged, repo_id, tokenizer, save_method, token, private, commit_message)


def attach_full_finetuning_saves(model) -> None:
    """What the guide's step 6 and Unsloth's saves call on a model trained in full (no adapters):
    `merge_and_unload()` returns the model itself; `save_pretrained_merged` / `push_to_hub_merged`
    write it as a plain HF folder."""
    model.merge_and_unload = types.MethodType(_nothing_to_merge, model)
    model.save_pretrained_merged = types.MethodType(_full_save_pretrained_merged, model)
    model.push_to_hub_merged = types.MethodType(_full_push_to_hub_merged, model)


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
    if config:
        raise EmbedtuneError("loftq_config: LoftQ initialisation quantizes the base model, which embedtune does "
                             "not support; leave it None")


def _nothing_to_merge(model, *args, **kwargs):
    """`merge_and_unload` of a fully fine-tuned model: no adapters, so the model as it is."""
    return model


def get_peft_model(
    model,
    r: int = 16,
    lora_alpha: int = 16,
    lora_dropout: float = 0.0,
    target_modules: list[str] | str | None = None,
    bias: str = "none",
    use_gradient_checkpointing: bool | str = False,
    task_type: Any = TaskType.FEATURE_EXTRACTION,
    random_state: int | None = 3407,
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
    init (3407 unless given, as in Unsloth: the same program gives the same model; None leaves torch's
    generator as it is); `use_rslora` and peft's other LoraConfig fields pass through. A model loaded with
    `full_finetuning=True` gets no adapters (as in Unsloth): it is returned, fully trainable, and its
    `merge_and_unload()` returns it unchanged.
    """
    try:
        use_gradient_checkpointing = parse_mode(use_gradient_checkpointing)
    except ValueError as exc:
        raise EmbedtuneError(str(exc)) from None
    info = load_info(model)
    if info is not None and info.full_finetuning:
        warnings.warn("full_finetuning=True: get_peft_model adds no adapters; every weight trains", stacklevel=2)
        model.embedtune_checkpointing = enable_checkpointing(model, use_gradient_checkpointing)
        # the guide's step 6 merges before saving: with nothing to merge, that is the model itself
        attach_full_finetuning_saves(model)
        return model
    if random_state is not None:
        torch.manual_seed(random_state)
    _loftq(loftq_config)
    named = target_modules  # the caller's own names, checked against the layers once wrapped
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
    try:
        peft_model = LoraEmbeddingModel(model, config)
    except ValueError as exc:
        if named is None or type(exc).__name__ != "NoMatchingPeftModuleError":
            raise
        raise SettingError(f"target_modules {named!r} matched no layer of this {model.config.model_type} model"
                           f"{_own_targets_hint(model.config.model_type)}") from None
    _warn_unmatched_targets(peft_model, named, model.config.model_type)
    if info is not None:
        peft_model.embedtune_info = info
        if info.bundled:  # the bundled package IS the hub model: record the portable name
            config.base_model_name_or_path = DEFAULT_MODEL_ID
    peft_model.embedtune_checkpointing = enable_checkpointing(peft_model, use_gradient_checkpointing)
    return peft_model


def _warn_unmatched_targets(peft_model, target_modules, model_type: str) -> None:
    """peft refuses targets that match no layer at all, but not a list of names some of which match none
    (the guide's query/key/value/dense on MPNet wraps only `dense`): say which named nothing, and what
    this architecture's own projections are called."""
    if isinstance(target_modules, str) or not target_modules:
        return
    wrapped = [name for name, module in peft_model.named_modules() if hasattr(module, "lora_A")]
    unmatched = [t for t in target_modules if not any(n == t or n.endswith("." + t) for n in wrapped)]
    if not unmatched:
        return
    warnings.warn(f"target_modules {', '.join(unmatched)} matched no layer of this {model_type} model, so LoRA "
                  f"trains only {', '.join(t for t in target_modules if t not in unmatched)}"
                  f"{_own_targets_hint(model_type)}", stacklevel=3)


def _own_targets_hint(model_type: str) -> str:
    """'; <family>'s attention and MLP projections are ...' where the registry lists them by name."""
    own = default_lora_targets(model_type)
    return (f"; {model_type}'s attention and MLP projections are {', '.join(own)} (target_modules=None picks them)"
            if not isinstance(own, str) else "")


def merge_lora(model):
    """Merge LoRA into the base weights if `model` carries unmerged adapters; return the plain model."""
    if isinstance(model, PeftModel):
        if not getattr(model, "_embedtune_merged", False):
            model.merge_and_unload()
        return model.get_base_model()
    return model
