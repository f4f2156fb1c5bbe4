"""Where FlashAttention-2's time goes on retrieval batches: per layer, forward + backward, bf16, BERT-base
heads, the stdlib lengths (batch 128, anchors then positives in one stream, max_seq_length 512).

1. The kernels of one call (torch.profiler, CUDA time per kernel over 20 calls), dropout 0.1 and 0.
2. The same call on other arrangements of the stream (CUDA graph timing): the anchors alone, the
   positives alone, and the whole stream's tokens cut into equal sequences of 64, 128, 256 and 512 tokens,
   to tell a cost per sequence from a cost per token (or per score).

    python3 benchmarks/probe_flash_profile_gpu.py --tokenizer .bench/tokenizer
"""

from __future__ import annotations

import argparse

import torch
from gpu_timing import finish, graph_ms, record
from probe_attention_gpu import flash, flash_bwd, inputs, real_lengths


def call(lengths, heads, p):
    """A forward + backward closure over a stream of these sequence lengths, and its score count."""
    q, k, v, cu, top = inputs(lengths, heads, 64)
    g = torch.randn_like(q)

    def run():
        out, saved = flash(q, k, v, cu, top, p, 64 ** -0.5)
        return flash_bwd(g, q, k, v, out, saved, cu, top, p, 64 ** -0.5)

    return run, sum(n * n for n in lengths)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    lens = real_lengths(args.tokenizer, 128, 512, 1)[0]
    anchors, positives = lens[:128], lens[128:]
    total = sum(lens)
    for p in (0.1, 0.0):
        run, _ = call(lens, 12, p)
        for _ in range(3):
            run()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                run()
            torch.cuda.synchronize()
        print(f"\ndropout {p}: kernels over 20 calls ({total} tokens, {len(lens)} sequences, 12 heads)")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8, max_name_column_width=60))
    rows = []
    arrangements = [("stream as trained", lens), ("anchors alone", anchors), ("positives alone", positives)]
    for width in (64, 128, 256, 512):
        arrangements.append((f"equal {width}-token sequences", [width] * (total // width)))
    for p in (0.1, 0.0):
        for name, lengths in arrangements:
            run, scores = call(lengths, 12, p)
            us = graph_ms(run) * 1000
            record(rows, {"dropout": p, "stream": name, "sequences": len(lengths), "tokens": sum(lengths),
                          "scores_M": round(scores * 12 / 1e6, 1), "us": round(us, 1),
                          "ns_per_token": round(us * 1000 / sum(lengths), 1)})
    finish(rows, args.out, [("dropout", "dropout", 7), ("stream", "stream", 28), ("seqs", "sequences", 5),
                            ("tokens", "tokens", 7), ("scores M", "scores_M", 9), ("us", "us", 8),
                            ("ns/token", "ns_per_token", 9)])


if __name__ == "__main__":
    main()
