"""Exports: hand a trained model over in the format its consumer loads (`embedtune export`).

MODEL is a run output folder (`model/`, maybe `adapter/`, `metrics.json`), a model folder
(SentenceTransformer or plain Hugging Face) or an adapter folder. Formats:

- ``sentence-transformers``: the merged model as a stock SentenceTransformer folder.
- ``hf``: the plain encoder + tokenizer for `transformers.AutoModel`; the card says how to pool.
- ``adapter``: the LoRA adapter only, with its base model recorded (reloads with plain peft or
  `embedtune.lora.load_adapter`).
- ``onnx``: the whole sentence pipeline (encoder, pooling, normalisation) as one graph from token
  ids to ``sentence_embedding``, traced with torch.onnx's TorchScript exporter (seconds, and no
  onnxscript needed). Before the folder is put in place the graph runs in onnxruntime on probe
  texts and must match the PyTorch model (cosine >= 0.9999), else the export is refused. Variants sit beside
  ``model.onnx``: ``fp16`` (weights in half precision, fp32 inputs/outputs, held to cosine >= 0.999)
  and ``int8`` (onnxruntime dynamic quantisation, per channel; its cosine is reported, and one below
  0.95 is flagged, never refused: int8 trades accuracy for size by design).

Every export writes a README.md model card (sentence-transformers' own, completed with embedtune's
facts: `model_card`) and is written atomically.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import logging
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import EmbedtuneError
from .hf_quiet import quiet_transformers
from .loading import (
    FastModel,
    ModelFileError,
    _accepts,
    _model_class,
    _read_json,
    bundled_alias,
    check_model_folder,
    check_safetensors,
    checkpoint_has_pooler,
    first_line,
    hub_offline,
    pooling_from_config,
    read_st_layout,
)
from .lora import (
    check_adapter_files,
    check_adapter_fits,
    load_adapter,
    merge_lora,
    read_adapter_config,
    read_adapter_pipeline,
)
from .model_card import CardFacts, complete_saved_card, source_card, st_card_text, write_model_card
from .files import atomic_folder, check_target
from .save import ADAPTER_PIPELINE
from .st import set_backbone, to_sentence_transformer

FORMATS = ("sentence-transformers", "hf", "adapter", "onnx")
ONNX_VARIANTS = ("fp16", "int8")
ONNX_FILE = "model.onnx"
ONNX_OUTPUT = "sentence_embedding"
# The encoder's token embeddings, the output sentence-transformers' ONNX backend (optimum's
# ORTModelForFeatureExtraction) reads; its own Pooling / Normalize modules then run on them.
ONNX_TOKENS = "last_hidden_state"
ONNX_OPSET = 17
ONNX_MIN_COSINE = 0.9999
# variant -> (floor, enforced): fp16 below its floor is a broken export; int8 is only flagged.
VARIANT_MIN_COSINE = {"fp16": (0.999, True), "int8": (0.95, False)}
_TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
_PLAIN_MODULES = {"Transformer", "Pooling", "Normalize"}

DEFAULT_PROBE_TEXTS = (
    "How do I reverse a list in Python?",
    "def reverse(items):\n    return items[::-1]",
    "The Eiffel Tower is 330 metres tall and stands in Paris.",
    "Wie spät ist es?",
    "x",
    "Binary search halves the search interval at every step until the target is found or the "
    "interval is empty; it needs the input to be sorted and runs in logarithmic time. " * 12,
)


@dataclass
class ExportSource:
    """Where the parts of MODEL live: the merged model, the adapter, the training record."""

    path: Path
    model_dir: Path | None = None  # SentenceTransformer or HF folder
    adapter_dir: Path | None = None
    metrics: dict | None = None


@dataclass
class OnnxCheck:
    """One ONNX file compared with the PyTorch model on the probe texts."""

    file: str
    precision: str
    min_cosine: float
    threshold: float
    enforced: bool

    @property
    def passed(self) -> bool:
        return self.min_cosine >= self.threshold


@dataclass
class ExportResult:
    format: str
    output: Path
    files: list[str] = field(default_factory=list)
    checks: list[OnnxCheck] = field(default_factory=list)


def _read_metrics(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise EmbedtuneError(f"{path}: unreadable training record ({exc})") from None


def _is_model_dir(path: Path) -> bool:
    return (path / "modules.json").is_file() or (path / "config.json").is_file()


def _is_adapter_dir(path: Path | None) -> bool:
    return path is not None and (path / "adapter_config.json").is_file()


def find_source(model_path: str | os.PathLike) -> ExportSource:
    """Read MODEL's layout: a run folder, a model folder (maybe `RUN/model`) or an adapter folder."""
    path = Path(os.path.expanduser(str(model_path)))
    if not path.is_dir():
        raise EmbedtuneError(f"{model_path}: no such folder (export takes a run output folder or a model folder)")
    if (path / "model").is_dir() and _is_model_dir(path / "model"):  # a run output folder
        adapter = path / "adapter"
        return ExportSource(path, path / "model", adapter if _is_adapter_dir(adapter) else None,
                            _read_metrics(path / "metrics.json"))
    run = path.parent if path.name in ("model", "adapter") and (path.parent / "metrics.json").is_file() else None
    metrics = _read_metrics(run / "metrics.json") if run else None
    if _is_adapter_dir(path):
        model = run / "model" if run and _is_model_dir(run / "model") else None
        return ExportSource(path, model, path, metrics)
    if _is_model_dir(path):
        adapter = run / "adapter" if run else None
        return ExportSource(path, path, adapter if _is_adapter_dir(adapter) else None, metrics)
    raise EmbedtuneError(f"{path}: not a run output or model folder (no model/, modules.json, config.json "
                         "or adapter_config.json)")


def _check_output(source: ExportSource, output: Path, overwrite: bool) -> Path:
    """Refuse a target that is not free, or whose replacement would delete the model being exported."""
    check_target(output, overwrite)
    target = output.resolve()
    for part in (source.path, source.model_dir, source.adapter_dir):
        if part is not None and (target == part.resolve() or target in part.resolve().parents):
            raise EmbedtuneError(f"{output}: is (or holds) the model being exported; choose another --output")
    return output


def export(model_path: str | os.PathLike, to: str = "sentence-transformers", output: str | os.PathLike = None,
           overwrite: bool = False, probe_texts: list[str] | None = None,
           onnx_variant: str | None = None) -> ExportResult:
    """Export MODEL to `output` in format `to`; see the module docstring for the formats."""
    if to not in FORMATS:
        raise EmbedtuneError(f"--to {to!r} is not one of {', '.join(FORMATS)}")
    if onnx_variant is not None and onnx_variant not in ONNX_VARIANTS:
        raise EmbedtuneError(f"--onnx-variant {onnx_variant!r} is not one of {', '.join(ONNX_VARIANTS)}")
    if onnx_variant is not None and to != "onnx":
        raise EmbedtuneError(f"--onnx-variant applies to --to onnx, not --to {to}")
    if output is None:
        raise EmbedtuneError("export needs an output folder (--output)")
    source = find_source(model_path)
    output = _check_output(source, Path(output), overwrite)
    if to == "adapter":
        return _export_adapter(source, output, overwrite)
    # transformers' per-load and per-save bars say nothing an export's own report does not
    with quiet_transformers(logs=False, progress_bars=True):
        st = _load_sentence_transformer(source)
        if to == "sentence-transformers":
            return _export_sentence_transformers(st, source, output, overwrite)
        if to == "hf":
            return _export_hf(st, source, output, overwrite)
        texts = list(probe_texts) if probe_texts else list(DEFAULT_PROBE_TEXTS)
        return _export_onnx(st, source, output, overwrite, texts, onnx_variant)


# ---------------------------------------------------------------- loading the model to export


def _load_sentence_transformer(source: ExportSource):
    """The model as a SentenceTransformer on CPU: stock loading for ST folders (every module kept),
    embedtune's for plain HF folders (its pooling defaults) and for adapters (merged onto the base)."""
    import torch

    if source.model_dir is not None and (source.model_dir / "modules.json").is_file():
        import pickle

        from safetensors import SafetensorError
        from sentence_transformers import SentenceTransformer

        check_model_folder(source.model_dir)  # a broken file: one line naming it, before the stock loader reads it
        try:
            with warnings.catch_warnings(), quiet_transformers():
                warnings.simplefilter("ignore")
                return SentenceTransformer(str(source.model_dir), device="cpu", local_files_only=True,
                                           trust_remote_code=False,
                                           model_kwargs=_encoder_load_kwargs(source.model_dir)).eval()
        except (SafetensorError, pickle.UnpicklingError) as exc:
            raise ModelFileError(f"{source.model_dir}: a weights file is broken ({first_line(exc)}); re-export or "
                                 "re-download the model") from None
        except (OSError, ValueError) as exc:
            raise EmbedtuneError(f"{source.model_dir}: could not load it: {first_line(exc)}") from None
    if source.model_dir is not None:
        model, tokenizer = FastModel.from_pretrained(str(source.model_dir), max_seq_length=None,
                                                     dtype=torch.float32, fast=False, device="cpu")
        return to_sentence_transformer(model, tokenizer).eval()
    model, tokenizer = load_adapter(source.adapter_dir, dtype=torch.float32, fast=False, device="cpu")
    st = to_sentence_transformer(model, tokenizer, normalize=_adapter_pipeline(source.adapter_dir).get("normalize", True))
    set_backbone(st[0], merge_lora(model))
    return st.eval()


def _encoder_load_kwargs(folder: Path | str) -> dict[str, Any]:
    """Safetensors only; and for a class with a pooler head (BERT's), the head exactly when the checkpoint
    holds its weights: a pooler that was saved is exported with the rest, and one that never was is not
    built (it would start random in every export)."""
    kwargs: dict[str, Any] = {"use_safetensors": True}
    if _builds_pooler(folder) and not checkpoint_has_pooler(_encoder_folder(folder)):
        kwargs["add_pooling_layer"] = False
    return kwargs


def _encoder_folder(folder: Path | str) -> Path:
    """The folder that holds the encoder's config and weights (a SentenceTransformer's Transformer module)."""
    folder = bundled_alias(str(folder)) or Path(folder)  # the bundled MiniLM's hub id: its local copy
    if (Path(folder) / "modules.json").is_file():
        return read_st_layout(Path(folder)).transformer_dir
    return Path(folder)


def _builds_pooler(folder: Path | str) -> bool:
    """Whether the model class of the encoder in `folder` (a local folder or the bundled model's name)
    takes `add_pooling_layer` (BERT, RoBERTa, XLM-R, ...)."""
    from transformers import AutoConfig

    try:
        folder = _encoder_folder(folder)
        with quiet_transformers():
            config = AutoConfig.from_pretrained(str(folder), trust_remote_code=False,
                                                local_files_only=folder.is_dir() or hub_offline())
        return _accepts(_model_class(config, None), "add_pooling_layer")
    except (OSError, ValueError, EmbedtuneError):
        return False  # the load itself reports what is wrong


def _adapter_pipeline(adapter_dir: Path) -> dict:
    return read_adapter_pipeline(adapter_dir)


def _pipeline_facts(st) -> dict[str, Any]:
    """Pooling, normalisation, length and prompts of a loaded SentenceTransformer, for the card."""
    facts: dict[str, Any] = {"pooling": None, "normalize": False, "max_seq_length": st.max_seq_length,
                             "prompts": {k: v for k, v in (st.prompts or {}).items() if v} or None,
                             "extra_modules": []}
    for module in st:
        name = type(module).__name__
        if name == "Pooling":
            facts["pooling"] = pooling_from_config(module.get_config_dict())
        elif name == "Normalize":
            facts["normalize"] = True
        elif name not in _PLAIN_MODULES:
            facts["extra_modules"].append(name)
    return facts


def _base_model(source: ExportSource) -> str | None:
    """The model the fine-tune started from: the training record's, else the adapter's."""
    config = (source.metrics or {}).get("config") or {}
    if config.get("model"):
        return str(config["model"])
    if source.adapter_dir is not None:
        named = _adapter_pipeline(source.adapter_dir).get("base_model")
        if named:
            return str(named)
        recorded = _read_json(source.adapter_dir / "adapter_config.json")
        return recorded.get("base_model_name_or_path") if isinstance(recorded, dict) else None
    return None


def _facts(fmt: str, source: ExportSource, output: Path, pipeline: dict, **extra) -> CardFacts:
    return CardFacts(format=fmt, location=output.name, base_model=_base_model(source), metrics=source.metrics,
                     pooling=pipeline.get("pooling"), normalize=pipeline.get("normalize"),
                     max_seq_length=pipeline.get("max_seq_length"), prompts=pipeline.get("prompts"), **extra)


def _write_card(st, folder: Path, facts: CardFacts) -> None:
    """The export's card: sentence-transformers' own for the model (the one it was saved with, for a
    run's model/: the trainer's), completed with embedtune's section for this format."""
    facts.st_card = st_card_text(st, folder)
    write_model_card(folder, facts)


def complete_run_card(st, model_dir: Path, metrics: dict) -> None:
    """A training run's model/ card: the one sentence-transformers' save wrote there (its trainer's facts:
    model-index, hyperparameters, logs), completed with embedtune's section from the run's metrics.
    A folder without a sentence-transformers card is left as it is."""
    if source_card(model_dir) is None:
        return
    pipeline = _pipeline_facts(st)
    complete_saved_card(model_dir, CardFacts(
        format="sentence-transformers", location=Path(model_dir).name,
        base_model=(metrics.get("config") or {}).get("model"), metrics=metrics, pooling=pipeline["pooling"],
        normalize=pipeline["normalize"], max_seq_length=pipeline["max_seq_length"], prompts=pipeline["prompts"]))


def write_run_adapter_card(st, adapter_dir: Path, metrics: dict) -> None:
    """A training run's adapter/ card: embedtune's, as `export --to adapter` writes it (peft's own is a
    blank template that names the base by its local path)."""
    recorded = _read_json(Path(adapter_dir) / "adapter_config.json")
    base = recorded.get("base_model_name_or_path") if isinstance(recorded, dict) else None
    pipeline = _pipeline_facts(st)
    write_model_card(adapter_dir, CardFacts(
        format="adapter", location=Path(adapter_dir).name, base_model=(metrics.get("config") or {}).get("model"),
        metrics=metrics, pooling=pipeline["pooling"], normalize=pipeline["normalize"],
        max_seq_length=pipeline["max_seq_length"], prompts=pipeline["prompts"], adapter_base=base,
        adapter_base_kwargs="add_pooling_layer=False" if base and _builds_pooler(base) else None))


def verify_written(folder: Path) -> None:
    """What an export wrote, read back before the folder is put in place: every safetensors file whole
    (its header parses and its tensors cover the file exactly) and every JSON file parses. A write
    cut short (a full disk, say) is one line, and the temp folder goes away with the failed export."""
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        try:
            if path.suffix == ".safetensors":
                check_safetensors(path)
            elif path.suffix == ".json":
                json.loads(path.read_text(encoding="utf-8"))
        except (ModelFileError, OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise EmbedtuneError(f"export refused: {path.name} did not read back as written ({exc}); nothing "
                                 "was put in place (is the disk full?)") from None


def _finish(fmt: str, output: Path, checks: list[OnnxCheck] | None = None) -> ExportResult:
    files = sorted(str(p.relative_to(output)) for p in output.rglob("*") if p.is_file())
    return ExportResult(fmt, output, files, checks or [])


# ---------------------------------------------------------------- formats


def _export_sentence_transformers(st, source: ExportSource, output: Path, overwrite: bool) -> ExportResult:
    with atomic_folder(output, overwrite) as tmp:
        st.save(str(tmp), create_model_card=False, safe_serialization=True)
        _write_card(st, tmp, _facts("sentence-transformers", source, output, _pipeline_facts(st)))
        verify_written(tmp)
    return _finish("sentence-transformers", output)


def _export_hf(st, source: ExportSource, output: Path, overwrite: bool) -> ExportResult:
    pipeline = _pipeline_facts(st)
    if pipeline["extra_modules"]:
        raise EmbedtuneError(
            f"{source.path}: the model has {', '.join(pipeline['extra_modules'])} module(s) after the encoder, "
            "which a plain encoder cannot hold; export --to sentence-transformers or onnx instead"
        )
    backbone, tokenizer = st[0].auto_model, st[0].tokenizer
    if st.max_seq_length:
        tokenizer.model_max_length = st.max_seq_length  # `truncation=True` then cuts where ST does
    with atomic_folder(output, overwrite) as tmp:
        backbone.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        _write_card(st, tmp, _facts("hf", source, output, pipeline))
        verify_written(tmp)
    return _finish("hf", output)


def _export_adapter(source: ExportSource, output: Path, overwrite: bool) -> ExportResult:
    if source.adapter_dir is None:
        raise EmbedtuneError(
            f"{source.path}: no LoRA adapter to export (LoRA runs keep one in adapter/; full fine-tunes, and runs "
            "made before adapters were kept, have none)"
        )

    config = _read_json(source.adapter_dir / "adapter_config.json")
    base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    pipeline = _adapter_pipeline(source.adapter_dir)
    looks_local = bool(base) and (os.path.isabs(base) or base.startswith((".", "~")) or base.count("/") > 1)
    if not base or (looks_local and not Path(os.path.expanduser(base)).is_dir()):
        raise EmbedtuneError(
            f"{source.adapter_dir / 'adapter_config.json'}: the recorded base model {base!r} is not there; "
            "set base_model_name_or_path to a folder or hub id that holds the base"
        )
    # What is handed over must load: the adapter's own files first, then its fit on the base's layers.
    weights = check_adapter_files(source.adapter_dir, read_adapter_config(source.adapter_dir))
    base_config = _base_config(base)
    if base_config is not None:
        check_adapter_fits(weights, base_config, str(source.adapter_dir / "adapter_model.safetensors"))
    with atomic_folder(output, overwrite) as tmp:
        for item in source.adapter_dir.iterdir():
            if item.is_file() and item.name != "README.md":
                shutil.copy2(item, tmp / item.name)
                if (tmp / item.name).stat().st_size != item.stat().st_size:
                    raise EmbedtuneError(f"export refused: the copy of {item.name} is not the size of the original; "
                                         "nothing was put in place (is the disk full?)")
        no_pooler = _builds_pooler(base)  # embedtune trains without the pooler: the adapter has no LoRA for one
        write_model_card(tmp, _facts("adapter", source, output, pipeline, adapter_base=base,
                                     adapter_base_kwargs="add_pooling_layer=False" if no_pooler else None,
                                     st_card=source_card(source.model_dir)))  # the run's model/ card, if any
        verify_written(tmp)
        check_adapter_files(tmp, read_adapter_config(tmp))  # the copy loads as the original did
    return _finish("adapter", output)


def _base_config(base: str):
    """The base model's transformers config (local folder, bundled copy or cached hub id), or None when it
    cannot be read here (then the adapter is exported on the strength of its own files)."""
    from transformers import AutoConfig

    folder = bundled_alias(str(base)) or Path(os.path.expanduser(str(base)))
    try:
        if folder.is_dir():
            if (folder / "modules.json").is_file():
                folder = read_st_layout(folder).transformer_dir
            with quiet_transformers():
                return AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
        with quiet_transformers():
            return AutoConfig.from_pretrained(str(base), local_files_only=hub_offline(), trust_remote_code=False)
    except Exception:  # noqa: BLE001 - unreadable or remote-code configs: no fit check, as before
        return None


# ---------------------------------------------------------------- onnx


def _sentence_graph(st, input_names: list[str]):
    """The SentenceTransformer pipeline as a module of token tensors: what gets traced."""
    import torch

    class SentenceGraph(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.st = st

        def forward(self, *tensors):
            features = self.st[0](dict(zip(input_names, tensors)))
            self.tokens = features["token_embeddings"]  # the encoder's own output, before any later module
            for module in list(self.st)[1:]:
                features = module(features)
            return features[ONNX_OUTPUT]

    return SentenceGraph().eval()


def _graph_outputs(sentence_graph):
    """The traced module: the sentence graph's embedding, and the encoder's token embeddings it computed
    on the way (for sentence-transformers' ONNX backend), from one run of the encoder."""
    import torch

    class Outputs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.graph = sentence_graph

        def forward(self, *tensors):
            sentence = self.graph(*tensors)
            return self.graph.tokens, sentence

    return Outputs().eval()


def _export_graph(st, tokenizer, path: Path) -> list[str]:
    """Trace the pipeline into `path`; returns the graph's input names."""
    import torch

    names = [n for n in tokenizer.model_input_names if n in _TOKEN_INPUTS]
    # A padded example, so the traced graph keeps the attention-mask path every batch needs.
    example = tokenizer(["a short text", "a longer text, so that the first one needs padding"],
                        padding=True, return_tensors="pt")
    axes = {name: {0: "batch", 1: "sequence"} for name in names}
    axes[ONNX_OUTPUT] = {0: "batch"}
    axes[ONNX_TOKENS] = {0: "batch", 1: "sequence"}
    kwargs: dict[str, Any] = {}
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        kwargs["dynamo"] = False
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notes; the check below decides
        try:
            torch.onnx.export(_graph_outputs(_sentence_graph(st, names)), tuple(example[n] for n in names), str(path),
                              input_names=names, output_names=[ONNX_TOKENS, ONNX_OUTPUT], dynamic_axes=axes,
                              opset_version=ONNX_OPSET, do_constant_folding=True, **kwargs)
        except Exception as exc:  # an architecture the tracer can't follow: one line, not a traceback
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise EmbedtuneError(f"torch.onnx could not export this model ({type(exc).__name__}: {first})") from None
    return names


def onnx_embeddings(session, tokenizer, texts: list[str]):
    """Sentence embeddings from an onnxruntime session over our graph (what the card's snippet does)."""
    feed_names = {i.name for i in session.get_inputs()}
    batch = tokenizer(texts, padding=True, truncation=True, return_tensors="np")
    return session.run([ONNX_OUTPUT], {k: v for k, v in batch.items() if k in feed_names})[0]


def st_backend_embeddings(session, tokenizer, texts: list[str], st):
    """Sentence embeddings as sentence-transformers' ONNX backend makes them: the graph's token embeddings
    (`last_hidden_state`), then the pipeline's modules after the encoder (Pooling, Normalize, ...) in PyTorch."""
    import torch

    feed_names = {i.name for i in session.get_inputs()}
    batch = tokenizer(texts, padding=True, truncation=True, return_tensors="np")
    tokens = session.run([ONNX_TOKENS], {k: v for k, v in batch.items() if k in feed_names})[0]
    features = {k: torch.from_numpy(v) for k, v in batch.items()}
    features["token_embeddings"] = torch.from_numpy(tokens)
    with torch.no_grad():
        for module in list(st)[1:]:
            features = module(features)
    return features[ONNX_OUTPUT].numpy()


def _min_cosine(path: Path, tokenizer, texts: list[str], reference, st=None) -> float:
    """Worst cosine between ONNX and PyTorch embeddings, over one padded batch and each text alone; with
    `st`, the ONNX embeddings are made the way sentence-transformers' ONNX backend makes them."""
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 1.0
    for rows in [list(range(len(texts)))] + [[i] for i in range(len(texts))]:
        chosen = [texts[i] for i in rows]
        got = (onnx_embeddings(session, tokenizer, chosen) if st is None
               else st_backend_embeddings(session, tokenizer, chosen, st)).astype(np.float64)
        want = reference[rows].astype(np.float64)
        cos = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1) + 1e-12)
        worst = min(worst, float(np.nan_to_num(cos, nan=-1.0).min()))
    return worst


class _QuietPreprocessHint(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


def _write_variant(variant: str, fp32_path: Path, folder: Path) -> Path:
    import onnx

    target = folder / f"model_{variant}.onnx"
    if variant == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            onnx.save(convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True), str(target))
    else:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        hint = _QuietPreprocessHint()
        logging.getLogger().addFilter(hint)
        try:
            quantize_dynamic(str(fp32_path), str(target), weight_type=QuantType.QInt8, per_channel=True)
        finally:
            logging.getLogger().removeFilter(hint)
    return target


def _write_st_layout(st, folder: Path) -> None:
    """Make the ONNX folder a SentenceTransformer folder for `SentenceTransformer(folder, backend="onnx")`:
    modules.json, the encoder's config.json, sentence_bert_config.json, the modules after the encoder
    (Pooling, Dense, Normalize, ...) and the tokenizer, as `SentenceTransformer.save` writes them, without
    the encoder's PyTorch weights (`model.onnx` holds the encoder: its `last_hidden_state` output is what
    the backend reads). The README, sentence-transformers' card completed by embedtune, is written after."""
    staging = folder / ".st-layout"
    st.save(str(staging), create_model_card=False, safe_serialization=True)
    encoder = read_st_layout(staging).transformer_dir
    for weights in list(encoder.glob("*.safetensors")) + list(encoder.glob("*.safetensors.index.json")):
        weights.unlink()
    for item in sorted(staging.iterdir()):
        target = folder / item.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(item, target)
    staging.rmdir()


def _export_onnx(st, source: ExportSource, output: Path, overwrite: bool, texts: list[str],
                 variant: str | None) -> ExportResult:
    import torch
    from transformers import AutoTokenizer

    if any(importlib.util.find_spec(name) is None for name in ("onnx", "onnxruntime")):
        raise EmbedtuneError("ONNX export needs onnx and onnxruntime: pip install 'embedtune[onnx]'")
    st = st.to(torch.float32).eval()
    pipeline = _pipeline_facts(st)
    tokenizer = st[0].tokenizer
    if st.max_seq_length:
        tokenizer.model_max_length = st.max_seq_length
    with torch.no_grad():
        reference = st.encode(texts, prompt="", convert_to_numpy=True, batch_size=16)
    checks: list[OnnxCheck] = []
    with atomic_folder(output, overwrite) as tmp:
        tokenizer.save_pretrained(str(tmp))
        saved_tokenizer = AutoTokenizer.from_pretrained(str(tmp))  # the consumer's tokenizer, checked too
        fp32 = tmp / ONNX_FILE
        inputs = _export_graph(st, tokenizer, fp32)
        checks.append(OnnxCheck(ONNX_FILE, "fp32", _min_cosine(fp32, saved_tokenizer, texts, reference),
                                ONNX_MIN_COSINE, True))
        if variant is not None:
            path = _write_variant(variant, fp32, tmp)
            floor, enforced = VARIANT_MIN_COSINE[variant]
            checks.append(OnnxCheck(path.name, variant, _min_cosine(path, saved_tokenizer, texts, reference),
                                    floor, enforced))
        # sentence-transformers' ONNX backend: the graph's token embeddings through the folder's own modules
        st_path = _min_cosine(fp32, saved_tokenizer, texts, reference, st=st)
        if st_path < ONNX_MIN_COSINE:
            checks[0].min_cosine = min(checks[0].min_cosine, st_path)
        for check in checks:
            if check.enforced and not check.passed:
                raise EmbedtuneError(
                    f"ONNX export refused: {check.file} matches the PyTorch model only to cosine "
                    f"{check.min_cosine:.6f} on {len(texts)} probe texts (needs >= {check.threshold})"
                )
        _write_st_layout(st, tmp)
        _write_card(st, tmp, _facts("onnx", source, output, pipeline, onnx_checks=checks,
                                    onnx_inputs=inputs, probe_count=len(texts)))
    return _finish("onnx", output, checks)
