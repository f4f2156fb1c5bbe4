"""Packed forward for decoder embedders: Qwen2, Qwen3, Llama, Mistral (Qwen3-Embedding, E5-Mistral, ...).

Llama-style layers (pre-norm, RoPE, grouped-query attention, gated MLP), always causal as transformers
runs these families (their code ignores a config's `use_bidirectional_attention`, which only the Gemma
family honours: `packing/gemma3`), sliding windows where the layer has one. RoPE and the norms are
the model's own modules and functions, so checkpoint-specific variants (q/k norms in Qwen3, rope
scaling) are honoured.
"""

from __future__ import annotations

import sys

import torch

from .layers import PackedOptions, run_layers
from .lora_linear import linear, linears
from .varlen import PackedBatch, varlen_attention


def _window(model, attn) -> int | None:
    window = getattr(attn, "sliding_window", None)
    if window is None and model.config.model_type == "mistral":
        window = getattr(model.config, "sliding_window", None)
    return window


def _layer(model, layer, hidden, cos, sin, plan: PackedBatch, backend: str):
    attn = layer.self_attn
    tokens, dim = hidden.shape[0], attn.head_dim
    h = layer.input_layernorm(hidden)
    q, k, v = (t.view(tokens, -1, dim) for t in linears([attn.q_proj, attn.k_proj, attn.v_proj], h))
    if hasattr(attn, "q_norm"):
        q, k = attn.q_norm(q), attn.k_norm(k)
    context = rotary_attention(attn, q, k, v, cos, sin, plan, backend, True, _window(model, attn))
    hidden = hidden + linear(attn.o_proj, context)
    return hidden + gated_mlp(layer.mlp, layer.post_attention_layernorm(hidden))


def rotary_attention(attn, q, k, v, cos, sin, plan: PackedBatch, backend: str, causal: bool,
                     window: int | None) -> torch.Tensor:
    """RoPE, grouped-query heads expanded, varlen attention: packed q [T, H, D], k/v [T, H_kv, D] -> [T, H*D]."""
    rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    q, k = rope(q, k, cos, sin, unsqueeze_dim=1)  # [T, H, D] with cos/sin [T, D]
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    dropout = attn.attention_dropout if attn.training else 0.0
    context = varlen_attention(q, k, v, plan, attn.scaling, dropout, causal=causal, backend=backend, window=window)
    return context.reshape(q.shape[0], -1)


def gated_mlp(mlp, x: torch.Tensor) -> torch.Tensor:
    """down(act(gate(x)) * up(x)), the MLP of Llama-family layers."""
    gate, up = linears([mlp.gate_proj, mlp.up_proj], x)
    return linear(mlp.down_proj, mlp.act_fn(gate) * up)


def packed_decoder_forward(model, input_ids, attention_mask, token_type_ids=None, attention_backend: str = "auto",
                           options: PackedOptions | None = None):
    """Last hidden states [B, L, H] (zeros at padding), every dense layer run on real tokens only."""
    plan = PackedBatch.for_forward(attention_mask, options)
    hidden = model.embed_tokens(plan.pack(input_ids))
    positions = plan.position_ids[None]
    cos, sin = model.rotary_emb(hidden[None], positions)
    cos, sin = cos[0], sin[0]
    hidden = run_layers(model.layers, hidden,
                        lambda layer, h: _layer(model, layer, h, cos, sin, plan, attention_backend),
                        per_token=(cos, sin), options=options)
    return plan.unpack(model.norm(hidden))
