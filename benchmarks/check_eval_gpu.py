"""`embedtune eval`'s search on a GPU: exact top-100 over 1M documents in bounded memory.

Streams a 1M x 384 normalized corpus in chunks of 32,768 through `retrieval.streaming_topk` and
compares the result with one full matrix product; prints the extra GPU memory of each.

    python benchmarks/check_eval_gpu.py
"""

from __future__ import annotations

import time

import torch

from embedtune.retrieval import streaming_topk

QUERIES, DOCS, DIM, CHUNK, K = 2000, 1_000_000, 384, 32768, 100


def corpus_chunks(device: str):
    for start in range(0, DOCS, CHUNK):
        gen = torch.Generator(device=device).manual_seed(1000 + start)
        rows = min(CHUNK, DOCS - start)
        yield torch.nn.functional.normalize(torch.randn(rows, DIM, device=device, generator=gen), dim=1)


def main() -> None:
    device = "cuda"
    gen = torch.Generator(device=device).manual_seed(0)
    queries = torch.nn.functional.normalize(torch.randn(QUERIES, DIM, device=device, generator=gen), dim=1)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    start = time.time()
    scores, ids = streaming_topk(queries, corpus_chunks(device), K)
    torch.cuda.synchronize()
    print(f"{torch.cuda.get_device_name()}: streaming top-{K} over {DOCS:,} docs in {time.time() - start:.2f} s, "
          f"peak extra {(torch.cuda.max_memory_allocated() - base) / 2**20:.0f} MiB")
    full = torch.cat(list(corpus_chunks(device)))
    full_scores, full_ids = (queries @ full.T).topk(K, dim=1)
    print(f"corpus embeddings alone: {full.numel() * 4 / 2**20:.0f} MiB")
    mismatched = (ids != full_ids.cpu()).any(dim=1).sum().item()
    print(f"rows whose ids differ from the full search: {mismatched} of {QUERIES} "
          f"(max score difference {(scores - full_scores.cpu()).abs().max().item():.2e}; ties can swap ids)")


if __name__ == "__main__":
    main()
