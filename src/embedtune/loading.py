"""Loading a base encoder: `FastModel`, the entry point that mirrors the guide.

`FastModel.from_pretrained` accepts a hub id, a local Hugging Face folder or a
SentenceTransformer folder, resolves the model class from the config, picks a dtype for the
hardware, and records what it learned (pooling, normalisation, architecture) on the model as
`model.embedtune_info` so later steps (LoRA defaults, the SentenceTransformer bridge) need no
second look at the checkpoint.
"""

from __future__ import annotations

import inspect
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .architectures import arch_spec
from .checkpointing import enable_checkpointing, parse_mode
from .errors import EmbedtuneError
from .hf_quiet import quiet_transformers
from .st import install_compat
from .trainer_steps import install as install_trainer_steps
# re-exported: st.py, save.py, train.py, the CLI and users import these from here
from .model_facts import DTYPE_ALIASES, DEFAULT_MODEL_ID, LoadInfo, load_info, pooling_for  # noqa: F401


from .model_files import (  # noqa: F401 - re-exported: st, lora, export, tests and users import them from here
    BUNDLED_IDS,
    ModelFileError,
    PICKLED_WEIGHTS,
    SAFETENSORS_WEIGHTS,
    _LEGACY_POOLING_KEYS,
    _StLayout,
    _read_json,
    _sharded_files,
    _size,
    _tokenizer_max_length,
    bundled_alias,
    bundled_model_path,
    check_model_folder,
    check_remote_code,
    check_safetensors,
    check_st_modules,
    check_weight_files,
    first_line,
    hub_offline,
    pooling_from_config,
    read_st_layout,
    refused_weights,
    remote_code_message,
)

# Position ids of these families start after the padding index (HF's create_position_ids_from_input_ids).
_PADDING_OFFSET_POSITIONS = {"roberta", "xlm-roberta", "camembert", "mpnet"}


def resolve_dtype(dtype: Any = None) -> torch.dtype:
    """`None` means bf16 on GPUs that support it, fp16 on older CUDA cards, fp32 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        name = DTYPE_ALIASES.get(dtype.lower())
        if name is None:
            raise EmbedtuneError(f"unknown dtype {dtype!r}; use one of bf16, fp16, fp32")
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]
    if dtype is not None:
        raise EmbedtuneError(f"unknown dtype {dtype!r}; use one of bf16, fp16, fp32")
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _is_bundled(model_name: str, source: str) -> bool:
    bundled = bundled_alias(model_name)
    return bundled is not None and Path(source) == bundled


def _resolve_source(model_name: str, token: Any = None) -> tuple[str, _StLayout | None]:
    """Map the user's model name to a local folder or hub id, reading an ST layout if there is one."""
    path = Path(os.path.expanduser(str(model_name)))
    path = bundled_alias(model_name) or path
    if path.is_dir():
        if (path / "modules.json").exists():
            return str(path), read_st_layout(path)
        if not (path / "config.json").exists():
            raise EmbedtuneError(f"{path}: not a model folder (no config.json or modules.json)")
        return str(path), None
    if path.exists() or str(model_name).startswith((".", "/", "~")) or str(model_name).count("/") > 1:
        raise EmbedtuneError(f"{model_name}: no such model folder")
    # A hub id: look for an ST layout without failing when offline.
    try:
        from huggingface_hub import hf_hub_download

        modules_file = Path(hf_hub_download(str(model_name), "modules.json", local_files_only=hub_offline(),
                                            token=token))
        return str(model_name), read_st_layout(modules_file.parent)
    except Exception:
        return str(model_name), None


def _weights_location(source: str, layout: _StLayout | None) -> str:
    """Where the encoder's weights load from. A hub id's encoder at the repository root loads by id, so
    transformers fetches (or finds cached) files the modules.json lookup did not."""
    if layout is None:
        return source
    if not Path(source).is_dir() and layout.transformer_dir == layout.folder:
        return source
    return str(layout.transformer_dir)


def _st_folder(source: str, layout: _StLayout | None) -> str | None:
    """Where the ST modules load from: the local folder, or the hub id (its modules' files may not be cached yet)."""
    if layout is None:
        return None
    return source if not Path(source).is_dir() else str(layout.folder)


# Unsloth keywords with nothing to do here: vLLM generation, name rewriting, compile and tokenizer fixes.
_IGNORED_UNSLOTH = ("fast_inference", "gpu_memory_utilization", "max_lora_rank", "disable_log_stats",
                    "float8_kv_cache", "use_exact_model_name", "fix_tokenizer", "return_logits", "fullgraph",
                    "unsloth_force_compile", "unsloth_tiled_mlp", "whisper_language", "whisper_task")


def unsloth_keywords(kwargs: dict) -> Any:
    """Take Unsloth's `from_pretrained` keywords out of `kwargs` (the rest go to the model class).

    16/32-bit loading is what embedtune does, so `load_in_16bit` and a False 4/8-bit flag are no-ops;
    quantized (4/8-bit, fp8) training is refused. Returns `use_gradient_checkpointing` if given.
    """
    for name in ("load_in_4bit", "load_in_8bit", "load_in_fp8"):
        if kwargs.pop(name, False):
            raise EmbedtuneError(f"{name}=True: quantized training is not supported; load in 16 or 32 bit "
                                 "(drop the flag, or dtype='bf16')")
    kwargs.pop("load_in_16bit", None)
    for name in _IGNORED_UNSLOTH:
        kwargs.pop(name, None)
    seed = kwargs.pop("random_state", None)
    if seed is not None:
        torch.manual_seed(int(seed))
    return kwargs.pop("use_gradient_checkpointing", None)


def _model_class(config, auto_model, name: str = ""):
    if auto_model is not None:
        return _fitting_class(config, auto_model, name)
    from transformers import AutoModel

    try:
        cls = AutoModel._model_mapping[type(config)]
    except KeyError:
        raise EmbedtuneError(
            f"no transformers model class for model_type {config.model_type!r}; pass auto_model=..."
        ) from None
    return _encoder_only_class(cls)


def _fitting_class(config, auto_model, name: str):
    """`auto_model` where it is a class of the checkpoint's family; where it is another family's base
    model class (the guide's `auto_model=BertModel` kept for a RoBERTa / XLM-R checkpoint, its
    `Qwen2Model` for Qwen3), the checkpoint's own base class, with a warning: the other family's
    class would build other layers than the checkpoint's (RoBERTa's position offset, Qwen3's q/k
    norms), so the model would train, and reload, as another model than the one saved."""
    import warnings

    from transformers import AutoModel

    wanted = getattr(getattr(auto_model, "config_class", None), "model_type", None)
    if not wanted or wanted == config.model_type:
        return auto_model
    try:
        if AutoModel._model_mapping[auto_model.config_class] is not auto_model:
            return auto_model  # a task-head class: not swapped for a base model
        own = _encoder_only_class(AutoModel._model_mapping[type(config)])
    except (KeyError, AttributeError, ImportError, ValueError):
        return auto_model
    warnings.warn(f"auto_model={auto_model.__name__} is a {wanted} class, but {name or 'the checkpoint'} is a "
                  f"{config.model_type} model: loading it as {own.__name__}, its own class (pass "
                  f"auto_model={own.__name__} or AutoModel to say so)", stacklevel=4)
    return own


def _encoder_only_class(cls):
    """An embedder uses only the encoder of an encoder-decoder family (T5 -> GTR, sentence-T5), as
    sentence-transformers loads it: transformers' `<Name>EncoderModel` where the family has one (T5,
    MT5, UMT5; a saved T5 encoder's config says `is_encoder_decoder: false` but maps to `T5Model`)."""
    import transformers

    try:
        return getattr(transformers, cls.__name__.removesuffix("Model") + "EncoderModel")
    except (AttributeError, ImportError, ValueError):
        return cls


def _load_weights(cls, weights: str, config, load_kwargs: dict, name: str, allow_pickle: bool):
    """`cls.from_pretrained` with every way a weights file can be broken turned into one line, and a
    load that would leave some of the model's weights at random initialisation refused."""
    import pickle

    from safetensors import SafetensorError

    wants_info = "output_loading_info" not in load_kwargs
    try:
        with quiet_transformers(progress_bars=True):  # no load report, and no per-load bar
            loaded = cls.from_pretrained(weights, config=config, **load_kwargs, **({"output_loading_info": True}
                                                                                   if wants_info else {}))
    except (SafetensorError, pickle.UnpicklingError) as exc:
        raise refused_weights(exc, name, name) from None
    except (OSError, EnvironmentError) as exc:
        hint = " (a pickle checkpoint needs allow_pickle=True)" if not allow_pickle else ""
        raise ModelFileError(f"could not load weights from {name}: {first_line(exc)}{hint}") from None
    except RuntimeError as exc:  # e.g. a tensor whose shape does not fit the config
        if not any(word in str(exc) for word in ("size mismatch", "shape", "state_dict")):
            raise
        raise ModelFileError(f"{name}: its weights do not fit its config.json ({first_line(exc)}); re-export or "
                             "re-download the model") from None
    if not wants_info:
        return loaded
    model, info = loaded
    # A pooler head asked for (add_pooling_layer=True) that the checkpoint lacks is not a broken file:
    # sentence pipelines never use it.
    missing = sorted(k for k in info.get("missing_keys") or () if not k.startswith("pooler."))
    if missing:
        files = sorted(Path(weights).glob("*.safetensors")) if Path(weights).is_dir() else []
        where = str(files[0]) if len(files) == 1 else name
        raise ModelFileError(
            f"{where}: lacks {len(missing)} of the {type(model).__name__} weights (e.g. {missing[0]}), "
            "which would start random; the weights file is incomplete, or belongs to another architecture"
            + (" (config.json names the checkpoint's own code in auto_map: pass trust_remote_code=True if you "
               "trust it)" if getattr(config, "auto_map", None) and not load_kwargs.get("trust_remote_code") else "")
        )
    return model


# ---------------------------------------------------------------- weights the model in memory does not build

# The checkpoint's tensors that the model in memory leaves out (BERT's pooler under
# add_pooling_layer=False): kept on the CPU, written back by every save_pretrained of the model.
KEPT_WEIGHTS = "embedtune_kept_weights"
POOLER_PREFIX = "pooler."


def _pooler_key_names(cls):
    """A test on checkpoint key names: the pooler's, bare or under the class's base_model_prefix."""
    prefixes = (POOLER_PREFIX,)
    base = getattr(cls, "base_model_prefix", "") or ""
    if base:
        prefixes += (f"{base}.{POOLER_PREFIX}",)

    def name(key: str) -> str | None:
        for prefix in prefixes:
            if key.startswith(prefix):
                return POOLER_PREFIX + key[len(prefix):]
        return None

    return name


def _weight_files(weights: str, local: dict) -> list[Path]:
    """The safetensors files of a local folder or of a hub model (as cached by the load that just ran)."""
    folder = Path(weights)
    if folder.is_dir():
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            return _sharded_files(index)
        return [folder / "model.safetensors"] if (folder / "model.safetensors").is_file() else []
    try:
        from transformers.utils import cached_file

        lookup = {"local_files_only": True, "_raise_exceptions_for_missing_entries": False}
        if local.get("token") is not None:
            lookup["token"] = local["token"]
        single = cached_file(weights, "model.safetensors", **lookup)
        if single:
            return [Path(single)]
        index = cached_file(weights, "model.safetensors.index.json", **lookup)
        if index:
            names = sorted(set(_read_json(Path(index)).get("weight_map", {}).values()))
            found = [cached_file(weights, n, **lookup) for n in names]
            return [Path(f) for f in found if f]
    except Exception:  # noqa: BLE001 - nothing cached to read: nothing kept (the model itself loaded)
        pass
    return []


def checkpoint_tensors(weights: str, rename, local: dict | None = None) -> dict[str, torch.Tensor]:
    """The tensors of the checkpoint at `weights` whose names `rename` maps (to the returned names), on the CPU."""
    from safetensors import safe_open

    found: dict[str, torch.Tensor] = {}
    for path in _weight_files(weights, local or {}):
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                target = rename(key)
                if target is not None:
                    found[target] = handle.get_tensor(key)
    return found


def checkpoint_has_pooler(folder: str | os.PathLike) -> bool:
    """Whether a local model folder's weights hold a pooler (bare or under a base_model_prefix)."""
    from safetensors import safe_open

    for path in _weight_files(str(folder), {}):
        with safe_open(str(path), framework="pt") as handle:
            if any(k.startswith(POOLER_PREFIX) or f".{POOLER_PREFIX}" in k for k in handle.keys()):
                return True
    return False


def keep_unbuilt_weights(model, tensors: dict[str, torch.Tensor]) -> None:
    """Keep checkpoint tensors that `model` does not build (its pooler, say) so that nothing it loaded is
    lost: every `model.save_pretrained` writes them beside the model's own weights (cast to its dtype), and
    `model.load_state_dict` takes them (a trainer checkpoint reloaded onto the model) without calling them
    unexpected. The model's parameters, its `state_dict()` and its forward are untouched, so training,
    optimizers and distributed wrappers see exactly the model that was built."""
    import types

    if not tensors:
        return
    model.__dict__[KEPT_WEIGHTS] = {k: v.detach().to("cpu") for k, v in tensors.items()}
    if "save_pretrained" not in model.__dict__:
        # a bound method (not a closure), so that copy.deepcopy binds it to the copy
        model.save_pretrained = types.MethodType(_save_pretrained_keeping, model)
        model.register_load_state_dict_pre_hook(_take_kept_weights)


def _save_pretrained_keeping(self, save_directory, *args, **kwargs):
    kept = self.__dict__.get(KEPT_WEIGHTS)
    if kept and not args:
        state = kwargs.get("state_dict")
        state = dict(self.state_dict() if state is None else state)
        reference = next(iter(self.parameters()), None)
        for key, tensor in kept.items():
            if key not in state:
                state[key] = tensor.to(device=reference.device, dtype=reference.dtype) \
                    if reference is not None and tensor.is_floating_point() else tensor
        kwargs["state_dict"] = state
    return type(self).save_pretrained(self, save_directory, *args, **kwargs)


def _take_kept_weights(module, state_dict, prefix, *args) -> None:
    kept = module.__dict__.get(KEPT_WEIGHTS)
    if not kept:
        return
    for key in list(state_dict):
        if key.startswith(prefix) and key[len(prefix):] in kept:
            kept[key[len(prefix):]] = state_dict.pop(key).detach().to("cpu")


def _broken_json(folder: Path) -> Path | None:
    """The first JSON file in `folder` that does not parse (to name it when a loader fails), or None."""
    for path in sorted(folder.glob("*.json")):
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            return path
    return None


def _accepts(cls, name: str) -> bool:
    try:
        params = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return False
    return name in params


def _max_positions(config) -> int | None:
    limit = getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int) or limit <= 0:
        return None
    if config.model_type in _PADDING_OFFSET_POSITIONS:
        limit -= (getattr(config, "pad_token_id", 1) or 1) + 1
    return limit


def _check_local_files(weights: str, layout: _StLayout | None, name: str, trust_remote_code: bool,
                       allow_pickle: bool) -> None:
    """Check a local model's files before any loader reads them, so that a broken file is one line
    naming it rather than a traceback from deep inside transformers."""
    if Path(weights).is_dir():
        if (Path(weights) / "config.json").is_file():
            check_remote_code(Path(weights) / "config.json", name, trust_remote_code)
        check_weight_files(weights, allow_pickle)
    if layout is not None:
        check_st_modules(layout, allow_pickle)


def _load_config(weights: str, name: str, trust_remote_code: bool, local: dict):
    """The checkpoint's transformers config; a missing, offline-only or remote-code config is one
    line saying which (AutoConfig's own errors are long and name no fix)."""
    from transformers import AutoConfig  # heavy: only when a model loads

    try:
        return AutoConfig.from_pretrained(weights, trust_remote_code=trust_remote_code, **local)
    except OSError as exc:
        offline = " (HF_HUB_OFFLINE is set: only local folders and cached hub models load)" if hub_offline() else ""
        raise EmbedtuneError(f"could not load a model config from {name}: {first_line(exc)}"
                             f"{offline}") from None
    except ValueError as exc:  # a hub checkpoint whose config needs its own code, or an unknown model_type
        if "trust_remote_code" in str(exc):
            raise ModelFileError(remote_code_message(name, "its config.json")) from None
        raise ModelFileError(f"could not load a model config from {name}: {first_line(exc)}") from None


def _load_tokenizer(folder: str, name: str, trust_remote_code: bool, local: dict):
    """The checkpoint's tokenizer; a broken tokenizer file is one line naming it (tokenizers raises
    a bare Exception that names none)."""
    from transformers import AutoTokenizer  # heavy: only when a model loads

    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code, **local)
    except Exception as exc:  # noqa: BLE001 - tokenizers raises plain Exception for a broken tokenizer.json
        broken = _broken_json(Path(folder)) if Path(folder).is_dir() else None
        raise ModelFileError(f"{broken or f'could not load a tokenizer from {name}'}: {first_line(exc)}; "
                             "re-export or re-download the model's tokenizer files") from None


def lowercase_inputs(tokenizer) -> None:
    """Make `tokenizer` lowercase its texts, as sentence-transformers does for a Transformer module saved
    with `do_lower_case: true` (a Lowercase normalizer first; the slow tokenizers' own flag). A tokenizer
    class with a `do_lower_case` setting (BERT's) gets it too: transformers 5 rebuilds such a tokenizer's
    normalizer from its saved tokenizer_config.json, which then says to lowercase."""
    if hasattr(tokenizer, "do_lower_case") or not getattr(tokenizer, "is_fast", False):
        try:
            tokenizer.do_lower_case = True
        except AttributeError:
            tokenizer.basic_tokenizer.do_lower_case = True
    if getattr(tokenizer, "is_fast", False):
        from tokenizers.normalizers import Lowercase, Sequence

        backend = tokenizer.backend_tokenizer
        normalizer = backend.normalizer
        if normalizer is not None and normalizer.normalize_str("A") == "a":
            return  # it lowercases already
        parts = list(normalizer) if isinstance(normalizer, Sequence) else [normalizer] if normalizer else []
        backend.normalizer = Sequence([Lowercase(), *parts])


def _set_max_length(tokenizer, config, layout: _StLayout | None, max_seq_length: int | None) -> int:
    """Fix the tokenizer's length limit and padding: the length asked for, else the checkpoint's own
    setting, else its position table, else 512, never past what the position table holds; decoders
    without a pad token pad with EOS. Returns the length."""
    limit = _max_positions(config)
    if max_seq_length is None:
        max_seq_length = (layout.max_seq_length if layout else None) or limit or 512
    max_seq_length = min(max_seq_length, limit) if limit else max_seq_length
    tokenizer.model_max_length = max_seq_length
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return max_seq_length


class FastModel:
    """The guide's entry point: `from_pretrained` loads an encoder, `get_peft_model` adds LoRA."""

    @staticmethod
    def from_pretrained(
        model_name: str = DEFAULT_MODEL_ID,
        auto_model: type | None = None,
        max_seq_length: int | None = 512,
        dtype: Any = None,
        add_pooling_layer: bool = False,
        trust_remote_code: bool = False,
        allow_pickle: bool = False,
        device: str | torch.device | None = None,
        fast: bool = True,
        compile: bool | str = "auto",
        cuda_graphs: bool | None = None,
        full_finetuning: bool = False,
        token: Any = None,
        **kwargs: Any,
    ):
        """Load `(model, tokenizer)` for fine-tuning. Weights load from safetensors only unless `allow_pickle`.

        `fast=True` switches supported architectures to the padding-free packed forward
        (`embedtune.packing`); outputs are the same, the dense layers just skip padding. `compile`:
        "auto" compiles the packed layers on a GPU once a training run has gone on long enough to
        earn the warm-up back (`speed.CompileWhenItPays`); True / False decide it now. `cuda_graphs`:
        a SentenceTransformerTrainer replays this model's steps as CUDA graphs where they pay (None:
        on a GPU, for runs long enough, with a loss the graph step covers; `trainer_steps`); False
        keeps them eager, True asks for them whatever the run's length. Eager steps with such a loss
        embed all columns in one forward either way.
        Unsloth's own keywords are accepted (`unsloth_keywords`); `full_finetuning=True` is recorded
        and makes `get_peft_model` leave every weight trainable instead of adding LoRA.
        """
        name = str(model_name)
        checkpointing = unsloth_keywords(kwargs)
        source, layout = _resolve_source(name, token)
        weights = _weights_location(source, layout)
        _check_local_files(weights, layout, name, trust_remote_code, allow_pickle)
        # A local folder, or HF_HUB_OFFLINE: transformers must not look anything up on the hub.
        local = {"local_files_only": True} if Path(weights).is_dir() or hub_offline() else {}
        if token is not None:
            local["token"] = token
        config = _load_config(weights, name, trust_remote_code, local)
        cls = _model_class(config, auto_model, name)
        load_kwargs: dict[str, Any] = {"dtype": resolve_dtype(dtype), "trust_remote_code": trust_remote_code, **local}
        if not allow_pickle:
            load_kwargs["use_safetensors"] = True
        if _accepts(cls, "add_pooling_layer"):
            load_kwargs["add_pooling_layer"] = add_pooling_layer
        load_kwargs.update(kwargs)
        model = _load_weights(cls, weights, config, load_kwargs, name, allow_pickle)
        if load_kwargs.get("add_pooling_layer") is False:
            # not built (training never reads it), but the checkpoint's own pooler goes into every save
            keep_unbuilt_weights(model, checkpoint_tensors(weights, _pooler_key_names(cls), local))
        tokenizer = _load_tokenizer(weights, name, trust_remote_code, local)
        if layout is not None and layout.do_lower_case:
            lowercase_inputs(tokenizer)  # as the checkpoint's Transformer module does: trained and saved so
        max_seq_length = _set_max_length(tokenizer, config, layout, max_seq_length)

        model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model.embedtune_info = LoadInfo(
            source=name,
            weights_path=weights,
            model_type=config.model_type,
            pooling=layout.pooling if layout else None,
            normalize=layout.normalize if layout else None,
            max_seq_length=max_seq_length,
            spec=arch_spec(config.model_type),
            prompts=layout.prompts if layout else None,
            similarity_fn_name=layout.similarity_fn_name if layout else None,
            default_prompt_name=layout.default_prompt_name if layout else None,
            st_folder=_st_folder(source, layout),
            st_modules=layout.modules if layout else None,
            bundled=_is_bundled(name, source),
            full_finetuning=bool(full_finetuning),
            trust_remote_code=trust_remote_code,
            allow_pickle=allow_pickle,
            token=token,
            cuda_graphs=cuda_graphs,
        )
        if fast:
            from .packing import enable_fast_path  # packing imports transformers: kept off `import loading`

            enable_fast_path(model, compile=compile)
        if full_finetuning and checkpointing not in (None, False):
            enable_checkpointing(model, parse_mode(checkpointing))
        if full_finetuning:  # Unsloth's saves, also without get_peft_model (peft imported for this case only)
            from .lora_model import attach_full_finetuning_saves

            attach_full_finetuning_saves(model)
        install_compat()  # what the guide's own wrapper code needs, for the models embedtune builds
        install_trainer_steps()  # a SentenceTransformerTrainer runs the steps embedtune chooses for its models
        return model, tokenizer

    @staticmethod
    def get_peft_model(model, *args, **kwargs):
        """Add LoRA adapters; see `embedtune.lora.get_peft_model`."""
        from .lora_model import get_peft_model  # peft is heavy: imported when LoRA is added

        return get_peft_model(model, *args, **kwargs)

    @staticmethod
    def for_training(model):
        """Kept for API parity with the guide's library; the model is already trainable."""
        model.train()
        return model

    @staticmethod
    def for_inference(model):
        """Unsloth's switch to inference: evaluation mode (no dropout), the model returned."""
        model.eval()
        return model
