"""Packed (padding-free) forward for the BERT family: BERT, RoBERTa, XLM-RoBERTa, ELECTRA.

These share one layer layout (attention.self.{query,key,value}, attention.output.{dense,LayerNorm},
intermediate.dense, output.{dense,LayerNorm}). We run the model's own submodules, so LoRA layers
that peft put there are used as they are, on [tokens, hidden] instead of [batch, length, hidden].
"""

from __future__ import annotations

import torch

from ..kernels.fused_norm import residual_norm, will_fuse
from .layers import PackedOptions, run_layers
from .lora_linear import linear, linear_bias, linears
from .varlen import PackedBatch, varlen_attention

# RoBERTa-style position ids start after the padding index.
POSITION_OFFSET_TYPES = {"roberta", "xlm-roberta", "camembert"}


def _embed(model, input_ids, token_type_ids, plan: PackedBatch):
    ids = plan.pack(input_ids)[None]
    positions = plan.position_ids
    if model.config.model_type in POSITION_OFFSET_TYPES:
        positions = positions + model.embeddings.padding_idx + 1
    types = plan.pack(token_type_ids)[None] if token_type_ids is not None else torch.zeros_like(ids)
    hidden = model.embeddings(input_ids=ids, token_type_ids=types, position_ids=positions[None])[0]
    project = getattr(model, "embeddings_project", None)  # ELECTRA with embedding_size != hidden
    return project(hidden) if project is not None else hidden


def _layer(layer, hidden, plan: PackedBatch, attention_backend: str, fused: bool = False):
    self_attn = layer.attention.self
    tokens = hidden.shape[0]
    heads, dim = self_attn.num_attention_heads, self_attn.attention_head_size
    projections = linears([self_attn.query, self_attn.key, self_attn.value], hidden, fused)  # fused: their grads' join
    q, k, v = (t.view(tokens, heads, dim) for t in projections)
    dropout = self_attn.dropout.p if self_attn.training else 0.0
    scale = getattr(self_attn, "scaling", dim ** -0.5)
    context = varlen_attention(q, k, v, plan, scale, dropout, backend=attention_backend).reshape(tokens, heads * dim)
    out = layer.attention.output
    hidden, product_input = dense_residual_norm(out, context, hidden, fused)
    return feed_forward(layer, hidden, product_input, fused)


def dense_residual_norm(block, x, residual, fused: bool, product_input: bool = True):
    """`block.LayerNorm(block.dropout(block.dense(x)) + residual)` (BERT's SelfOutput and Output) as
    `residual_norm` returns it. Where the fused op runs, the dense layer's bias is left to it: its add
    rides along the kernel's load and its gradient along the kernel's column sums, instead of a
    reduction over [tokens, hidden] of its own."""
    bias = linear_bias(block.dense) if will_fuse(block.LayerNorm, x, fused) else None
    branch = linear(block.dense, x, bias=bias is None)
    return residual_norm(block.LayerNorm, block.dropout, branch, residual, fused, product_input, branch_bias=bias)


def feed_forward(layer, hidden, product_input=None, fused: bool = False):
    """The BERT-family block after attention: dense, activation, dense, dropout, residual, LayerNorm.

    `product_input`: `hidden` as the first product takes it (its autocast copy, from the fused norm).
    `fused`: end with the fused dropout + residual + LayerNorm where it applies (`fused_norm`)."""
    first = hidden if product_input is None else product_input
    inter = layer.intermediate.intermediate_act_fn(linear(layer.intermediate.dense, first))
    return dense_residual_norm(layer.output, inter, hidden, fused, product_input=False)[0]


def packed_bert_forward(model, input_ids, attention_mask, token_type_ids=None, attention_backend: str = "auto",
                        options: PackedOptions | None = None):
    """Token embeddings [B, L, H] (zeros at padding) computed without running dense layers on padding."""
    plan = PackedBatch.for_forward(attention_mask, options)
    hidden = _embed(model, input_ids, token_type_ids, plan)
    fused = (options or PackedOptions.current()).fused_kernels
    hidden = run_layers(model.encoder.layer, hidden,
                        lambda layer, h: _layer(layer, h, plan, attention_backend, fused), options=options)
    return plan.unpack(hidden)
