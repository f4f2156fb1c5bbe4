"""The QKV projection's backward joins flash attention's three gradients into one [tokens, 3 x hidden]
tensor (a cat, 47 us a BERT-base layer in `profile_graphs_fused_h200_2026-12-03.log`) and then sums its
columns for the stacked bias (`sum(0)`, 38 us at 2,304 columns, `probe_bias_grad_h200_2026-12-03.log`).
This probe times one Triton kernel that does both in a pass (a few tile shapes) against `torch.cat` +
`sum(0)`, inside a CUDA graph, checked against fp64. The kernel is embedtune's own
(`kernels.triton_join`, which full fine-tuning's graphed steps run with the tile this probe chose);
the probe launches it with each tile shape.

    PYTHONPATH=src python3 benchmarks/probe_qkv_grad_gpu.py [--tokens 17900] [--hidden 768,1024]
"""

from __future__ import annotations

import argparse

import torch
import triton
from gpu_timing import finish, graph_ms, record

from embedtune.kernels import triton_join


def fused(dq, dk, dv, tile):
    rows, hidden = dq.shape
    rb, cb, warps = tile
    out = torch.empty((rows, 3 * hidden), device=dq.device, dtype=dq.dtype)
    partial = torch.empty((triton.cdiv(rows, rb), 3 * hidden), device=dq.device, dtype=torch.float32)
    triton_join._join_and_sum[(triton.cdiv(rows, rb), triton.cdiv(hidden, cb), 3)](
        dq, dk, dv, out, partial, rows, hidden, RB=rb, CB=cb, num_warps=warps)
    return out, partial.sum(0)


def today(dq, dk, dv):
    out = torch.cat([dq, dk, dv], dim=1)
    return out, out.sum(0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=17900)
    ap.add_argument("--hidden", default="768,1024")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows_out = []
    for hidden in (int(h) for h in args.hidden.split(",")):
        torch.manual_seed(hidden)
        grads = [(torch.randn(args.tokens, hidden, device=device) * 1e-3).to(torch.bfloat16) for _ in range(3)]
        joined = torch.cat([g.double() for g in grads], dim=1)
        want_sum = joined.sum(0)
        ways = {"torch.cat + sum(0)": lambda: today(*grads)}
        for tile in ((32, 256, 4), (64, 128, 4), (64, 256, 8), (128, 128, 8)):
            ways[f"triton {tile}"] = lambda tile=tile: fused(*grads, tile)
        for name, fn in ways.items():
            out, total = fn()
            exact = bool(torch.equal(out.double(), joined))
            err = ((total.double() - want_sum).norm() / want_sum.norm()).item()
            us = graph_ms(fn) * 1000 if device == "cuda" else 0.0
            record(rows_out, {"hidden": hidden, "way": name, "us": round(us, 1), "join_exact": exact,
                              "sum_rel_err": f"{err:.1e}"})
    finish(rows_out, args.out, [("hidden", "hidden", 6), ("way", "way", 26), ("us", "us", 7),
                                ("join exact", "join_exact", 10), ("sum rel err", "sum_rel_err", 11)])


if __name__ == "__main__":
    main()
