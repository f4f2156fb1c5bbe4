"""Packed forward for ModernBERT: pre-norm layers, fused Wqkv, RoPE (separate global/local bases),
alternating global and local (sliding-window, bidirectional) attention, GeGLU MLP."""

from __future__ import annotations

import sys

from .layers import PackedOptions, run_layers
from .lora_linear import linear
from .varlen import PackedBatch, varlen_attention


def _layer(model, layer, hidden, rope_by_type, plan: PackedBatch, backend: str):
    attn = layer.attn
    tokens, dim = hidden.shape[0], attn.head_dim
    q, k, v = linear(attn.Wqkv, layer.attn_norm(hidden)).view(tokens, 3, -1, dim).unbind(dim=1)
    cos, sin = rope_by_type[layer.attention_type]
    rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    q, k = rope(q, k, cos, sin, unsqueeze_dim=1)
    window = model.config.sliding_window if attn.sliding_window is not None else None
    dropout = attn.attention_dropout if attn.training else 0.0
    context = varlen_attention(q, k, v, plan, dim ** -0.5, dropout, causal=False, backend=backend, window=window)
    hidden = hidden + attn.out_drop(linear(attn.Wo, context.reshape(tokens, -1)))
    mlp = layer.mlp
    gate_in, gate = linear(mlp.Wi, layer.mlp_norm(hidden)).chunk(2, dim=-1)
    return hidden + linear(mlp.Wo, mlp.drop(mlp.act(gate_in) * gate))


def packed_modernbert_forward(model, input_ids, attention_mask, token_type_ids=None, attention_backend: str = "auto",
                              options: PackedOptions | None = None):
    """Last hidden states [B, L, H] (zeros at padding), every dense layer run on real tokens only."""
    plan = PackedBatch.for_forward(attention_mask, options)
    hidden = model.embeddings(input_ids=plan.pack(input_ids)[None])[0]
    positions = plan.position_ids[None]
    rope_by_type = {}
    for layer_type in set(model.config.layer_types):
        cos, sin = model.rotary_emb(hidden[None], positions, layer_type)
        rope_by_type[layer_type] = (cos[0], sin[0])
    hidden = run_layers(model.layers, hidden,
                        lambda layer, h: _layer(model, layer, h, rope_by_type, plan, attention_backend),
                        per_token=tuple(t for pair in rope_by_type.values() for t in pair), options=options)
    return plan.unpack(model.final_norm(hidden))
