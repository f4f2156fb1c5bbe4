"""Triton kernels for `dropout(x) + residual -> LayerNorm`, forward and backward (see `fused_norm`).

Imported only where they run: on a CUDA device, or on the CPU under Triton's interpreter
(`TRITON_INTERPRET=1` set before this module is imported), which is how CI checks them.

Forward, one pass over each row: load the branch `x` (adding its linear layer's bias, where the caller
left that to this kernel) and the residual, drop `x` with a Philox mask drawn from (seed, row, column)
(one draw serves four columns), add, normalize in fp32, write the normalized stream (and, when
asked, its copy in the autocast dtype for the next matrix products), the pre-norm sum and the row
statistics. The mask is never stored: the backward draws it again from the same seed.
Backward, one pass: recompute the normalized row from the saved sum, form the LayerNorm input
gradient (the residual's gradient), mask and scale it for the branch, and accumulate the weight and
bias gradients (and the branch bias's: the branch gradient's column sums) per program in one buffer;
`fused_norm` adds up the per-program partials with one reduction.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _keep(seed, row, cols, p, BLOCK: tl.constexpr):
    """The dropout keep mask of a [rows, BLOCK] tile, a function of (seed, row, column) alone, so the
    backward draws the forward's mask again whatever its tiles. One Philox draw gives four numbers: it
    serves four neighbouring columns (one draw per element made the kernels bound by the draws)."""
    quad = tl.arange(0, BLOCK // 4)
    u0, u1, u2, u3 = tl.rand4x(seed, row[:, None] * ((cols + 3) // 4) + quad[None, :])
    u = tl.interleave(tl.interleave(u0, u2), tl.interleave(u1, u3))  # column 4j + k gets u_k of draw j
    return u >= p


# One compiled kernel each way: the switches are runtime arguments, and the row count is not
# specialized on (Triton would compile again for counts that are or are not multiples of 16).
@triton.jit(do_not_specialize=["rows", "dropout", "write_half", "has_xbias"])
def _forward(X, XB, R, W, B, Y, Y_HALF, S, MEAN, RSTD, SEED, rows, cols, p, eps, dropout, write_half, has_xbias,
             BLOCK: tl.constexpr, ROWS: tl.constexpr):
    row = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    col = tl.arange(0, BLOCK)
    in_rows = row < rows
    mask = in_rows[:, None] & (col < cols)[None, :]
    offs = row[:, None] * cols + col[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if has_xbias != 0:
        x += tl.load(XB + col, mask=col < cols, other=0.0).to(tl.float32)[None, :]
    if dropout != 0:
        keep = _keep(tl.load(SEED), row, cols, p, BLOCK)
        x = tl.where(keep, x / (1.0 - p), 0.0)
    s = x + tl.load(R + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(S + offs, s, mask=mask)
    mean = tl.sum(s, axis=1) / cols
    centred = tl.where(mask, s - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / cols + eps)
    w = tl.load(W + col, mask=col < cols, other=0.0).to(tl.float32)
    b = tl.load(B + col, mask=col < cols, other=0.0).to(tl.float32)
    y = centred * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
    if write_half != 0:
        tl.store(Y_HALF + offs, y.to(Y_HALF.dtype.element_ty), mask=mask)
    tl.store(MEAN + row, mean, mask=in_rows)
    tl.store(RSTD + row, rstd, mask=in_rows)


@triton.jit(do_not_specialize=["rows", "rows_per_program", "dropout", "has_half", "want_dx", "want_dw", "want_dxb"])
def _backward(DY, DY_HALF, S, MEAN, RSTD, W, SEED, DS, DX, PARTIAL, rows, cols, rows_per_program, p,
              dropout, has_half, want_dx, want_dw, want_dxb, BLOCK: tl.constexpr, ROWS: tl.constexpr):
    """PARTIAL: [programs, 3, cols] fp32, this program's sums of the weight, bias and branch bias gradients."""
    program = tl.program_id(0)
    col = tl.arange(0, BLOCK)
    in_cols = col < cols
    w = tl.load(W + col, mask=in_cols, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    db = tl.zeros((BLOCK,), dtype=tl.float32)
    dxb = tl.zeros((BLOCK,), dtype=tl.float32)
    first = program * rows_per_program
    start = 0
    while start < rows_per_program:  # a multiple of ROWS; rows past the end are masked
        row = (first + start + tl.arange(0, ROWS)).to(tl.int64)
        in_rows = row < rows
        mask = in_rows[:, None] & in_cols[None, :]
        offs = row[:, None] * cols + col[None, :]
        mean = tl.load(MEAN + row, mask=in_rows, other=0.0)
        rstd = tl.load(RSTD + row, mask=in_rows, other=0.0)
        xhat = tl.where(mask, (tl.load(S + offs, mask=mask, other=0.0) - mean[:, None]) * rstd[:, None], 0.0)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        if has_half != 0:
            dy += tl.load(DY_HALF + offs, mask=mask, other=0.0).to(tl.float32)
        g = dy * w[None, :]
        c1 = tl.sum(xhat * g, axis=1) / cols
        c2 = tl.sum(g, axis=1) / cols
        ds = (g - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        tl.store(DS + offs, ds.to(DS.dtype.element_ty), mask=mask)
        if want_dx + want_dxb != 0:
            dx = ds
            if dropout != 0:
                keep = _keep(tl.load(SEED), row, cols, p, BLOCK)
                dx = tl.where(keep, ds / (1.0 - p), 0.0)
            if want_dx != 0:
                tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
            if want_dxb != 0:
                dxb += tl.sum(dx, axis=0)
        if want_dw != 0:
            dw += tl.sum(dy * xhat, axis=0)
            db += tl.sum(dy, axis=0)
        start += ROWS
    out = PARTIAL + program * 3 * cols + col
    if want_dw != 0:
        tl.store(out, dw, mask=in_cols)
        tl.store(out + cols, db, mask=in_cols)
    if want_dxb != 0:
        tl.store(out + 2 * cols, dxb, mask=in_cols)


# Tiles timed on an H200 inside CUDA graphs for rows of 513-1,024 columns (BERT-base and -large), at
# 17,900 rows (benchmarks/tune_fused_norm_gpu.py, tune_fused_norm_h200_2026-12-03.log): forward one row
# per program with 2 warps (80 us against 90 us for 4 rows, 4 warps); backward 2 rows a step, 4 warps,
# 16 programs per multiprocessor (143 us against 166 us for 4, 4, 4). Other widths keep the rule below.
_TUNED = {1024: {"forward": (1, 2), "backward": (2, 4, 16)}}


def _block(cols: int) -> tuple[int, int, int]:
    """Columns per row padded to a power of two, rows per tile (about 4k elements a tile), warps."""
    block = max(4, triton.next_power_of_2(cols))  # the dropout mask is drawn four columns at a time
    rows = max(1, min(16, 4096 // block))
    return block, rows, 8 if block >= 2048 else 4


def _forward_tile(cols: int) -> tuple[int, int]:
    block, rows, warps = _block(cols)
    return _TUNED.get(block, {}).get("forward", (rows, warps))


def _backward_tile(cols: int) -> tuple[int, int, int]:
    block, rows, warps = _block(cols)
    return _TUNED.get(block, {}).get("backward", (rows, warps, 4))


def _seed_or_zero(seed, device):
    """The seed pointer is int64 in every call (without dropout it is not read), so one kernel serves both."""
    return seed if seed is not None else torch.zeros(1, dtype=torch.int64, device=device)


def forward(x, residual, weight, bias, seed, p: float, eps: float, out_dtype, half_dtype, tile=None,
            branch_bias=None):
    """Returns (y, y_half or None, pre-norm sum, mean, rstd); x and residual are [rows, cols], contiguous;
    `branch_bias` [cols] is added to x first. `tile`: (rows per program, warps) instead of `_block`'s
    (benchmarks/tune_fused_norm_gpu.py)."""
    rows, cols = x.shape
    block = _block(cols)[0]
    tile_rows, warps = tile if tile is not None else _forward_tile(cols)
    y = torch.empty((rows, cols), device=x.device, dtype=out_dtype)
    y_half = torch.empty((rows, cols), device=x.device, dtype=half_dtype) if half_dtype is not None else y
    s = torch.empty((rows, cols), device=x.device, dtype=torch.float32)
    mean = torch.empty(rows, device=x.device, dtype=torch.float32)
    rstd = torch.empty(rows, device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(rows, tile_rows),)
    # without a branch bias the norm's bias stands in for the pointer (same dtype: no other kernel variant)
    _forward[grid](x, branch_bias if branch_bias is not None else bias, residual, weight, bias, y, y_half, s,
                   mean, rstd, _seed_or_zero(seed, x.device), rows, cols, p, eps, int(seed is not None),
                   int(half_dtype is not None), int(branch_bias is not None),
                   BLOCK=block, ROWS=tile_rows, num_warps=warps)
    return y, (y_half if half_dtype is not None else None), s, mean, rstd


def _programs(device: torch.device, rows: int, tile_rows: int, per_sm: int = 4) -> int:
    if device.type == "cuda":
        slots = torch.cuda.get_device_properties(device).multi_processor_count * per_sm
    else:
        slots = 4  # the interpreter: few programs, each looping over many rows
    return max(1, min(slots, triton.cdiv(rows, tile_rows)))


def backward(dy, dy_half, s, mean, rstd, weight, seed, p: float, x_dtype, residual_dtype,
             want_dx: bool, want_dw: bool, tile=None, want_dxb: bool = False):
    """Returns (d residual, d x or None, d weight or None, d bias or None, d branch bias (fp32) or None).
    `tile`: (rows per step, warps, programs per multiprocessor) instead of the defaults
    (benchmarks/tune_fused_norm_gpu.py)."""
    rows, cols = s.shape
    block = _block(cols)[0]
    tile_rows, warps, per_sm = tile if tile is not None else _backward_tile(cols)
    programs = _programs(s.device, rows, tile_rows, per_sm)
    rows_per_program = triton.cdiv(triton.cdiv(rows, programs), tile_rows) * tile_rows
    programs = triton.cdiv(rows, rows_per_program)
    ds = torch.empty((rows, cols), device=s.device, dtype=residual_dtype)
    dx = torch.empty((rows, cols), device=s.device, dtype=x_dtype) if want_dx else ds
    partial = torch.empty((programs, 3, cols), device=s.device, dtype=torch.float32) if want_dw or want_dxb else mean
    _backward[(programs,)](dy, dy_half if dy_half is not None else dy, s, mean, rstd, weight,
                           _seed_or_zero(seed, s.device), ds, dx, partial, rows, cols, rows_per_program, p,
                           int(seed is not None), int(dy_half is not None), int(want_dx), int(want_dw),
                           int(want_dxb), BLOCK=block, ROWS=tile_rows, num_warps=warps)
    # one reduction for all the partials (each its own was a launch of about 18 us); rows a call did not
    # ask for hold whatever the buffer held and are summed unread
    sums = partial.sum(0) if want_dw or want_dxb else None
    dw = sums[0].to(weight.dtype) if want_dw else None
    db = sums[1].to(weight.dtype) if want_dw else None
    return ds, (dx if want_dx else None), dw, db, (sums[2] if want_dxb else None)
