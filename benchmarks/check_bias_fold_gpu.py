"""GPU check of the dense layers' biases folded into the fused norm (`kernels.fused_norm`'s
`branch_bias`): exactness against the plain modules under bf16 autocast, and the GPU time of one
sub-block (BERT's SelfOutput / Output) forward + backward replayed as a CUDA graph, plain / fused
without the fold / fused with it, at BERT-base and BERT-large widths. Prints a table last.
(`bias_fold_check_h200_2026-12-03.log` also has an intermediate block with a bias + GELU Triton
kernel, since removed: it was slower than the GEMM's bias epilogue, torch's GELU and the bias sum.)

    PYTHONPATH=src python3 benchmarks/check_bias_fold_gpu.py [--tokens 17900]
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from gpu_timing import replay_ms

from embedtune.graphs import _fresh_leaf_streams
from embedtune.kernels.fused_norm import residual_norm


def output_block(way: str, dense, norm, dropout, x, residual):
    """BERT's SelfOutput: norm(dropout(dense(x)) + residual), as the three ways run it."""
    with torch.autocast("cuda", dtype=torch.bfloat16):
        if way == "plain":
            y = norm(dropout(dense(x)) + residual)
            return y, y.to(torch.bfloat16)
        if way == "fused":
            return residual_norm(norm, dropout, dense(x), residual, fused=True)
        return residual_norm(norm, dropout, F.linear(x, dense.weight), residual, fused=True, branch_bias=dense.bias)


def make(tokens: int, hidden: int, seed: int = 0):
    torch.manual_seed(seed)
    dense = torch.nn.Linear(hidden, hidden).cuda()
    norm = torch.nn.LayerNorm(hidden, eps=1e-12).cuda()
    with torch.no_grad():
        norm.weight.normal_(1, 0.3)
        norm.bias.normal_(0, 0.3)
        dense.bias.normal_(0, 0.5)
    x = torch.randn(tokens, hidden, device="cuda").to(torch.bfloat16).requires_grad_()
    residual = torch.randn(tokens, hidden, device="cuda", requires_grad=True)
    params = [dense.weight, dense.bias, norm.weight, norm.bias]
    return (dense, norm, torch.nn.Dropout(0.1)), [x, residual], params


def exactness(tokens: int, hidden: int) -> dict:
    """Relative errors (norm of the difference over the plain path's norm) of outputs and gradients,
    dropout off (eval mode), with fixed upstream gradients."""
    results = {}
    for way in ("plain", "folded"):
        modules, inputs, params = make(tokens, hidden)
        for m in modules:
            m.eval()
        outs = output_block(way, *modules, *inputs)
        torch.manual_seed(1)
        ups = [torch.randn_like(o, dtype=torch.float32) for o in outs]
        sum((o.float() * u).sum() for o, u in zip(outs, ups)).backward()
        results[way] = [o.detach().float() for o in outs] + [t.grad.float() for t in inputs + params]
    names = ["y", "y_bf16", "dx", "dresidual", "dW", "dbias", "dnorm_w", "dnorm_b"]
    return {n: ((a - b).norm() / b.norm()).item() for n, a, b in zip(names, results["folded"], results["plain"])}


def graph_time(way: str, tokens: int, hidden: int, replays: int = 50) -> float:
    """GPU ms of one forward + backward (dropout 0.1, all gradients) replayed as a CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        modules, inputs, params = make(tokens, hidden)
        for _ in range(3):
            outs = output_block(way, *modules, *inputs)
            torch.autograd.backward(list(outs), [torch.ones_like(o) for o in outs])
            for t in inputs + params:
                t.grad = None
        ups = [torch.ones_like(o) for o in outs]
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), _fresh_leaf_streams():
        outs = output_block(way, *modules, *inputs)
        torch.autograd.backward(list(outs), ups)
    return replay_ms(graph, replays)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=17900)
    args = parser.parse_args()
    rows = []
    for hidden in (768, 1024):
        err = exactness(args.tokens, hidden)
        ms = {way: graph_time(way, args.tokens, hidden) for way in ("plain", "fused", "folded")}
        row = {"hidden": hidden, "block": "output", "rel_err": err, "graph_ms": ms}
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(f"\n{'hidden':>6} {'max rel err':>11} {'plain ms':>9} {'fused ms':>9} {'folded ms':>10}  errors")
    for r in rows:
        ms, err = r["graph_ms"], r["rel_err"]
        print(f"{r['hidden']:6d} {max(err.values()):11.1e} {ms['plain']:9.3f} {ms['fused']:9.3f} "
              f"{ms['folded']:10.3f}  " + " ".join(f"{k} {v:.1e}" for k, v in err.items()))


if __name__ == "__main__":
    main()
