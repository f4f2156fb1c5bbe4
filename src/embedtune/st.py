"""The SentenceTransformer bridge: wrap an in-memory model, and keep the guide's wrapper working.

`to_sentence_transformer` puts a stock ST Transformer module around the model already in memory
(no second load of the encoder) and rebuilds the checkpoint's own pipeline after it (Pooling, Dense,
Normalize, ... as its modules.json lists them; Pooling + Normalize for a plain HF checkpoint).
`install_compat` is the one narrow patch of sentence-transformers that embedtune makes, applied on
import: the Transformer constructor loads the bundled all-MiniLM-L6-v2 for that model's hub id (as
`FastModel.from_pretrained` does), and on ST 6 it makes `sentence_transformers.models` reachable
again and makes assigning `auto_model`/`tokenizer` on a Transformer module really replace the
backbone (stock ST 6 silently registers a stray submodule and keeps running the old model).
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
from .loading import bundled_alias, hub_offline, load_info, pooling_for, pooling_from_config

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


def install_compat() -> None:
    """Apply the compatibility patch once: the bundled model's names (ST 5 and 6), and on ST 6 the
    backbone/tokenizer assignment (ST 5 keeps these attributes plain)."""
    cls = _transformer_class()
    _resolve_bundled_names(cls)
    if getattr(cls, _COMPAT_FLAG, False) or not _backbone_is_property(cls):
        return
    original_setattr = cls.__setattr__

    def __setattr__(self, name, value):
        if name == "auto_model":
            replace_backbone(self, value)
        elif name == "tokenizer":
            replace_tokenizer(self, value)
        else:
            original_setattr(self, name, value)

    cls.__setattr__ = __setattr__
    setattr(cls, _COMPAT_FLAG, True)


@contextlib.contextmanager
def _reuse_model(cls, model):
    """Make the ST Transformer constructor adopt `model` instead of loading weights."""
    original = cls._load_model
    as_property = _backbone_is_property(cls)

    def _load_model(self, *args, **kwargs):
        if as_property:
            return model
        self.auto_model = model  # ST 5: a plain attribute
        return None

    cls._load_model = _load_model
    try:
        yield
    finally:
        cls._load_model = original


def transformer_module(model, tokenizer, max_seq_length: int | None = None):
    """A stock ST Transformer module around the in-memory `model` and `tokenizer`."""
    install_compat()
    cls = _transformer_class()
    if max_seq_length is None:
        info = load_info(model)
        max_seq_length = info.max_seq_length if info else tokenizer.model_max_length
    with tempfile.TemporaryDirectory(prefix="embedtune-st-") as tmp:
        # ST reads the config and tokenizer from a folder; we give it the in-memory ones' files.
        model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        with _reuse_model(cls, model), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = cls(tmp, max_seq_length=max_seq_length)
    install_compat()
    if _backbone_is_property(cls):
        replace_tokenizer(module, tokenizer)
    else:
        module.tokenizer = tokenizer
    tokenizer.model_max_length = max_seq_length
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
    if info is not None:
        if info.prompts:  # a checkpoint's own prompts (e.g. E5's "query: ") keep applying
            st_model.prompts = dict(info.prompts)
        with contextlib.suppress(Exception):
            st_model.model_card_data.base_model = info.source
    return st_model


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
    """Load one module of the checkpoint with its class's own `load`, as sentence-transformers 5 and 6 do."""
    cls = module_class(info, class_ref)
    local_only = _local_only(info)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if len(inspect.signature(cls.load).parameters) == 1:  # old-style modules: a local folder
                from sentence_transformers.util import load_dir_path

                return cls.load(load_dir_path(info.st_folder, subfolder=subfolder, token=info.token,
                                              local_files_only=local_only))
            return cls.load(info.st_folder, subfolder=subfolder, token=info.token, local_files_only=local_only,
                            trust_remote_code=bool(info.trust_remote_code))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        offline = " (HF_HUB_OFFLINE is set)" if hub_offline() else ""
        raise EmbedtuneError(f"{info.source}: could not load its {class_ref.rsplit('.', 1)[-1]} module from "
                             f"{subfolder or 'the root'}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                             f"{offline}") from None


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
