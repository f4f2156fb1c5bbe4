"""Variations users make on the guide's program: each case here once went wrong."""

from __future__ import annotations

import warnings

import pytest
import torch

from embedtune import FastModel
from tiny_models import make_tiny_model

TEXTS = ["Return the sum of two numbers.", "def add(a, b):\n    return a + b", "Open a file for reading."]


@pytest.mark.parametrize("arch, guide_class, own_class", [
    ("roberta", "BertModel", "RobertaModel"),     # the guide's class kept for a RoBERTa / XLM-R checkpoint
    ("qwen3", "Qwen2Model", "Qwen3Model"),        # the guide's note names Qwen2Model; Qwen3-Embedding is qwen3
])
def test_auto_model_of_another_family_loads_the_checkpoints_own_class(tmp_path, arch, guide_class, own_class):
    import transformers
    from transformers import AutoModel

    folder = make_tiny_model(arch, tmp_path)
    with pytest.warns(UserWarning, match=f"auto_model={guide_class} .* loading it as {own_class}"):
        model, tokenizer = FastModel.from_pretrained(str(folder), auto_model=getattr(transformers, guide_class),
                                                     max_seq_length=64, add_pooling_layer=False, fast=True)
    assert type(model).__name__ == own_class
    # the model trains as the checkpoint it is: the same outputs as the stock class loaded from it
    stock = AutoModel.from_pretrained(str(folder), **({"add_pooling_layer": False} if arch == "roberta" else {}))
    model.eval()
    stock.eval()
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        got = model(**batch).last_hidden_state
        want = stock(**batch).last_hidden_state
    mask = batch["attention_mask"].bool()
    assert (got[mask] - want[mask]).abs().max().item() < 1e-4


def test_auto_model_of_the_checkpoints_family_is_kept(tmp_path):
    from transformers import BertModel

    folder = make_tiny_model("bert", tmp_path)
    model, _ = FastModel.from_pretrained(str(folder), auto_model=BertModel, max_seq_length=64)
    assert type(model) is BertModel


def test_lora_bias_trains_and_counts_in_the_packed_forward(tmp_path):
    """peft's `lora_bias=True` (a bias on each lora_B) passed through get_peft_model: the packed forward
    must add it, and it must get a gradient, as in peft's own layer."""
    from transformers import BertModel

    folder = make_tiny_model("bert", tmp_path)
    models = []
    for fast in (True, False):
        model, tokenizer = FastModel.from_pretrained(str(folder), auto_model=BertModel, max_seq_length=64, fast=fast)
        models.append(FastModel.get_peft_model(model, r=4, lora_alpha=8, target_modules=["query", "value"],
                                               lora_bias=True))
    fast_model, peft_model = models
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in fast_model.named_parameters():
            if ".lora_" in name:
                param.normal_(0, 0.3)
    peft_model.load_state_dict(fast_model.state_dict())
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    mask = batch["attention_mask"].bool()
    outs = []
    for model in (fast_model, peft_model):
        model.eval()  # the two forwards' dropout masks would differ; the comparison is of the math
        out = model(**batch).last_hidden_state
        out[mask].square().sum().backward()
        outs.append(out.detach())
    assert (outs[0][mask] - outs[1][mask]).abs().max().item() < 1e-4
    grads = {name: p.grad for name, p in fast_model.named_parameters() if name.endswith("lora_B.default.bias")}
    want = {name: p.grad for name, p in peft_model.named_parameters() if name.endswith("lora_B.default.bias")}
    assert grads and all(g is not None for g in grads.values())
    assert all(torch.allclose(grads[n], want[n], atol=1e-4) for n in grads)


def test_save_pretrained_merged_keeps_modules_to_save(tmp_path):
    """peft's `modules_to_save=[...]` (a module trained in full beside LoRA): Unsloth's
    `save_pretrained_merged` must write the trained copy under the module's own name, as
    merge_and_unload() + save_pretrained does; not peft's wrapper keys, which a plain load ignores
    (leaving that module at random initialisation)."""
    from transformers import AutoModel, BertModel

    folder = make_tiny_model("bert", tmp_path)
    model, tokenizer = FastModel.from_pretrained(str(folder), auto_model=BertModel, max_seq_length=64)
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, target_modules=["query", "value"],
                                     modules_to_save=["word_embeddings"])
    torch.manual_seed(0)
    with torch.no_grad():  # as if trained: LoRA and the embedding copy moved
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.3)
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    mask = batch["attention_mask"].bool()
    model.eval()
    with torch.no_grad():
        expected = model(**batch).last_hidden_state[mask]
    model.save_pretrained_merged(str(tmp_path / "merged"), tokenizer)
    from safetensors.torch import load_file

    keys = set(load_file(str(tmp_path / "merged" / "model.safetensors")))
    assert "embeddings.word_embeddings.weight" in keys
    assert not any("modules_to_save" in k or "original_module" in k for k in keys)
    reloaded = AutoModel.from_pretrained(str(tmp_path / "merged"))
    reloaded.eval()
    with torch.no_grad():
        got = reloaded(**batch).last_hidden_state[mask]
    assert (got - expected).abs().max().item() < 1e-4


def test_guide_targets_that_match_nothing_are_one_line_naming_the_models_own(tmp_path):
    """The guide's query/key/value/dense kept for a decoder embedder (Qwen3): one line naming the model's
    own projections, not peft's exception."""
    from embedtune.errors import EmbedtuneError

    folder = make_tiny_model("qwen3", tmp_path)
    model, _ = FastModel.from_pretrained(str(folder), max_seq_length=64)
    with pytest.raises(EmbedtuneError, match="matched no layer of this qwen3 model; qwen3's attention and MLP "
                                             "projections are .*q_proj"):
        FastModel.get_peft_model(model, r=8, lora_alpha=8, target_modules=["query", "key", "value", "dense"])


def _lora_st(tmp_path):
    """A tiny BERT with LoRA moved off its zero start (as if trained), in the guide's SentenceTransformer."""
    from transformers import BertModel

    from embedtune import to_sentence_transformer

    folder = make_tiny_model("bert", tmp_path)
    model, tokenizer = FastModel.from_pretrained(str(folder), auto_model=BertModel, max_seq_length=64)
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, target_modules=["query", "key", "value", "dense"])
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
    st = to_sentence_transformer(model, tokenizer, pooling="cls")
    st.eval()
    return model, tokenizer, st


def test_merged_save_over_an_earlier_adapter_save_reloads_the_trained_model(tmp_path):
    """An ST save before merging (an adapter), then the guide's step 6 (merge, save) into the same folder: the
    earlier adapter files must not stay beside the merged weights, where a load applies the LoRA twice."""
    from sentence_transformers import SentenceTransformer

    model, _, st = _lora_st(tmp_path)
    expected = st.encode(TEXTS, convert_to_tensor=True)
    out = tmp_path / "embeddings_merged"
    st.save_pretrained(str(out))
    assert (out / "adapter_config.json").exists()
    model.merge_and_unload()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        st.save_pretrained(str(out))
    got = SentenceTransformer(str(out), device="cpu").encode(TEXTS, convert_to_tensor=True)
    assert (got - expected).abs().max().item() < 1e-5
    assert not (out / "adapter_config.json").exists() and (out / "model.safetensors").exists()
    assert any("removed adapter_config.json, adapter_model.safetensors" in str(w.message) for w in caught)


def test_adapter_save_into_a_merged_models_folder_is_refused(tmp_path):
    """save_pretrained_merged, then the ST save without merging into the same folder: the adapter would load on top
    of the merged weights (the LoRA twice); one line instead of a silently wrong folder."""
    from embedtune.errors import EmbedtuneError

    model, tokenizer, st = _lora_st(tmp_path)
    out = tmp_path / "out"
    model.save_pretrained_merged(str(out), tokenizer)
    with pytest.raises(EmbedtuneError, match="holds a full model's weights .*merge first"):
        st.save_pretrained(str(out))


@pytest.mark.parametrize("peft_step", [True, False])
def test_full_finetuning_has_unsloths_merged_saves(tmp_path, monkeypatch, peft_step):
    """`full_finetuning=True` (with the guide's get_peft_model, or without it): Unsloth's
    `save_pretrained_merged(dir, tokenizer)` writes the model as a plain HF folder, and `push_to_hub_merged`
    uploads that folder; neither is an AttributeError."""
    from transformers import AutoModel, BertModel

    folder = make_tiny_model("bert", tmp_path)
    model, tokenizer = FastModel.from_pretrained(str(folder), auto_model=BertModel, max_seq_length=64,
                                                 full_finetuning=True)
    if peft_step:
        with pytest.warns(UserWarning, match="adds no adapters"):
            model = FastModel.get_peft_model(model, r=8, target_modules=["query", "key", "value", "dense"])
    with torch.no_grad():  # as if trained
        model.embeddings.word_embeddings.weight.add_(1.0)
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    mask = batch["attention_mask"].bool()
    model.eval()
    with torch.no_grad():
        expected = model(**batch).last_hidden_state[mask]
    out = tmp_path / "merged"
    model.save_pretrained_merged(str(out), tokenizer)
    assert (out / "tokenizer.json").exists()
    reloaded = AutoModel.from_pretrained(str(out))
    with torch.no_grad():
        assert (reloaded(**batch).last_hidden_state[mask] - expected).abs().max().item() < 1e-5

    uploads = _fake_hub(monkeypatch)
    model.push_to_hub_merged("me/tuned", tokenizer)
    assert uploads[0] == "me/tuned" and {"config.json", "model.safetensors", "tokenizer.json"} <= set(uploads[1])


def _fake_hub(monkeypatch) -> list:
    """huggingface_hub.HfApi replaced by one that records the repository created and the files uploaded."""
    import huggingface_hub

    uploads: list = []

    class Api:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=None, exist_ok=False):
            uploads.append(repo_id)

        def upload_folder(self, repo_id, folder_path, commit_message=None):
            from pathlib import Path

            uploads.append(sorted(p.name for p in Path(folder_path).iterdir()))

    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    return uploads


def test_lora_push_to_hub_merged_uploads_the_merged_encoder(tmp_path, monkeypatch):
    """Unsloth's `model.push_to_hub_merged(repo, tokenizer)` on the guide's LoRA model: what
    save_pretrained_merged writes, uploaded; the model in memory keeps its adapters."""
    model, tokenizer, _ = _lora_st(tmp_path)
    uploads = _fake_hub(monkeypatch)
    model.push_to_hub_merged("me/tuned", tokenizer)
    assert uploads[0] == "me/tuned" and {"config.json", "model.safetensors", "tokenizer.json"} <= set(uploads[1])
    assert "adapter_config.json" not in uploads[1] and not model.is_merged
