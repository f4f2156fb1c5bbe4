"""`embedtune export`: every format loads with its own consumer and gives the fine-tuned model's embeddings.

One tiny LoRA run (random-init 2-layer BERT, `embedtune.train.run`, mean pooling, a query prompt)
is shared by the tests; its in-memory model is the reference every export is compared with.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from embedtune import FastModel, to_sentence_transformer
from embedtune.cli import app
from embedtune.errors import EmbedtuneError
from embedtune.export import DEFAULT_PROBE_TEXTS, export
from embedtune.lora import load_adapter
from embedtune.model_card import embedtune_version
from embedtune.train import TrainConfig, run
from tiny_models import make_tiny_model

runner = CliRunner()
TEXTS = ["how do I sort a dictionary by value", "sorted(d.items(), key=lambda kv: kv[1])", "x",
         "a considerably longer sentence, long enough that every other text in the batch is padded " * 2]


SNIPPET_TEXTS = ["first text", "second text"]  # what the cards' snippets encode


def _mean_pool_normalize(tokens: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    mask = mask.unsqueeze(-1).to(tokens.dtype)
    pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1).numpy()


def _max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def _min_cosine(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min())


def _onnx_encode(path: Path, tokenizer, texts: list[str]) -> np.ndarray:
    """What the card tells an onnxruntime user to do: one padded batch, then each text alone."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}

    def run_batch(batch_texts):
        batch = tokenizer(batch_texts, padding=True, truncation=True, return_tensors="np")
        return session.run(["sentence_embedding"], {k: v for k, v in batch.items() if k in names})[0]

    together = run_batch(texts)
    alone = np.concatenate([run_batch([t]) for t in texts])
    return together, alone


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    base = make_tiny_model("bert", root)
    rows = [{"anchor": f"question {i} about topic {i % 7}", "positive": f"answer {i}: topic {i % 7}, number {i}"}
            for i in range(48)]
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run(TrainConfig(
        data=str(data), model=str(base), output_dir=str(root / "run"), max_steps=3, batch_size=8, lr=5e-3,
        max_seq_length=32, lora_r=4, eval_size=16, evals_per_run=1, pooling="mean", query_prompt="query: ",
    ))
    st = result.model.eval()
    probe = list(DEFAULT_PROBE_TEXTS)
    return SimpleNamespace(
        root=root, base=base, run=root / "run", metrics=result.metrics,
        expected=st.encode(TEXTS, convert_to_numpy=True),
        expected_probe=st.encode(probe, convert_to_numpy=True),
        expected_snippet=st.encode(SNIPPET_TEXTS, convert_to_numpy=True),
    )


def test_training_changed_the_model(trained):
    """Otherwise an export that dropped the adapter would still pass the comparisons below."""
    model, tok = FastModel.from_pretrained(str(trained.base), max_seq_length=32)
    untrained = to_sentence_transformer(model, tok, pooling="mean").eval().encode(TEXTS, convert_to_numpy=True)
    assert _max_diff(untrained, trained.expected) > 1e-3


def test_lora_run_keeps_its_adapter_with_a_reloadable_base(trained):
    adapter = trained.run / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]) == trained.base.resolve()
    pipeline = json.loads((adapter / "embedtune_adapter.json").read_text())
    assert pipeline["pooling"] == "mean" and pipeline["normalize"] is True
    assert pipeline["prompts"] == {"query": "query: "}
    assert trained.metrics["artifacts"]["adapter"] == "adapter"  # named inside the run folder


def test_sentence_transformers_export_loads_with_stock_sentence_transformers(trained, tmp_path):
    from sentence_transformers import SentenceTransformer

    out = tmp_path / "st"
    result = export(trained.run, to="sentence-transformers", output=out)
    assert result.output == out and "modules.json" in result.files and "README.md" in result.files
    loaded = SentenceTransformer(str(out), device="cpu")
    assert _max_diff(loaded.encode(TEXTS, convert_to_numpy=True), trained.expected) < 1e-5
    assert loaded.prompts["query"] == "query: "
    assert "embedtune" in (out / "README.md").read_text()
    assert not (out / "adapter_config.json").exists()


def test_hf_export_loads_with_automodel_and_mean_pooling(trained, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    out = tmp_path / "hf"
    export(trained.run, to="hf", output=out)
    assert not (out / "modules.json").exists()
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    model = AutoModel.from_pretrained(str(out)).eval()
    batch = tokenizer(TEXTS, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        got = _mean_pool_normalize(model(**batch).last_hidden_state, batch["attention_mask"])
    assert _max_diff(got, trained.expected) < 1e-5
    assert "mean pooling" in (out / "README.md").read_text()


# Plain AutoModel builds BERT's pooler, which LoRA's "dense" target matches but training never had.
@pytest.mark.filterwarnings("ignore:Found missing adapter keys")
def test_adapter_export_reloads_with_plain_peft_and_with_embedtune(trained, tmp_path):
    from peft import PeftModel
    from transformers import AutoModel, AutoTokenizer

    out = tmp_path / "adapter"
    result = export(trained.run, to="adapter", output=out)
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(result.files)
    assert not any(name.startswith("model") for name in result.files), "adapter only, no merged weights"

    base = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    peft_model = PeftModel.from_pretrained(AutoModel.from_pretrained(base), str(out)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    batch = tokenizer(TEXTS, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        got = _mean_pool_normalize(peft_model(**batch).last_hidden_state, batch["attention_mask"])
    assert _max_diff(got, trained.expected) < 1e-5

    # embedtune restores the recorded pooling: the tiny BERT's own default would be cls.
    model, tok = load_adapter(out)
    st = to_sentence_transformer(model, tok).eval()
    assert _max_diff(st.encode(TEXTS, convert_to_numpy=True), trained.expected) < 1e-5
    assert st.prompts.get("query") == "query: "


def test_adapter_folder_exports_merged_onto_its_base(trained, tmp_path):
    """An adapter on its own (outside its run, so no merged model/ beside it) is merged onto its base."""
    import shutil

    from sentence_transformers import SentenceTransformer

    adapter = shutil.copytree(trained.run / "adapter", tmp_path / "adapter-alone")
    export(adapter, to="sentence-transformers", output=tmp_path / "st")
    loaded = SentenceTransformer(str(tmp_path / "st"), device="cpu")
    assert _max_diff(loaded.encode(TEXTS, convert_to_numpy=True), trained.expected) < 1e-5


def test_onnx_export_with_fp16_matches_in_onnxruntime(trained, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "onnx"
    result = export(trained.run, to="onnx", output=out, onnx_variant="fp16")
    assert [c.file for c in result.checks] == ["model.onnx", "model_fp16.onnx"]
    assert all(c.passed for c in result.checks) and result.checks[0].min_cosine >= 0.9999
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    together, alone = _onnx_encode(out / "model.onnx", tokenizer, TEXTS)
    assert _min_cosine(together, trained.expected) >= 0.9999
    assert _min_cosine(alone, trained.expected) >= 0.9999
    assert _max_diff(together, trained.expected) < 1e-4
    half, _ = _onnx_encode(out / "model_fp16.onnx", tokenizer, TEXTS)
    assert half.dtype == np.float32 and _min_cosine(half, trained.expected) >= 0.999
    card = (out / "README.md").read_text()
    assert f"| model.onnx | fp32 | {result.checks[0].min_cosine:.6f} |" in card
    assert f"| model_fp16.onnx | fp16 | {result.checks[1].min_cosine:.6f} |" in card


def test_cli_onnx_int8_reports_the_measured_cosine(trained, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "onnx8"
    result = runner.invoke(app, ["export", str(trained.run), "--to", "onnx", "--onnx-variant", "int8",
                                 "--output", str(out)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    reported = {m[0]: float(m[1]) for m in re.findall(r"(model\S*\.onnx) \(\w+\): min cosine vs PyTorch ([0-9.]+)", text)}
    assert set(reported) == {"model.onnx", "model_int8.onnx"}
    assert "model_int8.onnx" in text and "model.onnx" in text
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    probe = list(DEFAULT_PROBE_TEXTS)
    together, alone = _onnx_encode(out / "model_int8.onnx", tokenizer, probe)
    measured = min(_min_cosine(together, trained.expected_probe), _min_cosine(alone, trained.expected_probe))
    assert abs(measured - reported["model_int8.onnx"]) < 1e-4
    assert reported["model.onnx"] >= 0.9999
    assert (out / "model_int8.onnx").stat().st_size < (out / "model.onnx").stat().st_size


@pytest.mark.parametrize("arch", ["modernbert", "qwen3"])
def test_onnx_export_of_other_families_matches_in_onnxruntime(tmp_path, arch):
    """cls pooling over ModernBERT's local attention, lasttoken pooling over a decoder."""
    from transformers import AutoTokenizer

    base = make_tiny_model(arch, tmp_path)
    model, tok = FastModel.from_pretrained(str(base), max_seq_length=None)
    expected = to_sentence_transformer(model, tok).eval().encode(TEXTS, convert_to_numpy=True)
    result = export(base, to="onnx", output=tmp_path / "onnx")
    assert result.checks[0].passed
    together, alone = _onnx_encode(tmp_path / "onnx" / "model.onnx", AutoTokenizer.from_pretrained(str(tmp_path / "onnx")), TEXTS)
    assert _min_cosine(together, expected) >= 0.9999 and _min_cosine(alone, expected) >= 0.9999


def test_onnx_export_that_does_not_match_is_refused(trained, tmp_path, monkeypatch):
    import embedtune.export as export_module

    original = export_module._sentence_graph

    def skewed_graph(st, names):
        graph = original(st, names)
        forward = graph.forward
        graph.forward = lambda *tensors: forward(*tensors) * torch.linspace(-1, 1, trained.expected.shape[1])
        return graph

    monkeypatch.setattr(export_module, "_sentence_graph", skewed_graph)
    with pytest.raises(EmbedtuneError, match="ONNX export refused: model.onnx matches .* cosine"):
        export(trained.run, to="onnx", output=tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    assert [p.name for p in tmp_path.iterdir()] == []


def test_model_card_states_the_run_and_its_metrics(trained, tmp_path):
    out = tmp_path / "st"
    export(trained.run / "model", to="sentence-transformers", output=out)  # RUN/model finds RUN's record
    card = (out / "README.md").read_text()
    metrics = json.loads((trained.run / "metrics.json").read_text())
    assert metrics["base"] and metrics["final"]
    for name, before in metrics["base"].items():
        after = metrics["final"][name]
        assert f"| {name} | {before:.4f} | {after:.4f} | {after - before:+.4f} |" in card
    assert f"| training pairs | {metrics['train_pairs']} |" in card
    assert f"| batch per step | `{metrics['config']['batch_size']}` |" in card  # one process
    assert f"| held-out pairs | {metrics['eval_pairs']} |" in card
    assert f"| lora_r | {metrics['config']['lora_r']} |" in card
    assert f"| lr | {metrics['config']['lr']:g} |" in card
    assert f"| base model | `{trained.base.name}` |" in card  # a local base by its folder name
    assert f"| embedtune version | `{embedtune_version()}` |" in card
    assert "| data file | `pairs.jsonl` |" in card and "| speed mode | `eager" in card
    assert "| loss | `in-batch negatives contrastive loss" in card
    assert 'SentenceTransformer("st")' in card  # the folder as handed over, wherever it is put
    assert str(trained.root) not in card and str(tmp_path) not in card, "no local absolute path"


def test_model_card_is_sentence_transformers_own_completed_by_embedtune(trained, tmp_path):
    """The run's model/ card and every export's card are the card sentence-transformers' trainer wrote
    (model-index with the evaluation, hyperparameters, training logs), with one embedtune section."""
    from embedtune.model_card import SECTION_END, SECTION_START

    cards = {"run": (trained.run / "model" / "README.md").read_text()}
    for fmt in ("sentence-transformers", "hf", "adapter", "onnx"):
        cards[fmt] = (export(trained.run, to=fmt, output=tmp_path / fmt).output / "README.md").read_text()
    for name, card in cards.items():
        header = card.split("\n---\n", 1)[0]
        assert card.startswith("---\n") and "- sentence-transformers" in header and "- embedtune" in header, name
        assert "model-index:" in header, name  # sentence-transformers' evaluation results
        for heading in ("## Model Details", "### Training Hyperparameters", "### Training Logs",
                        "## Fine-tuned with embedtune"):
            assert heading in card, (name, heading)
        assert card.count(SECTION_START) == 1 and card.count(SECTION_END) == 1, name
        assert str(trained.root) not in card and str(tmp_path) not in card, f"{name}: a local absolute path"
    assert "| format | `onnx` |" in cards["onnx"] and "### ONNX check" in cards["onnx"]


def test_model_folder_without_training_record_says_so(trained, tmp_path):
    """A plain HF folder exports to a SentenceTransformer with embedtune's pooling, and an honest card."""
    from sentence_transformers import SentenceTransformer

    out = tmp_path / "st"
    export(trained.base, to="sentence-transformers", output=out)
    card = (out / "README.md").read_text()
    assert "No training record" in card and "| ndcg@10 |" not in card
    model, tok = FastModel.from_pretrained(str(trained.base), max_seq_length=None)
    expected = to_sentence_transformer(model, tok).eval().encode(TEXTS, convert_to_numpy=True)
    got = SentenceTransformer(str(out), device="cpu").encode(TEXTS, convert_to_numpy=True)
    assert _max_diff(got, expected) < 1e-5


@pytest.mark.parametrize("case", ["missing-adapter", "unknown-format", "variant-without-onnx", "not-empty",
                                  "output-is-source", "no-such-model"])
def test_cli_bad_input_is_one_line_and_writes_nothing(trained, tmp_path, case):
    out = tmp_path / "out"
    args, needle = {
        "missing-adapter": ([str(trained.base), "--to", "adapter"], "no LoRA adapter"),
        "unknown-format": ([str(trained.run), "--to", "tflite"], "'tflite' is not one of"),
        "variant-without-onnx": ([str(trained.run), "--to", "hf", "--onnx-variant", "int8"], "applies to --to onnx"),
        "not-empty": ([str(trained.run), "--to", "hf"], "not empty"),
        "output-is-source": ([str(trained.run), "--to", "hf", "--overwrite"], "is (or holds) the model"),
        "no-such-model": ([str(tmp_path / "nope"), "--to", "hf"], "no such folder"),
    }[case]
    if case == "not-empty":
        out.mkdir()
        (out / "keep.txt").write_text("precious")
    if case == "output-is-source":
        out = trained.run
    before = sorted(p.name for p in trained.run.iterdir())
    result = runner.invoke(app, ["export", *args, "--output", str(out)])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], result.output
    assert sorted(p.name for p in trained.run.iterdir()) == before
    if case == "not-empty":
        assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"
    elif case != "output-is-source":
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temp folders left behind"


@pytest.mark.parametrize("fmt", ["sentence-transformers", "hf", "adapter", "onnx"])
def test_card_snippets_run_and_give_the_fine_tuned_embeddings(trained, tmp_path, fmt, monkeypatch):
    """The card's "How to load" code, run as written, reproduces the model (adapter: both ways)."""
    from embedtune.model_card import SECTION_END, SECTION_START

    out = tmp_path / fmt
    export(trained.run, to=fmt, output=out)
    card = (out / "README.md").read_text()
    section = card.split(SECTION_START, 1)[1].split(SECTION_END, 1)[0]  # embedtune's; the rest is ST's
    snippets = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(snippets) == (2 if fmt == "adapter" else 1)
    monkeypatch.chdir(tmp_path)  # the snippets name the folder as handed over: run beside it
    for code in snippets:
        namespace: dict = {}
        exec(compile(code, f"{fmt}-card", "exec"), namespace)  # noqa: S102 - our own generated snippet
        embeddings = namespace["embeddings"]
        embeddings = embeddings.numpy() if isinstance(embeddings, torch.Tensor) else np.asarray(embeddings)
        assert _max_diff(embeddings, trained.expected_snippet) < 1e-5, code


def test_card_reports_the_saved_weights_final_scores(tmp_path):
    """sentence-transformers' card states the evaluator's last evaluation; after the best weights are restored
    the saved model is not that one: its card states the run's final (exact) scores instead."""
    from embedtune.evaluate import metric_key, shared_ir_evaluator
    from embedtune.ir_task import IRTask
    from embedtune.model_card import card_reports_final

    base = make_tiny_model("bert", tmp_path)
    model, tok = FastModel.from_pretrained(str(base), max_seq_length=32)
    st = to_sentence_transformer(model, tok)
    evaluator = shared_ir_evaluator(IRTask(queries={"q": "x"}, corpus={"d": "y"}, relevant={"q": {"d"}}))
    evaluator.store_metrics_in_model_card_data(st, {metric_key("ir-eval", "ndcg@10"): 0.0724}, 1, 1500)
    assert card_reports_final(st, "ir-eval", {"ndcg@10": 0.0824}, lambda m: metric_key("ir-eval", m))
    st.save(str(tmp_path / "saved"))
    header = (tmp_path / "saved" / "README.md").read_text().split("\n---\n", 1)[0]
    assert "0.0824" in header and "0.0724" not in header
    assert not card_reports_final(st, "other-eval", {"ndcg@10": 0.5}, lambda m: m)


def test_batch_fact_counts_every_process():
    from embedtune.report import batch_fact

    assert batch_fact(4, 2) == "4 per process x 2 processes = 8"
    assert batch_fact(4, 1) == batch_fact(4, None) == "4" and batch_fact(None, 2) is None
