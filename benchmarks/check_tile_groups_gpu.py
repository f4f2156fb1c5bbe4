"""Tile groups on the GPU (`packing.tile_groups`): the grouped attention op against the plain flash op.

On stdlib batches (128 pairs, max_seq_length 512, the graph step's fixed-length stream), bf16, head size 64,
BERT-base (12 heads) and BERT-large (16 heads):
1. exactness, dropout 0: outputs and gradients of the grouped op and of the plain op, each against fp32
   attention over each sequence alone (length buckets); the grouped op must be as close as the plain one
   (within 1.5x its distance, or 2e-3 relative);
2. dropout 0.1: the backward replays the forward's mask (out is linear in v for a fixed mask: with the
   RNG reset, <g, out(v2) - out(v1)> = <dL/dv, v2 - v1>), the keep rate averages out (the mean of many
   dropped outputs approaches the undropped one as for the plain op), and a new call draws a new mask;
3. time per layer, forward + backward in a CUDA graph, plain and grouped (the plan's own cost apart).
Table last.

    python3 benchmarks/check_tile_groups_gpu.py --tokenizer .bench/tokenizer
"""

from __future__ import annotations

import argparse
import sys

import torch
from gpu_timing import finish, graph_ms, record
from probe_attention_gpu import real_lengths, rel

from embedtune.packing import tile_groups
from embedtune.packing.varlen import PackedBatch, bucketed_sdpa, grouped_op, varlen_op

SCALE = 64 ** -0.5


def plans(lengths: list[int]) -> tuple[PackedBatch, PackedBatch, torch.Tensor]:
    mask = torch.zeros(len(lengths), 512, dtype=torch.bool, device="cuda")
    for i, n in enumerate(lengths):
        mask[i, :n] = True
    stream = -(-sum(lengths) // 1024) * 1024
    return PackedBatch.fixed(mask, stream), PackedBatch.fixed(mask, stream, group_short=True), mask


def grads(fn, q, k, v, g):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    return (out, *torch.autograd.grad((out * g).sum(), (q, k, v)))


def exactness(plain: PackedBatch, grouped: PackedBatch, heads: int) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    row = {}
    for name, plan in (("plain", plain), ("grouped", grouped)):
        q, k, v, go = (torch.randn(plan.stream, heads, 64, device="cuda", generator=g) for _ in range(4))
        ref = grads(lambda *t: bucketed_sdpa(*t, plan, SCALE), q, k, v, go)
        op = varlen_op if name == "plain" else grouped_op
        half = grads(lambda *t: op(*(x.bfloat16() for x in t), plan, SCALE), q, k, v, go.bfloat16())
        real = plan.cu_seqlens[plan.batch].item()  # fillers' rows apart
        row[name] = max(rel(a[:real], b[:real]) for a, b in zip(half, ref))
        g = torch.Generator(device="cuda").manual_seed(0)  # the same inputs for both
    row["ok"] = row["grouped"] <= max(1.5 * row["plain"], 2e-3)
    return row


def replay_error(op, plan: PackedBatch, q, k, v, go, p: float) -> float:
    """Relative error of <g, out(v2) - out(v1)> = <dL/dv, v2 - v1> with the RNG reset between the two
    forwards: zero up to rounding when the backward replays the forward's dropout mask."""
    real = plan.cu_seqlens[plan.batch].item()
    v2 = v + 0.5 * torch.randn_like(v)
    state = torch.cuda.get_rng_state()
    v1 = v.clone().requires_grad_()
    out1 = op(q, k, v1, plan, SCALE, p)
    dv = torch.autograd.grad((out1 * go).sum(), v1)[0]
    torch.cuda.set_rng_state(state)
    out2 = op(q, k, v2, plan, SCALE, p)
    lhs = (go.float() * (out2.float() - out1.detach().float()))[:real].sum()
    rhs = (dv.float() * (v2.float() - v.float()))[:real].sum()
    return abs(((lhs - rhs) / rhs).item())


def dropout_checks(plan: PackedBatch, heads: int, p: float = 0.1) -> dict:
    """The grouped op against the plain op on the same stream: mask replay, a new mask per call, the mean."""
    g = torch.Generator(device="cuda").manual_seed(1)
    q, k, v, go = (torch.randn(plan.stream, heads, 64, device="cuda", generator=g, dtype=torch.bfloat16)
                   for _ in range(4))
    real = plan.cu_seqlens[plan.batch].item()
    row = {"replay_grouped": replay_error(grouped_op, plan, q, k, v, go, p),
           "replay_plain": replay_error(varlen_op, plan, q, k, v, go, p)}
    first = grouped_op(q, k, v, plan, SCALE, p)[:real]
    row["new_call_new_mask"] = rel(grouped_op(q, k, v, plan, SCALE, p)[:real], first)
    for name, op in (("grouped", grouped_op), ("plain", varlen_op)):
        undropped = op(q, k, v, plan, SCALE, 0.0).float()[:real]
        mean = sum(op(q, k, v, plan, SCALE, p).float()[:real] for _ in range(200)) / 200
        row[f"mean_{name}"] = rel(mean, undropped)
    row["ok"] = (row["replay_grouped"] <= max(2 * row["replay_plain"], 2e-2) and row["new_call_new_mask"] > 0.1
                 and row["mean_grouped"] < 1.5 * row["mean_plain"] + 1e-2)
    return row


def timing(plain: PackedBatch, grouped: PackedBatch, mask: torch.Tensor, heads: int, p: float) -> dict:
    g = torch.Generator(device="cuda").manual_seed(2)
    q, k, v, go = (torch.randn(plain.stream, heads, 64, device="cuda", generator=g, dtype=torch.bfloat16,
                               requires_grad=True) for _ in range(4))

    def layer(op, plan):
        def run():
            out = op(q, k, v, plan, SCALE, p)
            torch.autograd.grad(out, (q, k, v), go)
        return run

    row = {"plain_us": graph_ms(layer(varlen_op, plain)) * 1000,
           "grouped_us": graph_ms(layer(grouped_op, grouped)) * 1000,
           "plan_us": graph_ms(lambda: PackedBatch.fixed(mask, grouped.stream, group_short=True)) * 1000}
    default = tile_groups.GROUPED_SHARE
    for share in SHARES:  # the coded copies' share of the stream (`tile_groups.GROUPED_SHARE`)
        tile_groups.GROUPED_SHARE = share
        other = PackedBatch.fixed(mask, grouped.stream, group_short=True)
        row[f"share_{share}_us"] = graph_ms(layer(grouped_op, other)) * 1000
    tile_groups.GROUPED_SHARE = default
    return row


SHARES = (0.375, 0.625, 0.75)


def profile(plain: PackedBatch, grouped: PackedBatch, heads: int, p: float = 0.1) -> None:
    """Where each op's time goes: CUDA time per kernel over 10 layers' forward + backward."""
    g = torch.Generator(device="cuda").manual_seed(3)
    q, k, v, go = (torch.randn(plain.stream, heads, 64, device="cuda", generator=g, dtype=torch.bfloat16,
                               requires_grad=True) for _ in range(4))
    for name, op, plan in (("plain", varlen_op, plain), ("grouped", grouped_op, grouped)):
        for _ in range(3):
            torch.autograd.grad(op(q, k, v, plan, SCALE, p), (q, k, v), go)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                torch.autograd.grad(op(q, k, v, plan, SCALE, p), (q, k, v), go)
            torch.cuda.synchronize()
        print(f"\n{name} op, {heads} heads, dropout {p}: kernels over 10 layers")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=70))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows, ok = [], True
    for b, lengths in enumerate(real_lengths(args.tokenizer, 128, 512, args.batches)):
        plain, grouped, mask = plans(lengths)
        if b == 0:
            profile(plain, grouped, 12)
        tiles = grouped.tiles
        groups = int((tiles.cu_groups[1:] > tiles.cu_groups[:-1]).sum())
        for heads in (12, 16):
            exact = exactness(plain, grouped, heads)
            drop = dropout_checks(grouped, heads) if heads == 12 else {}
            ok &= exact["ok"] and drop.get("ok", True)
            for p in (0.1, 0.0):
                t = timing(plain, grouped, mask, heads, p)
                record(rows, {"batch": b, "heads": heads, "dropout": p, "tokens": sum(lengths), "stream": plain.stream,
                              "groups": groups, "grouped_tokens": int(tiles.cu_rest[0]),
                              **{k: round(x, 1) for k, x in t.items()},
                              "x": round(t["grouped_us"] / t["plain_us"], 3),
                              "err_plain": exact["plain"], "err_grouped": exact["grouped"],
                              **({f"drop_{k}": x for k, x in drop.items()} if p == 0.1 else {})})
    finish(rows, args.out, [("b", "batch", 2), ("heads", "heads", 5), ("p", "dropout", 4), ("tokens", "tokens", 6),
                            ("groups", "groups", 6), ("grouped", "grouped_tokens", 7), ("plain us", "plain_us", 9),
                            ("grouped us", "grouped_us", 10), ("x", "x", 6), ("plan us", "plan_us", 8),
                            *((f"at {s}", f"share_{s}_us", 9) for s in SHARES),
                            ("err plain", "err_plain", 9), ("err grouped", "err_grouped", 11)])
    drops = [r for r in rows if "drop_ok" in r]
    for r in drops:
        print(f"batch {r['batch']} dropout: mask replay {r['drop_replay_grouped']:.1e} (plain op "
              f"{r['drop_replay_plain']:.1e}), new mask {r['drop_new_call_new_mask']:.3f}, mean of 200 vs "
              f"undropped {r['drop_mean_grouped']:.4f} (plain op {r['drop_mean_plain']:.4f})")
    print("CHECKS", "PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
