"""GPU check of the fused dropout + residual + LayerNorm (`embedtune.kernels.fused_norm`): exactness
against the plain ops, the dropout mask under CUDA-graph replay, and the time of one call forward +
backward against the plain ops (eager and torch.compile'd) at BERT shapes. Prints a table last.

    python3 benchmarks/check_fused_norm_gpu.py [--tokens 17000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch
from gpu_timing import replay_ms

from embedtune.kernels import fused_norm
from embedtune.kernels.fused_norm import DropoutAddNorm, dropout_add_norm, dropout_seed


def plain(norm, p, x, r):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = norm(torch.nn.functional.dropout(x, p, training=p > 0) + r)
        return y, y.to(torch.bfloat16)


def fused(norm, p, x, r):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        return dropout_add_norm(norm, p, x, r)


def exactness(tokens: int, cols: int) -> dict:
    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(cols, eps=1e-12).cuda()
    with torch.no_grad():
        norm.weight.normal_(1, 0.3)
        norm.bias.normal_(0, 0.3)
    x = (torch.randn(tokens, cols, device="cuda") * 0.5).to(torch.bfloat16).requires_grad_()
    r = torch.randn(tokens, cols, device="cuda", requires_grad=True)
    up, up_half = torch.randn(tokens, cols, device="cuda"), torch.randn(tokens, cols, device="cuda")
    out = {}
    for name, fn in (("fused", fused), ("plain", plain)):
        y, y16 = fn(norm, 0.0, x, r)
        ((y * up).sum() + (y16.float() * up_half).sum()).backward()
        out[name] = [y.detach(), y16.detach()] + [t.grad.clone() for t in (x, r, norm.weight, norm.bias)]
        for t in (x, r, norm.weight, norm.bias):
            t.grad = None
    names = ["y", "y_bf16", "dx", "dr", "dw", "db"]
    err = {n: ((a.float() - b.float()).norm() / b.float().norm()).item() for n, a, b in zip(names, out["fused"], out["plain"])}
    err["y_bf16_is_y_rounded"] = bool(torch.equal(out["fused"][1], out["fused"][0].to(torch.bfloat16)))
    # dropout: rate and scale from the saved pre-norm sum
    seed = dropout_seed(x.device)
    _, _, s, _, _ = fused_norm._kernels().forward(x.detach(), r.detach(), norm.weight, norm.bias, seed, 0.1, 1e-12,
                                                  torch.float32, None)
    dropped = s - r.detach()
    keep = dropped != 0
    err["keep_rate"] = keep.float().mean().item()
    # the scale, where s - r keeps x's digits (|x| not small against the residual)
    clear = keep & (x.detach().float().abs() > 0.25 * r.detach().abs())
    err["scale_err"] = ((dropped[clear] / x.detach().float()[clear]) - 1 / 0.9).abs().median().item()
    # CUDA graph: each replay draws a new mask; backward reuses the forward's. Its own norm with frozen
    # weights and inputs made on the side stream, so nothing captured accumulates into tensors of the
    # default stream (which capture forbids)
    graph_norm = torch.nn.LayerNorm(cols, eps=1e-12).cuda().requires_grad_(False)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        static_x = x.detach().clone().requires_grad_()
        static_r = r.detach().clone()
        static_up = up.clone()
        for _ in range(3):
            y, _ = fused(graph_norm, 0.1, static_x, static_r)
            (y * static_up).sum().backward()
            static_x.grad = None
    torch.cuda.current_stream().wait_stream(stream)
    from embedtune.graphs import _fresh_leaf_streams  # as the recipe's graph step captures

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), _fresh_leaf_streams():
        y, _ = fused(graph_norm, 0.1, static_x, static_r)
        (y * static_up).sum().backward()
    masks = []
    for _ in range(3):
        graph.replay()
        masks.append(static_x.grad != 0)
    torch.cuda.synchronize()
    err["replays_differ"] = bool(not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2]))
    err["replay_keep_rate"] = masks[2].float().mean().item()
    return err


def timing(tokens: int, cols: int, p: float) -> dict:
    from triton.testing import do_bench

    norm = torch.nn.LayerNorm(cols, eps=1e-12).cuda()
    x = torch.randn(tokens, cols, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    r = torch.randn(tokens, cols, device="cuda", requires_grad=True)
    up = torch.randn(tokens, cols, device="cuda")
    up16 = up.to(torch.bfloat16)
    compiled = torch.compile(plain, dynamic=True)
    result = {}
    for name, fn in (("plain eager", plain), ("plain compiled", compiled), ("fused", fused)):
        def step():
            y, y16 = fn(norm, p, x, r)
            torch.autograd.backward([y, y16], [up, up16])
        for _ in range(3):
            step()
        result[name] = do_bench(step, warmup=20, rep=200)
    return result


FIRST_CALL = """
import time
t = time.perf_counter()
import torch
from embedtune.kernels.fused_norm import dropout_add_norm
norm = torch.nn.LayerNorm(768).cuda()
x = torch.randn(1000, 768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
r = torch.randn(1000, 768, device="cuda", requires_grad=True)
with torch.autocast("cuda", dtype=torch.bfloat16):
    y, y16 = dropout_add_norm(norm, 0.1, x, r)
torch.autograd.backward([y, y16], [torch.ones_like(y), torch.ones_like(y16)])
torch.cuda.synchronize()
print(time.perf_counter() - t)
"""


def build_seconds() -> dict:
    """The first fused call's seconds in a fresh process (torch imported beforehand, so not counted):
    with an empty Triton cache, then with the one it filled."""
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TRITON_CACHE_DIR=cache)
        base = "import time, torch\ntorch.zeros(1, device='cuda')\n"
        def run(code):
            out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
            return float(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else out.stderr[-500:]
        code = base + FIRST_CALL.replace("import torch\n", "", 1)
        return {"cold_s": run(code), "warm_s": run(code)}


def graph_timing(tokens: int, cols: int, p: float, replays: int = 50) -> dict:
    """GPU time of one forward + backward (weight gradients included) replayed as a CUDA graph, as the
    recipe runs it: the host's launch costs, which `timing` also sees, are gone."""
    from embedtune.graphs import _fresh_leaf_streams

    result = {}
    for name, fn in (("plain eager", plain), ("fused", fused)):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            norm = torch.nn.LayerNorm(cols, eps=1e-12).cuda()
            x = torch.randn(tokens, cols, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            r = torch.randn(tokens, cols, device="cuda", requires_grad=True)
            up = torch.randn(tokens, cols, device="cuda")
            up16 = up.to(torch.bfloat16)
            for _ in range(3):
                y, y16 = fn(norm, p, x, r)
                torch.autograd.backward([y, y16], [up, up16])
                x.grad = r.grad = norm.weight.grad = norm.bias.grad = None
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), _fresh_leaf_streams():
            y, y16 = fn(norm, p, x, r)
            torch.autograd.backward([y, y16], [up, up16])
        result[name] = replay_ms(graph, replays)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=17000)
    args = parser.parse_args()
    builds = build_seconds()
    print(json.dumps({"first_call": builds}), flush=True)
    rows = []
    for cols in (768, 1024):
        err = exactness(args.tokens, cols)
        print(json.dumps({"cols": cols, **err}), flush=True)
        times = timing(args.tokens, cols, 0.1)
        times.update({f"{k} (graph)": v for k, v in graph_timing(args.tokens, cols, 0.1).items()})
        print(json.dumps({"cols": cols, "ms": times}), flush=True)
        rows.append((cols, err, times))
    print(f"\n{'cols':>5s} {'rel err y / dx / dr / dw / db':>44s} {'keep':>6s} {'replays':>8s} "
          f"{'eager ms':>9s} {'compiled ms':>12s} {'fused ms':>9s} {'graph: eager ms':>16s} {'fused ms':>9s}")
    for cols, err, t in rows:
        errs = " / ".join(f"{err[k]:.1e}" for k in ("y", "dx", "dr", "dw", "db"))
        print(f"{cols:5d} {errs:>44s} {err['keep_rate']:6.3f} {str(err['replays_differ']):>8s} "
              f"{t['plain eager']:9.3f} {t['plain compiled']:12.3f} {t['fused']:9.3f} "
              f"{t['plain eager (graph)']:16.3f} {t['fused (graph)']:9.3f}")
    print(f"first fused call in a new process (torch and CUDA already up): {builds}")


if __name__ == "__main__":
    main()
