"""Saves that keep everything: what a model loaded with is what its saves and exports hold.

- BERT-family poolers (BERT, RoBERTa, XLM-R): `FastModel.from_pretrained` builds no pooler (training
  never reads it), yet `save_merged`, `save_hf`, a training run's model/ and `embedtune export` write the
  checkpoint's own pooler, so a stock reload reports nothing "newly initialized" and `pooler_output`
  is the same at every load.
- ONNX exports are SentenceTransformer folders (config, modules, tokenizer, `model.onnx` with the
  encoder's `last_hidden_state`) that give the PyTorch model's embeddings the way sentence-transformers'
  ONNX backend computes them, and that backend itself (optimum in onnxruntime, from the separate
  `.onnx-st` stack) loads them and gives those embeddings.
- No card names the training file's local path; metrics.json and config.yaml name no local absolute
  path, and the saved config still replays (a real run) and `embedtune report` still reads the run.
- Adapters of the bundled model load offline with plain peft + transformers.
"""

from __future__ import annotations

import json
import os
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


def test_run_folder_names_no_absolute_local_path(trained, tmp_path_factory):
    """metrics.json names the run's files inside the run folder, config.yaml names the data by its file
    name and the local model by its folder name, and neither they nor the card hold a local absolute path."""
    import yaml

    root, data, result = trained
    run_dir = root / "run"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["artifacts"] == {"model": "model", "metrics": "metrics.json", "plot": "training_curves.png",
                                    "config": "config.yaml", "adapter": "adapter"}
    assert all((run_dir / name).exists() for name in metrics["artifacts"].values())
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["data"] == data.name and config["output_dir"] == run_dir.name
    assert config == metrics["config"]
    for name in ("metrics.json", "config.yaml", "model/README.md", "adapter/README.md"):
        assert str(tmp_path_factory.getbasetemp()) not in (run_dir / name).read_text(), name
    assert "## Fine-tuned with embedtune" in (run_dir / "adapter" / "README.md").read_text()  # not peft's template


def test_saved_config_replays_and_report_reads_the_run(trained, models, tmp_path, monkeypatch):
    """The saved config.yaml replays from a folder that holds the data file and the model folder under the
    names it records (a real run), and `embedtune report` reads the run folder."""
    import yaml
    from typer.testing import CliRunner

    from embedtune.cli import app

    root, data, _ = trained
    runner = CliRunner()
    report = runner.invoke(app, ["report", str(root / "run")])
    assert report.exit_code == 0, report.output
    saved = yaml.safe_load((root / "run" / "config.yaml").read_text())
    (tmp_path / data.name).symlink_to(data)
    (tmp_path / saved["model"]).symlink_to(models["bert"], target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    replay = runner.invoke(app, ["train", "--config", str(root / "run" / "config.yaml"), "--output", "replay"])
    assert replay.exit_code == 0, replay.output
    again = yaml.safe_load((tmp_path / "replay" / "config.yaml").read_text())
    assert again == {**saved, "output_dir": "replay"}


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


@pytest.fixture(scope="module")
def onnx_export(tmp_path_factory):
    """The bundled model exported to ONNX, and the PyTorch model's embeddings of TEXTS."""
    from sentence_transformers import SentenceTransformer  # noqa: F401 - loaded before the export, as users do

    root = tmp_path_factory.mktemp("onnx")
    model, tokenizer = FastModel.from_pretrained(fast=False, device="cpu", dtype=torch.float32)
    st = to_sentence_transformer(model, tokenizer).eval()
    expected = st.encode(TEXTS, convert_to_numpy=True)
    src = save_merged(st, root / "merged")
    return export(src, to="onnx", output=root / "onnx").output, expected


def test_onnx_export_is_a_sentence_transformers_onnx_folder(onnx_export):
    """The bundled model exported to ONNX: the files `SentenceTransformer(dir, backend="onnx")` reads, and
    the backend's computation (the graph's last_hidden_state, then the folder's Pooling and Normalize)
    gives the PyTorch model's embeddings, in onnxruntime."""
    import onnxruntime as ort
    from transformers import AutoConfig, AutoTokenizer

    out, expected = onnx_export
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


# sentence-transformers' ONNX backend needs optimum-onnx, which pins transformers < 4.58 and so cannot
# sit beside transformers 5. scripts/test.sh installs that stack (sentence-transformers 5.x, optimum-onnx,
# transformers 4.57, ...) into .onnx-st; the backend then loads the export in a process of its own.
ONNX_STACK = Path(os.environ.get("EMBEDTUNE_ONNX_ST", Path(__file__).resolve().parents[1] / ".onnx-st"))
_ONNX_BACKEND = """
import json, sys
from sentence_transformers import SentenceTransformer

model = SentenceTransformer(sys.argv[1], backend="onnx", device="cpu")
print(type(model[0].auto_model).__name__, file=sys.stderr)
assert type(model[0].auto_model).__name__ == "ORTModelForFeatureExtraction"  # onnxruntime, no torch encoder
print(json.dumps(model.encode(json.loads(sys.argv[2]), convert_to_numpy=True).tolist()))
"""


@pytest.mark.skipif(not (ONNX_STACK / "optimum" / "onnxruntime").is_dir(),
                    reason=f"sentence-transformers' ONNX backend stack is not installed in {ONNX_STACK} "
                           "(scripts/test.sh installs it)")
def test_onnx_export_loads_with_sentence_transformers_onnx_backend(onnx_export, tmp_path):
    """`SentenceTransformer(dir, backend="onnx")` itself (optimum's ORTModelForFeatureExtraction in
    onnxruntime) loads the export and gives the PyTorch model's embeddings. That stack's
    sentence-transformers 5.x keeps Normalize in another module than 6.x, which wrote modules.json:
    the copy it loads names the class where 5.x has it, and nothing else is changed."""
    import shutil
    import subprocess
    import sys

    out, expected = onnx_export
    folder = tmp_path / "onnx"
    shutil.copytree(out, folder)
    if not (ONNX_STACK / "sentence_transformers" / "base" / "modules" / "normalize.py").is_file():
        modules = (folder / "modules.json").read_text()
        (folder / "modules.json").write_text(modules.replace(
            "sentence_transformers.base.modules.normalize.Normalize",
            "sentence_transformers.sentence_transformer.modules.normalize.Normalize"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ONNX_STACK)}
    done = subprocess.run([sys.executable, "-c", _ONNX_BACKEND, str(folder), json.dumps(TEXTS)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    got = np.array(json.loads(done.stdout.strip().splitlines()[-1]))
    assert got.shape == expected.shape and _cos(got, expected) >= 0.9999


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
