"""Packed attention kernels on one GPU: torch's FlashAttention-2 (what `embedtune::varlen_attn` calls)
against packed-tile Triton kernels (an experiment that lost: `experiments/triton_packed_attn.py`), the memory-efficient
(CUTLASS) kernel and, with --cudnn, cuDNN's fused attention, over the same ragged (cu_seqlens) batch,
with and without dropout.

    python benchmarks/probe_attention_gpu.py --tokenizer .bench/tokenizer [--cudnn]

Checks, for each kernel: the output and gradients without dropout against the other kernel; that the
backward replays the forward's dropout mask (out is linear in v for a fixed mask, so with the RNG state
reset, <g, out(v2) - out(v1)> must equal <dL/dv, v2 - v1>); and that dropout keeps the mean (the
average of many dropped outputs approaches the undropped one). Then times forward + backward per
layer on real batches (stdlib pairs, 128 pairs, max_seq_length 512). Table last.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "experiments"))  # triton_packed_attn


def real_lengths(tokenizer: str, batch: int, max_len: int, steps: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    from embedtune.data.stdlib import build_stdlib_pairs

    tok = AutoTokenizer.from_pretrained(tokenizer)
    pairs = build_stdlib_pairs(seed=0)
    out = []
    for step in range(steps):
        rows = [pairs[(step * batch + i) % len(pairs)] for i in range(batch)]
        texts = [r["anchor"] for r in rows] + [r["positive"] for r in rows]
        out.append([min(len(ids), max_len) for ids in tok(texts)["input_ids"]])
    return out


def flash(q, k, v, cu, max_len, p, scale):
    out, lse, rng, _, _ = torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, max_len, max_len, p, False,
                                                                   False, scale=scale)
    return out, (lse, rng)


def flash_bwd(g, q, k, v, out, saved, cu, max_len, p, scale):
    lse, rng = saved
    return torch.ops.aten._flash_attention_backward(g, q, k, v, out, lse, cu, cu, max_len, max_len, p, False, rng,
                                                    q.new_empty(0), scale=scale)


def cudnn(q, k, v, cu, max_len, p, scale):
    r = torch.ops.aten._cudnn_attention_forward(q, k, v, None, cu, cu, max_len, max_len, True, p, False, False,
                                                scale=scale)
    return r[0], (r[1], r[6], r[7])


def cudnn_bwd(g, q, k, v, out, saved, cu, max_len, p, scale):
    lse, seed, offset = saved
    return torch.ops.aten._cudnn_attention_backward(g, q, k, v, out, lse, seed, offset, None, cu, cu, max_len,
                                                    max_len, p, False, scale=scale)


def efficient(q, k, v, cu, max_len, p, scale):
    """The memory-efficient (CUTLASS, xformers) kernel; ragged batches go in as one row of cu_seqlens."""
    r = torch.ops.aten._efficient_attention_forward(q[None], k[None], v[None], None, cu, cu, max_len, max_len, p, 0,
                                                    True, scale=scale)
    return r[0][0], (r[1], r[2], r[3])


def efficient_bwd(g, q, k, v, out, saved, cu, max_len, p, scale):
    lse, seed, offset = saved
    dq, dk, dv, _ = torch.ops.aten._efficient_attention_backward(g[None], q[None], k[None], v[None], None, out[None],
                                                                  cu, cu, max_len, max_len, lse, p, seed, offset, 0,
                                                                  False, scale=scale)
    return dq[0], dk[0], dv[0]


def triton_fwd(q, k, v, cu, max_len, p, scale):
    """The packed-tile Triton kernels of the experiment in `experiments/triton_packed_attn.py`."""
    import triton_packed_attn as triton_attn

    seed = triton_attn.draw_seed(q.device) if p > 0 else q.new_zeros(1, dtype=torch.int64)
    out, lse = triton_attn.forward(q, k, v, cu, scale, p, seed)
    return out, (lse, seed)


def triton_bwd(g, q, k, v, out, saved, cu, max_len, p, scale):
    import triton_packed_attn as triton_attn

    lse, seed = saved
    return triton_attn.backward(g, q, k, v, out, lse, cu, scale, p, seed)


ARGS = None
KERNELS = {"flash": (flash, flash_bwd), "triton": (triton_fwd, triton_bwd), "efficient": (efficient, efficient_bwd),
           "cudnn": (cudnn, cudnn_bwd)}
TIGHT = "flash, batch's own max length"  # as "flash", with max_seqlen the batch's longest row, not the width


def inputs(lengths, heads, dim, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    total = sum(lengths)
    q, k, v = (torch.randn(total, heads, dim, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3))
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32, device="cuda")
    cu[1:] = torch.cumsum(torch.tensor(lengths, device="cuda"), 0)
    return q, k, v, cu, max(lengths)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def checks(name, lengths, heads, dim, p=0.1):
    fwd, bwd = KERNELS[name]
    q, k, v, cu, m = inputs(lengths, heads, dim)
    scale = dim ** -0.5
    g = torch.randn_like(q)
    res = {}
    # the other kernel, no dropout
    out, saved = fwd(q, k, v, cu, m, 0.0, scale)
    grads = bwd(g, q, k, v, out, saved, cu, m, 0.0, scale)
    ref, ref_saved = flash(q, k, v, cu, m, 0.0, scale)
    ref_grads = flash_bwd(g, q, k, v, ref, ref_saved, cu, m, 0.0, scale)
    res["out_vs_flash"] = rel(out, ref)
    res["grads_vs_flash"] = max(rel(a, b) for a, b in zip(grads, ref_grads))
    # the backward replays the forward's mask
    v2 = v + 0.5 * torch.randn_like(v)
    state = torch.cuda.get_rng_state()
    out1, saved1 = fwd(q, k, v, cu, m, p, scale)
    torch.cuda.set_rng_state(state)
    out2, _ = fwd(q, k, v2, cu, m, p, scale)
    _, _, dv = bwd(g, q, k, v, out1, saved1, cu, m, p, scale)
    lhs = (g.float() * (out2.float() - out1.float())).sum()
    rhs = (dv.float() * (v2.float() - v.float())).sum()
    res["mask_replay_rel_err"] = abs((lhs - rhs) / rhs).item()
    res["dropout_changes_out"] = rel(out1, ref)
    # dropout keeps the mean
    mean = torch.zeros_like(ref, dtype=torch.float32)
    n = 64
    for _ in range(n):
        mean += fwd(q, k, v, cu, m, p, scale)[0].float() / n
    res["dropout_mean_vs_plain"] = rel(mean, ref)
    return res


def time_kernel(name, batches, heads, dim, p, reps=10):
    fwd, bwd = KERNELS["flash" if name == TIGHT else name]
    prepared = []
    for lengths in batches:
        q, k, v, cu, m = inputs(lengths, heads, dim)
        # max_seqlen: the padded width, as packing passes it
        prepared.append((q, k, v, cu, m if name == TIGHT else 512, torch.randn_like(q)))
    scale = dim ** -0.5
    for q, k, v, cu, m, g in prepared[:2]:  # warm-up (plan building)
        out, saved = fwd(q, k, v, cu, m, p, scale)
        bwd(g, q, k, v, out, saved, cu, m, p, scale)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fwd_ms = bwd_ms = 0.0
    for _ in range(reps):
        for q, k, v, cu, m, g in prepared:
            start.record()
            out, saved = fwd(q, k, v, cu, m, p, scale)
            end.record()
            torch.cuda.synchronize()
            fwd_ms += start.elapsed_time(end)
            start.record()
            bwd(g, q, k, v, out, saved, cu, m, p, scale)
            end.record()
            torch.cuda.synchronize()
            bwd_ms += start.elapsed_time(end)
    n = reps * len(prepared)
    return fwd_ms / n, bwd_ms / n


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--cudnn", action="store_true", help="also cuDNN (slow on ragged batches: a plan per shape)")
    parser.add_argument("--triton-blocks", default="64,64,4,2;128,64,8,2;128,64,4,2;64,32,4,2;64,64,4,3;32,64,4,2",
                        help="Triton (query block, key block, warps, stages) settings to time, ';'-separated; the first is checked")
    args = parser.parse_args()
    global ARGS
    ARGS = args
    print(f"card: {torch.cuda.get_device_name()}  torch {torch.__version__}  cudnn {torch.backends.cudnn.version()}")
    batches = real_lengths(args.tokenizer, 128, 512, args.steps)
    print(f"tokens per batch: {[sum(b) for b in batches]}")
    rows = []
    for name in [*KERNELS, TIGHT]:
        if name == TIGHT:
            for heads, label in ((12, "bert-base"), (16, "bert-large")):
                f, b = time_kernel(name, batches, heads, 64, 0.1)
                rows.append(("flash*", label, 0.1, f, b))
            continue
        if name == "cudnn" and not ARGS.cudnn:
            continue
        try:
            print(name, "checks:", {k: f"{v:.2e}" for k, v in checks(name, batches[0], 12, 64).items()}, flush=True)
        except Exception as error:  # noqa: BLE001 - report and go on to timing the rest
            print(name, "checks FAILED:", type(error).__name__, str(error).splitlines()[0][:300], flush=True)
            continue
        settings = args.triton_blocks.split(";") if name == "triton" else [None]
        for setting in settings:
            if setting:
                os.environ["EMBEDTUNE_TRITON_ATTN_BLOCKS"] = setting
            for heads, label in ((12, "bert-base"), (16, "bert-large")):
                for p in (0.1, 0.0):
                    shown = f"triton {setting}" if setting else name
                    try:
                        f, b = time_kernel(name, batches, heads, 64, p)
                        rows.append((shown, label, p, f, b))
                    except Exception as error:  # noqa: BLE001
                        print(shown, label, p, "timing FAILED:", type(error).__name__, str(error).splitlines()[0][:300])
        os.environ["EMBEDTUNE_TRITON_ATTN_BLOCKS"] = settings[0] or ""
    print("flash*: flash with max_seqlen the batch's longest row (else the padded width, 512)")
    print(f"\n{'kernel':18s} {'shape':11s} {'dropout':>7s} {'fwd ms':>8s} {'bwd ms':>8s} {'total':>8s}")
    for name, label, p, f, b in rows:
        print(f"{name:18s} {label:11s} {p:7.1f} {f:8.3f} {b:8.3f} {f + b:8.3f}")


if __name__ == "__main__":
    main()
