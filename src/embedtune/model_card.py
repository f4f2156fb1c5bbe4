"""The README.md model card of every save and export: sentence-transformers' own card, completed with
embedtune's facts.

sentence-transformers writes the card (`SentenceTransformer.save`, filled by its trainer: model-index,
hyperparameters, training logs, evaluation results). embedtune adds one section, between markers so a
later export replaces it rather than adding another: how the model was fine-tuned (base, speed mode,
data file name and rows, loss, steps), its held-out metrics before and after, and for an export how to
load that format (and the ONNX check). Facts come from the run's metrics.json and the export itself;
nothing is guessed: without a training record the section says so. Without any sentence-transformers
card (a bare adapter folder) the section stands alone. No card names a local absolute path: files
are named by their file name, folders by their folder name.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .hf_quiet import quiet_stderr

CARD_NAME = "README.md"
SECTION_START = "<!-- embedtune: facts of the fine-tune; written by embedtune, replaced by its next export -->"
SECTION_END = "<!-- /embedtune -->"
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
    st_card: str | None = None  # sentence-transformers' own card text, which the facts complete


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


def _folder_name(location: str) -> str:
    return Path(location).name or str(location)


def _front_matter(facts: CardFacts) -> str:
    lines = ["---", f"library_name: {json.dumps(_LIBRARY[facts.format])}"]
    if _looks_like_hub_id(facts.base_model):
        lines.append(f"base_model: {json.dumps(facts.base_model)}")
    tags = ["embedtune", "sentence-similarity", "feature-extraction", facts.format]
    lines += ["tags:"] + [f"- {json.dumps(tag)}" for tag in tags]
    lines += ["pipeline_tag: \"sentence-similarity\"", "---", ""]
    return "\n".join(lines)


def _is_local(value: Any) -> bool:
    return isinstance(value, str) and (os.path.isabs(value) or value.startswith("~"))


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


def _loss_fact(config: dict) -> str:
    """The contrastive loss and the settings that shape it, from the run's config."""
    parts = [f"temperature {config['temperature']:g}"] if isinstance(config.get("temperature"), (int, float)) else []
    if config.get("symmetric"):
        parts.append("symmetric (positive -> anchor too)")
    if config.get("matryoshka_dims"):
        parts.append(f"Matryoshka dims {config['matryoshka_dims']}")
    if config.get("cached_loss"):
        parts.append("cached (GradCache)")
    return "in-batch negatives contrastive loss (InfoNCE)" + (f": {', '.join(parts)}" if parts else "")


def _batch_fact(config: dict, metrics: dict) -> str | None:
    from .report import batch_fact  # the words `embedtune report` uses

    return batch_fact(config.get("batch_size"), metrics.get("world_size"))


def _speed_fact(metrics: dict) -> str | None:
    from .report import speed_fact  # the words `embedtune report` uses; only when a card is written

    return speed_fact(metrics.get("speed"), metrics.get("cuda_graphs"))


def _training_section(metrics: dict | None) -> list[str]:
    out = ["### Training", ""]
    if metrics is None:
        return out + ["No training record (metrics.json) was found with this model, so its data size, "
                      "hyperparameters and evaluation metrics are unknown.", ""]
    config = metrics.get("config") or {}
    out += [
        "| fact | value |", "|---|---|",
        f"| data file | {_cell(_file_name(config.get('data')))} |",
        f"| training pairs | {_cell(metrics.get('train_pairs'))} |",
        f"| held-out pairs | {_cell(metrics.get('eval_pairs'))} |",
        f"| rows skipped | {_cell(metrics.get('skipped_summary') or metrics.get('skipped_rows'))} |",
        f"| steps | {_cell(metrics.get('steps'))} |",
        f"| batch per step | {_cell(_batch_fact(config, metrics))} |",
        f"| loss | {_cell(_loss_fact(config))} |",
        f"| speed mode | {_cell(_speed_fact(metrics))} |",
        f"| training time | {_cell(metrics.get('train_time_s'))} s |",
        "",
        "#### Hyperparameters",
        "",
        "| setting | value |", "|---|---|",
    ]
    out += [f"| {key} | {_cell(_file_name(value) if key == 'model' and _is_local(value) else value)} |"
            for key, value in config.items() if key not in _NOT_HYPERPARAMETERS]
    out += ["", "#### Held-out evaluation", ""] + _metrics_section(metrics)
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
    where = json.dumps(_folder_name(facts.location))  # the folder as handed over, wherever it is put
    out = ["### How to load", "", f"From the folder that holds `{_folder_name(facts.location)}`:", ""]
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
        folder = _folder_name(facts.location)
        code = _pooled_snippet(facts, [
            "import json", "",
            "from peft import PeftModel",
            "from transformers import AutoModel, AutoTokenizer", "",
            f"recorded = json.load(open({json.dumps(folder + '/adapter_config.json')}))[\"base_model_name_or_path\"]",
            f"base = AutoModel.from_pretrained(recorded"
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
                f"session = ort.InferenceSession({json.dumps(_folder_name(facts.location) + '/model.onnx')})",
                "names = {i.name for i in session.get_inputs()}",
                "batch = tokenizer([\"first text\", \"second text\"], padding=True, truncation=True, return_tensors=\"np\")",
                "embeddings = session.run([\"sentence_embedding\"], {k: v for k, v in batch.items() if k in names})[0]"]
    out += ["```python", *code, "```", ""]
    return out


def _pipeline_section(facts: CardFacts) -> list[str]:
    out = ["### Sentence pipeline", "",
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
    out = ["### ONNX check", "",
           f"Each file ran in onnxruntime (CPU) on {facts.probe_count} probe texts, as one padded batch and one "
           "by one, and was compared with the PyTorch model's sentence embeddings.", "",
           "| file | precision | min cosine vs PyTorch | required | result |", "|---|---|---:|---:|---|"]
    for check in facts.onnx_checks:
        result = "passed" if check.passed else ("failed" if check.enforced else "below the reported floor")
        kind = f">= {check.threshold}" if check.enforced else f"{check.threshold} (reported only)"
        out.append(f"| {check.file} | {check.precision} | {check.min_cosine:.6f} | {kind} | {result} |")
    return out + [""]


def embedtune_section(facts: CardFacts) -> str:
    """embedtune's facts as one markdown section, between the markers that let a later export replace it."""
    base = facts.base_model if not _is_local(facts.base_model) else _file_name(facts.base_model)
    lines = [
        SECTION_START,
        "## Fine-tuned with embedtune",
        "",
        f"Fine-tuned from `{base or 'unknown'}` with embedtune {embedtune_version()}. This folder holds it as: "
        f"{_TITLE[facts.format]}.",
        "",
        "| | |", "|---|---|",
        f"| base model | {_cell(base or 'unknown')} |",
        f"| format | {_cell(facts.format)} |",
        f"| embedtune version | {_cell(embedtune_version())} |",
    ]
    if facts.adapter_base:
        recorded = _file_name(facts.adapter_base) if _is_local(facts.adapter_base) else facts.adapter_base
        lines.append(f"| adapter's recorded base | {_cell(recorded)} |")
    lines.append("")
    lines += _usage_section(facts) + _pipeline_section(facts) + _onnx_section(facts) + _training_section(facts.metrics)
    return "\n".join(lines).rstrip() + "\n\n" + SECTION_END + "\n"


def _without_section(text: str) -> str:
    """`text` with any earlier embedtune section taken out."""
    while SECTION_START in text and SECTION_END in text.split(SECTION_START, 1)[1]:
        before, rest = text.split(SECTION_START, 1)
        text = before.rstrip("\n") + "\n\n" + rest.split(SECTION_END, 1)[1].lstrip("\n")
    return text


def _tagged(text: str, tags: list[str]) -> str:
    """The card's YAML header with `tags` added to its list (a header and a list are made if missing)."""
    if not text.startswith("---\n") or "\n---\n" not in text[4:]:
        return "---\ntags:\n" + "".join(f"- {tag}\n" for tag in tags) + "---\n\n" + text
    header, body = text[4:].split("\n---\n", 1)
    lines = header.split("\n")
    missing = [f"- {tag}" for tag in tags if f"- {tag}" not in lines]
    if "tags:" in lines:
        at = lines.index("tags:") + 1
        lines[at:at] = missing
    else:
        lines += ["tags:"] + missing
    return "---\n" + "\n".join(lines) + "\n---\n" + body


def complete_card(st_card: str, facts: CardFacts) -> str:
    """sentence-transformers' card `st_card` with embedtune's section: before its Usage section (where a
    reader looks for how to load this folder), else at the end; tagged `embedtune`."""
    text = _tagged(_without_section(st_card), ["embedtune", facts.format])
    section = embedtune_section(facts)
    marker = "\n## Usage\n"
    if marker in text:
        before, after = text.split(marker, 1)
        return before.rstrip("\n") + "\n\n" + section + "\n" + marker.lstrip("\n") + after
    return text.rstrip("\n") + "\n\n" + section


def render_model_card(facts: CardFacts) -> str:
    """The card's markdown text: sentence-transformers' card completed, or embedtune's section alone."""
    if facts.st_card:
        return complete_card(facts.st_card, facts)
    title = f"# Fine-tuned embedding model — {_TITLE[facts.format]}"
    return _front_matter(facts) + "\n" + title + "\n\n" + embedtune_section(facts)


def write_model_card(folder: str | os.PathLike, facts: CardFacts) -> Path:
    """Write (or replace) `folder/README.md`."""
    path = Path(folder) / CARD_NAME
    path.write_text(render_model_card(facts), encoding="utf-8")
    return path


def st_card_text(st_model, folder: str | os.PathLike) -> str | None:
    """sentence-transformers' own card for `st_model`, as its `save` writes it into `folder` (its trainer's
    facts when it was trained in this process; the card it was loaded with otherwise), or None when
    this sentence-transformers cannot write one."""
    create = getattr(st_model, "_create_model_card", None)
    if create is None:
        return None
    from .st import clip_card_examples  # torch: only when a card is made from a model

    clip_card_examples(st_model)
    card = getattr(st_model, "model_card_data", None)
    if card is not None and hasattr(card, "local_files_only"):
        card.local_files_only = True  # an export does not ask the hub what the base model was
    try:
        with quiet_stderr():
            create(str(folder))
        return (Path(folder) / CARD_NAME).read_text(encoding="utf-8")
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def source_card(folder: str | os.PathLike | None) -> str | None:
    """The sentence-transformers card saved in `folder` (a run's model/), or None."""
    path = Path(folder) / CARD_NAME if folder is not None else None
    if path is None or not path.is_file():
        return None
    text = path.read_text(encoding="utf-8", errors="replace")
    return text if "sentence-transformers" in text.split("\n---\n", 1)[0] else None


def complete_saved_card(folder: str | os.PathLike, facts: CardFacts) -> Path | None:
    """Add embedtune's section to the card a sentence-transformers save wrote in `folder` (a run's model/)."""
    card = source_card(folder)
    if card is None:
        return None
    facts.st_card = card
    return write_model_card(folder, facts)


def card_reports_final(st_model, evaluator_name: str, final: dict[str, float], key) -> bool:
    """sentence-transformers' card reports each evaluator's last evaluation (its model-index and
    metrics table), but the saved weights are the restored best ones, scored exactly by the run's final
    evaluation: the card reports that instead. `key(metric)`: the evaluator's name for a metric. True
    where the evaluator was on the card."""
    results = getattr(getattr(st_model, "model_card_data", None), "eval_results_dict", None)
    if not results or not final:
        return False
    found = False
    for evaluator in list(results):
        if getattr(evaluator, "name", None) == evaluator_name:
            results[evaluator] = {key(metric): value for metric, value in final.items()}
            found = True
    return found


def pick_card_examples(st_model, dataset) -> None:
    """sentence-transformers' trainer picks the card's example texts from the training data when it
    starts, under a progress bar of its own; picked here first, with that bar silenced, it keeps them."""
    card = getattr(st_model, "model_card_data", None)
    if card is None or getattr(card, "widget", None) or not hasattr(card, "set_widget_examples"):
        return
    with quiet_stderr():
        card.set_widget_examples(dataset)
