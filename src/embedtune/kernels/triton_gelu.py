"""Triton kernels for `gelu(x + bias)` after a linear layer, forward and backward (see `fused_gelu`).

Imported only where they run: on a CUDA device, or on the CPU under Triton's interpreter
(`TRITON_INTERPRET=1`), which is how CI checks them.

Forward, one pass: add the bias to the product (which the linear layer wrote without it), apply the
exact (erf) GELU in fp32, write the activation. Backward, one pass: the product's gradient
`dh * gelu'(x + bias)`, written out, and its column sums (the bias gradient) per program, which
`fused_gelu` adds up: the reduction autograd runs over the [tokens, features] gradient for a
linear layer's bias is folded into a pass that reads that gradient anyway.
Tiles are fixed (no width in a constexpr), so one kernel serves every width.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_COLS = 256  # columns per program
_ROWS = 16  # rows per step
_SQRT_HALF = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit(do_not_specialize=["rows"])
def _forward(X, B, H, rows, cols, ROWS: tl.constexpr, COLS: tl.constexpr):
    row = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    col = tl.program_id(1) * COLS + tl.arange(0, COLS)
    mask = (row < rows)[:, None] & (col < cols)[None, :]
    offs = row[:, None] * cols + col[None, :]
    z = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    z += tl.load(B + col, mask=col < cols, other=0.0).to(tl.float32)[None, :]
    h = 0.5 * z * (1.0 + tl.math.erf(z * _SQRT_HALF))
    tl.store(H + offs, h.to(H.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["rows", "rows_per_program", "want_db"])
def _backward(DH, X, B, DX, PARTIAL, rows, cols, rows_per_program, want_db, ROWS: tl.constexpr, COLS: tl.constexpr):
    """PARTIAL: [programs, cols] fp32, this program's column sums of the product's gradient."""
    program = tl.program_id(0)
    col = tl.program_id(1) * COLS + tl.arange(0, COLS)
    in_cols = col < cols
    bias = tl.load(B + col, mask=in_cols, other=0.0).to(tl.float32)
    db = tl.zeros((COLS,), dtype=tl.float32)
    first = program * rows_per_program
    start = 0
    while start < rows_per_program:  # a multiple of ROWS; rows past the end are masked
        row = (first + start + tl.arange(0, ROWS)).to(tl.int64)
        mask = (row < rows)[:, None] & in_cols[None, :]
        offs = row[:, None] * cols + col[None, :]
        z = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32) + bias[None, :]
        dh = tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
        slope = 0.5 * (1.0 + tl.math.erf(z * _SQRT_HALF)) + z * tl.exp(-0.5 * z * z) * _INV_SQRT_2PI
        dx = dh * slope
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
        if want_db != 0:
            db += tl.sum(tl.where(mask, dx, 0.0), axis=0)
        start += ROWS
    if want_db != 0:
        tl.store(PARTIAL + program * cols + col, db, mask=in_cols)


def forward(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """gelu(x + bias) in x's dtype; x [rows, cols] contiguous."""
    rows, cols = x.shape
    h = torch.empty_like(x)
    _forward[(triton.cdiv(rows, _ROWS), triton.cdiv(cols, _COLS))](x, bias, h, rows, cols, ROWS=_ROWS, COLS=_COLS,
                                                                   num_warps=4)
    return h


def _row_programs(device: torch.device, rows: int, col_blocks: int) -> int:
    """Row groups per column block: about four programs per multiprocessor in all (few on the interpreter)."""
    slots = torch.cuda.get_device_properties(device).multi_processor_count * 4 if device.type == "cuda" else 4
    return max(1, min(triton.cdiv(slots, col_blocks), triton.cdiv(rows, _ROWS)))


def backward(dh: torch.Tensor, x: torch.Tensor, bias: torch.Tensor, want_db: bool):
    """Returns (d x in x's dtype, d bias in fp32 or None)."""
    rows, cols = x.shape
    col_blocks = triton.cdiv(cols, _COLS)
    programs = _row_programs(x.device, rows, col_blocks)
    rows_per_program = triton.cdiv(triton.cdiv(rows, programs), _ROWS) * _ROWS
    programs = triton.cdiv(rows, rows_per_program)
    dx = torch.empty_like(x)
    # without a bias gradient an fp32 stand-in keeps the pointer's dtype, so one kernel variant serves both
    partial = torch.empty((programs, cols) if want_db else (1,), device=x.device, dtype=torch.float32)
    _backward[(programs, col_blocks)](dh, x, bias, dx, partial, rows, cols, rows_per_program, int(want_db),
                                      ROWS=_ROWS, COLS=_COLS, num_warps=4)
    return dx, (partial.sum(0) if want_db else None)
