"""Exact top-k inner-product search, bounded in memory: what mining (`mine`) and evaluation
(`retrieval`) share.

A leaf module (torch only): one (query block x corpus chunk) score matrix at a time, merged into a
running top-k per query, so neither the corpus scores nor a full score matrix is ever held.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from .errors import EmbedtuneError

SCORE_BUDGET = 1 << 26  # floats in one (query block x corpus chunk) score matrix: 256 MiB in fp32
MAX_QUERY_BLOCK = 4096


def chunked_topk(
    queries: torch.Tensor, corpus: torch.Tensor, k: int, chunk_size: int = 50_000, query_block: int | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``k`` inner products of each query against ``corpus``: (scores, ids), descending, on the CPU.

    Scores one (query block x corpus chunk) matrix at a time and merges each chunk's top-k into a
    running top-k, so peak memory is bounded by ``query_block * chunk_size`` scores, not the corpus.
    ``k`` is clamped to the corpus size. ``progress`` shows a bar over the (query block, chunk) pairs.
    """
    if chunk_size < 1:
        raise EmbedtuneError(f"chunk_size must be at least 1, got {chunk_size}")
    n_q, n_c = queries.shape[0], corpus.shape[0]
    k = min(k, n_c)
    out_scores = torch.empty(n_q, k, dtype=torch.float32)
    out_ids = torch.empty(n_q, k, dtype=torch.long)
    if n_q == 0 or k == 0:
        return out_scores, out_ids
    if query_block is None:
        query_block = max(1, min(MAX_QUERY_BLOCK, SCORE_BUDGET // min(chunk_size, n_c)))
    corpus = corpus.to(queries.device, queries.dtype)
    bar = search_bar(math.ceil(n_q / query_block) * math.ceil(n_c / chunk_size), progress)
    for q0 in range(0, n_q, query_block):
        q = queries[q0 : q0 + query_block]
        best_scores = best_ids = None
        for c0 in range(0, n_c, chunk_size):
            bar.update(1)
            scores = q @ corpus[c0 : c0 + chunk_size].T
            s, i = scores.topk(min(k, scores.shape[1]), dim=1)
            i += c0
            if best_scores is None:
                best_scores, best_ids = s, i
            else:
                merged_s = torch.cat([best_scores, s], dim=1)
                merged_i = torch.cat([best_ids, i], dim=1)
                best_scores, order = merged_s.topk(min(k, merged_s.shape[1]), dim=1)
                best_ids = merged_i.gather(1, order)
        out_scores[q0 : q0 + len(q)] = best_scores.float().cpu()
        out_ids[q0 : q0 + len(q)] = best_ids.cpu()
    bar.close()
    return out_scores, out_ids


def search_bar(total: int, show: bool):
    """A progress bar over search steps, shown only when `show`."""
    return tqdm(total=total, desc="Searching", unit="block", disable=not show)
