"""Variations users make on the guide's program: each case here once went wrong."""

from __future__ import annotations

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
