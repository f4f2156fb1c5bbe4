"""Packed-tile attention in Triton: bidirectional attention over a packed stream, tiled over the stream.

FlashAttention-2's varlen kernel gives every (sequence, head) its own programs and 128-row tiles, so
a 15-token query or a 120-token passage fills a tile mostly with masked rows, and its backward
launches a program per key block of the longest sequence, most of which exit at once. Retrieval
batches are exactly that: short queries beside ~100-token passages. These kernels tile the stream
itself: a program takes `BLOCK` consecutive stream tokens (several whole short sequences, or a slice
of a long one), walks the key blocks that the sequences of its rows span, and masks pairs from
different sequences by sequence id. The work per tile is then proportional to the real tokens, and the
backward writes dK/dV and dQ from separate programs, without atomics.

Dropout draws a keep decision per (head, query, key) from Philox (7 rounds; one draw gives eight
16-bit values, so the dropout probability is rounded to 1/65536ths) keyed by a seed tensor that the op
draws from torch's CUDA generator (so CUDA graph replays draw fresh masks), and the backward redraws
the same decisions. The log-sum-exp is kept in base 2 ([heads, tokens], fp32), for the backward only.

The kernels are defined on first use (`kernels()`), so importing this module needs no Triton, and
Triton's interpreter (TRITON_INTERPRET=1, set before the first use) runs them on CPU tensors: that is
how CI tests them against plain softmax attention.
"""

from __future__ import annotations

import functools
import os

import torch

LOG2E = 1.4426950408889634
HEAD_DIMS = (16, 32, 64, 128)


@functools.cache
def triton_available() -> bool:
    """Whether Triton imports (it ships with torch's CUDA builds)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means: no Triton kernels
        return False
    return True


def supported(q: torch.Tensor, causal: bool, window: int | None) -> bool:
    """Inputs these kernels take: CUDA half precision, bidirectional, no window, head dim a power of two."""
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and not causal and window is None
            and q.shape[-1] in HEAD_DIMS and triton_available())


def _blocks() -> tuple[int, int, int, int]:
    """(query block, key block, warps, pipeline stages); EMBEDTUNE_TRITON_ATTN_BLOCKS="64,64,4,2"
    overrides (for probes). Blocks are powers of two, at least 16."""
    raw = os.environ.get("EMBEDTUNE_TRITON_ATTN_BLOCKS")
    if raw:
        bm, bn, warps, stages = (int(x) for x in raw.split(","))
        return bm, bn, warps, stages
    return 64, 64, 4, 2


def _dropout_args(dropout_p: float) -> tuple[int, float]:
    """(threshold, keep scale): the kernels drop where a 16-bit draw is below the threshold, and scale
    kept values by the exact inverse of the resulting keep probability."""
    threshold = min(round(dropout_p * 65536), 65535)
    return threshold, 65536.0 / (65536 - threshold)


@functools.cache
def kernels():
    """The Triton kernels (forward, dK/dV, dQ, dense keep mask), imported on first use."""
    from . import _triton_kernels as k

    return k._forward, k._backward_dkdv, k._backward_dq, k._keep_dense


def sequence_ids(cu_seqlens: torch.Tensor, tokens: int) -> torch.Tensor:
    """[tokens] int32: the sequence of each stream token (empty sequences skipped; tokens past the last
    boundary, if any, go to the last sequence, so the kernels never read past `cu_seqlens`)."""
    cu = cu_seqlens.to(torch.int32)
    ids = torch.searchsorted(cu, torch.arange(tokens, dtype=torch.int32, device=cu.device), right=True) - 1
    return ids.clamp_(0, cu.numel() - 2).to(torch.int32)


def _strides(t: torch.Tensor) -> tuple[int, int]:
    return t.stride(0), t.stride(1)


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def draw_seed(device) -> torch.Tensor:
    """A dropout seed from torch's generator for `device` (graph-safe: each CUDA graph replay draws anew)."""
    return torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=device)


def forward(q, k, v, cu_seqlens, scale: float, dropout_p: float, seed: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed attention: q, k, v [tokens, heads, dim] -> (out [tokens, heads, dim], base-2 lse [heads, tokens])."""
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    tokens, heads, dim = q.shape
    out = torch.empty(tokens, heads, dim, dtype=q.dtype, device=q.device)
    lse = torch.empty(heads, tokens, dtype=torch.float32, device=q.device)
    if tokens == 0:
        return out, lse
    seq = sequence_ids(cu_seqlens, tokens)
    bm, bn, warps, stages = _blocks()
    threshold, keep_scale = _dropout_args(dropout_p)
    fwd = kernels()[0]
    fwd[(-(-tokens // bm), heads)](
        q, k, v, out, lse, seq, cu_seqlens, seed, tokens, float(scale), threshold, keep_scale,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out),
        D=dim, BM=bm, BN=bn, DROPOUT=threshold > 0, num_warps=warps, num_stages=stages)
    return out, lse


def backward(grad_out, q, k, v, out, lse, cu_seqlens, scale: float, dropout_p: float, seed: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) of `forward`, replaying its dropout decisions from `seed`."""
    q, k, v, grad_out = (_last_dim_contiguous(t) for t in (q, k, v, grad_out))
    tokens, heads, dim = q.shape
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if tokens == 0:
        return dq, dk, dv
    delta = (out.float() * grad_out.float()).sum(-1).transpose(0, 1).contiguous()  # [heads, tokens]
    seq = sequence_ids(cu_seqlens, tokens)
    bm, bn, warps, stages = _blocks()
    threshold, keep_scale = _dropout_args(dropout_p)
    _, dkdv, dq_kernel, _ = kernels()
    common = (seq, cu_seqlens, seed, tokens, float(scale), threshold, keep_scale)
    options = dict(D=dim, BM=bm, BN=bn, DROPOUT=threshold > 0, num_warps=warps, num_stages=stages)
    dkdv[(-(-tokens // bn), heads)](
        q, k, v, grad_out, lse, delta, dk, dv, *common,
        *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out), *_strides(dk), *_strides(dv), **options)
    dq_kernel[(-(-tokens // bm), heads)](
        q, k, v, grad_out, lse, delta, dq, *common,
        *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out), *_strides(dq), **options)
    return dq, dk, dv


def keep_mask(seed: torch.Tensor, tokens: int, heads: int, dropout_p: float, device=None) -> torch.Tensor:
    """[heads, tokens, tokens] bool: the dropout decisions `forward` and `backward` draw (for tests)."""
    dense = kernels()[3]
    block = 16
    out = torch.empty(heads, tokens, tokens, dtype=torch.int8, device=device or seed.device)
    grid = (-(-tokens // block), -(-tokens // block))
    threshold, _ = _dropout_args(dropout_p)
    for h in range(heads):
        dense[grid](seed, out[h], tokens, threshold, h, BLOCK=block)
    return out.bool()
