"""Triton kernels of `embedtune.packing.triton_attn` (see there). Imported on first use only: importing
this module needs Triton, and Triton's interpreter (TRITON_INTERPRET=1) must be chosen before it.

Shapes: q, k, v, o [T, heads, D] (any token and head strides, unit stride on D); LSE, DELTA [heads, T]
fp32; SEQ [T] int32 sequence ids; CU [sequences + 1] int32 starts. Programs: (token block, head).
"""

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


@triton.jit(do_not_specialize=["T", "threshold"])
def _forward(Q, K, V, O, LSE, SEQ, CU, SEED, T, sm_scale, threshold, keep_scale,
             sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, so_t, so_h,
             D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, DROPOUT: tl.constexpr):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    offs_m = pid * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, D)
    rows = offs_m < T
    sid_q = tl.load(SEQ + offs_m, mask=rows, other=-1)
    lo, hi = _span(SEQ, CU, pid * BM, T, BM)
    q = tl.load(Q + offs_m[:, None] * sq_t + h * sq_h + offs_d[None, :], mask=rows[:, None], other=0.0)
    qk_scale = sm_scale * 1.4426950408889634
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    seed = tl.load(SEED)
    for start in range(lo - lo % BN, hi, BN):
        offs_n = start + tl.arange(0, BN)
        cols = (offs_n >= lo) & (offs_n < hi)
        sid_k = tl.load(SEQ + offs_n, mask=cols, other=-2)
        k = tl.load(K + offs_n[:, None] * sk_t + h * sk_h + offs_d[None, :], mask=cols[:, None], other=0.0)
        v = tl.load(V + offs_n[:, None] * sv_t + h * sv_h + offs_d[None, :], mask=cols[:, None], other=0.0)
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
    pid = tl.program_id(0)
    h = tl.program_id(1)
    offs_m = pid * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, D)
    rows = offs_m < T
    sid_q = tl.load(SEQ + offs_m, mask=rows, other=-1)
    lo, hi = _span(SEQ, CU, pid * BM, T, BM)
    q = tl.load(Q + offs_m[:, None] * sq_t + h * sq_h + offs_d[None, :], mask=rows[:, None], other=0.0)
    do = tl.load(DO + offs_m[:, None] * sdo_t + h * sdo_h + offs_d[None, :], mask=rows[:, None], other=0.0)
    lse = tl.load(LSE + h * T + offs_m, mask=rows, other=0.0)
    delta = tl.load(DELTA + h * T + offs_m, mask=rows, other=0.0)
    qk_scale = sm_scale * 1.4426950408889634
    dq = tl.zeros([BM, D], tl.float32)
    seed = tl.load(SEED)
    for start in range(lo - lo % BN, hi, BN):
        offs_n = start + tl.arange(0, BN)
        cols = (offs_n >= lo) & (offs_n < hi)
        sid_k = tl.load(SEQ + offs_n, mask=cols, other=-2)
        k = tl.load(K + offs_n[:, None] * sk_t + h * sk_h + offs_d[None, :], mask=cols[:, None], other=0.0)
        v = tl.load(V + offs_n[:, None] * sv_t + h * sv_h + offs_d[None, :], mask=cols[:, None], other=0.0)
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
