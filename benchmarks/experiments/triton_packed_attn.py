"""An experiment, not part of embedtune: packed-tile varlen attention in Triton, to compare with
torch's FlashAttention-2 in `benchmarks/probe_attention_gpu.py` (result in docs/BENCHMARKS_HISTORY.md: not faster on the
stdlib batches, slower with dropout, so embedtune keeps FlashAttention-2).

FlashAttention-2's varlen kernel gives every (sequence, head) its own programs and 128-row tiles, so a
15-token query fills a tile mostly with masked rows. These kernels tile the packed stream itself: a
program takes a block of consecutive stream tokens (several whole short sequences, or a slice of a
long one), walks the key blocks that its rows' sequences span, and masks pairs from different
sequences by sequence id; the backward writes dK/dV and dQ from separate programs, without atomics.
Dropout: one 4x32-bit Philox draw (7 rounds) per query and 8 keys, eight 16-bit values against the
dropout probability in 1/65536ths; the backward redraws the same decisions from the seed tensor.
Checked on CPU with Triton's interpreter (TRITON_INTERPRET=1, Triton >= 3.8 with numpy 2) and on the
GPU by the probe's checks against FlashAttention-2.
"""

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _span(SEQ, CU, first_token, T, BLOCK: tl.constexpr):
    """Stream range [lo, hi) covered by the sequences of tokens first_token .. first_token+BLOCK-1."""
    first = tl.load(SEQ + first_token)
    last = tl.load(SEQ + tl.minimum(first_token + BLOCK, T) - 1)
    return tl.load(CU + first), tl.load(CU + last + 1)


@triton.jit
def _interleave(a, b, BM: tl.constexpr, WIDTH: tl.constexpr):
    """[BM, WIDTH/2] and [BM, WIDTH/2] -> [BM, WIDTH], columns alternating a, b."""
    return tl.reshape(tl.join(a, b), (BM, WIDTH))


@triton.jit
def _keep(seed, h, offs_m, start_n, T, threshold, BM: tl.constexpr, BN: tl.constexpr):
    """Dropout keep decisions for head h, query rows offs_m and key columns start_n .. start_n+BN-1
    (start_n a multiple of 8): the same decision for a (head, query, key) in every kernel and tiling.
    One 4x32-bit Philox draw (7 rounds) per query and 8 keys, eight 16-bit values compared with
    `threshold` (the dropout probability in 1/65536ths)."""
    groups = start_n // 8 + tl.arange(0, BN // 8)
    row = offs_m[:, None] + 0 * groups[None, :]
    col = h * (T // 8 + 1) + groups[None, :] + 0 * offs_m[:, None]
    zero = tl.zeros_like(row)
    w0, w1, w2, w3 = tl.philox(seed, row, col, zero, zero, 7)
    q0 = _interleave(w0 & 0xFFFF, w2 & 0xFFFF, BM, BN // 4)
    q1 = _interleave(w1 & 0xFFFF, w3 & 0xFFFF, BM, BN // 4)
    q2 = _interleave(w0 >> 16, w2 >> 16, BM, BN // 4)
    q3 = _interleave(w1 >> 16, w3 >> 16, BM, BN // 4)
    bits = _interleave(_interleave(q0, q2, BM, BN // 2), _interleave(q1, q3, BM, BN // 2), BM, BN)
    return bits.to(tl.int32) >= threshold


@triton.jit
def _query_rows(Q, SEQ, CU, T, sq_t, sq_h, h, pid, D: tl.constexpr, BM: tl.constexpr):
    """A query block's token indices, validity, sequence ids, key span [lo, hi) and q tile."""
    offs_m = pid * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, D)
    rows = offs_m < T
    sid_q = tl.load(SEQ + offs_m, mask=rows, other=-1)
    lo, hi = _span(SEQ, CU, pid * BM, T, BM)
    q = tl.load(Q + offs_m[:, None] * sq_t + h * sq_h + offs_d[None, :], mask=rows[:, None], other=0.0)
    return offs_m, offs_d, rows, sid_q, lo, hi, q


@triton.jit
def _key_tile(K, V, SEQ, start, lo, hi, sk_t, sk_h, sv_t, sv_h, h, offs_d, BN: tl.constexpr):
    """Sequence ids, k and v of the key block start .. start+BN-1 (keys outside [lo, hi) masked)."""
    offs_n = start + tl.arange(0, BN)
    cols = (offs_n >= lo) & (offs_n < hi)
    sid_k = tl.load(SEQ + offs_n, mask=cols, other=-2)
    k = tl.load(K + offs_n[:, None] * sk_t + h * sk_h + offs_d[None, :], mask=cols[:, None], other=0.0)
    v = tl.load(V + offs_n[:, None] * sv_t + h * sv_h + offs_d[None, :], mask=cols[:, None], other=0.0)
    return sid_k, k, v


@triton.jit(do_not_specialize=["T", "threshold"])
def _forward(Q, K, V, O, LSE, SEQ, CU, SEED, T, sm_scale, threshold, keep_scale,
             sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, so_t, so_h,
             D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, DROPOUT: tl.constexpr):
    h = tl.program_id(1)
    offs_m, offs_d, rows, sid_q, lo, hi, q = _query_rows(Q, SEQ, CU, T, sq_t, sq_h, h, tl.program_id(0), D, BM)
    qk_scale = sm_scale * 1.4426950408889634
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    seed = tl.load(SEED)
    for start in range(lo - lo % BN, hi, BN):
        sid_k, k, v = _key_tile(K, V, SEQ, start, lo, hi, sk_t, sk_h, sv_t, sv_h, h, offs_d, BN)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        s = tl.where(sid_q[:, None] == sid_k[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            p = tl.where(_keep(seed, h, offs_m, start, T, threshold, BM, BN), p * keep_scale, 0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    tl.store(O + offs_m[:, None] * so_t + h * so_h + offs_d[None, :], out.to(O.dtype.element_ty), mask=rows[:, None])
    m_fin = tl.where(m_i == float("-inf"), 0.0, m_i)
    tl.store(LSE + h * T + offs_m, m_fin + tl.log2(l_safe), mask=rows)


@triton.jit(do_not_specialize=["T", "threshold"])
def _backward_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, SEQ, CU, SEED, T, sm_scale, threshold, keep_scale,
                   sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sdo_t, sdo_h, sdk_t, sdk_h, sdv_t, sdv_h,
                   D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, DROPOUT: tl.constexpr):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    start_n = pid * BN
    offs_n = start_n + tl.arange(0, BN)
    offs_d = tl.arange(0, D)
    cols = offs_n < T
    sid_k = tl.load(SEQ + offs_n, mask=cols, other=-2)
    lo, hi = _span(SEQ, CU, start_n, T, BN)
    k = tl.load(K + offs_n[:, None] * sk_t + h * sk_h + offs_d[None, :], mask=cols[:, None], other=0.0)
    v = tl.load(V + offs_n[:, None] * sv_t + h * sv_h + offs_d[None, :], mask=cols[:, None], other=0.0)
    qk_scale = sm_scale * 1.4426950408889634
    dk = tl.zeros([BN, D], tl.float32)
    dv = tl.zeros([BN, D], tl.float32)
    seed = tl.load(SEED)
    for start in range(lo, hi, BM):
        offs_m = start + tl.arange(0, BM)
        rows = offs_m < hi
        sid_q = tl.load(SEQ + offs_m, mask=rows, other=-1)
        q = tl.load(Q + offs_m[:, None] * sq_t + h * sq_h + offs_d[None, :], mask=rows[:, None], other=0.0)
        do = tl.load(DO + offs_m[:, None] * sdo_t + h * sdo_h + offs_d[None, :], mask=rows[:, None], other=0.0)
        lse = tl.load(LSE + h * T + offs_m, mask=rows, other=0.0)
        delta = tl.load(DELTA + h * T + offs_m, mask=rows, other=0.0)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        p = tl.where(sid_q[:, None] == sid_k[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v))
        if DROPOUT:
            keep = _keep(seed, h, offs_m, start_n, T, threshold, BM, BN)
            p_used = tl.where(keep, p * keep_scale, 0.0)
            dp = tl.where(keep, dp * keep_scale, 0.0)
        else:
            p_used = p
        dv += tl.dot(tl.trans(p_used.to(do.dtype)), do)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
    tl.store(DK + offs_n[:, None] * sdk_t + h * sdk_h + offs_d[None, :], (dk * sm_scale).to(DK.dtype.element_ty),
             mask=cols[:, None])
    tl.store(DV + offs_n[:, None] * sdv_t + h * sdv_h + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=cols[:, None])


@triton.jit(do_not_specialize=["T", "threshold"])
def _backward_dq(Q, K, V, DO, LSE, DELTA, DQ, SEQ, CU, SEED, T, sm_scale, threshold, keep_scale,
                 sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sdo_t, sdo_h, sdq_t, sdq_h,
                 D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, DROPOUT: tl.constexpr):
    h = tl.program_id(1)
    offs_m, offs_d, rows, sid_q, lo, hi, q = _query_rows(Q, SEQ, CU, T, sq_t, sq_h, h, tl.program_id(0), D, BM)
    do = tl.load(DO + offs_m[:, None] * sdo_t + h * sdo_h + offs_d[None, :], mask=rows[:, None], other=0.0)
    lse = tl.load(LSE + h * T + offs_m, mask=rows, other=0.0)
    delta = tl.load(DELTA + h * T + offs_m, mask=rows, other=0.0)
    qk_scale = sm_scale * 1.4426950408889634
    dq = tl.zeros([BM, D], tl.float32)
    seed = tl.load(SEED)
    for start in range(lo - lo % BN, hi, BN):
        sid_k, k, v = _key_tile(K, V, SEQ, start, lo, hi, sk_t, sk_h, sv_t, sv_h, h, offs_d, BN)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        p = tl.where(sid_q[:, None] == sid_k[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v))
        if DROPOUT:
            dp = tl.where(_keep(seed, h, offs_m, start, T, threshold, BM, BN), dp * keep_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    tl.store(DQ + offs_m[:, None] * sdq_t + h * sdq_h + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=rows[:, None])


@triton.jit
def _keep_dense(SEED, KEEP, T, threshold, h, BLOCK: tl.constexpr):
    """Writes head h's keep decisions as a dense [T, T] int8 matrix (for tests)."""
    offs_m = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    start_n = tl.program_id(1) * BLOCK
    offs_n = start_n + tl.arange(0, BLOCK)
    keep = _keep(tl.load(SEED), h, offs_m, start_n, T, threshold, BLOCK, BLOCK)
    inside = (offs_m[:, None] < T) & (offs_n[None, :] < T)
    tl.store(KEEP + offs_m[:, None] * T + offs_n[None, :], keep.to(tl.int8), mask=inside)


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
    fwd = _forward
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
    dkdv, dq_kernel = _backward_dkdv, _backward_dq
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
    dense = _keep_dense
    block = 16
    out = torch.empty(heads, tokens, tokens, dtype=torch.int8, device=device or seed.device)
    grid = (-(-tokens // block), -(-tokens // block))
    threshold, _ = _dropout_args(dropout_p)
    for h in range(heads):
        dense[grid](seed, out[h], tokens, threshold, h, BLOCK=block)
    return out.bool()


def _cpu_check() -> None:
    """Against plain softmax attention in fp32, with and without dropout, on CPU through Triton's
    interpreter: TRITON_INTERPRET=1 python benchmarks/experiments/triton_packed_attn.py"""
    torch.manual_seed(0)
    lens = [5, 17, 3, 40, 1, 9, 70]
    tokens, heads, dim = sum(lens), 2, 16
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    q, k, v = (torch.randn(tokens, heads, dim, requires_grad=True) for _ in range(3))
    scale, seed = dim ** -0.5, torch.tensor([1234])
    seq = sequence_ids(cu, tokens)
    same = seq[:, None] == seq[None, :]
    for p in (0.0, 0.3):
        out, lse = forward(q.detach(), k.detach(), v.detach(), cu, scale, p, seed)
        scores = torch.einsum("thd,shd->hts", q, k).mul(scale).masked_fill(~same, float("-inf"))
        probs = scores.softmax(-1)
        if p:
            keep = keep_mask(seed, tokens, heads, p)
            probs = probs * keep * _dropout_args(p)[1]
            print(f"dropout {p}: drawn rate {1 - keep[:, same].float().mean().item():.3f}")
        ref = torch.einsum("hts,shd->thd", probs, v)
        grad = torch.randn_like(ref)
        ours = backward(grad, q.detach(), k.detach(), v.detach(), out, lse, cu, scale, p, seed)
        theirs = torch.autograd.grad(ref, (q, k, v), grad)
        errors = [(out - ref).abs().max().item()] + [(a - b).abs().max().item() for a, b in zip(ours, theirs)]
        print(f"dropout {p}: max abs error out, dq, dk, dv: " + ", ".join(f"{e:.1e}" for e in errors))
        assert max(errors) < 1e-5, errors


if __name__ == "__main__":
    _cpu_check()
