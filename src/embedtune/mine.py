"""Hard-negative mining: give every (anchor, positive) pair the corpus documents the model ranks
high for the anchor but that are not its positive, filtered against likely false negatives.

The corpus is every distinct positive of the pair file, or the documents of a corpus file (JSON lines
with a "text" field, or plain text with one document per line). Retrieval is exact inner-product
search over normalized embeddings (cosine similarity): torch, chunked over the corpus with a running
top-k per query so memory stays bounded for millions of documents, or FAISS ``IndexFlatIP`` when
it is installed (see ``use_faiss``).

False-negative filters, per row, in rank order:

* the anchor's own positives (every positive of every row with that anchor, compared as text, whitespace aside) are
  removed from the ranking before ranks are counted;
* candidates ranked below ``rank_range[0]`` (0-based) are skipped, and ranking stops at
  ``rank_range[1]`` (exclusive): the closest documents are the likeliest unlabelled positives;
* a candidate must score at most ``positive_score - margin``, where ``positive_score`` is the
  cosine of the anchor with the row's own positive.

The first ``num_negatives`` survivors become ``negative_1..negative_N``; rows with fewer survivors are
dropped (counted in ``skipped_no_candidates``) so the output stays rectangular and
``embedtune.data.load_pairs`` reads it back with ``num_negatives == N``.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from embedtune.data import column, load_pairs
from embedtune.data.readers import decode_data_line, decode_json_line, one_line
from embedtune.data.token_cache import clip_inputs, model_budget
from embedtune.errors import DataError, EmbedtuneError, SaveError
from embedtune.exact_search import MAX_QUERY_BLOCK, SCORE_BUDGET, chunked_topk, search_bar  # chunked_topk: re-exported
from embedtune.files import atomic_file

_OUTPUT_SUFFIXES = (".jsonl", ".ndjson", ".json")  # what load_pairs reads back as JSON lines
_CORPUS_JSONL = (".jsonl", ".ndjson")
_CORPUS_TEXT = (".txt",)
_ROW_BLOCK = 8192  # rows filtered per step: bounds the Python lists made from the top-k tensors


@dataclass
class MineResult:
    """Where the mined pairs went and what happened.

    ``rows`` rows were written to ``path``, each with ``num_negatives`` negatives;
    ``skipped_no_candidates`` input rows were dropped because fewer than ``num_negatives``
    candidates passed the filters. ``stats`` holds mean_positive_score, mean_negative_score,
    rows_written, rows_input, skipped_no_candidates, corpus_size, seconds and the settings used.
    """

    path: Path
    rows: int
    skipped_no_candidates: int
    num_negatives: int
    stats: dict = field(default_factory=dict)


def mine_hard_negatives(
    model,
    data: str | os.PathLike,
    output: str | os.PathLike,
    *,
    corpus: str | os.PathLike | None = None,
    num_negatives: int = 3,
    rank_range: tuple[int, int] = (3, 50),
    margin: float = 0.05,
    batch_size: int = 64,
    chunk_size: int = 50_000,
    use_faiss: bool | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
    query_prompt: str | None = None,
    document_prompt: str | None = None,
    columns: str | dict | None = None,
) -> MineResult:
    """Mine ``num_negatives`` hard negatives per pair of ``data`` with ``model``; write JSON lines to ``output``.

    ``model`` is a loaded SentenceTransformer. ``rank_range=(lo, hi)`` keeps candidates whose 0-based
    rank, after removing the anchor's own positives, is in ``[lo, hi)``. ``use_faiss=None`` uses FAISS
    when it is importable, ``True`` requires it, ``False`` always uses the chunked torch search.
    ``columns`` names the pairs file's columns by role where they are not the usual names
    (`data.readers.column_roles`). ``query_prompt``/``document_prompt`` are prepended to anchors /
    documents, for models trained with prompts. The output file is written atomically; an existing
    one is refused unless ``overwrite``.
    """
    start = time.perf_counter()
    lo, hi = _check_settings(num_negatives, rank_range, margin, batch_size, chunk_size)
    out = _check_output(output, overwrite)
    backend = _pick_backend(use_faiss)

    loaded = load_pairs(data, columns)
    anchors_col = column(loaded.dataset, "anchor")
    positives_col = column(loaded.dataset, "positive")
    # Documents: deduplicated, first-seen order; corpus ids are positions in `docs`.
    if corpus is None:
        docs = list(dict.fromkeys(positives_col))
        corpus_source = os.fspath(data)
    else:
        docs = read_corpus(corpus)
        corpus_source = os.fspath(corpus)
    pairs = _PairIds.build(anchors_col, positives_col, docs)
    emb = _encode_all(model, pairs, docs, batch_size, show_progress, query_prompt, document_prompt)

    # Retrieve enough that removing the anchor's own positives still leaves ranks up to hi - 1.
    k = min(hi + pairs.max_own, len(docs))
    if backend == "faiss":
        top_scores, top_ids = faiss_topk(emb.anchors, emb.docs, k, progress=show_progress)
    else:
        top_scores, top_ids = chunked_topk(emb.anchors, emb.docs, k, chunk_size, progress=show_progress)

    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out, "w", durable=True) as f:  # no output at all unless some row was mined
        counts = _write_mined(f, pairs, emb, top_ids, top_scores, docs, anchors_col, positives_col,
                              num_negatives=num_negatives, rank_range=(lo, hi), margin=margin)
        if counts.written == 0:
            raise DataError(
                f"{os.fspath(data)}: no row got {num_negatives} negatives passing the filters "
                f"(rank_range=({lo}, {hi}), margin={margin}, corpus of {len(docs)} documents); "
                "lower num_negatives or margin, or widen rank_range or the corpus"
            )

    written, skipped = counts.written, counts.skipped
    stats = {
        "mean_positive_score": counts.positive_total / written,
        "mean_negative_score": counts.negative_total / (written * num_negatives),
        "rows_written": written,
        "rows_input": len(anchors_col),
        "rows_skipped_by_loader": loaded.skipped,
        "skipped_no_candidates": skipped,
        "skipped_reason": (
            f"rows dropped: fewer than {num_negatives} candidates passed the rank_range/margin/"
            "own-positive filters"
        ),
        "corpus_size": len(docs),
        "corpus_source": corpus_source,
        "num_negatives": num_negatives,
        "rank_range": [lo, hi],
        "margin": margin,
        "backend": backend,
        "seconds": time.perf_counter() - start,
    }
    return MineResult(path=out, rows=written, skipped_no_candidates=skipped, num_negatives=num_negatives,
                      stats=stats)


# --------------------------------------------------------------------------------------------------
# The steps of mining


@dataclass
class _PairIds:
    """The pair rows as ids, so the filters compare integers, not texts: per row its distinct anchor
    (``row_anchor``) and its positive (``row_positive``: >= 0 a corpus id, < 0 is -(1 + extra id));
    per anchor the corpus ids of all its positives (``own``, removed from its ranking); positives
    missing from the corpus (only with a corpus file: ``extra``, encoded on their own)."""
    anchors: dict[str, int]
    row_anchor: list[int]
    own: list[set[int] | None]
    max_own: int
    extra: dict[str, int]
    row_positive: list[int]

    @classmethod
    def build(cls, anchors_col: list[str], positives_col: list[str], docs: list[str]) -> _PairIds:
        doc_id = {text: i for i, text in enumerate(docs)}
        # a corpus copy of a positive that differs only in whitespace tokenizes alike and scores alike:
        # it is that positive, not a negative
        same_text: dict[str, list[int]] = {}
        for i, text in enumerate(docs):
            same_text.setdefault(" ".join(text.split()), []).append(i)
        anchor_id: dict[str, int] = {}
        row_anchor = [anchor_id.setdefault(a, len(anchor_id)) for a in anchors_col]
        own: list[set[int] | None] = [None] * len(anchor_id)
        for a, p in zip(row_anchor, positives_col):
            cids = same_text.get(" ".join(p.split()))
            if cids:
                if own[a] is None:
                    own[a] = set()
                own[a].update(cids)
        max_own = max((len(s) for s in own if s), default=0)
        extra_id: dict[str, int] = {}
        for p in positives_col:
            if p not in doc_id:
                extra_id.setdefault(p, len(extra_id))
        row_positive = [doc_id[p] if p in doc_id else -1 - extra_id[p] for p in positives_col]
        return cls(anchor_id, row_anchor, own, max_own, extra_id, row_positive)


@dataclass
class _Embeddings:
    anchors: torch.Tensor
    docs: torch.Tensor
    extra: torch.Tensor | None


def _encode_all(model, pairs: _PairIds, docs: list[str], batch_size: int, show_progress: bool,
                query_prompt: str | None, document_prompt: str | None) -> _Embeddings:
    """Anchors, documents and out-of-corpus positives encoded in eval mode (the model's own mode put
    back after, even on error: a model being trained must not stay in eval mode)."""
    encode = _encoder(model, batch_size, show_progress)
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        return _Embeddings(anchors=encode(list(pairs.anchors), query_prompt, "Encoding queries"),
                           docs=encode(docs, document_prompt, "Encoding corpus"),
                           extra=encode(list(pairs.extra), document_prompt, "Encoding positives")
                           if pairs.extra else None)
    finally:
        model.train(was_training)


@dataclass
class _Counts:
    written: int = 0
    skipped: int = 0
    positive_total: float = 0.0
    negative_total: float = 0.0


def _write_mined(f, pairs: _PairIds, emb: _Embeddings, top_ids, top_scores, docs: list[str], anchors_col: list[str],
                 positives_col: list[str], *, num_negatives: int, rank_range: tuple[int, int],
                 margin: float) -> _Counts:
    """Filter every row's candidates and write the rows that keep ``num_negatives`` as JSON lines;
    rows are taken ``_ROW_BLOCK`` at a time so the Python lists made from the top-k tensors stay small."""
    counts = _Counts()
    n_rows = len(anchors_col)
    for r0 in range(0, n_rows, _ROW_BLOCK):
        r1 = min(r0 + _ROW_BLOCK, n_rows)
        a_ids = torch.tensor(pairs.row_anchor[r0:r1], dtype=torch.long)
        pos_scores = _positive_scores(emb.anchors, emb.docs, emb.extra, a_ids, pairs.row_positive[r0:r1]).tolist()
        block_ids = top_ids[a_ids].tolist()
        block_scores = top_scores[a_ids].tolist()
        for j, r in enumerate(range(r0, r1)):
            picked = select_negatives(
                block_ids[j], block_scores[j], pairs.own[pairs.row_anchor[r]] or (), pos_scores[j],
                num_negatives=num_negatives, rank_range=rank_range, margin=margin,
            )
            if picked is None:
                counts.skipped += 1
                continue
            row: dict[str, Any] = {"anchor": anchors_col[r], "positive": positives_col[r]}
            for n, (cid, score) in enumerate(picked, 1):
                row[f"negative_{n}"] = docs[cid]
                counts.negative_total += score
            f.write(json.dumps(row, ensure_ascii=False))
            f.write("\n")
            counts.positive_total += pos_scores[j]
            counts.written += 1
    return counts


# --------------------------------------------------------------------------------------------------
# Filtering


def select_negatives(
    cand_ids, cand_scores, own_ids, positive_score: float, *, num_negatives: int, rank_range: tuple[int, int],
    margin: float,
) -> list[tuple[int, float]] | None:
    """The first ``num_negatives`` (corpus id, score) among ranked candidates passing the filters, or None.

    ``cand_ids``/``cand_scores`` are one query's candidates in descending score order; ``own_ids`` the
    anchor's positives (removed before ranks are counted).
    """
    lo, hi = rank_range
    limit = positive_score - margin
    picked: list[tuple[int, float]] = []
    rank = -1
    for cid, score in zip(cand_ids, cand_scores):
        if cid < 0 or cid in own_ids:  # -1: FAISS pads with -1 when the corpus is short
            continue
        rank += 1
        if rank < lo:
            continue
        if rank >= hi:
            break
        if score <= limit:
            picked.append((cid, score))
            if len(picked) == num_negatives:
                return picked
    return None


def _positive_scores(anchor_emb, doc_emb, extra_emb, a_ids: torch.Tensor, row_positive: list[int]) -> torch.Tensor:
    """Cosine of each row's anchor with its own positive (embeddings are normalized), on the CPU."""
    device = anchor_emb.device
    a_ids = a_ids.to(device)
    pos = torch.tensor(row_positive, dtype=torch.long, device=device)
    in_corpus = pos >= 0
    pos_emb = torch.empty(len(row_positive), anchor_emb.shape[1], dtype=anchor_emb.dtype, device=device)
    pos_emb[in_corpus] = doc_emb[pos[in_corpus]]
    if extra_emb is not None and not bool(in_corpus.all()):
        pos_emb[~in_corpus] = extra_emb[-1 - pos[~in_corpus]]
    return (anchor_emb[a_ids] * pos_emb).sum(dim=1).float().cpu()


# --------------------------------------------------------------------------------------------------
# Search


def faiss_topk(queries: torch.Tensor, corpus: torch.Tensor, k: int,
               progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``k`` inner products with a FAISS ``IndexFlatIP``: (scores, ids), descending, on the CPU."""
    faiss = _import_faiss()
    import numpy as np

    k = min(k, corpus.shape[0])
    index = faiss.IndexFlatIP(corpus.shape[1])
    index.add(np.ascontiguousarray(corpus.float().cpu().numpy()))
    out_scores = torch.empty(queries.shape[0], k, dtype=torch.float32)
    out_ids = torch.empty(queries.shape[0], k, dtype=torch.long)
    if k == 0:
        return out_scores, out_ids
    step = max(1, min(MAX_QUERY_BLOCK, SCORE_BUDGET // max(1, corpus.shape[0])))
    bar = search_bar(math.ceil(queries.shape[0] / step), progress)
    for q0 in range(0, queries.shape[0], step):
        q = np.ascontiguousarray(queries[q0 : q0 + step].float().cpu().numpy())
        scores, ids = index.search(q, k)
        out_scores[q0 : q0 + len(q)] = torch.from_numpy(scores)
        out_ids[q0 : q0 + len(q)] = torch.from_numpy(ids.astype(np.int64))
        bar.update(1)
    bar.close()
    return out_scores, out_ids


def _import_faiss():
    try:
        import faiss
    except ImportError as e:
        raise EmbedtuneError(
            f"use_faiss=True but faiss cannot be imported ({one_line(str(e))}); "
            "install faiss-cpu or faiss-gpu, or mine with use_faiss=False (exact torch search)"
        ) from None
    return faiss


def _pick_backend(use_faiss: bool | None) -> str:
    if use_faiss:
        _import_faiss()
        return "faiss"
    if use_faiss is None:  # FAISS when it imports, else torch
        try:
            _import_faiss()
        except EmbedtuneError:
            return "torch"
        return "faiss"
    return "torch"


ENCODE_CHUNK_BATCHES = 64  # batches per `encode` call: its own length sorting works within a chunk


def _encoder(model, batch_size: int, show_progress: bool):
    """`encode(texts, prompt, label)`: normalized embeddings, under a bar named by what it encodes
    (sentence-transformers' own bar would say only "Batches")."""
    from tqdm.auto import tqdm

    budget = model_budget(model)  # huge texts cut to what max_seq_length can use, before the tokenizer

    def encode(texts: list[str], prompt: str | None, label: str) -> torch.Tensor:
        kwargs = {"prompt": prompt} if prompt else {}
        step = max(1, batch_size * ENCODE_CHUNK_BATCHES)
        parts = []
        with tqdm(total=len(texts), desc=label, unit="text", disable=not show_progress) as bar:
            for start in range(0, len(texts), step):
                chunk = clip_inputs(texts[start:start + step], budget)
                parts.append(model.encode(chunk, normalize_embeddings=True, convert_to_tensor=True,
                                          batch_size=batch_size, show_progress_bar=False, **kwargs).float())
                bar.update(len(chunk))
        if not parts:
            return model.encode([], normalize_embeddings=True, convert_to_tensor=True, show_progress_bar=False,
                                **kwargs).float()
        return torch.cat(parts)

    return encode


# --------------------------------------------------------------------------------------------------
# Inputs and output


def read_corpus(path: str | os.PathLike) -> list[str]:
    """Distinct documents of a corpus file, in first-seen order.

    ``.jsonl``/``.ndjson``: one JSON object per line with a non-empty string "text"; ``.txt``: one
    document per line. Blank lines are ignored; any other bad line raises a DataError naming file:line.
    """
    name = os.fspath(path)
    p = Path(name)
    suffix = p.suffix.lower()
    if not p.exists():
        raise DataError(f"{name}: no such file or directory")
    if p.is_dir():
        raise DataError(f"{name}: is a folder; the corpus must be a .jsonl file with a \"text\" field or a .txt file")
    if suffix not in _CORPUS_JSONL + _CORPUS_TEXT:
        raise DataError(
            f"{name}: unsupported corpus format '{p.suffix or '(no extension)'}'; use .jsonl (one "
            '{"text": ...} object per line) or .txt (one document per line)'
        )
    jsonl = suffix in _CORPUS_JSONL
    docs: dict[str, None] = {}
    try:
        with p.open("rb") as f:
            for lineno, raw in enumerate(f, 1):
                text = decode_data_line(name, raw, lineno)
                if not text.strip():
                    continue
                if jsonl:
                    text = _corpus_json_line(name, lineno, text)
                else:
                    text = text.rstrip("\r\n")
                docs.setdefault(text)
    except OSError as e:
        raise DataError(f"{name}: cannot read: {one_line(e.strerror or str(e))}") from None
    if not docs:
        raise DataError(f"{name}: corpus file holds no documents")
    return list(docs)


def _corpus_json_line(name: str, lineno: int, line: str) -> str:
    value = decode_json_line(name, lineno, line)
    if not isinstance(value, dict):
        raise DataError(f"{name}:{lineno}: expected a JSON object with a \"text\" field")
    if "text" not in value:
        keys = ", ".join(map(str, list(value)[:10])) or "none"
        raise DataError(f"{name}:{lineno}: missing \"text\" field (found keys: {one_line(keys)})")
    text = value["text"]
    if type(text) is not str or not text.strip():
        raise DataError(f"{name}:{lineno}: \"text\" must be a non-empty string")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(f"{name}:{lineno}: invalid text: an unpaired UTF-16 surrogate escape") from None
    return text


def _check_output(output: str | os.PathLike, overwrite: bool) -> Path:
    out = Path(output)
    if out.is_dir():
        raise SaveError(f"{out}: is a folder; give a .jsonl file path")
    if out.suffix.lower() not in _OUTPUT_SUFFIXES:
        raise SaveError(f"{out}: the mined pairs are JSON lines; name the output file .jsonl")
    if out.exists() and not overwrite:
        raise SaveError(f"{out}: file exists; pass overwrite=True (CLI: --overwrite)")
    return out


def check_mine_options(num_negatives, rank_range, margin, batch_size, output, overwrite) -> None:
    """The settings and the output file checked up front, so a caller can refuse them before it loads a model."""
    _check_settings(num_negatives, rank_range, margin, batch_size, 1)
    _check_output(output, overwrite)


def _check_settings(num_negatives, rank_range, margin, batch_size, chunk_size) -> tuple[int, int]:
    if isinstance(num_negatives, bool) or not isinstance(num_negatives, int) or num_negatives < 1:
        raise EmbedtuneError(f"num_negatives must be a whole number of at least 1, got {num_negatives!r}")
    try:
        lo, hi = (int(x) for x in rank_range)
    except (TypeError, ValueError):
        raise EmbedtuneError(f"rank_range must be two whole numbers (lo, hi), got {rank_range!r}") from None
    if lo < 0 or hi <= lo:
        raise EmbedtuneError(f"rank_range must satisfy 0 <= lo < hi, got ({lo}, {hi})")
    if hi - lo < num_negatives:
        raise EmbedtuneError(
            f"rank_range ({lo}, {hi}) holds only {hi - lo} ranks, fewer than num_negatives={num_negatives}"
        )
    if not isinstance(margin, (int, float)) or isinstance(margin, bool) or not math.isfinite(margin):
        raise EmbedtuneError(f"margin must be a finite number, got {margin!r}")
    if batch_size < 1:
        raise EmbedtuneError(f"batch_size must be at least 1, got {batch_size}")
    if chunk_size < 1:
        raise EmbedtuneError(f"chunk_size must be at least 1, got {chunk_size}")
    return lo, hi
