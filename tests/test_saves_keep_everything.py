"""Saves that keep everything: what a model loaded with is what its saves and exports hold.

- BERT-family poolers (BERT, RoBERTa, XLM-R): `FastModel.from_pretrained` builds no pooler (training
  never reads it), yet `save_merged`, `save_hf`, a training run's model/ and `embedtune export` write the
  checkpoint's own pooler, so a stock reload reports nothing "newly initialized" and `pooler_output`
  is the same at every load.
- ONNX exports are SentenceTransformer folders (config, modules, tokenizer, `model.onnx` with the
  encoder's `last_hidden_state`) that give the PyTorch model's embeddings the way sentence-transformers'
  ONNX backend computes them.
- No card names the training file's local path.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from embedtune import FastModel, save_hf, save_merged, to_sentence_transformer
from embedtune.export import export
from embedtune.train import TrainConfig, run
from tiny_models import make_tiny_model

ARCHS = ("bert", "roberta", "xlm-roberta")
TEXTS = ["how do I sort a dictionary by value", "sorted(d.items(), key=lambda kv: kv[1])", "x",
         "a considerably longer sentence, long enough that every other text in the batch is padded " * 2]


def _stock_load(folder: Path):
    """A plain transformers load of `folder` (its encoder, for a SentenceTransformer folder) and its
    missing keys (what transformers reports as newly initialized)."""
    from transformers import AutoModel

    model, info = AutoModel.from_pretrained(str(folder), output_loading_info=True)
    return model.eval(), sorted(info["missing_keys"])


def _pooler_output(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).pooler_output


def _assert_keeps_pooler(folder: Path, base: Path):
    from transformers import AutoTokenizer

    loaded, missing = _stock_load(folder)
    assert missing == [], f"{folder}: newly initialized {missing}"
    original, _ = _stock_load(base)
    assert torch.equal(loaded.pooler.dense.weight, original.pooler.dense.weight)
    again, _ = _stock_load(folder)
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    assert torch.equal(_pooler_output(loaded, tokenizer), _pooler_output(again, tokenizer))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("keep")
    return {arch: make_tiny_model(arch, root) for arch in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
def test_guide_saves_keep_the_pooler(models, tmp_path, arch):
    """The guide's path: load without a pooler (as the guide asks), add LoRA, save_merged / save_hf."""
    base = models[arch]
    model, tokenizer = FastModel.from_pretrained(str(base), add_pooling_layer=False, fast=False, device="cpu",
                                                 dtype=torch.float32)
    assert getattr(model, "pooler", None) is None  # the model in memory is the one training runs
    model = FastModel.get_peft_model(model, r=4)
    st = to_sentence_transformer(model, tokenizer)
    hf = save_hf(st, output_dir=tmp_path / "hf")
    merged = save_merged(st, tmp_path / "merged")
    _assert_keeps_pooler(merged, base)
    _assert_keeps_pooler(hf, base)
    for fmt in ("sentence-transformers", "hf"):
        _assert_keeps_pooler(export(merged, to=fmt, output=tmp_path / f"export-{fmt}").output, base)


def test_a_checkpoint_without_pooler_gets_none(models, tmp_path):
    """Nothing is invented: a checkpoint saved without a pooler exports without one."""
    from safetensors.torch import load_file, save_file

    import shutil

    folder = tmp_path / "no-pooler"
    shutil.copytree(models["bert"], folder)
    weights = load_file(str(folder / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if not k.startswith("pooler.")}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    out = export(folder, to="hf", output=tmp_path / "hf").output
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        assert not [k for k in handle.keys() if k.startswith("pooler.")]


def test_trainer_reload_takes_the_saved_pooler(models):
    """A checkpoint that holds the pooler loads back onto the pooler-less model in memory (resume,
    load_best_model_at_end): the keys are taken, not unexpected."""
    model, _ = FastModel.from_pretrained(str(models["bert"]), fast=False, device="cpu", dtype=torch.float32)
    from safetensors.torch import load_file

    state = load_file(str(models["bert"] / "model.safetensors"))
    result = model.load_state_dict(state, strict=True)
    assert not result.unexpected_keys and not result.missing_keys


@pytest.fixture(scope="module")
def trained(tmp_path_factory, models):
    root = tmp_path_factory.mktemp("keep-run")
    rows = [{"anchor": f"question {i} about topic {i % 7}", "positive": f"answer {i}: topic {i % 7}, number {i}"}
            for i in range(32)]
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run(TrainConfig(data=str(data), model=str(models["bert"]), output_dir=str(root / "run"), max_steps=2,
                             batch_size=8, lr=5e-3, max_seq_length=32, lora_r=4, eval_size=8, evals_per_run=1,
                             pooling="mean"))
    return root, data, result


def test_training_run_model_keeps_the_pooler(trained, models):
    root, _, _ = trained
    _assert_keeps_pooler(root / "run" / "model", models["bert"])


def _text_files(folder: Path):
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            try:
                yield path, path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                continue


@pytest.mark.parametrize("fmt", ["sentence-transformers", "hf", "adapter", "onnx"])
def test_no_card_names_the_training_files_path(trained, tmp_path, fmt):
    root, data, _ = trained
    out = export(root / "run", to=fmt, output=tmp_path / fmt).output
    assert data.name in (out / "README.md").read_text()
    leaks = [str(p.relative_to(out)) for p, text in _text_files(out) if str(data) in text]
    assert leaks == [], f"the training file's local path is written in {leaks}"


def _pool(tokens: np.ndarray, mask: np.ndarray, mode: str) -> np.ndarray:
    if mode == "cls":
        pooled = tokens[:, 0]
    else:
        weights = mask[..., None].astype(tokens.dtype)
        pooled = (tokens * weights).sum(1) / np.clip(weights.sum(1), 1e-9, None)
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


def _cos(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min())


def test_onnx_export_is_a_sentence_transformers_onnx_folder(tmp_path):
    """The bundled model exported to ONNX: the files `SentenceTransformer(dir, backend="onnx")` reads, and
    the backend's computation (the graph's last_hidden_state, then the folder's Pooling and Normalize)
    gives the PyTorch model's embeddings, in onnxruntime."""
    import onnxruntime as ort
    from sentence_transformers import SentenceTransformer
    from transformers import AutoConfig, AutoTokenizer

    model, tokenizer = FastModel.from_pretrained(fast=False, device="cpu", dtype=torch.float32)
    st = to_sentence_transformer(model, tokenizer).eval()
    expected = st.encode(TEXTS, convert_to_numpy=True)
    src = save_merged(st, tmp_path / "merged")
    out = export(src, to="onnx", output=tmp_path / "onnx").output

    modules = json.loads((out / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[-1] for m in modules] == ["Transformer", "Pooling", "Normalize"]
    assert AutoConfig.from_pretrained(str(out)).model_type == "bert"
    assert (out / "sentence_bert_config.json").is_file() and (out / "model.onnx").is_file()
    assert not (out / "model.safetensors").exists(), "the encoder lives in model.onnx"
    pooling = json.loads((out / modules[1]["path"] / "config.json").read_text())
    mode = "mean" if pooling.get("pooling_mode_mean_tokens") or pooling.get("pooling_mode") == "mean" else "cls"

    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert "last_hidden_state" in [o.name for o in session.get_outputs()]
    names = {i.name for i in session.get_inputs()}
    tok = AutoTokenizer.from_pretrained(str(out))
    for texts, want in [(TEXTS, expected)] + [([t], expected[i:i + 1]) for i, t in enumerate(TEXTS)]:
        batch = tok(texts, padding=True, truncation=True, return_tensors="np")
        tokens = session.run(["last_hidden_state"], {k: v for k, v in batch.items() if k in names})[0]
        assert _cos(_pool(tokens, batch["attention_mask"], mode), want) >= 0.9999

    if importlib.util.find_spec("optimum") is None:
        return  # the backend itself needs optimum (not installable next to transformers 5 here)
    onnx_st = SentenceTransformer(str(out), backend="onnx", device="cpu")
    assert _cos(onnx_st.encode(TEXTS, convert_to_numpy=True), expected) >= 0.9999


_PLAIN_PEFT = """
import json, sys
import torch
from peft import PeftModel
from transformers import AutoModel, AutoTokenizer

adapter = sys.argv[1]
base = json.load(open(adapter + "/adapter_config.json"))["base_model_name_or_path"]
model = PeftModel.from_pretrained(AutoModel.from_pretrained(base, add_pooling_layer=False), adapter).eval()
tokenizer = AutoTokenizer.from_pretrained(adapter)
batch = tokenizer(json.loads(sys.argv[2]), padding=True, return_tensors="pt")
with torch.no_grad():
    tokens = model(**batch).last_hidden_state
assert "embedtune" not in sys.modules
print(json.dumps(tokens[:, 0].tolist()))
"""


def test_adapter_of_the_bundled_model_loads_offline_with_plain_peft(tmp_path):
    """`embedtune train`'s adapter/ of the bundled model, loaded by a program that never imports embedtune,
    offline with an empty Hugging Face cache: the recorded base must be something it can resolve."""
    import os
    import subprocess
    import sys

    from embedtune import save_adapter

    model, tokenizer = FastModel.from_pretrained(max_seq_length=32, fast=False, device="cpu", dtype=torch.float32)
    peft = FastModel.get_peft_model(model, r=4, random_state=0)
    with torch.no_grad():  # a trained-looking adapter: B is zero at init
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    st = to_sentence_transformer(peft, tokenizer).eval()
    adapter = save_adapter(st, tmp_path / "adapter")
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = peft(**batch).last_hidden_state[:, 0].numpy()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty-hf-home")}
    for name in ("HF_HUB_CACHE", "TRANSFORMERS_CACHE", "PYTHONPATH"):
        env.pop(name, None)
    done = subprocess.run([sys.executable, "-c", _PLAIN_PEFT, str(adapter), json.dumps(TEXTS)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    got = np.array(json.loads(done.stdout.strip().splitlines()[-1]))
    assert np.abs(got - expected).max() < 1e-4
