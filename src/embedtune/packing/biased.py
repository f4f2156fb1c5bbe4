"""Packed attention with an additive per-sequence score bias (relative position terms), by length bucket.

MPNet adds a learned relative-position bias to every attention score, and DeBERTa adds disentangled
content-to-position and position-to-content terms. Neither fits a varlen (flash / fused) kernel, which
takes no bias. So only attention is run per length bucket (the buckets of `PackedBatch.buckets`, or
one bucket holding the whole batch for `backend="padded"`): each bucket is gathered into a
[n, heads, len, head_dim] view and SDPA runs with a float `attn_mask` = the bucket's bias plus -inf at
padding keys. Everything else (embeddings, projections, feed-forward, LayerNorm) stays on the packed
tokens. Padding within a bucket is bounded by the bucket slack; padded query rows always see at least
one real key (every sequence has one), so no row is all -inf and no NaN can reach the gradients.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .varlen import PackedBatch

# bias_fn(q_bucket, k_bucket) -> additive scores bias broadcastable to [n, heads, len, len], or None
BiasFn = Callable[[torch.Tensor, torch.Tensor], "torch.Tensor | None"]


def whole_batch_bucket(plan: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """All sequences in one bucket as wide as the padded batch (no host sync): [B, L] index and mask."""
    pos = torch.arange(plan.max_len, device=plan.cu_seqlens.device)
    valid = pos[None, :] < plan.seq_lens[:, None]
    index = torch.where(valid, plan.cu_seqlens[:-1, None].long() + pos[None, :], torch.zeros_like(pos)[None, :])
    return index, valid


def biased_attention(q, k, v, plan: PackedBatch, scale: float, bias_fn: BiasFn, dropout_p: float = 0.0,
                     backend: str = "auto") -> torch.Tensor:
    """softmax(q k^T * scale + bias) v per sequence, for packed q, k, v [tokens, heads, head_dim]."""
    groups = [whole_batch_bucket(plan)] if backend == "padded" else plan.buckets()
    out = torch.empty_like(q)
    for index, valid in groups:
        qb, kb, vb = (t[index].transpose(1, 2) for t in (q, k, v))  # [n, H, len, D]
        bias = bias_fn(qb, kb)
        key_ok = valid[:, None, None, :]
        if bias is None:
            mask = key_ok
        else:
            mask = bias.to(q.dtype).masked_fill(~key_ok, float("-inf"))
        ob = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, dropout_p=dropout_p, scale=scale)
        out = out.index_copy(0, index[valid], ob.transpose(1, 2)[valid])
    return out
