"""Packed forward for MPNet (all-mpnet-base-v2 and friends).

MPNet is BERT-shaped (post-norm layers; q/k/v/o projections, intermediate.dense, output.dense) plus a
learned relative position bias: relative distances are bucketed (32 buckets, log-spaced beyond 8,
as transformers' `MPNetEncoder.compute_position_bias` does) and looked up in one per-head table
shared by all layers. The bias depends only on the distance, so one [heads, L, L] bias at the padded
width serves every sequence wherever it sits (a narrower grid takes its top-left corner).

Embeddings, projections, feed-forward and LayerNorms run on the packed tokens; attention is SDPA
with the bias as a float mask over length buckets (CPU) or the padded batch (GPU), see
`biased.biased_attention`, since varlen kernels take no bias. The bias is computed once per forward, as transformers does (its backward
through the table lookup syncs with the host, so once per layer would stall the GPU). transformers'
MPNet has no activation checkpointing; should a layer run checkpointed anyway, its bias is rebuilt
inside the layer, since a checkpoint that passes only the hidden states through (embedtune's
offloading one) would drop the gradient of a tensor the layer merely captured.
"""

from __future__ import annotations

import torch

from .bert import feed_forward
from .biased import biased_attention
from .layers import PackedOptions, run_layers
from .lora_linear import linear, linears
from .varlen import PackedBatch


def _position_bias(model, width: int, device) -> torch.Tensor:
    """[heads, width, width] relative position bias, exactly as the padded forward builds it."""
    probe = torch.empty(1, width, 0, device=device)  # compute_position_bias reads only size and device
    return model.encoder.compute_position_bias(probe)[0]


def _layer(model, layer, hidden, plan: PackedBatch, backend: str, shared_bias):
    attn = layer.attention.attn
    tokens = hidden.shape[0]
    heads, dim = attn.num_attention_heads, attn.attention_head_size
    q, k, v = (t.view(tokens, heads, dim) for t in linears([attn.q, attn.k, attn.v], hidden))
    bias = shared_bias if shared_bias is not None else _position_bias(model, plan.max_len, hidden.device)
    dropout = attn.dropout.p if attn.training else 0.0

    def bias_fn(qb, kb):
        width = qb.shape[2]
        return bias[:, :width, :width]

    context = biased_attention(q, k, v, plan, dim ** -0.5, bias_fn, dropout, backend).reshape(tokens, heads * dim)
    block = layer.attention
    hidden = block.LayerNorm(block.dropout(linear(attn.o, context)) + hidden)
    return feed_forward(layer, hidden)


def packed_mpnet_forward(model, input_ids, attention_mask, token_type_ids=None, attention_backend: str = "auto",
                         options: PackedOptions | None = None):
    """Last hidden states [B, L, H] (zeros at padding), every dense layer run on real tokens only."""
    plan = PackedBatch.from_mask(attention_mask)
    # MPNet numbers positions from padding_idx + 1 (fairseq style), whatever the tokenizer's pad id.
    positions = plan.position_ids + model.embeddings.padding_idx + 1
    hidden = model.embeddings(input_ids=plan.pack(input_ids)[None], position_ids=positions[None])[0]
    layers = model.encoder.layer
    checkpointed = any(getattr(layer, "gradient_checkpointing", False) for layer in layers)
    bias = None if checkpointed else _position_bias(model, plan.max_len, hidden.device)
    hidden = run_layers(layers, hidden, lambda layer, h: _layer(model, layer, h, plan, attention_backend, bias),
                        stack_traceable=False, options=options)  # biased attention buckets on the host
    return plan.unpack(hidden)
