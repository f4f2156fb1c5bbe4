"""Tile shapes of the fused norm kernels (`embedtune.kernels.triton_norm`) on one GPU: each forward
(rows per program, warps) and backward (rows per step, warps, programs per multiprocessor) timed as
GPU time inside a CUDA graph (20 calls replayed), at BERT shapes under bf16 autocast, dropout 0.1.
Results equal to the defaults' are checked. The default tiles are also timed without dropout: what
drawing the mask costs. Prints the best tiles last.

    python3 benchmarks/tune_fused_norm_gpu.py [--tokens 17900] [--cols 768,1024] [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
from gpu_timing import graph_ms

from embedtune.kernels import triton_norm
from embedtune.kernels.fused_norm import dropout_seed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=17900)
    ap.add_argument("--cols", default="768,1024")
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true", help="only the default tiles and a few neighbours")
    args = ap.parse_args()
    rows_out = []
    best = {}
    for cols in (int(c) for c in args.cols.split(",")):
        torch.manual_seed(0)
        x = torch.randn(args.tokens, cols, device="cuda").to(torch.bfloat16)
        r = torch.randn(args.tokens, cols, device="cuda")
        w = torch.randn(cols, device="cuda") * 0.3 + 1
        b = torch.randn(cols, device="cuda") * 0.3
        xb = torch.randn(cols, device="cuda") * 0.3  # the dense layer's bias, folded in as in training
        seed = dropout_seed(x.device)
        ref = triton_norm.forward(x, r, w, b, seed, 0.1, 1e-12, torch.float32, torch.bfloat16, branch_bias=xb)
        dy, dyh = torch.randn_like(r), torch.randn_like(x)
        ref_b = triton_norm.backward(dy, dyh, ref[2], ref[3], ref[4], w, seed, 0.1, torch.bfloat16, torch.float32,
                                     True, True, want_dxb=True)
        default_f = triton_norm._forward_tile(cols)
        default_b = triton_norm._backward_tile(cols)
        tiles_f = [(1, 2), (1, 4), (2, 4)] if args.quick else list(itertools.product([1, 2, 4, 8], [2, 4, 8]))
        for tile, dropout in [(None, True)] + [(t, True) for t in tiles_f] + [(None, False)]:
            call = lambda: triton_norm.forward(x, r, w, b, seed if dropout else None, 0.1, 1e-12, torch.float32,  # noqa: E731
                                               torch.bfloat16, tile=tile, branch_bias=xb)
            out = call()
            same = not dropout or all(torch.allclose(a.float(), c.float(), rtol=1e-5, atol=1e-5 if a.dtype == torch.float32 else 2e-2)
                                      for a, c in zip(out[:3], ref[:3]))
            ms = graph_ms(call)
            row = {"cols": cols, "kind": "forward", "tile": tile or default_f, "default": tile is None and dropout,
                   "dropout": dropout, "us": round(ms * 1000, 1), "same": same}
            rows_out.append(row)
            print(json.dumps(row), flush=True)
        tiles_b = ([(1, 4, 16), (1, 4, 32), (2, 4, 8), (2, 4, 32), (4, 4, 16)] if args.quick
                   else list(itertools.product([1, 2, 4, 8], [4, 8], [4, 8, 16, 32])))
        for tile, dropout in [(None, True)] + [(t, True) for t in tiles_b] + [(None, False)]:
            call = lambda: triton_norm.backward(dy, dyh, ref[2], ref[3], ref[4], w, seed if dropout else None, 0.1,  # noqa: E731
                                                torch.bfloat16, torch.float32, True, True, tile=tile, want_dxb=True)
            out = call()
            same = not dropout or torch.allclose(out[0], ref_b[0], rtol=1e-5, atol=1e-5) and \
                torch.allclose(out[1].float(), ref_b[1].float(), rtol=1e-2, atol=2e-2) and \
                torch.allclose(out[2], ref_b[2], rtol=1e-4, atol=1e-3) and torch.allclose(out[3], ref_b[3], rtol=1e-4, atol=1e-3) and \
                torch.allclose(out[4], ref_b[4], rtol=1e-4, atol=1e-3)
            ms = graph_ms(call)
            row = {"cols": cols, "kind": "backward", "tile": tile or default_b, "default": tile is None and dropout,
                   "dropout": dropout, "us": round(ms * 1000, 1), "same": same}
            rows_out.append(row)
            print(json.dumps(row), flush=True)
        for kind in ("forward", "backward"):
            mine = [r for r in rows_out if r["cols"] == cols and r["kind"] == kind]
            best[(cols, kind)] = (min((r for r in mine if r["same"] and r["dropout"]), key=lambda r: r["us"]),
                                  next(r for r in mine if r["default"]), next(r for r in mine if not r["dropout"]))
    if args.out:
        open(args.out, "w").write("\n".join(json.dumps(r) for r in rows_out) + "\n")
    gbytes = lambda cols: args.tokens * cols * (2 + 4 + 4 + 2 + 4) / 1e9  # noqa: E731 - each way moves about this much
    print(f"\n{'cols':>5} {'kind':>8} {'default tile':>14} {'default us':>10} {'best tile':>12} {'best us':>8} {'GB/s best':>9} "
          f"{'no dropout us':>13}")
    for (cols, kind), (top, default, plain) in best.items():
        print(f"{cols:>5} {kind:>8} {str(tuple(default['tile'])):>14} {default['us']:>10} {str(tuple(top['tile'])):>12} "
              f"{top['us']:>8} {gbytes(cols) / (top['us'] / 1e6):>9.0f} {plain['us']:>13}")


if __name__ == "__main__":
    main()
