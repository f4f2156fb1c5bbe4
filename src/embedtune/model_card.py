"""The README.md model card every export carries: what the model is, how it was made, how to load it.

Facts come from the run's metrics.json (base model, data size, hyperparameters, held-out metrics
before and after) and from the export itself (format, pooling, ONNX checks). Nothing is guessed:
without a training record the card says so. It replaces the card sentence-transformers or peft
would write; stock loaders do not read README.md, so loading is unaffected.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__

CARD_NAME = "README.md"
_LIBRARY = {"sentence-transformers": "sentence-transformers", "hf": "transformers", "adapter": "peft",
            "onnx": "onnx"}
_TITLE = {"sentence-transformers": "SentenceTransformer (merged)", "hf": "Hugging Face encoder + tokenizer",
          "adapter": "LoRA adapter (PEFT)", "onnx": "ONNX sentence-embedding graph"}
# Settings that are about files and run handling, not the model: shown under data, or not at all.
_NOT_HYPERPARAMETERS = {"data", "output_dir", "overwrite", "report_to"}
_METRIC_ORDER = ("ndcg@10", "mrr@10", "recall@10")


@dataclass
class CardFacts:
    """Everything a card states; `None` means unknown, and the card says so."""

    format: str
    location: str
    base_model: str | None = None
    metrics: dict | None = None
    pooling: str | None = None
    normalize: bool | None = None
    max_seq_length: int | None = None
    prompts: dict[str, str] | None = None
    adapter_base: str | None = None  # base_model_name_or_path in adapter_config.json
    adapter_base_kwargs: str | None = None  # extra AutoModel.from_pretrained arguments for the base
    onnx_checks: list = field(default_factory=list)  # export.OnnxCheck
    onnx_inputs: list[str] | None = None
    probe_count: int | None = None


def embedtune_version() -> str:
    """The installed embedtune's version (the package's own constant when not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("embedtune")
    except PackageNotFoundError:
        return __version__


def _cell(value: Any) -> str:
    """A value as one markdown table cell: no pipes or newlines break the table."""
    if value is None:
        text = "—"
    elif isinstance(value, float):
        text = f"{value:g}"
    elif isinstance(value, (dict, list, bool)):
        text = json.dumps(value)
    else:
        text = str(value)
    text = text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", "\\n")
    return f"`{text}`" if isinstance(value, (dict, list, str)) and text else text


def _looks_like_hub_id(name: str | None) -> bool:
    return bool(name) and name.count("/") == 1 and not name.startswith((".", "/", "~")) and not os.path.exists(name)


def _front_matter(facts: CardFacts) -> str:
    lines = ["---", f"library_name: {json.dumps(_LIBRARY[facts.format])}"]
    if _looks_like_hub_id(facts.base_model):
        lines.append(f"base_model: {json.dumps(facts.base_model)}")
    tags = ["embedtune", "sentence-similarity", "feature-extraction", facts.format]
    lines += ["tags:"] + [f"- {json.dumps(tag)}" for tag in tags]
    lines += ["pipeline_tag: \"sentence-similarity\"", "---", ""]
    return "\n".join(lines)


def _file_name(path: Any) -> Any:
    """A training file's name without its folder: a card is published, the machine's paths are not."""
    return Path(str(path)).name if isinstance(path, str) and path else path


def _metrics_section(metrics: dict) -> list[str]:
    base, final = metrics.get("base") or {}, metrics.get("final") or {}
    if not base and not final:
        return ["No held-out evaluation was run (`--no-eval`), so there are no before/after metrics.", ""]
    names = [m for m in _METRIC_ORDER if m in base or m in final]
    names += sorted((set(base) | set(final)) - set(names))
    rows = ["| metric | base model | fine-tuned | change |", "|---|---:|---:|---:|"]
    for name in names:
        before, after = base.get(name), final.get(name)
        change = f"{after - before:+.4f}" if isinstance(before, (int, float)) and isinstance(after, (int, float)) else "—"
        fmt = lambda v: f"{v:.4f}" if isinstance(v, (int, float)) else "—"  # noqa: E731
        rows.append(f"| {name} | {fmt(before)} | {fmt(after)} | {change} |")
    step = metrics.get("best_step")
    note = (f"Held-out retrieval ({metrics.get('eval_pairs', '?')} pairs, each anchor ranking all positives); "
            f"the fine-tuned column is the kept (best) evaluation" + (f", at step {step}." if step else "."))
    return [note, ""] + rows + [""]


def _training_section(metrics: dict | None) -> list[str]:
    out = ["## Training", ""]
    if metrics is None:
        return out + ["No training record (metrics.json) was found with this model, so its data size, "
                      "hyperparameters and evaluation metrics are unknown.", ""]
    config = metrics.get("config") or {}
    out += [
        "| data | value |", "|---|---|",
        f"| data file | {_cell(_file_name(config.get('data')))} |",
        f"| training pairs | {_cell(metrics.get('train_pairs'))} |",
        f"| held-out pairs | {_cell(metrics.get('eval_pairs'))} |",
        f"| rows skipped | {_cell(metrics.get('skipped_summary') or metrics.get('skipped_rows'))} |",
        f"| steps | {_cell(metrics.get('steps'))} |",
        "",
        "### Hyperparameters",
        "",
        "| setting | value |", "|---|---|",
    ]
    out += [f"| {key} | {_cell(value)} |" for key, value in config.items() if key not in _NOT_HYPERPARAMETERS]
    out += ["", "### Evaluation", ""] + _metrics_section(metrics)
    return out


def _pooling_code(pooling: str | None) -> list[str]:
    if pooling == "cls":
        return ["embeddings = tokens[:, 0]  # cls pooling"]
    if pooling == "lasttoken":
        return ["last = batch[\"attention_mask\"].sum(1) - 1  # lasttoken pooling (right padding)",
                "embeddings = tokens[torch.arange(tokens.shape[0]), last]"]
    if pooling == "max":
        return ["mask = batch[\"attention_mask\"].unsqueeze(-1).bool()  # max pooling",
                "embeddings = tokens.masked_fill(~mask, float(\"-inf\")).max(1).values"]
    return ["mask = batch[\"attention_mask\"].unsqueeze(-1).to(tokens.dtype)  # mean pooling",
            "embeddings = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)"]


def _pooled_snippet(facts: CardFacts, load: list[str]) -> list[str]:
    code = ["import torch"] + load + [
        "texts = [\"first text\", \"second text\"]",
        "batch = tokenizer(texts, padding=True, truncation=True, return_tensors=\"pt\")",
        "with torch.no_grad():",
        "    tokens = model(**batch).last_hidden_state",
    ] + _pooling_code(facts.pooling)
    if facts.normalize:
        code.append("embeddings = torch.nn.functional.normalize(embeddings, dim=-1)")
    return code


def _usage_section(facts: CardFacts) -> list[str]:
    where = json.dumps(facts.location)
    out = ["## How to load", ""]
    if facts.format == "sentence-transformers":
        code = ["from sentence_transformers import SentenceTransformer", "",
                f"model = SentenceTransformer({where})",
                "embeddings = model.encode([\"first text\", \"second text\"])"]
        if facts.prompts:
            code.append("queries = model.encode_query([\"a question\"])  # applies the saved prompts")
    elif facts.format == "hf":
        code = _pooled_snippet(facts, [
            "from transformers import AutoModel, AutoTokenizer", "",
            f"tokenizer = AutoTokenizer.from_pretrained({where})",
            f"model = AutoModel.from_pretrained({where}).eval()",
        ])
    elif facts.format == "adapter":
        code = _pooled_snippet(facts, [
            "from peft import PeftModel",
            "from transformers import AutoModel, AutoTokenizer", "",
            f"base = AutoModel.from_pretrained({json.dumps(facts.adapter_base)}"
            f"{', ' + facts.adapter_base_kwargs if facts.adapter_base_kwargs else ''})",
            f"model = PeftModel.from_pretrained(base, {where}).eval()",
            f"tokenizer = AutoTokenizer.from_pretrained({where})",
        ])
        out += ["With plain peft (pool the encoder's output as below):", "", "```python", *code, "```", "",
                "With embedtune (the recorded pooling and prompts are restored):", ""]
        code = ["from embedtune import to_sentence_transformer", "from embedtune.lora import load_adapter", "",
                f"model, tokenizer = load_adapter({where})",
                "st_model = to_sentence_transformer(model, tokenizer)",
                "embeddings = st_model.encode([\"first text\", \"second text\"])"]
    else:
        code = ["import onnxruntime as ort", "from transformers import AutoTokenizer", "",
                f"tokenizer = AutoTokenizer.from_pretrained({where})",
                f"session = ort.InferenceSession({json.dumps(str(Path(facts.location) / 'model.onnx'))})",
                "names = {i.name for i in session.get_inputs()}",
                "batch = tokenizer([\"first text\", \"second text\"], padding=True, truncation=True, return_tensors=\"np\")",
                "embeddings = session.run([\"sentence_embedding\"], {k: v for k, v in batch.items() if k in names})[0]"]
    out += ["```python", *code, "```", ""]
    return out


def _pipeline_section(facts: CardFacts) -> list[str]:
    out = ["## Sentence pipeline", "",
           f"- pooling: {facts.pooling or 'unknown'}; normalised to unit length: "
           f"{'yes' if facts.normalize else 'no' if facts.normalize is not None else 'unknown'}",
           f"- max sequence length: {facts.max_seq_length or 'unknown'} tokens (longer inputs are truncated)"]
    if facts.prompts:
        shown = ", ".join(f"{name}: {json.dumps(text)}" for name, text in facts.prompts.items())
        out.append(f"- prompts, prepended to the text ({'saved with the model' if facts.format == 'sentence-transformers' else 'prepend them yourself'}): {shown}")
    if facts.format == "onnx":
        out.append(f"- graph inputs: {', '.join(facts.onnx_inputs or [])} (int64, batch x sequence); "
                   "output: sentence_embedding (float32, batch x dim), pooling and normalisation included")
    return out + [""]


def _onnx_section(facts: CardFacts) -> list[str]:
    if facts.format != "onnx" or not facts.onnx_checks:
        return []
    out = ["## ONNX check", "",
           f"Each file ran in onnxruntime (CPU) on {facts.probe_count} probe texts, as one padded batch and one "
           "by one, and was compared with the PyTorch model's sentence embeddings.", "",
           "| file | precision | min cosine vs PyTorch | required | result |", "|---|---|---:|---:|---|"]
    for check in facts.onnx_checks:
        result = "passed" if check.passed else ("failed" if check.enforced else "below the reported floor")
        kind = f">= {check.threshold}" if check.enforced else f"{check.threshold} (reported only)"
        out.append(f"| {check.file} | {check.precision} | {check.min_cosine:.6f} | {kind} | {result} |")
    return out + [""]


def render_model_card(facts: CardFacts) -> str:
    """The card's markdown text."""
    base = facts.base_model or "unknown"
    lines = [
        _front_matter(facts),
        f"# Fine-tuned embedding model — {_TITLE[facts.format]}",
        "",
        f"A text-embedding model fine-tuned from `{base}` with embedtune {embedtune_version()}, "
        f"exported as `{facts.format}`.",
        "",
        "| | |", "|---|---|",
        f"| base model | {_cell(base)} |",
        f"| export format | {_cell(facts.format)} |",
        f"| embedtune version | {_cell(embedtune_version())} |",
    ]
    if facts.adapter_base:
        lines.append(f"| adapter's recorded base | {_cell(facts.adapter_base)} |")
    lines.append("")
    lines += _usage_section(facts) + _pipeline_section(facts) + _onnx_section(facts) + _training_section(facts.metrics)
    return "\n".join(lines).rstrip() + "\n"


def write_model_card(folder: str | os.PathLike, facts: CardFacts) -> Path:
    """Write (or replace) `folder/README.md`."""
    path = Path(folder) / CARD_NAME
    path.write_text(render_model_card(facts), encoding="utf-8")
    return path
