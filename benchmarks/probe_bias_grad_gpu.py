"""Column sums of a [tokens, features] bf16 gradient (a linear layer's bias gradient) on one GPU: what
autograd runs (`grad.sum(0)`) against a matrix-vector product and a two-pass Triton column sum,
timed as GPU time inside a CUDA graph, each checked against an fp64 sum. The step profile
(`profile_graphs_fused_h200_2026-12-03.log`) shows a 42 us reduction four times per BERT-base layer.
A probe: nothing in embedtune uses the alternatives yet.

    python3 benchmarks/probe_bias_grad_gpu.py [--tokens 17900] [--features 768,2304,3072,1024,4096]
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl
from gpu_timing import finish, graph_ms, record


@triton.jit(do_not_specialize=["rows", "rows_per_program"])
def _column_partials(G, P, rows, cols, rows_per_program, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program (i, j): the fp32 sums of rows [i * rows_per_program, ...) over columns block j."""
    i, j = tl.program_id(0), tl.program_id(1)
    col = j * BLOCK_C + tl.arange(0, BLOCK_C)
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    start = i * rows_per_program
    r = 0
    while r < rows_per_program:
        row = (start + r + tl.arange(0, BLOCK_R)).to(tl.int64)
        mask = (row < rows)[:, None] & (col < cols)[None, :]
        acc += tl.sum(tl.load(G + row[:, None] * cols + col[None, :], mask=mask, other=0.0).to(tl.float32), axis=0)
        r += BLOCK_R
    tl.store(P + i * cols + col, acc, mask=col < cols)


def triton_column_sum(g: torch.Tensor, programs: int = 264, block_r: int = 32, block_c: int = 256) -> torch.Tensor:
    rows, cols = g.shape
    per = triton.cdiv(triton.cdiv(rows, programs), block_r) * block_r
    programs = triton.cdiv(rows, per)
    partial = torch.empty((programs, cols), device=g.device, dtype=torch.float32)
    _column_partials[(programs, triton.cdiv(cols, block_c))](g, partial, rows, cols, per, BLOCK_R=block_r,
                                                             BLOCK_C=block_c, num_warps=4)
    return partial.sum(0).to(g.dtype)


def matvec(g: torch.Tensor) -> torch.Tensor:
    ones = torch.ones(g.shape[0], device=g.device, dtype=g.dtype)
    return torch.mv(g.t(), ones)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=17900)
    ap.add_argument("--features", default="768,2304,3072,1024,4096")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    ways = {"sum(0) (autograd's)": lambda g: g.sum(0), "torch.mv": matvec, "triton two-pass": triton_column_sum}
    rows = []
    for cols in (int(c) for c in args.features.split(",")):
        torch.manual_seed(cols)
        g = (torch.randn(args.tokens, cols, device="cuda") * 1e-3).to(torch.bfloat16)
        exact = g.double().sum(0)
        for name, fn in ways.items():
            got = fn(g)
            err = ((got.double() - exact).norm() / exact.norm()).item()
            us = graph_ms(lambda: fn(g)) * 1000
            record(rows, {"features": cols, "way": name, "us": round(us, 1), "rel_err": err,
                          "GB/s": round(g.numel() * 2 / (us / 1e6) / 1e9)})
    finish(rows, args.out, [("features", "features", 8), ("way", "way", 22), ("us", "us", 7), ("GB/s", "GB/s", 6),
                            ("rel err", "rel_err", 9)])


if __name__ == "__main__":
    main()
