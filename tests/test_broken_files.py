"""Broken model and adapter files: one line naming the file and what to do, in every command and in the
Python API, never a traceback, and nothing half-written; exports read back what they write.

Each case copies a tiny model (tests/tiny_models.py) and breaks one file of it the way files break
(a download or copy cut short, an empty file, a config that needs the checkpoint's own code, a
pickled module, tensors missing, a corrupt tokenizer or adapter file).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from embedtune import FastModel, to_sentence_transformer
from embedtune.cli import app
from embedtune.errors import EmbedtuneError
from embedtune.export import export
from embedtune.loading import ModelFileError, check_safetensors
from embedtune.lora import get_peft_model, load_adapter
from embedtune.save import save_adapter
from tiny_models import make_tiny_model, make_tiny_st_model

runner = CliRunner()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("broken")
    base = make_tiny_model("bert", root)
    st = make_tiny_st_model(root, "st", dense_dims=(16,))
    model, tokenizer = FastModel.from_pretrained(str(base), max_seq_length=32, fast=False, device="cpu")
    lora = get_peft_model(model, r=4, lora_alpha=4)
    save_adapter(to_sentence_transformer(lora, tokenizer), root / "adapter")
    rows = [{"anchor": f"question {i} about topic {i % 5}", "positive": f"answer {i}: topic {i % 5}, number {i}"}
            for i in range(24)]
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"base": base, "st": st, "adapter": root / "adapter", "data": data, "root": root}


def _truncate(path: Path, keep: float = 0.5) -> None:
    size = path.stat().st_size
    with path.open("r+b") as f:
        f.truncate(int(size * keep))


def _pickle_dense(folder: Path) -> Path:
    dense = folder / "2_Dense"
    weights = load_file(str(dense / "model.safetensors"))
    (dense / "model.safetensors").unlink()
    torch.save(weights, dense / "pytorch_model.bin")
    return dense / "pytorch_model.bin"


def _remote_code(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "custom-bert"
    config["auto_map"] = {"AutoConfig": "configuration_custom.CustomConfig", "AutoModel": "modeling_custom.CustomModel"}
    (folder / "config.json").write_text(json.dumps(config))


def _drop_layer(folder: Path) -> None:
    weights = load_file(str(folder / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if "layer.1." not in k}, str(folder / "model.safetensors"))


# case -> (which model to copy, how to break it, what the one line must say)
CASES = {
    "truncated-weights": ("base", lambda d: _truncate(d / "model.safetensors"),
                          "model.safetensors: truncated or not a safetensors file"),
    "empty-weights": ("base", lambda d: (d / "model.safetensors").write_bytes(b""),
                      "model.safetensors: truncated or not a safetensors file (header too small; 0 bytes)"),
    "remote-code": ("base", _remote_code, "needs remote code"),
    "pickled-dense": ("st", _pickle_dense, "2_Dense/pytorch_model.bin: pickled weights are not loaded unless "
                                           "allow_pickle=True"),
    "truncated-dense": ("st", lambda d: _truncate(d / "2_Dense" / "model.safetensors"),
                        "2_Dense/model.safetensors: truncated or not a safetensors file"),
    "missing-weights": ("base", _drop_layer, "model.safetensors: lacks"),
    "broken-config": ("base", lambda d: (d / "config.json").write_text('{"model_type": "be'),
                      "config.json: unreadable JSON"),
    "broken-tokenizer": ("base", lambda d: (d / "tokenizer.json").write_text("{"), "tokenizer.json:"),
}


def _broken_copy(models, case: str, tmp_path: Path) -> tuple[Path, str]:
    kind, breaker, needle = CASES[case]
    target = tmp_path / f"model-{case}"
    shutil.copytree(models[kind], target)
    breaker(target)
    return target, needle


def _one_error_line(result, needle: str) -> str:
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    assert lines[-1] == errors[0] and needle in errors[0], result.output
    return errors[0]


@pytest.mark.parametrize("case", list(CASES))
def test_from_pretrained_names_the_broken_file(models, tmp_path, case):
    folder, needle = _broken_copy(models, case, tmp_path)
    with pytest.raises(ModelFileError) as info:
        model, tokenizer = FastModel.from_pretrained(str(folder), max_seq_length=32, fast=False, device="cpu")
        to_sentence_transformer(model, tokenizer)
    message = str(info.value)
    assert isinstance(info.value, EmbedtuneError) and "\n" not in message
    assert needle in message, message


@pytest.mark.parametrize("command", ["train", "eval", "mine", "export"])
@pytest.mark.parametrize("case", list(CASES))
def test_every_command_gives_one_line_and_writes_nothing(models, tmp_path, case, command):
    folder, needle = _broken_copy(models, case, tmp_path)
    out = tmp_path / "out"
    args = {
        "train": ["train", str(models["data"]), "--model", str(folder), "--max-steps", "1", "--batch-size", "4",
                  "--no-eval", "--output", str(out)],
        "eval": ["eval", str(folder), str(models["data"])],
        "mine": ["mine", str(models["data"]), "--model", str(folder), "--output", str(tmp_path / "mined.jsonl")],
        "export": ["export", str(folder), "--output", str(out)],
    }[command]
    _one_error_line(runner.invoke(app, args), needle)
    left = sorted(p.name for p in tmp_path.iterdir() if p != folder)
    assert left == [], f"{command} wrote {left}"


def test_pickled_module_loads_when_allowed(models, tmp_path):
    """The refusal is about the pickle rule, not the file: with allow_pickle=True a plain pickle loads."""
    folder = tmp_path / "st"
    shutil.copytree(models["st"], folder)
    _pickle_dense(folder)
    model, tokenizer = FastModel.from_pretrained(str(folder), allow_pickle=True, fast=False, device="cpu")
    st = to_sentence_transformer(model, tokenizer)
    assert [type(m).__name__ for m in st][:3] == ["Transformer", "Pooling", "Dense"]


class _Marker:
    """A pickle that would create a file if it were ever unpickled with code execution."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_hostile_pickle_is_refused_in_one_line_and_never_run(models, tmp_path):
    folder = tmp_path / "st"
    shutil.copytree(models["st"], folder)
    weights = _pickle_dense(folder)
    marker = tmp_path / "was-run"
    torch.save({"linear.weight": _Marker(marker)}, weights)
    with pytest.raises(ModelFileError) as info:
        model, tokenizer = FastModel.from_pretrained(str(folder), allow_pickle=True, fast=False, device="cpu")
        to_sentence_transformer(model, tokenizer)
    message = str(info.value)
    assert "2_Dense/pytorch_model.bin: torch.load(weights_only=True) refused it" in message, message
    assert "\n" not in message and "\x1b" not in message and "nothing in it was run" in message
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "empty", "appended", "garbage", "bad-shape"])
def test_check_safetensors_catches_every_kind_of_damage(models, tmp_path, damage):
    source = (models["base"] / "model.safetensors").read_bytes()
    path = tmp_path / "model.safetensors"
    if damage == "bad-shape":  # a header whose shape does not match the tensor's bytes
        weights = load_file(str(models["base"] / "model.safetensors"))
        name = next(iter(weights))
        header_len = int.from_bytes(source[:8], "little")
        header = json.loads(source[8 : 8 + header_len])
        header[name]["shape"] = [header[name]["shape"][0] + 1, *header[name]["shape"][1:]]
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        data = len(raw).to_bytes(8, "little") + raw + source[8 + header_len :]
    else:
        data = {"truncated": source[: len(source) - 100], "empty": b"", "appended": source + b"\0" * 16,
                "garbage": os.urandom(4096)}[damage]
    path.write_bytes(data)
    with pytest.raises(ModelFileError, match="model.safetensors: truncated or not a safetensors file"):
        check_safetensors(path)
    path.write_bytes(source)
    assert check_safetensors(path) > 0


# ---------------------------------------------------------------- adapters


def _adapter_copy(models, tmp_path, damage: str) -> tuple[Path, str]:
    folder = tmp_path / f"adapter-{damage}"
    shutil.copytree(models["adapter"], folder)
    config_path = folder / "adapter_config.json"
    if damage == "truncated":
        _truncate(folder / "adapter_model.safetensors")
        return folder, "adapter_model.safetensors: truncated or not a safetensors file"
    if damage == "empty":
        (folder / "adapter_model.safetensors").write_bytes(b"")
        return folder, "adapter_model.safetensors: truncated or not a safetensors file"
    if damage == "broken-config":
        config_path.write_text('{"peft_type": "LO')
        return folder, "adapter_config.json"
    if damage == "wrong-rank":
        config = json.loads(config_path.read_text())
        config["r"] = 8
        config_path.write_text(json.dumps(config))
        return folder, "not rank r=8 as adapter_config.json says"
    if damage == "half-pairs":
        weights = load_file(str(folder / "adapter_model.safetensors"))
        save_file({k: v for k, v in weights.items() if ".lora_B." not in k or "layer.0." not in k},
                  str(folder / "adapter_model.safetensors"))
        return folder, "has no lora_B weight"
    if damage == "other-base":
        other = make_tiny_model("distilbert", models["root"])
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = str(other)
        config_path.write_text(json.dumps(config))
        return folder, "which its base model does not have"
    if damage == "broken-pipeline":
        (folder / "embedtune_adapter.json").write_text("{")
        return folder, "embedtune_adapter.json: unreadable JSON"
    raise AssertionError(damage)


ADAPTER_DAMAGE = ["truncated", "empty", "broken-config", "wrong-rank", "half-pairs", "other-base", "broken-pipeline"]


@pytest.mark.parametrize("damage", ADAPTER_DAMAGE)
@pytest.mark.parametrize("to", ["adapter", "sentence-transformers"])
def test_export_of_a_broken_adapter_is_one_line_and_writes_nothing(models, tmp_path, damage, to):
    folder, needle = _adapter_copy(models, tmp_path, damage)
    out = tmp_path / "out"
    _one_error_line(runner.invoke(app, ["export", str(folder), "--to", to, "--output", str(out)]), needle)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temp folders left behind"


@pytest.mark.parametrize("damage", [d for d in ADAPTER_DAMAGE if d != "other-base"])
def test_load_adapter_names_the_broken_file(models, tmp_path, damage):
    folder, needle = _adapter_copy(models, tmp_path, damage)
    with pytest.raises(ModelFileError) as info:
        load_adapter(folder, fast=False, device="cpu")
    assert needle in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_intact_adapter_still_exports_and_loads(models, tmp_path):
    result = export(models["adapter"], to="adapter", output=tmp_path / "out")
    assert {"adapter_model.safetensors", "adapter_config.json"} <= set(result.files)
    model, _ = load_adapter(tmp_path / "out", fast=False, device="cpu")
    assert any("lora_A" in name for name, _ in model.named_parameters())


def test_export_refuses_a_copy_that_does_not_read_back(models, tmp_path, monkeypatch):
    """A copy cut short on the way (a full disk): refused, and no output folder."""
    import embedtune.export as export_module

    real_copy = shutil.copy2

    def short_copy(src, dst, *args, **kwargs):
        real_copy(src, dst, *args, **kwargs)
        if str(src).endswith(".safetensors"):
            _truncate(Path(dst), 0.9)

    monkeypatch.setattr(export_module.shutil, "copy2", short_copy)
    with pytest.raises(EmbedtuneError, match="adapter_model.safetensors"):
        export(models["adapter"], to="adapter", output=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_export_refuses_weights_that_do_not_read_back(models, tmp_path, monkeypatch):
    """What `--to sentence-transformers` writes is read back before the folder is put in place."""
    from sentence_transformers import SentenceTransformer

    real_save = SentenceTransformer.save

    def short_save(self, path, *args, **kwargs):
        real_save(self, path, *args, **kwargs)
        _truncate(Path(path) / "model.safetensors", 0.9)

    monkeypatch.setattr(SentenceTransformer, "save", short_save)
    with pytest.raises(EmbedtuneError, match="model.safetensors did not read back as written"):
        export(models["st"], to="sentence-transformers", output=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("damaged", ["adapter_model.safetensors", "2_Dense/model.safetensors"])
def test_trainer_checkpoint_with_a_damaged_file_is_one_line(models, tmp_path, damaged):
    """Reloading a trainer checkpoint of a LoRA model (resume, load_best_model_at_end): a damaged weights
    file is named, not a SafetensorError traceback."""
    from embedtune.st import load_peft_checkpoint

    model, tokenizer = FastModel.from_pretrained(str(models["st"]), fast=False, device="cpu")
    st = to_sentence_transformer(get_peft_model(model, r=4, lora_alpha=4), tokenizer)
    checkpoint = tmp_path / "checkpoint-1"
    st.save(str(checkpoint))
    load_peft_checkpoint(st, checkpoint)  # intact: loads
    _truncate(checkpoint / damaged)
    with pytest.raises(ModelFileError, match=f"{damaged}: truncated or not a safetensors file"):
        load_peft_checkpoint(st, checkpoint)


def test_a_pooler_the_checkpoint_lacks_is_not_a_broken_file(models, tmp_path):
    """Only weights a sentence pipeline uses count: add_pooling_layer=True on a checkpoint saved without a
    pooler still loads (the pooler starts random, as before, and no pipeline reads it)."""
    folder = tmp_path / "no-pooler"
    shutil.copytree(models["base"], folder)
    weights = load_file(str(folder / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if not k.startswith("pooler.")}, str(folder / "model.safetensors"))
    model, _ = FastModel.from_pretrained(str(folder), add_pooling_layer=True, fast=False, device="cpu")
    assert model.pooler is not None
