"""The SentenceTransformer bridge: wrap an in-memory model, and keep the guide's wrapper working.

`to_sentence_transformer` puts a stock ST Transformer module around the model already in memory
(no second load of the encoder: a one-off subclass adopts the model, then the module is a plain
Transformer again) and rebuilds the checkpoint's own pipeline after it (Pooling, Dense, Normalize, ...
as its modules.json lists them; Pooling + Normalize for a plain HF checkpoint).
`install_compat` is the guide compat: the narrow patches of sentence-transformers that a program
written from the guide needs around a model embedtune built (the bundled model's hub id in the
Transformer constructor; on ST 6 `sentence_transformers.models` reachable and assigning
`auto_model`/`tokenizer` really replacing the backbone; the trainer's checkpoint loading for LoRA
models). Each acts on embedtune's models only (`embedtune_built`) and leaves everything else to the
stock code; docs/ARCHITECTURE.md ("Patches") lists them with the tests that cover them.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import tempfile
import warnings

import torch

from .errors import EmbedtuneError
from .model_facts import DEFAULT_MODEL_ID, load_info, pooling_for
from .model_files import (
    ModelFileError, bundled_alias, check_safetensors, check_weight_files, first_line, hub_offline,
    pooling_from_config, refused_weights,
)

_COMPAT_FLAG = "_embedtune_compat"
_BUNDLED_FLAG = "_embedtune_bundled_names"


def st_modules():
    """`sentence_transformers.models` on ST 5 and 6 alike, without the ST 6 deprecation warning."""
    import sentence_transformers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import sentence_transformers.models as models
    if getattr(sentence_transformers, "models", None) is not models:
        sentence_transformers.models = models
    return models


def _transformer_class():
    return st_modules().Transformer


def _backbone_is_property(cls) -> bool:
    """ST 6 keeps the backbone in `.model` behind a read-only `auto_model` property."""
    return isinstance(inspect.getattr_static(cls, "auto_model", None), property)


def replace_backbone(module, model) -> None:
    """Swap the transformers model a ST Transformer module runs, refreshing what ST derived from it.

    ST caches the parameter names of the backbone's forward to filter features; versions differ in
    how (5.x: always a set with a safety net of common names; 6.x: None when forward takes
    **kwargs). We keep the module's own convention and only swap the names that came from the
    old backbone's signature.
    """
    old = getattr(module, "model", None)
    old_names = set(inspect.signature(old.forward).parameters) if old is not None else set()
    torch.nn.Module.__setattr__(module, "model", model)
    signature = inspect.signature(model.forward)
    names = set(signature.parameters)
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())
    if hasattr(module, "_declared_forward_params"):
        module._declared_forward_params = names
    cached = getattr(module, "model_forward_params", None)
    if isinstance(cached, set):
        module.model_forward_params = names | (cached - old_names)
    elif hasattr(module, "model_forward_params"):  # ST 6.x: None means "forward takes **kwargs"
        from sentence_transformers.base.modules import transformer as st_transformer

        safety = set(getattr(st_transformer, "_FORWARD_SAFETY_NET_KEYS", set()))
        module.model_forward_params = None if takes_kwargs else names | safety


def replace_tokenizer(module, tokenizer) -> None:
    """Swap the tokenizer (ST 6 keeps it as `.processor`), keeping the module's max_seq_length."""
    old = getattr(module, "processor", None)
    old_max = getattr(old, "model_max_length", None)
    if old_max is not None and old_max < getattr(tokenizer, "model_max_length", float("inf")):
        tokenizer.model_max_length = old_max
    object.__setattr__(module, "processor", tokenizer)


def embedtune_built(model) -> bool:
    """Whether `model` (a transformers model, possibly inside peft wrappers) was loaded by
    `FastModel.from_pretrained`: the only models the guide compat below acts on."""
    return model is not None and load_info(model) is not None


def _resolve_bundled_names(cls) -> None:
    """Make the Transformer constructor load the bundled all-MiniLM-L6-v2 for its hub id (and short name).

    `FastModel.from_pretrained` resolves those names to the bundled package (which IS that model), so a
    program written from the guide, whose step 4 builds `models.Transformer(BASE_MODEL_ID)`, must too:
    offline, the hub id alone does not load. Only those names; an existing folder of that name wins.
    """
    if getattr(cls, _BUNDLED_FLAG, False):
        return
    original = cls.__init__

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        if args and isinstance(args[0], str):
            args = (_bundled_or(args[0]), *args[1:])
        elif isinstance(kwargs.get("model_name_or_path"), str):
            kwargs["model_name_or_path"] = _bundled_or(kwargs["model_name_or_path"])
        original(self, *args, **kwargs)

    cls.__init__ = __init__
    setattr(cls, _BUNDLED_FLAG, True)


def _bundled_or(name: str) -> str:
    folder = bundled_alias(name)
    return str(folder) if folder is not None else name


def _install_backbone_assignment(cls) -> None:
    """ST 6: make `module.auto_model = model` / `module.tokenizer = tokenizer` (the guide's step 4) really
    swap the backbone / tokenizer (`replace_backbone`, `replace_tokenizer`), for embedtune's models only:
    the value, or the backbone the module runs, was built by `FastModel.from_pretrained`. Every other
    assignment is the stock `__setattr__`'s (which registers a stray `auto_model` submodule and keeps
    running the old backbone, and refuses `tokenizer`)."""
    if getattr(cls, _COMPAT_FLAG, False):
        return
    original = cls.__setattr__

    @functools.wraps(original)
    def __setattr__(self, name, value):
        if name == "auto_model" and (embedtune_built(value) or _runs_embedtune_model(self)):
            replace_backbone(self, value)
        elif name == "tokenizer" and _runs_embedtune_model(self):
            replace_tokenizer(self, value)
        else:
            original(self, name, value)

    cls.__setattr__ = __setattr__
    setattr(cls, _COMPAT_FLAG, True)


def _runs_embedtune_model(module) -> bool:
    return embedtune_built(module.__dict__.get("_modules", {}).get("model"))


def install_compat() -> None:
    """Install the guide compat, once: what a program written from the guide needs of sentence-transformers
    around a model embedtune built (see docs/ARCHITECTURE.md, "Patches"):

    - `sentence_transformers.models` reachable (ST 6 only imports it on demand; the guide reads it);
    - the bundled model's hub id and short name in the Transformer constructor (`_resolve_bundled_names`);
    - on ST 6, assigning `auto_model` / `tokenizer` (`_install_backbone_assignment`);
    - the trainer's checkpoint loading for embedtune's (LoRA) models (`_install_peft_checkpoint_loading`).

    Each patch acts on embedtune's models (or the bundled model's names) only and hands everything else
    to the stock code. `FastModel.from_pretrained` is where it belongs (the guide's step 1: nothing of
    sentence-transformers is touched before a model is built); a process that never builds a model with
    embedtune keeps the stock classes. Idempotent.
    """
    st_modules()
    cls = _transformer_class()
    _resolve_bundled_names(cls)
    _install_peft_checkpoint_loading()
    if _backbone_is_property(cls):
        _install_backbone_assignment(cls)


def set_backbone(module, model) -> None:
    """`module.auto_model = model` on ST 5 and 6 alike, without the compat patch (embedtune's own code)."""
    if _backbone_is_property(type(module)):
        replace_backbone(module, model)
    else:
        module.auto_model = model  # ST 5: a plain attribute


def set_tokenizer(module, tokenizer) -> None:
    """`module.tokenizer = tokenizer` on ST 5 and 6 alike, without the compat patch."""
    if _backbone_is_property(type(module)):
        replace_tokenizer(module, tokenizer)
    else:
        module.tokenizer = tokenizer


def _adopting(cls, model):
    """A one-off subclass of the ST Transformer `cls` whose constructor adopts `model` instead of loading
    weights (its `_load_model`); the instance is turned back into a plain `cls` once built."""

    def _load_model(self, *args, **kwargs):
        if _backbone_is_property(cls):
            return model
        self.auto_model = model  # ST 5: a plain attribute
        return None

    return type(f"_Adopting{cls.__name__}", (cls,), {"_load_model": _load_model, "__module__": __name__})


def transformer_module(model, tokenizer, max_seq_length: int | None = None):
    """A stock ST Transformer module around the in-memory `model` and `tokenizer`."""
    cls = _transformer_class()
    if max_seq_length is None:
        info = load_info(model)
        max_seq_length = info.max_seq_length if info else tokenizer.model_max_length
    with tempfile.TemporaryDirectory(prefix="embedtune-st-") as tmp:
        # ST reads the config and tokenizer from a folder; we give it the in-memory ones' files.
        model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = _adopting(cls, model)(tmp, max_seq_length=max_seq_length)
    module.__class__ = cls  # a stock Transformer from here on (modules.json names its class)
    set_tokenizer(module, tokenizer)
    tokenizer.model_max_length = max_seq_length
    from .data.token_cache import clip_module_inputs  # the data package loads its readers: only when wrapping

    clip_module_inputs(module)  # huge texts are cut to what max_seq_length can use before tokenizing
    return module


def to_sentence_transformer(model, tokenizer, pooling: str | None = None, max_seq_length: int | None = None,
                            normalize: bool | None = None):
    """Wrap a loaded (optionally LoRA) model as a SentenceTransformer without reloading the encoder.

    A SentenceTransformer checkpoint keeps its own pipeline: after our in-memory Transformer come its
    modules in modules.json order (Pooling, Dense, LayerNorm, Normalize, ...), each loaded from the
    checkpoint by its own class. A plain HF checkpoint gets Pooling + Normalize, as the guide builds.
    `pooling` overrides the pooling mode (None: the checkpoint's own where known, else cls for encoders
    and lasttoken for decoders). `normalize` None keeps the checkpoint's choice; True/False add or drop
    the Normalize module. The checkpoint's modules with weights (Dense, LayerNorm, ...) train with the
    encoder in full fine-tuning; under LoRA they stay frozen, so the adapter alone holds everything
    that was trained and reloads exactly (`lora.load_adapter`).
    """
    from sentence_transformers import SentenceTransformer

    first = transformer_module(model, tokenizer, max_seq_length)
    info = load_info(model)
    mode = pooling_for(model, pooling)
    if info is not None and info.st_modules:
        rest = checkpoint_modules(info, model.config.hidden_size, mode, normalize)
    else:
        rest = plain_head(model.config.hidden_size, mode, normalize)
    _match_backbone(rest, model)
    device = next(model.parameters()).device
    st_model = SentenceTransformer(modules=[first, *rest], device=str(device))
    # One mode for the whole tree, the encoder's (transformers loads models in eval mode): a wrapper
    # whose own flag says training over modules in eval mode would let a step that goes by the flag
    # (`model.training`) run without dropout.
    st_model.train(model.training)
    if info is not None:
        if info.prompts:  # a checkpoint's own prompts (e.g. E5's "query: ") keep applying
            st_model.prompts = dict(info.prompts)
        # and its similarity function (a dot-product model stays one) and default prompt, saved with it
        if info.similarity_fn_name:
            st_model.similarity_fn_name = info.similarity_fn_name
        if info.default_prompt_name and info.default_prompt_name in (st_model.prompts or {}):
            st_model.default_prompt_name = info.default_prompt_name
        _card_base_model(st_model, info)
    return st_model


def _card_base_model(st_model, info) -> None:
    """The card's base model: the hub id (the bundled MiniLM's own, wherever its copy lies); a local folder
    is named by no path (a card is published) and, as it has no hub id, none is looked up at save."""
    source = str(info.source)
    local = os.path.isabs(source) or os.path.exists(source)
    name = DEFAULT_MODEL_ID if getattr(info, "bundled", False) else (None if local else source)
    card = st_model.model_card_data
    with contextlib.suppress(Exception):
        if name:
            card.base_model = name
        else:
            card.local_files_only = True


def plain_head(hidden_size: int, mode: str, normalize: bool | None) -> list:
    """The guide's head for a checkpoint that has none: Pooling, then Normalize unless asked not to."""
    models = st_modules()
    head = [models.Pooling(hidden_size, pooling_mode=mode)]
    return head + [models.Normalize()] if normalize is not False else head


def checkpoint_modules(info, hidden_size: int, mode: str, normalize: bool | None) -> list:
    """The modules that follow the Transformer in the checkpoint's modules.json, loaded from the checkpoint."""
    entries = info.st_modules
    kinds = [str(e.get("type", "")) for e in entries]
    if not kinds or not kinds[0].endswith("Transformer"):
        raise EmbedtuneError(f"{info.source}: modules.json does not start with a Transformer module ({kinds[:1]}); "
                             "embedtune wraps pipelines that begin with the encoder")
    modules = []
    for entry, kind in zip(entries[1:], kinds[1:]):
        if kind.endswith("Normalize") and normalize is False:
            continue
        module = load_st_module(info, kind, str(entry.get("path", "")))
        if kind.endswith("Pooling"):
            module = _pooling_as(module, mode, hidden_size)
        modules.append(module)
    if normalize and not any(k.endswith("Normalize") for k in kinds[1:]):
        modules.append(st_modules().Normalize())
    return modules


def _pooling_as(module, mode: str, hidden_size: int):
    """The checkpoint's Pooling, or one of the same width and prompt handling with the requested mode."""
    if pooling_from_config(module.get_config_dict()) == mode:
        return module
    width = getattr(module, "embedding_dimension", None) or getattr(module, "word_embedding_dimension", None)
    return st_modules().Pooling(width or hidden_size, pooling_mode=mode,
                                include_prompt=getattr(module, "include_prompt", True))


def module_class(info, class_ref: str):
    """The class a modules.json entry names, imported without running code from the checkpoint."""
    from sentence_transformers import util

    trusted = bool(info.trust_remote_code)
    if not class_ref.startswith("sentence_transformers.") and not trusted:
        raise EmbedtuneError(f"{info.source}: module class {class_ref} is code from outside sentence-transformers; "
                             "loading it needs trust_remote_code=True")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if hasattr(util, "import_module_class"):
                return util.import_module_class(class_ref, model_name_or_path=info.st_folder, trust_remote_code=trusted,
                                                token=info.token, local_files_only=_local_only(info))
            return util.import_from_string(class_ref)
    except (ImportError, ValueError, OSError, AttributeError) as exc:
        raise EmbedtuneError(f"{info.source}: cannot import module class {class_ref} "
                             f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None


def _local_only(info) -> bool:
    return hub_offline() or os.path.isdir(info.st_folder)


def load_st_module(info, class_ref: str, subfolder: str):
    """Load one module of the checkpoint with its class's own `load`, as sentence-transformers 5 and 6 do.

    Its weight file is checked first (`check_module_weights`): a truncated safetensors file, or
    weights kept only as a pickle without `allow_pickle=True`, is one line naming the file."""
    import pickle

    from safetensors import SafetensorError


    cls = module_class(info, class_ref)
    local_only = _local_only(info)
    where = os.path.join(str(info.st_folder), subfolder) if subfolder else str(info.st_folder)
    check_module_weights(info, cls, subfolder, local_only)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if len(inspect.signature(cls.load).parameters) == 1:  # old-style modules: a local folder
                from sentence_transformers.util import load_dir_path

                return cls.load(load_dir_path(info.st_folder, subfolder=subfolder, token=info.token,
                                              local_files_only=local_only))
            return cls.load(info.st_folder, subfolder=subfolder, token=info.token, local_files_only=local_only,
                            trust_remote_code=bool(info.trust_remote_code))
    except (SafetensorError, pickle.UnpicklingError) as exc:
        raise refused_weights(exc, where, f"{where}/pytorch_model.bin") from None
    except RuntimeError as exc:  # the state dict does not fit the module's config (missing/unexpected keys, shapes)
        if not any(word in str(exc) for word in ("state_dict", "size mismatch", "shape")):
            raise
        raise ModelFileError(f"{where}: the {class_ref.rsplit('.', 1)[-1]} module's weights do not fit its "
                             f"config ({first_line(exc)}); re-export or re-download the model") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        offline = " (HF_HUB_OFFLINE is set)" if hub_offline() else ""
        raise EmbedtuneError(f"{info.source}: could not load its {class_ref.rsplit('.', 1)[-1]} module from "
                             f"{subfolder or 'the root'}: {first_line(exc)}{offline}") from None


def check_module_weights(info, cls, subfolder: str, local_only: bool) -> None:
    """The weight file a checkpoint module would load, checked before it does: a whole safetensors file,
    or a pickle only with `allow_pickle=True`. Local folders are checked in place; for a hub model, the
    files the module's own lookup (`load_file_path`) finds (what it would download anyway)."""
    from pathlib import Path


    allow_pickle = bool(getattr(info, "allow_pickle", False))
    if os.path.isdir(info.st_folder):
        folder = Path(info.st_folder) / subfolder
        if subfolder and folder.is_dir():
            check_weight_files(folder, allow_pickle)
        return
    find = getattr(cls, "load_file_path", None)
    if find is None:
        return
    lookup = {"subfolder": subfolder, "token": info.token, "local_files_only": local_only}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            safetensors = find(info.st_folder, filename="model.safetensors", **lookup)
            pickled = None if safetensors else find(info.st_folder, filename="pytorch_model.bin", **lookup)
    except (OSError, ValueError, TypeError):
        return  # the load itself reports what it cannot find
    if safetensors:
        check_safetensors(safetensors)
    elif pickled and not allow_pickle:
        raise ModelFileError(f"{info.st_folder}/{subfolder}/pytorch_model.bin: pickled weights are not loaded unless "
                             "allow_pickle=True (a pickle can run code); convert them to safetensors (from Python, "
                             "FastModel.from_pretrained(..., allow_pickle=True) loads them if you trust the file)")


def _match_backbone(modules, model) -> None:
    """Give the head modules the encoder's dtype, and freeze their weights under LoRA (see
    `to_sentence_transformer`)."""
    from peft import PeftModel

    dtype = next(model.parameters()).dtype
    lora = isinstance(model, PeftModel) and not getattr(model, "_embedtune_merged", False)
    for module in modules:
        if dtype.is_floating_point:
            module.to(dtype)
        if lora:
            module.requires_grad_(False)


_RESUME_FLAG = "_embedtune_peft_checkpoints"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MODULE_WEIGHTS = "model.safetensors"


def _install_peft_checkpoint_loading() -> None:
    """Make the sentence-transformers trainer reload its own checkpoints of a LoRA model.

    `BaseTrainer._load_from_checkpoint` (ST 5.7 and 6.x; run by `train(resume_from_checkpoint=...)`
    and by `load_best_model_at_end=True`) rebuilds the checkpoint as a stock SentenceTransformer and
    copies its state dict over: for a Transformer module holding a peft `PeftModel` the keys differ
    (ST 6 raises; `load_best_model_at_end` only logs it and keeps the last weights). Only models whose
    backbone embedtune built (`embedtune_built`) are taken over (`load_peft_checkpoint`); every other
    model, and FSDP / DeepSpeed runs, go to the original untouched. In full fine-tuning the stock reload builds the backbone with parts that embedtune's
    loading leaves out and the checkpoint never held (BERT's pooler): those keys alone are dropped
    (`_ignore_fresh_backbone_keys`). Subclasses that override the method (embedtune's own
    `ResumableTrainer`) are unaffected.
    """
    try:
        from sentence_transformers.base.trainer import BaseTrainer as cls
    except ImportError:  # older layouts: the trainer class itself
        from sentence_transformers import SentenceTransformerTrainer as cls
    if getattr(cls, _RESUME_FLAG, False) or "_load_from_checkpoint" not in vars(cls):
        return
    original = cls._load_from_checkpoint

    @functools.wraps(original)
    def _load_from_checkpoint(self, checkpoint_path, *args, **kwargs):
        model = getattr(self.model, "_orig_mod", self.model)
        if (args or kwargs or getattr(self, "is_fsdp_enabled", False) or getattr(self, "is_deepspeed_enabled", False)
                or not embedtune_built(first_backbone(model))):
            return original(self, checkpoint_path, *args, **kwargs)
        if unmerged_peft_backbone(model) is None:
            with _ignore_fresh_backbone_keys(model, checkpoint_path):
                return original(self, checkpoint_path, *args, **kwargs)
        load_peft_checkpoint(model, checkpoint_path)

    cls._load_from_checkpoint = _load_from_checkpoint
    setattr(cls, _RESUME_FLAG, True)


def first_backbone(st_model):
    """The backbone the SentenceTransformer's first module runs, if that module is a ST Transformer."""
    modules = getattr(st_model, "_modules", None)
    first = next(iter(modules.values()), None) if modules else None
    return getattr(first, "auto_model", None) if isinstance(first, _transformer_class()) else None


def unmerged_peft_backbone(st_model):
    """The peft `PeftModel` that the SentenceTransformer's first (Transformer) module runs, if its
    adapters are not merged (embedtune's `merge_and_unload` or peft's `merge_adapter`); else None."""
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    modules = getattr(st_model, "_modules", None)
    first = next(iter(modules.values()), None) if modules else None
    if first is None or not isinstance(first, _transformer_class()):
        return None
    backbone = getattr(first, "auto_model", None)
    if not isinstance(backbone, PeftModel) or getattr(backbone, "_embedtune_merged", False):
        return None
    if any(isinstance(m, BaseTunerLayer) and getattr(m, "merged", False) for m in backbone.modules()):
        return None
    return backbone


def load_peft_checkpoint(st_model, checkpoint_path) -> None:
    """Load a trainer checkpoint of `st_model` (whose Transformer runs an unmerged `PeftModel`) in place.

    The Transformer module's folder in the checkpoint (its modules.json path; the root for ST's own
    saves) holds the adapter as peft saves it: `adapter_model.safetensors` for the "default" adapter,
    `<name>/adapter_model.safetensors` for others. These go in with peft's `set_peft_model_state_dict`;
    the frozen base weights are the model's own already. Every other module with weights (Dense,
    LayerNorm, ...) gets them from its subfolder's `model.safetensors`, else through its class's own
    `load`. Weights are read from safetensors only; a checkpoint that has them only as pickles is refused.
    The parameters keep their identity, device and dtype, so the optimizer state loaded next still fits.
    """
    import json
    from pathlib import Path

    folder = Path(checkpoint_path)
    backbone = unmerged_peft_backbone(st_model)
    if backbone is None:
        raise EmbedtuneError("load_peft_checkpoint: the model's Transformer module holds no unmerged LoRA model")
    try:
        entries = json.loads((folder / "modules.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise EmbedtuneError(f"{folder}: cannot read the checkpoint's modules.json ({exc})") from None
    paths = {str(e.get("name", e.get("idx"))): str(e.get("path", "")) for e in entries}
    names = list(st_model._modules)
    if sorted(paths) != sorted(names):
        raise EmbedtuneError(f"{folder}: the checkpoint's modules ({sorted(paths)}) are not this model's "
                             f"({sorted(names)}); resume with the model the run was started with")
    _load_adapters(backbone, folder / paths[names[0]])
    for name in names[1:]:
        module = st_model._modules[name]
        if module is not None and module.state_dict():
            _load_module_weights(module, folder, paths[name], name)


def _load_adapters(backbone, folder) -> None:
    """Every adapter of `backbone` from where peft's `save_pretrained` put it under `folder`, checked
    against the adapter's own keys (a key may be absent only where peft dropped an alias of a saved one)."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file


    for adapter in backbone.peft_config:
        path = folder / ADAPTER_WEIGHTS if adapter == "default" else folder / adapter / ADAPTER_WEIGHTS
        if not path.is_file():
            pickled = " (it has adapter_model.bin, a pickle, which embedtune does not load)" \
                if path.with_suffix(".bin").is_file() else ""
            raise EmbedtuneError(f"{path.parent}: no {ADAPTER_WEIGHTS} for LoRA adapter {adapter!r}{pickled}")
        check_safetensors(path)  # a damaged file: one line naming it
        weights = load_file(str(path), device="cpu")
        # the adapter's own keys; embedding layers peft may add on save are not required (nor looked up online)
        expected = get_peft_model_state_dict(backbone, adapter_name=adapter, save_embedding_layers=False)
        saved_storage = {_storage(expected[k]) for k in expected if k in weights}
        missing = [k for k in expected if k not in weights and _storage(expected[k]) not in saved_storage]
        unexpected = []
        if not missing:
            before = {k: v.detach().clone() for k, v in expected.items() if isinstance(v, torch.Tensor)}
            try:
                result = set_peft_model_state_dict(backbone, weights, adapter_name=adapter)
            except RuntimeError as exc:  # shapes that differ (another rank r)
                set_peft_model_state_dict(backbone, before, adapter_name=adapter)
                raise EmbedtuneError(f"{path}: the adapter weights do not fit this model "
                                     f"({str(exc).strip().splitlines()[-1].strip()}); resume with the model "
                                     "and LoRA settings the run was started with") from None
            unexpected = list(getattr(result, "unexpected_keys", []) or [])
            if unexpected:  # leave the model as it was, not half loaded
                set_peft_model_state_dict(backbone, before, adapter_name=adapter)
        if missing or unexpected:
            detail = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
            raise EmbedtuneError(f"{path}: the adapter weights do not fit this model ({detail}); resume with "
                                 "the model and LoRA settings the run was started with")


def _storage(tensor):
    return (tensor.device, tensor.untyped_storage().data_ptr()) if isinstance(tensor, torch.Tensor) else id(tensor)


def _load_module_weights(module, root, subfolder: str, name: str) -> None:
    """A checkpoint module's weights into the live `module` (strict), from safetensors or its class's `load`."""
    from safetensors.torch import load_model


    folder = root / subfolder
    weights = folder / MODULE_WEIGHTS
    if weights.is_file():
        check_safetensors(weights)  # a damaged file: one line naming it
        load_model(module, str(weights), strict=True)
        return
    if (folder / "pytorch_model.bin").is_file():
        raise EmbedtuneError(f"{folder}: module {name} ({type(module).__name__}) has its weights only as "
                             "pytorch_model.bin, a pickle, which embedtune does not load")
    cls = type(module)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if len(inspect.signature(cls.load).parameters) == 1:  # old-style modules: a local folder
            loaded = cls.load(str(folder))
        else:
            loaded = cls.load(str(root), subfolder=subfolder, local_files_only=True)
    module.load_state_dict(loaded.state_dict())


@contextlib.contextmanager
def _ignore_fresh_backbone_keys(st_model, checkpoint_path):
    """While the stock `_load_from_checkpoint` runs: drop from the state dict it loads the keys of the
    Transformer module that the live model lacks and the checkpoint's weight files do not hold, i.e.
    parts the stock reload initialised afresh (e.g. BERT's pooler, which `FastModel.from_pretrained`
    leaves out). Everything else stays strict. No-op unless the first module is a Transformer whose
    weights the checkpoint holds as safetensors."""
    import json
    from pathlib import Path

    saved = None
    modules = getattr(st_model, "_modules", None)
    first_name, first = next(iter(modules.items()), (None, None)) if modules else (None, None)
    if first is not None and isinstance(first, _transformer_class()):
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError, StopIteration):
            folder = Path(checkpoint_path)
            entries = json.loads((folder / "modules.json").read_text(encoding="utf-8"))
            entry = next(e for e in entries if str(e.get("name", e.get("idx"))) == first_name)
            saved = _saved_weight_names(folder / str(entry.get("path", "")))
    if not saved:
        yield
        return
    live = set(st_model.state_dict())
    prefix = f"{first_name}."

    def fresh(key: str) -> bool:
        if not key.startswith(prefix) or key in live:
            return False
        inner = key[len(prefix):].split(".", 1)[-1]  # past the module's backbone attribute (model / auto_model)
        return inner not in saved

    def drop_fresh(module, state_dict, *args):  # torch's load_state_dict pre-hook: the root runs it first
        for key in [k for k in state_dict if fresh(k)]:
            del state_dict[key]

    handle = st_model.register_load_state_dict_pre_hook(drop_fresh)
    try:
        yield
    finally:
        handle.remove()


def _saved_weight_names(folder) -> set[str] | None:
    """The tensor names a transformers save put in `folder` (safetensors, single or sharded), or None."""
    import json

    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}))

    single = folder / MODULE_WEIGHTS
    if not single.is_file():
        return None
    check_safetensors(single)  # a damaged checkpoint: one line naming the file
    with safe_open(str(single), framework="pt") as handle:
        return set(handle.keys())


CARD_EXAMPLE_CHARS = 1000  # what sentence-transformers' own examples table shows of a text


def clip_card_examples(st_model, chars: int = CARD_EXAMPLE_CHARS) -> None:
    """Cut the training texts that sentence-transformers' trainer copies into the model card (the
    widget examples in its YAML header, the usage snippet) to `chars` characters, as its examples
    table already does. A pairs file of megabyte texts otherwise puts them whole into README.md, and
    writing and re-reading that YAML with PyYAML takes minutes at every save. Call before saving."""
    card = getattr(st_model, "model_card_data", None)
    if card is None:
        return

    def cut(value):
        if isinstance(value, str):
            return value if len(value) <= chars else value[:chars] + "..."
        if isinstance(value, list):
            return [cut(v) for v in value]
        if isinstance(value, tuple):
            return tuple(cut(v) for v in value)
        if isinstance(value, dict):
            return {k: cut(v) for k, v in value.items()}
        return value

    for name in ("widget", "usage_examples", "usage_examples_display"):
        value = getattr(card, name, None)
        if value:
            with contextlib.suppress(AttributeError, TypeError):
                setattr(card, name, cut(value))
