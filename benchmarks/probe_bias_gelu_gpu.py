"""The intermediate layer's bias + exact GELU with the bias gradient summed in the GELU's backward, as
Triton kernels of a few tile shapes, against what runs today (the GEMM adds the bias; torch's GELU
forward and backward; autograd's `sum(0)` for the bias gradient). GPU time inside a CUDA graph at
BERT shapes, results checked against an fp64 reference. A probe: a first kernel (16 x 256 tiles, a row
loop per program) lost 0.056 ms a layer (`bias_fold_check_h200_2026-12-03.log`); these tiles have no
row loop, and the forward runs flat.

    python3 benchmarks/probe_bias_gelu_gpu.py [--tokens 17900] [--features 3072,4096]
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl
from gpu_timing import finish, graph_ms, record

SQRT_HALF = tl.constexpr(0.7071067811865476)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _forward_flat(X, B, H, n, cols, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    z = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32) + tl.load(B + offs % cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(H + offs, (0.5 * z * (1.0 + tl.math.erf(z * SQRT_HALF))).to(H.dtype.element_ty), mask=mask)


@triton.jit
def _backward_tile(DH, X, B, DX, PARTIAL, rows, cols, RB: tl.constexpr, CB: tl.constexpr):
    """Tile (i, j): RB rows x CB columns; writes d x and this tile's column sums to PARTIAL[i]."""
    i, j = tl.program_id(0), tl.program_id(1)
    row = (i * RB + tl.arange(0, RB)).to(tl.int64)
    col = j * CB + tl.arange(0, CB)
    mask = (row < rows)[:, None] & (col < cols)[None, :]
    offs = row[:, None] * cols + col[None, :]
    z = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32) + tl.load(B + col, mask=col < cols, other=0.0).to(tl.float32)[None, :]
    dh = tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
    dx = dh * (0.5 * (1.0 + tl.math.erf(z * SQRT_HALF)) + z * tl.exp(-0.5 * z * z) * INV_SQRT_2PI)
    tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(PARTIAL + i * cols + col, tl.sum(tl.where(mask, dx, 0.0), axis=0), mask=col < cols)


def fused(x, bias, dh, forward_block: int, tile: tuple[int, int, int]):
    rows, cols = x.shape
    h = torch.empty_like(x)
    _forward_flat[(triton.cdiv(x.numel(), forward_block),)](x, bias, h, x.numel(), cols, BLOCK=forward_block,
                                                            num_warps=4 if forward_block <= 2048 else 8)
    rb, cb, warps = tile
    dx = torch.empty_like(x)
    partial = torch.empty((triton.cdiv(rows, rb), cols), device=x.device, dtype=torch.float32)
    _backward_tile[(triton.cdiv(rows, rb), triton.cdiv(cols, cb))](dh, x, bias, dx, partial, rows, cols, RB=rb, CB=cb,
                                                                    num_warps=warps)
    return h, dx, partial.sum(0)


def today(pre_biased, dh):
    """What autograd runs after the GEMM with its bias epilogue: GELU forward, its backward, the bias sum."""
    h = torch.nn.functional.gelu(pre_biased)
    dx = torch.ops.aten.gelu_backward(dh, pre_biased)
    return h, dx, dx.sum(0)  # bf16 in, fp32 accumulation inside: what addmm's backward does


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=17900)
    ap.add_argument("--features", default="3072,4096")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows_out = []
    for cols in (int(c) for c in args.features.split(",")):
        torch.manual_seed(cols)
        x = torch.randn(args.tokens, cols, device=device).to(torch.bfloat16)
        bias = torch.randn(cols, device=device) * 0.5
        dh = torch.randn(args.tokens, cols, device=device).to(torch.bfloat16)
        z = x.double() + bias.double()
        want_h = torch.nn.functional.gelu(z)
        want_dx = dh.double() * (0.5 * (1 + torch.erf(z * 0.5 ** 0.5)) + z * torch.exp(-0.5 * z * z) / (2 * torch.pi) ** 0.5)
        want = (want_h, want_dx, want_dx.sum(0))
        pre_biased = (x.float() + bias).to(torch.bfloat16)  # the GEMM's output with its bias epilogue
        ways = {"today": lambda: today(pre_biased, dh)}
        for block in (1024, 4096):
            for tile in ((32, 128, 4), (64, 128, 8), (64, 256, 8), (128, 128, 8)):
                ways[f"flat {block} + tile {tile}"] = lambda block=block, tile=tile: fused(x, bias, dh, block, tile)
        for name, fn in ways.items():
            got = fn()
            err = [((g.double() - w).norm() / w.norm()).item() for g, w in zip(got, want)]
            us = graph_ms(fn) * 1000 if device == "cuda" else 0.0
            record(rows_out, {"features": cols, "way": name, "us": round(us, 1),
                              "rel_err_h_dx_db": [f"{e:.1e}" for e in err]})
    finish(rows_out, args.out, [("features", "features", 8), ("way", "way", 36), ("us", "us", 7),
                                ("rel err h / dx / db", "rel_err_h_dx_db", 27)])


if __name__ == "__main__":
    main()
