"""GPU check of the linear biases folded into the fused kernels (`kernels.fused_norm`'s `branch_bias`,
`kernels.fused_gelu`): exactness against the plain modules under bf16 autocast, and the GPU time of
one sub-block forward + backward replayed as a CUDA graph, plain / fused without the fold / fused
with it, at BERT-base and BERT-large widths. Prints a table last.

    PYTHONPATH=src python3 benchmarks/check_bias_fold_gpu.py [--tokens 17900]
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from gpu_timing import replay_ms

from embedtune.graphs import _fresh_leaf_streams
from embedtune.kernels.fused_gelu import bias_gelu
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


def intermediate_block(way: str, dense, x):
    """BERT's Intermediate: gelu(dense(x)); "fused" is the plain path (the fused norm does not touch it)."""
    with torch.autocast("cuda", dtype=torch.bfloat16):
        if way != "folded":
            return (F.gelu(dense(x)),)
        return (bias_gelu(F.linear(x, dense.weight), dense.bias),)


def make(kind: str, tokens: int, hidden: int, inter: int, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "output":
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
    dense = torch.nn.Linear(hidden, inter).cuda()
    with torch.no_grad():
        dense.bias.normal_(0, 0.5)
    x = torch.randn(tokens, hidden, device="cuda").to(torch.bfloat16).requires_grad_()
    return (dense,), [x], [dense.weight, dense.bias]


def run(kind: str, way: str, modules, inputs):
    if kind == "output":
        return output_block(way, *modules, *inputs)
    return intermediate_block(way, modules[0], *inputs)


def exactness(kind: str, tokens: int, hidden: int, inter: int) -> dict:
    """Relative errors (norm of the difference over the plain path's norm) of outputs and gradients,
    dropout off (eval mode), with fixed upstream gradients."""
    results = {}
    for way in ("plain", "folded"):
        modules, inputs, params = make(kind, tokens, hidden, inter)
        for m in modules:
            m.eval()
        outs = run(kind, way, modules, inputs)
        torch.manual_seed(1)
        ups = [torch.randn_like(o, dtype=torch.float32) for o in outs]
        sum((o.float() * u).sum() for o, u in zip(outs, ups)).backward()
        results[way] = [o.detach().float() for o in outs] + [t.grad.float() for t in inputs + params]
    names = (["y", "y_bf16", "dx", "dresidual", "dW", "dbias", "dnorm_w", "dnorm_b"] if kind == "output"
             else ["h", "dx", "dW", "dbias"])
    return {n: ((a - b).norm() / b.norm()).item() for n, a, b in zip(names, results["folded"], results["plain"])}


def graph_time(kind: str, way: str, tokens: int, hidden: int, inter: int, replays: int = 50) -> float:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        modules, inputs, params = make(kind, tokens, hidden, inter)
        for _ in range(3):
            outs = run(kind, way, modules, inputs)
            torch.autograd.backward(list(outs), [torch.ones_like(o) for o in outs])
            for t in inputs + params:
                t.grad = None
        ups = [torch.ones_like(o) for o in outs]
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), _fresh_leaf_streams():
        outs = run(kind, way, modules, inputs)
        torch.autograd.backward(list(outs), ups)
    return replay_ms(graph, replays)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=17900)
    args = parser.parse_args()
    rows = []
    for hidden, inter in ((768, 3072), (1024, 4096)):
        for kind in ("output", "intermediate"):
            err = exactness(kind, args.tokens, hidden, inter)
            ms = {way: graph_time(kind, way, args.tokens, hidden, inter) for way in ("plain", "fused", "folded")}
            row = {"hidden": hidden, "block": kind, "rel_err": err, "graph_ms": ms}
            print(json.dumps(row), flush=True)
            rows.append(row)
    print(f"\n{'hidden':>6} {'block':>12} {'max rel err':>11} {'plain ms':>9} {'fused ms':>9} {'folded ms':>10}  errors")
    for r in rows:
        ms, err = r["graph_ms"], r["rel_err"]
        print(f"{r['hidden']:6d} {r['block']:>12} {max(err.values()):11.1e} {ms['plain']:9.3f} {ms['fused']:9.3f} "
              f"{ms['folded']:10.3f}  " + " ".join(f"{k} {v:.1e}" for k, v in err.items()))


if __name__ == "__main__":
    main()
