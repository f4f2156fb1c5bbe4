"""Packed attention with an additive per-sequence score bias (relative position terms).

MPNet adds a learned relative-position bias to every attention score, and DeBERTa adds disentangled
content-to-position and position-to-content terms. Neither fits a varlen (flash / fused) kernel,
which takes no bias. So only attention leaves the packed stream: the sequences are laid out in a
[n, heads, len, head_dim] grid and SDPA runs with a float `attn_mask` = the grid's bias plus a large
negative number at padding keys. Everything else (embeddings, projections, feed-forward, LayerNorm)
stays on the packed tokens.

The grid is either the length buckets of `PackedBatch.buckets` (the default on CPU, and
`backend="bucketed"`: padding only within a bucket) or the whole padded batch in one grid (the
default on GPU, and `backend="padded"`: one SDPA launch per layer instead of one per bucket, as
`varlen_attention` does for its padded cases). The bias depends only on distances within a
sequence, so one [len, len] bias serves every row of a grid wherever the row's tokens start.
Tokens move into and out of a grid by index_copy / index_select over unique indices, so the
backward pass has no duplicate-index accumulation and the per-layer loop has no host syncs.
Masking uses the dtype's lowest value rather than -inf (as transformers does): a row with no real
key gives finite, discarded outputs instead of NaN gradients.
"""

from __future__ import annotations

from typing import Callable

import torch

from .varlen import PackedBatch, masked_sdpa

# bias_fn(q_grid, k_grid) -> additive score bias broadcastable to [n, heads, len, len], or None
BiasFn = Callable[[torch.Tensor, torch.Tensor], "torch.Tensor | None"]
# (packed token indices of the grid's real tokens or None for all of them in order,
#  their slots in the flattened [n * len] grid, [n, len] validity mask)
Grid = tuple["torch.Tensor | None", torch.Tensor, torch.Tensor]


def _grids(plan: PackedBatch, one_grid: bool) -> list[Grid]:
    """The grids attention runs in; the bucket grids are built once per batch (one host sync each)."""
    if one_grid:  # the input's own padded layout: packed order is the flattened batch order
        return [(None, plan.flat_index, plan.key_mask)]
    cached = getattr(plan, "_bias_grids", None)
    if cached is None:
        cached = []
        for index, valid in plan.buckets():
            if valid.shape[1] == 0:  # sequences without tokens have nothing to attend
                continue
            slots = valid.reshape(-1).nonzero().squeeze(1)
            cached.append((index.reshape(-1)[slots], slots, valid))
        plan._bias_grids = cached
    return cached


def _to_grid(x: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Packed [T, H, D] -> [n, H, len, D] with zeros at padding."""
    tokens, slots, valid = grid
    n, width = valid.shape
    src = x if tokens is None else x.index_select(0, tokens)
    out = x.new_zeros(n * width, *x.shape[1:]).index_copy(0, slots, src)
    return out.view(n, width, *x.shape[1:]).transpose(1, 2)


def biased_attention(q, k, v, plan: PackedBatch, scale: float, bias_fn: BiasFn, dropout_p: float = 0.0,
                     backend: str = "auto") -> torch.Tensor:
    """softmax(q k^T * scale + bias) v per sequence, for packed q, k, v [tokens, heads, head_dim]."""
    one_grid = backend == "padded" or (backend == "auto" and q.is_cuda)
    out = None
    for grid in _grids(plan, one_grid):
        tokens, slots, valid = grid
        qb, kb, vb = (_to_grid(t, grid) for t in (q, k, v))  # [n, H, len, D]
        bias = bias_fn(qb, kb)
        bias = qb.new_zeros(()) if bias is None else bias.to(q.dtype)
        mask = bias.masked_fill(~valid[:, None, None, :], torch.finfo(q.dtype).min)
        ob = masked_sdpa(qb, kb, vb, mask, dropout_p, scale)
        n, heads, width, dim = ob.shape
        ob = ob.transpose(1, 2).reshape(n * width, heads, dim).index_select(0, slots)  # real tokens
        if tokens is None:
            return ob
        out = (torch.empty_like(q) if out is None else out).index_copy(0, tokens, ob)
    return out if out is not None else torch.zeros_like(q)
