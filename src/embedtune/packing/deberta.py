"""Packed forward for DeBERTa-v2/v3 (model_type "deberta-v2"): disentangled attention.

A DeBERTa score is content-to-content q_i.k_j plus, from a table of relative-position embeddings
(LayerNorm'ed when `norm_rel_ebd` says so, dropped out per layer in training), content-to-position
q_i.Kr[d(i,j)] ("c2p") and position-to-content k_j.Qr[-d(j,i)] ("p2c"), where d is the relative
distance i-j, log-bucketed beyond `position_buckets / 2` and clamped to the table. Kr/Qr are the
table through the layer's own key/query projections (`share_att_key`, as in DeBERTa-v3) or through
separate pos_key_proj/pos_query_proj. All terms are divided by sqrt(head_dim * (1 + #terms)).

The relative terms depend on each token's content and on distances inside its own sequence, so
they are an additive per-sequence bias: embeddings, projections, feed-forward and LayerNorms run on
the packed tokens, and attention is SDPA with the c2p + p2c bias as a float mask, over length
buckets (CPU) or the padded batch (GPU), see `biased.biased_attention`; a grid of width w only needs
the distance-index table's top-left w x w corner (distances do not depend on where a row starts).
The relative table's norm and projections are recomputed inside each layer (they are small) so that
activation checkpointing, which passes only the hidden states through, still routes their gradients.

Configurations this does not cover (a convolution after the first layer, `conv_kernel_size`;
`z_steps`; attention or norm options other than the ones above) keep the padded forward:
`unsupported_reason` names them and `enable_fast_path` falls back with its notice.
"""

from __future__ import annotations

import sys

import torch

from .bert import feed_forward
from .biased import biased_attention
from .layers import PackedOptions, run_layers
from .lora_linear import linear, linears
from .varlen import PackedBatch

KNOWN_REL_TERMS = {"c2p", "p2c"}
KNOWN_REL_NORMS = {"none", "layer_norm"}


def unsupported_reason(model) -> str | None:
    """Why this DeBERTa's configuration needs the padded forward, or None when the packed one is exact."""
    config = model.config
    if getattr(config, "conv_kernel_size", 0) > 0:
        return "conv_kernel_size > 0 (convolution layer)"
    if getattr(model, "z_steps", 0) > 1:
        return "z_steps > 1"
    terms = set(config.pos_att_type or [])
    if terms - KNOWN_REL_TERMS:
        return f"pos_att_type {sorted(terms - KNOWN_REL_TERMS)}"
    norms = {x.strip() for x in str(getattr(config, "norm_rel_ebd", "none")).lower().split("|")}
    if norms - KNOWN_REL_NORMS:
        return f"norm_rel_ebd {sorted(norms - KNOWN_REL_NORMS)}"
    return None


def _distance_indices(model, attn, width: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """[width, width] indices into the relative table for c2p (by i-j) and p2c (by -(j-i), read as [j, i])."""
    pos = torch.arange(width, device=device)
    distance = pos[:, None] - pos[None, :]
    if attn.position_buckets > 0 and attn.max_relative_positions > 0:
        bucket = sys.modules[type(model).__module__].make_log_bucket_position
        distance = bucket(distance, attn.position_buckets, attn.max_relative_positions)
    distance = distance.long()
    span = attn.pos_ebd_size
    return (distance + span).clamp(0, 2 * span - 1), (span - distance).clamp(0, 2 * span - 1)


def _relative_projections(model, attn, terms) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Kr (for c2p) and Qr (for p2c) as [heads, 2*span, head_dim], from this layer's view of the table."""
    table = model.encoder.get_rel_embedding()
    table = attn.pos_dropout(table)[: 2 * attn.pos_ebd_size]
    heads = attn.num_attention_heads

    def project(module):
        return linear(module, table).view(table.shape[0], heads, -1).transpose(0, 1)

    share = attn.share_att_key
    pos_key = project(attn.key_proj if share else attn.pos_key_proj) if "c2p" in terms else None
    pos_query = project(attn.query_proj if share else attn.pos_query_proj) if "p2c" in terms else None
    return pos_key, pos_query


def _relative_bias(model, attn, indices, denominator: float):
    """This layer's `bias_fn` for `biased_attention`: (c2p + p2c) / denominator over a bucket, or none."""
    terms = set(attn.pos_att_type) & KNOWN_REL_TERMS
    if not (attn.relative_attention and terms):
        return lambda qb, kb: None
    pos_key, pos_query = _relative_projections(model, attn, terms)
    c2p_index, p2c_index = indices

    def bias_fn(qb, kb):  # qb, kb: [n, H, w, D]
        n, heads, width, _ = qb.shape
        shape = (n, heads, width, width)
        bias = 0
        if pos_key is not None:  # c2p[i, j] = q_i . Kr[c2p_index[i, j]]
            scores = torch.matmul(qb, pos_key.transpose(-1, -2))  # [n, H, w, 2*span]
            bias = bias + scores.gather(-1, c2p_index[:width, :width].expand(shape))
        if pos_query is not None:  # p2c[i, j] = k_j . Qr[p2c_index[j, i]]
            scores = torch.matmul(kb, pos_query.transpose(-1, -2))
            bias = bias + scores.gather(-1, p2c_index[:width, :width].expand(shape)).transpose(-1, -2)
        return bias / denominator

    return bias_fn


def _layer(model, layer, hidden, plan: PackedBatch, indices, backend: str):
    attn = layer.attention.self
    tokens, heads, dim = hidden.shape[0], attn.num_attention_heads, attn.attention_head_size
    q, k, v = (t.view(tokens, heads, dim) for t in linears([attn.query_proj, attn.key_proj, attn.value_proj], hidden))
    terms = set(attn.pos_att_type) & KNOWN_REL_TERMS
    denominator = (dim * (1 + len(terms))) ** 0.5  # counted whether or not relative_attention is on
    bias_fn = _relative_bias(model, attn, indices, denominator)
    dropout = attn.dropout.p if attn.training else 0.0
    context = biased_attention(q, k, v, plan, 1.0 / denominator, bias_fn, dropout, backend).reshape(tokens, -1)
    out = layer.attention.output
    hidden = out.LayerNorm(out.dropout(linear(out.dense, context)) + hidden)
    return feed_forward(layer, hidden)


def packed_deberta_forward(model, input_ids, attention_mask, token_type_ids=None, attention_backend: str = "auto",
                           options: PackedOptions | None = None):
    """Last hidden states [B, L, H] (zeros at padding), every dense layer run on real tokens only."""
    plan = PackedBatch.from_mask(attention_mask)
    types = plan.pack(token_type_ids)[None] if token_type_ids is not None else None
    hidden = model.embeddings(input_ids=plan.pack(input_ids)[None], token_type_ids=types,
                              position_ids=plan.position_ids[None])[0]
    first = model.encoder.layer[0].attention.self
    indices = _distance_indices(model, first, plan.max_len, hidden.device) if first.relative_attention else None
    hidden = run_layers(model.encoder.layer, hidden,
                        lambda layer, h: _layer(model, layer, h, plan, indices, attention_backend),
                        stack_traceable=False, options=options)  # biased attention buckets on the host
    return plan.unpack(hidden)
