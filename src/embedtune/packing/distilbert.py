"""Packed forward for DistilBERT: BERT's layout under other names (q_lin/k_lin/v_lin/out_lin, lin1/lin2)."""

from __future__ import annotations

from .layers import PackedOptions, run_layers
from .lora_linear import linear, linears
from .varlen import PackedBatch, varlen_attention


def _layer(layer, hidden, plan: PackedBatch, attention_backend: str):
    attn = layer.attention
    tokens, heads = hidden.shape[0], attn.n_heads
    dim = attn.dim // heads
    q, k, v = (t.view(tokens, heads, dim) for t in linears([attn.q_lin, attn.k_lin, attn.v_lin], hidden))
    dropout = attn.dropout.p if attn.training else 0.0
    context = varlen_attention(q, k, v, plan, attn.scaling, dropout, backend=attention_backend)
    hidden = layer.sa_layer_norm(linear(attn.out_lin, context.reshape(tokens, heads * dim)) + hidden)
    ffn = layer.ffn
    out = ffn.dropout(linear(ffn.lin2, ffn.activation(linear(ffn.lin1, hidden))))
    return layer.output_layer_norm(out + hidden)


def packed_distilbert_forward(model, input_ids, attention_mask, token_type_ids=None, attention_backend: str = "auto",
                              options: PackedOptions | None = None):
    """Last hidden states [B, L, H] (zeros at padding) with the dense layers on real tokens only."""
    plan = PackedBatch.for_forward(attention_mask, options)
    hidden = model.embeddings(plan.pack(input_ids)[None], position_ids=plan.position_ids[None])[0]
    hidden = run_layers(model.transformer.layer, hidden, lambda layer, h: _layer(layer, h, plan, attention_backend),
                        options=options)
    return plan.unpack(hidden)
