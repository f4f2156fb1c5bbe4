"""Triton kernels for packed bidirectional attention with dropout, tiled over the token stream.

FlashAttention-2's varlen kernel gives every (sequence, head) its own 128-row tiles, so a retrieval
batch's 15-token queries cost nearly as much as its 250-token passages. Here a program owns 64
consecutive tokens of the stream, whatever sequences they belong to: its keys run from the start of
its first token's sequence to the end of its last token's, and a key counts for a query only inside the
query's own sequence (`START`/`END`, each token's sequence bounds). Short sequences then share tiles,
long ones take the tiles they need.

Dropout keeps a (query, key) weight with a Philox draw from (seed, query, key // 4, head) (one draw serves
four neighbouring keys): a function of absolute positions alone, so the backward kernels draw the
forward's mask again whatever their tiling. Scores work in base 2 (`exp2`); the saved row
log-sum-exp is in base 2 as well.

Backward: dK/dV by key tiles (looping over the queries that see them) and dQ by query tiles, two
kernels without atomics, both recomputing the probabilities from the saved log-sum-exp.

Imported only where they run: on a CUDA device, or on the CPU under Triton's interpreter
(`TRITON_INTERPRET=1` set before this module is imported), which is how CI checks them.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

LOG2E = math.log2(math.e)
HEAD_DIMS = (16, 32, 64, 128)  # head widths the kernels take (a power of two: whole tiles)


@triton.jit
def _keep(seed, head, rows, key0, p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keep mask of the [BLOCK_M, BLOCK_N] tile of queries `rows` and keys key0.. (key0 a multiple of 4)."""
    quads = key0 // 4 + tl.arange(0, BLOCK_N // 4)
    c0 = rows[:, None] + tl.zeros([BLOCK_M, BLOCK_N // 4], dtype=tl.int32)
    c1 = quads[None, :] + tl.zeros([BLOCK_M, BLOCK_N // 4], dtype=tl.int32)
    c2 = tl.zeros([BLOCK_M, BLOCK_N // 4], dtype=tl.int32) + head
    u0, u1, u2, u3 = tl.philox(seed, c0, c1, c2, c2 * 0, 7)
    u = tl.interleave(tl.interleave(tl.uint_to_uniform_float(u0), tl.uint_to_uniform_float(u2)),
                      tl.interleave(tl.uint_to_uniform_float(u1), tl.uint_to_uniform_float(u3)))
    return u >= p  # key 4j + i takes u_i of draw j


@triton.jit
def _bounds(CU, START, END, tokens, sequences, STEPS: tl.constexpr, BLOCK: tl.constexpr):
    """Each token's sequence bounds, by binary search of the sequence starts `CU` (sequences + 1)."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = rows < tokens
    lo = tl.zeros([BLOCK], dtype=tl.int32)
    hi = tl.zeros([BLOCK], dtype=tl.int32) + sequences
    for _ in tl.static_range(STEPS):  # invariant: CU[lo] <= row < CU[hi]
        mid = (lo + hi) // 2
        right = tl.load(CU + mid, mask=inside, other=0) <= rows
        lo = tl.where(right, mid, lo)
        hi = tl.where(right, hi, mid)
    tl.store(START + rows, tl.load(CU + lo, mask=inside, other=0), mask=inside)
    tl.store(END + rows, tl.load(CU + lo + 1, mask=inside, other=0), mask=inside)


@triton.jit
def _span(START, END, row0, BLOCK: tl.constexpr, tokens):
    """The stream range of the sequences that tokens row0..row0+BLOCK touch (bounds are monotonic)."""
    return tl.load(START + row0), tl.load(END + tl.minimum(row0 + BLOCK, tokens) - 1)


@triton.jit
def _tile(X, rows, inside, stride, head, HEAD_DIM: tl.constexpr):
    dims = tl.arange(0, HEAD_DIM)
    return tl.load(X + rows.to(tl.int64)[:, None] * stride + head * HEAD_DIM + dims[None, :],
                   mask=inside[:, None], other=0.0)


@triton.jit
def _put(X, value, rows, inside, stride, head, HEAD_DIM: tl.constexpr):
    dims = tl.arange(0, HEAD_DIM)
    tl.store(X + rows.to(tl.int64)[:, None] * stride + head * HEAD_DIM + dims[None, :],
             value.to(X.dtype.element_ty), mask=inside[:, None])


@triton.jit(do_not_specialize=["tokens", "heads", "dropout", "sq", "sk", "sv", "so"])
def _forward(Q, K, V, O, LSE, START, END, SEED, tokens, heads, sq, sk, sv, so, scale2, p, dropout,
             HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    head = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    inside = rows < tokens
    first = tl.load(START + rows, mask=inside, other=tokens)
    last = tl.load(END + rows, mask=inside, other=0)
    lo, hi = _span(START, END, tl.program_id(0) * BLOCK_M, BLOCK_M, tokens)
    lo = lo // BLOCK_N * BLOCK_N  # key tiles start at multiples of BLOCK_N (the draws' quads)
    q = _tile(Q, rows, inside, sq, head, HEAD_DIM)
    seed = tl.load(SEED)
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    total = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    key0 = lo
    while key0 < hi:  # (a `for` over a runtime range trips Triton's interpreter on NumPy 2)
        keys = key0 + tl.arange(0, BLOCK_N)
        k = _tile(K, keys, keys < hi, sk, head, HEAD_DIM)
        v = _tile(V, keys, keys < hi, sv, head, HEAD_DIM)
        s = tl.dot(q, tl.trans(k)) * scale2
        own = (keys[None, :] >= first[:, None]) & (keys[None, :] < last[:, None])
        s = tl.where(own, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet: nothing to rescale
        prob = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m - m_use)
        total = total * alpha + tl.sum(prob, 1)
        if dropout != 0:
            prob = tl.where(_keep(seed, head, rows, key0, p, BLOCK_M, BLOCK_N), prob, 0.0)
        acc = acc * alpha[:, None] + tl.dot(prob.to(v.dtype), v)
        m = m_new
        key0 += BLOCK_N
    total = tl.where(inside, total, 1.0)
    keep_scale = 1.0
    if dropout != 0:
        keep_scale = 1.0 / (1.0 - p)
    _put(O, acc * (keep_scale / total)[:, None], rows, inside, so, head, HEAD_DIM)
    tl.store(LSE + rows.to(tl.int64) * heads + head, m + tl.log2(total), mask=inside)


@triton.jit
def _grad_scores(q, k, v, do, lse, delta, rows, keys, first, last, seed, head, key0, scale2, p, dropout,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The tile's probabilities (as the output saw them, after dropout) and score gradients."""
    s = tl.dot(q, tl.trans(k)) * scale2
    own = (keys[None, :] >= first[:, None]) & (keys[None, :] < last[:, None])
    prob = tl.where(own, tl.exp2(s - lse[:, None]), 0.0)
    dprob = tl.dot(do, tl.trans(v))
    seen = prob
    if dropout != 0:
        keep = _keep(seed, head, rows, key0, p, BLOCK_M, BLOCK_N)
        seen = tl.where(keep, prob / (1.0 - p), 0.0)
        dprob = tl.where(keep, dprob / (1.0 - p), 0.0)
    return seen, prob * (dprob - delta[:, None])


@triton.jit(do_not_specialize=["tokens", "heads", "dropout", "sq", "sk", "sv", "sdo"])
def _backward_kv(Q, K, V, DO, LSE, DELTA, START, END, SEED, DK, DV, tokens, heads, sq, sk, sv, sdo, scale2, scale,
                 p, dropout, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    head = tl.program_id(1)
    key0 = tl.program_id(0) * BLOCK_N
    keys = key0 + tl.arange(0, BLOCK_N)
    inside = keys < tokens
    lo, hi = _span(START, END, key0, BLOCK_N, tokens)
    k = _tile(K, keys, inside, sk, head, HEAD_DIM)
    v = _tile(V, keys, inside, sv, head, HEAD_DIM)
    seed = tl.load(SEED)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    row0 = lo
    while row0 < hi:  # (a `for` over a runtime range trips Triton's interpreter on NumPy 2)
        rows = row0 + tl.arange(0, BLOCK_M)
        live = rows < hi
        first = tl.load(START + rows, mask=live, other=tokens)
        last = tl.load(END + rows, mask=live, other=0)
        q = _tile(Q, rows, live, sq, head, HEAD_DIM)
        do = _tile(DO, rows, live, sdo, head, HEAD_DIM)
        lse = tl.load(LSE + rows.to(tl.int64) * heads + head, mask=live, other=0.0)
        delta = tl.load(DELTA + rows.to(tl.int64) * heads + head, mask=live, other=0.0)
        seen, ds = _grad_scores(q, k, v, do, lse, delta, rows, keys, first, last, seed, head, key0, scale2, p,
                                dropout, BLOCK_M, BLOCK_N)
        dv += tl.dot(tl.trans(seen.to(do.dtype)), do)
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
        row0 += BLOCK_M
    _put(DK, dk * scale, keys, inside, heads * HEAD_DIM, head, HEAD_DIM)  # gradients: contiguous
    _put(DV, dv, keys, inside, heads * HEAD_DIM, head, HEAD_DIM)


@triton.jit(do_not_specialize=["tokens", "heads", "dropout", "sq", "sk", "sv", "sdo"])
def _backward_q(Q, K, V, DO, LSE, DELTA, START, END, SEED, DQ, tokens, heads, sq, sk, sv, sdo, scale2, scale, p,
                dropout, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    head = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    inside = rows < tokens
    first = tl.load(START + rows, mask=inside, other=tokens)
    last = tl.load(END + rows, mask=inside, other=0)
    lo, hi = _span(START, END, tl.program_id(0) * BLOCK_M, BLOCK_M, tokens)
    lo = lo // BLOCK_N * BLOCK_N  # key tiles start at multiples of BLOCK_N (the draws' quads)
    q = _tile(Q, rows, inside, sq, head, HEAD_DIM)
    do = _tile(DO, rows, inside, sdo, head, HEAD_DIM)
    lse = tl.load(LSE + rows.to(tl.int64) * heads + head, mask=inside, other=0.0)
    delta = tl.load(DELTA + rows.to(tl.int64) * heads + head, mask=inside, other=0.0)
    seed = tl.load(SEED)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    key0 = lo
    while key0 < hi:  # (a `for` over a runtime range trips Triton's interpreter on NumPy 2)
        keys = key0 + tl.arange(0, BLOCK_N)
        k = _tile(K, keys, keys < hi, sk, head, HEAD_DIM)
        v = _tile(V, keys, keys < hi, sv, head, HEAD_DIM)
        _, ds = _grad_scores(q, k, v, do, lse, delta, rows, keys, first, last, seed, head, key0, scale2, p, dropout,
                             BLOCK_M, BLOCK_N)
        dq += tl.dot(ds.to(k.dtype), k)
        key0 += BLOCK_N
    _put(DQ, dq * scale, rows, inside, heads * HEAD_DIM, head, HEAD_DIM)


BLOCK_M = 64
BLOCK_N = 64
BOUNDS_BLOCK = 256


def _warps(head_dim: int) -> int:
    return 8 if head_dim > 64 else 4


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[tokens, heads, head_dim] with heads and dims packed (rows may be strided: q/k/v column slices)."""
    if t.stride(2) != 1 or t.stride(1) != t.shape[2]:
        t = t.contiguous()
    return t


def sequence_bounds(cu_seqlens: torch.Tensor, tokens: int) -> torch.Tensor:
    """[2, tokens] int32: each token's sequence start and end in the stream."""
    sequences = cu_seqlens.numel() - 1
    bounds = torch.empty(2, tokens, dtype=torch.int32, device=cu_seqlens.device)
    steps = max(sequences, 1).bit_length() + 1
    _bounds[(triton.cdiv(tokens, BOUNDS_BLOCK),)](cu_seqlens, bounds[0], bounds[1], tokens, sequences,
                                                   STEPS=steps, BLOCK=BOUNDS_BLOCK)
    return bounds


def forward(q, k, v, cu_seqlens, scale: float, dropout_p: float, seed: torch.Tensor):
    """(out [tokens, heads, dim], base-2 log-sum-exp [tokens, heads] fp32, bounds [2, tokens])."""
    q, k, v = _rows(q), _rows(k), _rows(v)
    tokens, heads, dim = q.shape
    bounds = sequence_bounds(cu_seqlens.to(torch.int32), tokens)
    out = torch.empty(tokens, heads, dim, dtype=q.dtype, device=q.device)
    lse = torch.empty(tokens, heads, dtype=torch.float32, device=q.device)
    if tokens:
        _forward[(triton.cdiv(tokens, BLOCK_M), heads)](
            q, k, v, out, lse, bounds[0], bounds[1], seed, tokens, heads, q.stride(0), k.stride(0), v.stride(0),
            out.stride(0), scale * LOG2E, dropout_p, int(dropout_p > 0), HEAD_DIM=dim, BLOCK_M=BLOCK_M,
            BLOCK_N=BLOCK_N, num_warps=_warps(dim), num_stages=2)
    return out, lse, bounds


def backward(grad_out, q, k, v, out, lse, bounds, scale: float, dropout_p: float, seed: torch.Tensor):
    """(dq, dk, dv) for `forward`'s call with the same seed."""
    q, k, v, grad_out = _rows(q), _rows(k), _rows(v), _rows(grad_out)
    tokens, heads, dim = q.shape
    delta = (grad_out.float() * out.float()).sum(-1)  # [tokens, heads]: rowsum(P' * dP') = rowsum(dO * O)
    dq, dk, dv = (torch.empty(tokens, heads, dim, dtype=t.dtype, device=t.device) for t in (q, k, v))
    if tokens:
        common = (tokens, heads, q.stride(0), k.stride(0), v.stride(0), grad_out.stride(0), scale * LOG2E, scale,
                  dropout_p, int(dropout_p > 0))
        meta = dict(HEAD_DIM=dim, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=_warps(dim), num_stages=2)
        _backward_kv[(triton.cdiv(tokens, BLOCK_N), heads)](q, k, v, grad_out, lse, delta, bounds[0], bounds[1], seed,
                                                           dk, dv, *common, **meta)
        _backward_q[(triton.cdiv(tokens, BLOCK_M), heads)](q, k, v, grad_out, lse, delta, bounds[0], bounds[1], seed,
                                                          dq, *common, **meta)
    return dq, dk, dv
