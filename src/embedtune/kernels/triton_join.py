"""Triton kernel for `join_grads`: a stacked projection's output gradients (q, k, v) joined into one
[rows, parts * width] tensor, with the joined tensor's column sums, in one pass.

Imported only where it runs: on a CUDA device, or on the CPU under Triton's interpreter
(`TRITON_INTERPRET=1` set before this module is imported), which is how CI checks it.

Each program copies a tile of one part into its column block of the joined tensor and writes the
tile's fp32 column sums into its row block's line of a partial buffer; one reduction over the row
blocks then gives the sums.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


# The row count is not specialized on (Triton would compile again for counts that are or are not
# multiples of 16): every batch shape runs one compiled kernel.
@triton.jit(do_not_specialize=["rows"])
def _join_and_sum(A, B, C, OUT, PARTIAL, rows, width, RB: tl.constexpr, CB: tl.constexpr):
    """Program (i, j, part): rows i * RB.. and columns j * CB.. of part A, B or C, copied into OUT at
    columns part * width + ..., their column sums written to PARTIAL[i] at the same columns."""
    i, j, part = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    row = (i * RB + tl.arange(0, RB)).to(tl.int64)
    col = j * CB + tl.arange(0, CB)
    mask = (row < rows)[:, None] & (col < width)[None, :]
    src = row[:, None] * width + col[None, :]
    if part == 0:
        g = tl.load(A + src, mask=mask, other=0.0)
    elif part == 1:
        g = tl.load(B + src, mask=mask, other=0.0)
    else:
        g = tl.load(C + src, mask=mask, other=0.0)
    wide = tl.num_programs(2) * width
    out_col = part * width + col
    tl.store(OUT + row[:, None] * wide + out_col[None, :], g, mask=mask)
    tl.store(PARTIAL + i * wide + out_col, tl.sum(g.to(tl.float32), axis=0), mask=col < width)


# Tile timed on an H200 inside CUDA graphs at 17,900 rows (benchmarks/probe_qkv_grad_gpu.py,
# probe_qkv_grad_h200_2026-12-03.log): 59 us at width 768 and 73 us at 1024, as fast as (128, 128, 8)
# and well ahead of 256-column tiles (81 and 101 us).
ROWS, COLUMNS, WARPS = 64, 128, 4


def join_and_sum(grads: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(joined [rows, parts * width], column sums in fp32) of 2 or 3 contiguous [rows, width] parts
    of one dtype (`join_grads.can_join`)."""
    rows, width = grads[0].shape
    parts = len(grads)
    out = torch.empty((rows, parts * width), device=grads[0].device, dtype=grads[0].dtype)
    partial = torch.empty((triton.cdiv(rows, ROWS), parts * width), device=out.device, dtype=torch.float32)
    grid = (triton.cdiv(rows, ROWS), triton.cdiv(width, COLUMNS), parts)
    # two parts: C is never read (no program has part 2), B stands in for its pointer
    _join_and_sum[grid](grads[0], grads[1], grads[-1], out, partial, rows, width, RB=ROWS, CB=COLUMNS,
                        num_warps=WARPS)
    return out, partial.sum(0)
