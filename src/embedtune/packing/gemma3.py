"""Packed forward for Gemma3 text models (model_type "gemma3_text", e.g. EmbeddingGemma).

Gemma3 layers differ from the Llama-style ones in `decoder.py`: the token embeddings are scaled by
sqrt(hidden) (inside the model's embedding module), every RMSNorm multiplies by (1 + weight), there
are norms after attention and after the MLP as well as before them, q and k are RMS-normed per head,
scores are scaled by query_pre_attn_scalar^-0.5, and RoPE uses a different base for sliding
("local") and full ("global") layers. All norms, RoPE tables and the rope function are the model's
own, so their exact numerics are kept; dense layers run on the packed tokens only and attention is
`varlen_attention`.

Masks, as transformers builds them: causal unless `use_bidirectional_attention` (EmbeddingGemma sets
it). Causal sliding layers see keys with query - window < key <= query. Bidirectional full layers see
the whole sequence; bidirectional sliding layers see |query - key| < config.sliding_window, where the
config has already turned the checkpoint's window into that exclusive half-width (window // 2 + 1).
`attn_logit_softcapping` is not applied by transformers' Gemma3 attention; a config that sets it
keeps the padded forward (see `unsupported_reason`), so a later transformers that honours it cannot
silently differ.
"""

from __future__ import annotations

from .decoder import gated_mlp, rotary_attention
from .layers import PackedOptions, run_layers
from .lora_linear import linear, linears
from .varlen import PackedBatch

LAYER_TYPES = {"sliding_attention", "full_attention"}


def unsupported_reason(model) -> str | None:
    """Why this Gemma3 configuration needs the padded forward, or None when the packed one is exact."""
    config = model.config
    if getattr(config, "attn_logit_softcapping", None) is not None:
        return "attn_logit_softcapping"
    if getattr(config, "is_causal", True) is False:
        return "is_causal=False (mask override)"
    unknown = set(config.layer_types[: config.num_hidden_layers]) - LAYER_TYPES
    if unknown:
        return f"layer_types {sorted(unknown)}"
    return None


def _window(model, attn, causal: bool) -> int | None:
    """The sliding window in `varlen_attention`'s terms (causal: span; bidirectional: inclusive radius)."""
    if attn.sliding_window is None:
        return None
    window = model.config.sliding_window
    return window if causal else window - 1


def _layer(model, layer, hidden, rope_by_type, plan: PackedBatch, backend: str, causal: bool):
    attn = layer.self_attn
    tokens, dim = hidden.shape[0], attn.head_dim
    h = layer.input_layernorm(hidden)
    q, k, v = (t.view(tokens, -1, dim) for t in linears([attn.q_proj, attn.k_proj, attn.v_proj], h))
    q, k = attn.q_norm(q), attn.k_norm(k)
    cos, sin = rope_by_type[attn.layer_type]
    context = rotary_attention(attn, q, k, v, cos, sin, plan, backend, causal, _window(model, attn, causal))
    hidden = hidden + layer.post_attention_layernorm(linear(attn.o_proj, context))
    x = gated_mlp(layer.mlp, layer.pre_feedforward_layernorm(hidden))
    return hidden + layer.post_feedforward_layernorm(x)


def packed_gemma3_forward(model, input_ids, attention_mask, token_type_ids=None, attention_backend: str = "auto",
                          options: PackedOptions | None = None):
    """Last hidden states [B, L, H] (zeros at padding), every dense layer run on real tokens only."""
    plan = PackedBatch.for_forward(attention_mask, options)
    hidden = model.embed_tokens(plan.pack(input_ids))
    positions = plan.position_ids[None]
    rope_by_type = {}
    for layer_type in set(model.config.layer_types):
        cos, sin = model.rotary_emb(hidden[None], positions, layer_type)
        rope_by_type[layer_type] = (cos[0], sin[0])
    causal = not model.config.use_bidirectional_attention
    layers = model.layers[: model.config.num_hidden_layers]
    hidden = run_layers(layers, hidden,
                        lambda layer, h: _layer(model, layer, h, rope_by_type, plan, attention_backend, causal),
                        per_token=tuple(t for pair in rope_by_type.values() for t in pair), options=options)
    return plan.unpack(model.norm(hidden))
