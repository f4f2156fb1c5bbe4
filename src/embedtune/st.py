"""The SentenceTransformer bridge: wrap an in-memory model, and keep the guide's wrapper working.

`to_sentence_transformer` builds the stock modules (Transformer, Pooling, Normalize) around
the model already in memory: no second load, no network. `install_compat` is the one narrow
patch of sentence-transformers that embedtune makes, applied on import: on ST 6 it makes
`sentence_transformers.models` reachable again and makes assigning `auto_model`/`tokenizer` on a
Transformer module really replace the backbone (stock ST 6 silently registers a stray submodule
and keeps running the old model).
"""

from __future__ import annotations

import contextlib
import inspect
import tempfile
import warnings

import torch

from .loading import load_info, pooling_for

_COMPAT_FLAG = "_embedtune_compat"


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


def install_compat() -> None:
    """Apply the ST 6 compatibility patch once (no-op on ST 5, where these attributes are plain)."""
    cls = _transformer_class()
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
                            normalize: bool = True):
    """Wrap a loaded (optionally LoRA) model as a SentenceTransformer without reloading it.

    `pooling=None` uses the checkpoint's own pooling where known, else cls for encoders and
    lasttoken for decoders.
    """
    from sentence_transformers import SentenceTransformer

    models = st_modules()
    first = transformer_module(model, tokenizer, max_seq_length)
    mode = pooling_for(model, pooling)
    modules = [first, models.Pooling(model.config.hidden_size, pooling_mode=mode)]
    if normalize:
        modules.append(models.Normalize())
    device = next(model.parameters()).device
    st_model = SentenceTransformer(modules=modules, device=str(device))
    info = load_info(model)
    if info is not None:
        if info.prompts:  # a checkpoint's own prompts (e.g. E5's "query: ") keep applying
            st_model.prompts = dict(info.prompts)
        with contextlib.suppress(Exception):
            st_model.model_card_data.base_model = info.source
    return st_model

