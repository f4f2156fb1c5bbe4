"""Saves: atomic, refuse to clobber, and each format reloads with its stock consumer."""

from __future__ import annotations

import pytest
import torch

from embedtune import FastModel, SaveError, save_adapter, save_hf, save_merged, to_sentence_transformer
from embedtune.errors import EmbedtuneError
from embedtune.files import atomic_folder
from embedtune.loading import bundled_model_path

TEXTS = ["binary search over a sorted list", "def f(x):\n    return x * 2", "parse a date string"]


@pytest.fixture()
def lora_st():
    torch.manual_seed(0)
    model, tok = FastModel.from_pretrained(str(bundled_model_path()), max_seq_length=64)
    model = FastModel.get_peft_model(model, r=4)
    with torch.no_grad():  # make the adapter non-trivial, as training would
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return model, tok, to_sentence_transformer(model, tok)


def test_atomic_folder_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_folder(target) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("crash mid-save")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_saved_files_get_the_modes_plain_files_get(tmp_path, lora_st):
    """A library may write through mkstemp (0600: transformers' safetensors shards); a saved result
    is readable as everything else its user writes (0644 / 0755 under the usual umask)."""
    import os
    import stat

    model, tok, st = lora_st
    mask = os.umask(0o022)
    try:
        save_adapter(model, tmp_path / "adapter")  # before save_merged merges it away
        save_merged(st, tmp_path / "merged")
        with atomic_folder(tmp_path / "private") as tmp:
            fd = os.open(tmp / "secretive.bin", os.O_CREAT | os.O_WRONLY, 0o600)
            os.close(fd)
    finally:
        os.umask(mask)
    paths = [p for p in tmp_path.rglob("*")]
    assert any(p.name.endswith(".safetensors") for p in paths)
    for p in paths:
        assert stat.S_IMODE(p.stat().st_mode) == (0o755 if p.is_dir() else 0o644), p


def test_atomic_folder_keeps_previous_on_failure(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_folder(target, overwrite=True):
            raise RuntimeError("crash")
    assert (target / "old.txt").read_text() == "old"


def test_non_empty_target_refused(tmp_path, lora_st):
    _, _, st = lora_st
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f").write_text("1")
    with pytest.raises(SaveError, match="not empty"):
        save_merged(st, tmp_path / "x")


def test_save_merged_reloads_equal(tmp_path, lora_st):
    from sentence_transformers import SentenceTransformer

    _, _, st = lora_st
    st.eval()
    before = st.encode(TEXTS, convert_to_tensor=True)
    save_merged(st, tmp_path / "st")
    after_merge = st.encode(TEXTS, convert_to_tensor=True)
    reloaded = SentenceTransformer(str(tmp_path / "st"), device="cpu").encode(TEXTS, convert_to_tensor=True)
    assert (before - after_merge).abs().max() < 1e-5
    assert (before - reloaded).abs().max() < 1e-5
    assert not (tmp_path / "st" / "adapter_config.json").exists()


def test_save_hf_refuses_st_folder_and_writes_plain_encoder(tmp_path, lora_st):
    from transformers import AutoModel

    model, tok, st = lora_st
    save_merged(st, tmp_path / "st")
    with pytest.raises(SaveError, match="SentenceTransformer"):
        save_hf(model, tok, tmp_path / "st", overwrite=True)
    save_hf(model, tok, tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").exists()
    encoder = AutoModel.from_pretrained(str(tmp_path / "hf"))
    ref = model.get_base_model()
    for (n1, p1), (n2, p2) in zip(encoder.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(p1, p2), n1


def test_unsloths_save_pretrained_merged_writes_the_merged_encoder_and_keeps_the_adapters(tmp_path, lora_st):
    """`model.save_pretrained_merged(dir, tokenizer)` (Unsloth's; the guide names it): a plain HF folder whose
    encoder gives the LoRA model's hidden states, while the model in memory keeps training its adapters."""
    from transformers import AutoModel, AutoTokenizer

    model, tok, st = lora_st
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        expected = model(**batch).last_hidden_state
    model.save_pretrained_merged(str(tmp_path / "hf"), tok)
    assert not model.is_merged and any(p.requires_grad for n, p in model.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        assert torch.equal(model(**batch).last_hidden_state, expected)  # the adapters as they were
    encoder = AutoModel.from_pretrained(str(tmp_path / "hf")).eval()
    assert not any("lora" in k for k in encoder.state_dict())
    reloaded_tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    with torch.no_grad():
        got = encoder(**reloaded_tok(TEXTS, padding=True, return_tensors="pt")).last_hidden_state
    mask = batch["attention_mask"].bool()
    assert (got[mask] - expected[mask]).abs().max().item() < 1e-5
    save_merged(st, tmp_path / "st")
    with pytest.raises(EmbedtuneError, match="holds a SentenceTransformer"):  # the guide's warning, enforced
        lora_st[0].save_pretrained_merged(str(tmp_path / "st"), tok)
    with pytest.raises(EmbedtuneError, match="save_method='merged_4bit'"):
        model.save_pretrained_merged(str(tmp_path / "q"), tok, save_method="merged_4bit")


def test_save_adapter_reloads_onto_base_with_plain_peft(tmp_path, lora_st):
    from peft import PeftModel
    from transformers import AutoModel

    model, tok, st = lora_st
    st.eval()
    save_adapter(st, tmp_path / "adapter")
    files = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert "adapter_config.json" in files and "adapter_model.safetensors" in files
    assert "model.safetensors" not in files
    base = AutoModel.from_pretrained(str(bundled_model_path()))
    restored = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model.eval()(**batch).last_hidden_state
        got = restored(**batch).last_hidden_state
    real = batch["attention_mask"].bool()  # the packed path leaves zeros at padding; HF leaves junk
    assert (expected[real] - got[real]).abs().max() < 1e-5
