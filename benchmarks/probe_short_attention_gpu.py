"""Attention for the short sequences of a packed batch: FlashAttention-2's varlen kernel gives every
(sequence, head) its own tiles, so a batch's 128 anchors (~15 tokens each) cost nearly as much as its
128 positives. This probe times, per layer (forward + backward, dropout 0.1, bf16, in a CUDA graph):

- "flash all": one varlen flash call over the whole stream (what runs today);
- "flash long + dense short W": the flash kernel over the positives only, and the anchors as one
  padded [anchors, W] batch through plain batched matmuls, softmax and dropout (autograd's backward).

Real lengths (stdlib pairs, MiniLM tokenizer, batch 128, max_seq_length 512). Without dropout the
two ways' outputs and gradients are compared.

    python3 benchmarks/probe_short_attention_gpu.py --tokenizer .bench/tokenizer
"""

from __future__ import annotations

import argparse

import torch
from gpu_timing import finish, graph_ms, record
from probe_attention_gpu import flash, flash_bwd, real_lengths


def dense_short(q, k, v, index, valid, flat, p, scale):
    """Short sequences' attention on a padded [n, W] view of their packed rows. The rows go in by
    `index_copy` and come out by `index_select` (unique indices both ways: a gather with padding slots
    all pointing at one row would make the backward accumulate thousands of duplicates serially)."""
    n, width = index.shape
    heads, dim = q.shape[1:]
    qb, kb, vb = (t.new_zeros(n * width, heads, dim).index_copy(0, flat, t).view(n, width, heads, dim).transpose(1, 2)
                  for t in (q, k, v))  # [n, H, W, D]
    scores = (qb @ kb.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = scores.softmax(-1, dtype=torch.float32).to(q.dtype)
    probs = torch.nn.functional.dropout(probs, p, training=p > 0)
    out = (probs @ vb).transpose(1, 2).reshape(n * width, heads, dim)
    return out.index_select(0, flat)  # [short tokens, H, D]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = "cuda"
    rows = []
    for step, lens in enumerate(real_lengths(args.tokenizer, 128, 512, args.batches)):
        for width in (32, 64):
            short = [n for n in lens if n <= width]  # the short sequences first, then the rest
            lens_w = short + [n for n in lens if n > width]
            ns, ts, total = len(short), sum(short), sum(lens_w)
            cu = torch.tensor([0] + list(torch.tensor(lens_w).cumsum(0)), dtype=torch.int32, device=dev)
            cu_long = (cu[ns:] - ts).contiguous()
            pos = torch.arange(width, device=dev)
            lens_s = torch.tensor(short, device=dev)[:, None]
            valid = pos[None, :] < lens_s
            index = torch.where(valid, cu[:ns].long()[:, None] + pos[None, :], torch.zeros_like(lens_s))
            flat = valid.reshape(-1).nonzero().squeeze(1)
            for name, heads in (("bert-base", 12), ("bert-large", 16)):
                torch.manual_seed(step)
                q, k, v = (torch.randn(total, heads, 64, device=dev, dtype=torch.bfloat16) for _ in range(3))
                g = torch.randn_like(q)
                scale = 64 ** -0.5
                for p in (0.1, 0.0):
                    def flash_all():
                        out, saved = flash(q, k, v, cu, 512, p, scale)
                        return (out, *flash_bwd(g, q, k, v, out, saved, cu, 512, p, scale))

                    def split():
                        ql, kl, vl = q[ts:], k[ts:], v[ts:]
                        out_l, saved = flash(ql, kl, vl, cu_long, 512, p, scale)
                        dq_l, dk_l, dv_l = flash_bwd(g[ts:], ql, kl, vl, out_l, saved, cu_long, 512, p, scale)
                        qs, ks, vs = (t[:ts].detach().requires_grad_() for t in (q, k, v))
                        out_s = dense_short(qs, ks, vs, index, valid, flat, p, scale)
                        dq_s, dk_s, dv_s = torch.autograd.grad(out_s, (qs, ks, vs), g[:ts])
                        return (torch.cat([out_s, out_l]), torch.cat([dq_s, dq_l]), torch.cat([dk_s, dk_l]),
                                torch.cat([dv_s, dv_l]))

                    want = flash_all() if p == 0 else None
                    for way, fn in (("flash all", flash_all), (f"flash long + dense short <= {width}", split)):
                        err = "-"
                        if want is not None:
                            err = f"{max(((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(fn(), want)):.1e}"
                        us = graph_ms(fn) * 1000
                        record(rows, {"batch": step, "model": name, "dropout": p, "way": way, "us": round(us, 1),
                                      "short": f"{ns} seqs, {ts} tok", "rel_err": err})
    finish(rows, args.out, [("batch", "batch", 5), ("model", "model", 10), ("dropout", "dropout", 7),
                            ("way", "way", 34), ("us", "us", 8), ("short", "short", 18),
                            ("rel err", "rel_err", 8)])


if __name__ == "__main__":
    main()
