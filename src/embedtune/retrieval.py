"""Exact retrieval evaluation with graded relevance, bounded in memory for million-document corpora.

The corpus is encoded chunk by chunk (normalized embeddings, the model's query/document prompts);
each chunk is searched at once with `embedtune.exact_search.chunked_topk` on the model's device (GPU or CPU)
and merged into a running exact top-100 per query, so neither the corpus embeddings nor a full score
matrix is ever held: peak memory is one chunk's embeddings plus ``queries x 100`` results.

Metrics follow trec_eval (as BEIR reports them through pytrec_eval), per query then averaged over
the queries that have at least one relevant document (grade > 0):

* nDCG@10: gain = grade, discount log2(rank + 1), ideal DCG from the query's judged grades;
* MRR@10: 1 / rank of the first relevant document in the top 10, else 0;
* Recall@k: relevant documents in the top k / all relevant documents;
* MAP@100: sum of precision@rank at each relevant document in the top 100 / all relevant documents.

sentence-transformers' InformationRetrievalEvaluator (used during training) is binary; it divides
MAP@k by min(k, relevant) instead, which only differs for queries with more than k relevant documents.
As BEIR does, a document whose id equals the query's id is never counted as retrieved for it
(``ignore_identical_ids``), which matters for data sets such as ArguAna and Quora.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from embedtune import distributed
from embedtune.data import column, is_beir_folder, load_pairs, read_beir
from embedtune.data.pairs_task import pairs_to_ir_task
from embedtune.data.token_cache import clip_inputs, model_budget
from embedtune.errors import DataError, EmbedtuneError, SaveError
from embedtune.exact_search import chunked_topk
from embedtune.files import write_text_atomic
from embedtune.ir_task import IRTask

RETRIEVAL_METRICS = ("ndcg@10", "mrr@10", "recall@1", "recall@10", "recall@100", "map@100")
TOP_K = 100  # the deepest cut any reported metric needs
DEFAULT_CHUNK_SIZE = 32_768  # documents encoded and searched at once


# --------------------------------------------------------------------------------------------------
# Metrics for one query: `ranked` is the retrieved document ids, best first; `grades` the judgements.


def ndcg_at_k(ranked: Sequence[str], grades: Mapping[str, int], k: int) -> float:
    """nDCG@k with gain = grade (trec_eval's ndcg_cut); 0 when the query has no relevant document."""
    ideal_gains = sorted((g for g in grades.values() if g > 0), reverse=True)[:k]
    ideal = sum(g / math.log2(rank + 2) for rank, g in enumerate(ideal_gains))
    if ideal == 0:
        return 0.0
    dcg = sum(max(grades.get(doc, 0), 0) / math.log2(rank + 2) for rank, doc in enumerate(ranked[:k]))
    return dcg / ideal


def reciprocal_rank_at_k(ranked: Sequence[str], grades: Mapping[str, int], k: int) -> float:
    """1 / (1-based rank) of the first relevant document within the top k, else 0."""
    for rank, doc in enumerate(ranked[:k]):
        if grades.get(doc, 0) > 0:
            return 1.0 / (rank + 1)
    return 0.0


def recall_at_k(ranked: Sequence[str], grades: Mapping[str, int], k: int) -> float:
    """Fraction of the query's relevant documents found in the top k."""
    relevant = sum(1 for g in grades.values() if g > 0)
    if relevant == 0:
        return 0.0
    return sum(1 for doc in ranked[:k] if grades.get(doc, 0) > 0) / relevant


def average_precision_at_k(ranked: Sequence[str], grades: Mapping[str, int], k: int) -> float:
    """trec_eval's map_cut: precision at each relevant hit in the top k, summed, over all relevant documents."""
    relevant = sum(1 for g in grades.values() if g > 0)
    if relevant == 0:
        return 0.0
    hits = 0
    total = 0.0
    for rank, doc in enumerate(ranked[:k]):
        if grades.get(doc, 0) > 0:
            hits += 1
            total += hits / (rank + 1)
    return total / relevant


def ir_metrics(rankings: Mapping[str, Sequence[str]], grades: Mapping[str, Mapping[str, int]]) -> dict[str, float]:
    """The six reported metrics, averaged over the queries of ``grades`` with a relevant document.

    A query missing from ``rankings`` counts as retrieving nothing.
    """
    judged = [qid for qid, g in grades.items() if any(v > 0 for v in g.values())]
    if not judged:
        raise EmbedtuneError("no query has a relevant document (grade > 0): nothing to evaluate")
    sums = dict.fromkeys(RETRIEVAL_METRICS, 0.0)
    for qid in judged:
        ranked, g = rankings.get(qid, ()), grades[qid]
        sums["ndcg@10"] += ndcg_at_k(ranked, g, 10)
        sums["mrr@10"] += reciprocal_rank_at_k(ranked, g, 10)
        sums["recall@1"] += recall_at_k(ranked, g, 1)
        sums["recall@10"] += recall_at_k(ranked, g, 10)
        sums["recall@100"] += recall_at_k(ranked, g, 100)
        sums["map@100"] += average_precision_at_k(ranked, g, 100)
    return {name: total / len(judged) for name, total in sums.items()}


# --------------------------------------------------------------------------------------------------
# Search


def streaming_topk(queries: torch.Tensor, corpus_chunks: Iterable[torch.Tensor], k: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``k`` inner products over a corpus given as consecutive chunks: (scores, ids) on the CPU.

    Each chunk is searched with `chunked_topk` and merged into the running top-k, so only one chunk
    is held at a time. Ids are positions in the concatenated corpus; rows are sorted descending. When
    the corpus has fewer than ``k`` documents the result has as many columns as documents.
    """
    best_scores = torch.empty(queries.shape[0], 0, dtype=torch.float32)
    best_ids = torch.empty(queries.shape[0], 0, dtype=torch.long)
    offset = 0
    for chunk in corpus_chunks:
        scores, ids = chunked_topk(queries, chunk, k, chunk_size=max(1, chunk.shape[0]))
        merged_scores = torch.cat([best_scores, scores], dim=1)
        merged_ids = torch.cat([best_ids, ids + offset], dim=1)
        best_scores, order = merged_scores.topk(min(k, merged_scores.shape[1]), dim=1)
        best_ids = merged_ids.gather(1, order)
        offset += chunk.shape[0]
    return best_scores, best_ids


def model_prompts(st_model) -> tuple[str | None, str | None]:
    """The model's own (query, document) prompts, looked up as `encode_query`/`encode_document` do."""
    prompts = getattr(st_model, "prompts", None) or {}
    document = next((prompts[n] for n in ("document", "passage", "corpus") if prompts.get(n)), None)
    return prompts.get("query") or None, document


def _encoded_chunks(st_model, texts: Sequence[str], prompt: str | None, batch_size: int, chunk_size: int,
                    progress) -> Iterator[torch.Tensor]:
    """Normalized float32 embeddings of ``texts``, ``chunk_size`` at a time, on the model's device.

    Under torch.distributed (DDP) every rank encodes its share of each chunk and the shares are
    gathered, so evaluation is split across the GPUs and every rank gets the same embeddings.
    """
    kwargs = {"prompt": prompt} if prompt else {}
    rank, world = (distributed.rank(), distributed.world_size()) if shard_across_ranks(st_model) else (0, 1)
    budget = model_budget(st_model)  # huge texts cut to what max_seq_length can use, before the tokenizer
    for start in range(0, len(texts), chunk_size):
        batch = list(texts[start : start + chunk_size])
        mine = clip_inputs(batch[rank::world], budget)
        emb = st_model.encode(mine, batch_size=batch_size, normalize_embeddings=True, convert_to_tensor=True,
                              show_progress_bar=False, **kwargs).float()
        if world > 1:
            emb = distributed.gather_rows(emb.reshape(len(mine), -1), len(batch))
        progress.update(len(batch))
        yield emb


def shard_across_ranks(st_model) -> bool:
    """Split encoding over ranks when a process group is up and every rank is evaluating.

    sentence-transformers >= 6.2 shares evaluation inside its trainer its own way: rank 0 runs the
    evaluator and its `encode` farms batches out to the other ranks, which only serve. Then we
    must not shard (the other ranks never reach our gather). Nor under FSDP: every forward there is
    a collective, so all ranks must run the same batches.
    """
    from .sharding import is_sharded  # heavy: sharding pulls peft and transformers, needed only when evaluating

    if getattr(st_model, "_distributed_inference", None) is not None or is_sharded(st_model):
        return False
    return distributed.initialized() and distributed.world_size() > 1


def search(st_model, queries: Sequence[str], corpus: Sequence[str], k: int = TOP_K, *, batch_size: int = 64,
           chunk_size: int = DEFAULT_CHUNK_SIZE, query_prompt: str | None = None,
           document_prompt: str | None = None, show_progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact cosine top-``k`` of every query over ``corpus``: (scores, corpus positions), on the CPU.

    Prompts are used as given (None: no prompt). Encoding and search run on the model's device.
    """
    from tqdm.auto import tqdm

    if batch_size < 1 or chunk_size < 1:
        raise EmbedtuneError(f"batch size and chunk size must be at least 1, got {batch_size} and {chunk_size}")
    with tqdm(total=len(queries), desc="Encoding queries", unit="query", disable=not show_progress) as bar:
        query_emb = torch.cat(list(_encoded_chunks(st_model, queries, query_prompt, batch_size, chunk_size, bar)))
    with tqdm(total=len(corpus), desc="Encoding + searching corpus", unit="doc", disable=not show_progress) as bar:
        chunks = _encoded_chunks(st_model, corpus, document_prompt, batch_size, chunk_size, bar)
        return streaming_topk(query_emb, chunks, k)


def evaluate_retrieval(st_model, task: IRTask, *, batch_size: int = 64, chunk_size: int = DEFAULT_CHUNK_SIZE,
                       query_prompt: str | None = None, document_prompt: str | None = None,
                       show_progress: bool = False, ignore_identical_ids: bool = True) -> dict[str, float]:
    """nDCG@10, MRR@10, Recall@1/10/100 and MAP@100 of ``st_model`` on ``task`` (graded when it has grades).

    ``query_prompt``/``document_prompt`` None use the model's own prompts (``""`` forces none). The
    model runs in eval mode and its train/eval mode is restored afterwards.
    """
    own_query, own_document = model_prompts(st_model)
    query_prompt = own_query if query_prompt is None else query_prompt
    document_prompt = own_document if document_prompt is None else document_prompt
    grades = task.grades()
    query_ids = [qid for qid in task.queries if qid in grades]
    doc_ids = list(task.corpus)
    if not query_ids or not doc_ids:
        raise EmbedtuneError(f"nothing to evaluate: {len(query_ids)} judged queries, {len(doc_ids)} documents")
    position = {did: i for i, did in enumerate(doc_ids)} if ignore_identical_ids else {}
    exclude = [position.get(qid, -1) for qid in query_ids]
    extra = 1 if any(e >= 0 for e in exclude) else 0  # one more, so dropping the query itself leaves k

    was_training = st_model.training
    st_model.eval()
    try:
        scores, ids = search(st_model, [task.queries[q] for q in query_ids], [task.corpus[d] for d in doc_ids],
                             TOP_K + extra, batch_size=batch_size, chunk_size=chunk_size, query_prompt=query_prompt,
                             document_prompt=document_prompt, show_progress=show_progress)
    finally:
        st_model.train(was_training)
    if extra:
        own = ids == torch.tensor(exclude, dtype=torch.long).unsqueeze(1)
        scores = scores.masked_fill(own, float("-inf"))
        scores, order = scores.topk(min(TOP_K, scores.shape[1]), dim=1)
        ids = ids.gather(1, order).masked_fill(scores == float("-inf"), -1)
    rankings = {qid: [doc_ids[i] for i in row if i >= 0] for qid, row in zip(query_ids, ids.tolist())}
    return ir_metrics(rankings, {qid: grades[qid] for qid in query_ids})


# --------------------------------------------------------------------------------------------------
# What `embedtune eval` needs around it: the data, the device, the report file.


@dataclass
class EvalData:
    """An IR task read from a pairs file or a BEIR folder, and lines worth telling the user about it."""

    task: IRTask
    kind: str  # "pairs" or "beir"
    split: str | None = None
    notes: list[str] = field(default_factory=list)


def load_eval_task(data: str | os.PathLike, split: str | None = None, keep_identical_ids: bool = False,
                   columns: str | dict | None = None) -> EvalData:
    """A BEIR folder (holding corpus.jsonl, queries.jsonl or qrels/) or a pairs file, as an IR task.

    For pairs every anchor must find its positives among all distinct positives (as in training);
    ``columns`` names a pairs file's columns by role (`data.readers.column_roles`).
    """
    if is_beir_folder(data):
        if columns:
            raise DataError(f"{os.fspath(data)}: --columns applies to pairs files; this is a BEIR folder")
        loaded = read_beir(data, split, keep_identical_ids=keep_identical_ids)
        return EvalData(task=loaded.task, kind="beir", split=loaded.split, notes=loaded.notes())
    if split is not None:
        raise DataError(f"{os.fspath(data)}: --split applies to BEIR folders (corpus.jsonl, queries.jsonl, "
                        "qrels/<split>.tsv); this is a pairs file")
    loaded = load_pairs(data, columns)
    notes = [loaded.skipped_summary()] if loaded.skipped or loaded.skipped_few_negatives else []
    if loaded.label_column is not None:  # graded pairs (STS-style) are not retrieval judgements
        notes.append(f"the {loaded.label_column!r} column is not used: every anchor's positive counts as relevant, "
                     "whatever its score")
    task = pairs_to_ir_task(loaded.dataset, corpus_texts=column(loaded.dataset, "positive"))
    return EvalData(task=task, kind="pairs", notes=notes)


def resolve_device(device: str | None) -> str:
    """``device`` checked against this machine; None picks cuda when available, else cpu."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise EmbedtuneError(f"--device {device!r}: not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise EmbedtuneError(f"--device {device}: CUDA is not available here; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise EmbedtuneError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise EmbedtuneError(f"--device {device}: MPS is not available here; use --device cpu")
    elif dev.type != "cpu":
        raise EmbedtuneError(f"--device {device}: unsupported device type; use cpu, cuda or cuda:N")
    return str(dev)


def check_report_path(path: str | os.PathLike) -> Path:
    """Refuse a report path that can't be written, before any (slow) evaluation runs."""
    out = Path(path)
    if out.is_dir():
        raise SaveError(f"{out}: is a folder; give a .json file path")
    if out.suffix.lower() != ".json":
        raise SaveError(f"{out}: the metrics report is JSON; name the file .json")
    if out.parent.exists() and not out.parent.is_dir():
        raise SaveError(f"{out.parent}: not a folder")
    return out


def write_report(path: str | os.PathLike, report: dict) -> Path:
    """Write ``report`` as JSON, atomically (a temp file renamed into place); replaces an existing file."""
    out = check_report_path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return out
