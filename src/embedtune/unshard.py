"""The trained model out of FSDP's shards: one full, unsharded copy to save."""

from __future__ import annotations

import torch

from . import distributed
from .loading import FastModel
from .st import to_sentence_transformer


def unsharded_copy(st_model, config):
    """After FSDP training: the full weights gathered (every rank takes part) into a fresh, unsharded
    SentenceTransformer on rank 0's CPU, ready to save; None on the other ranks."""
    from .sharding import full_state_dict

    weights = full_state_dict(st_model)
    if not distributed.is_main():
        return None
    model, tokenizer = FastModel.from_pretrained(config.model, max_seq_length=config.max_seq_length,
                                                 dtype=torch.float32, device="cpu", fast=config.fast)
    model.load_state_dict(weights, strict=True)
    copy = to_sentence_transformer(model, tokenizer, pooling=config.pooling)
    copy.prompts = dict(st_model.prompts or {})
    return copy
