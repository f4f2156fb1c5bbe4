"""Hard-negative mining (embedtune.mine) with the real bundled MiniLM on stdlib docstring -> code pairs."""

from __future__ import annotations

import json
import sys

import pytest
import torch

import embedtune
from embedtune.data import build_stdlib_pairs, column, load_pairs, write_jsonl
from embedtune.errors import DataError, EmbedtuneError, SaveError
from embedtune.loading import DEFAULT_MODEL_ID
from embedtune.mine import _pick_backend, chunked_topk, mine_hard_negatives, read_corpus, select_negatives

N = 3
RANK_RANGE = (3, 50)
MARGIN = 0.05


@pytest.fixture(scope="module")
def st_model():
    model, tok = embedtune.FastModel.from_pretrained(DEFAULT_MODEL_ID, max_seq_length=64, device="cpu")
    return embedtune.to_sentence_transformer(model, tok)


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    return write_jsonl(build_stdlib_pairs(max_pairs=150, seed=3), tmp_path_factory.mktemp("mine") / "pairs.jsonl")


@pytest.fixture(scope="module")
def mined(st_model, pairs_file):
    out = pairs_file.parent / "mined.jsonl"
    result = mine_hard_negatives(st_model, pairs_file, out, num_negatives=N, rank_range=RANK_RANGE, margin=MARGIN,
                                 chunk_size=16, show_progress=False)
    return result


def _encode(model, texts):
    return model.encode(texts, normalize_embeddings=True, convert_to_tensor=True, batch_size=64,
                        show_progress_bar=False).float().cpu()


def test_mined_file_loads_back_rectangular(mined, pairs_file):
    loaded = load_pairs(mined.path)
    assert loaded.num_negatives == N == mined.num_negatives
    assert loaded.skipped == 0
    assert len(loaded.dataset) == mined.rows > 0
    assert mined.rows + mined.skipped_no_candidates == len(load_pairs(pairs_file).dataset)
    stats = mined.stats
    assert stats["rows_written"] == mined.rows and stats["skipped_no_candidates"] == mined.skipped_no_candidates
    assert stats["corpus_size"] == 150 and stats["backend"] in ("torch", "faiss") and stats["seconds"] > 0
    assert stats["mean_negative_score"] < stats["mean_positive_score"] - MARGIN
    # No temp file left behind next to the output.
    assert sorted(p.name for p in mined.path.parent.iterdir()) == ["mined.jsonl", "pairs.jsonl"]


def test_mined_negatives_respect_filters(mined, pairs_file, st_model):
    """Recompute every score with the model and rank against a brute-force full ranking."""
    source = load_pairs(pairs_file).dataset
    corpus = list(dict.fromkeys(column(source, "positive")))
    doc_id = {t: i for i, t in enumerate(corpus)}
    own: dict[str, set[int]] = {}
    for a, p in zip(column(source, "anchor"), column(source, "positive")):
        own.setdefault(a, set()).add(doc_id[p])

    ds = load_pairs(mined.path).dataset
    anchors, positives = column(ds, "anchor"), column(ds, "positive")
    negatives = [column(ds, f"negative_{n}") for n in range(1, N + 1)]
    a_emb, c_emb = _encode(st_model, anchors), _encode(st_model, corpus)
    full = a_emb @ c_emb.T  # brute force: every anchor against every document
    order = full.argsort(dim=1, descending=True).tolist()

    pos_scores, neg_scores = [], []
    for r, (anchor, positive) in enumerate(zip(anchors, positives)):
        pos_score = full[r, doc_id[positive]].item()
        ranking = [c for c in order[r] if c not in own[anchor]]  # own positives removed before ranking
        pos_scores.append(pos_score)
        for n in range(N):
            neg = negatives[n][r]
            assert neg != positive and doc_id[neg] not in own[anchor]
            score = full[r, doc_id[neg]].item()
            neg_scores.append(score)
            assert score <= pos_score - MARGIN + 1e-4, (r, n, score, pos_score)
            rank = ranking.index(doc_id[neg])
            assert RANK_RANGE[0] <= rank < RANK_RANGE[1], (r, n, rank)
        ranks = [ranking.index(doc_id[negatives[n][r]]) for n in range(N)]
        assert ranks == sorted(ranks)  # negative_1 is the hardest
        # Nothing eligible was passed over: every skipped rank in [lo, first pick) failed the margin.
        for c in ranking[RANK_RANGE[0] : ranks[-1]]:
            if c not in {doc_id[negatives[n][r]] for n in range(N)}:
                assert full[r, c].item() > pos_score - MARGIN - 1e-4
    assert abs(sum(pos_scores) / len(pos_scores) - mined.stats["mean_positive_score"]) < 1e-4
    assert abs(sum(neg_scores) / len(neg_scores) - mined.stats["mean_negative_score"]) < 1e-4


@pytest.mark.parametrize("shape", [(37, 101, 10), (5, 6, 10), (1, 50, 50), (64, 7, 3)])
def test_chunked_topk_equals_brute_force(shape):
    n_q, n_c, k = shape
    g = torch.Generator().manual_seed(n_q * 1000 + n_c)
    q = torch.nn.functional.normalize(torch.randn(n_q, 16, generator=g), dim=1)
    c = torch.nn.functional.normalize(torch.randn(n_c, 16, generator=g), dim=1)
    want_s, want_i = (q @ c.T).topk(min(k, n_c), dim=1)
    for chunk, block in [(7, 5), (7, None), (1, 3), (1000, None)]:
        got_s, got_i = chunked_topk(q, c, k, chunk_size=chunk, query_block=block)
        assert torch.equal(got_i, want_i), (chunk, block)
        torch.testing.assert_close(got_s, want_s)


def test_select_negatives_rank_and_margin():
    ids = [10, 11, 12, 13, 14, 15, 16]
    scores = [0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4]
    # Own positive 11 is removed before ranking: ranks are 10:0 12:1 13:2 14:3 15:4 16:5.
    pick = select_negatives(ids, scores, {11}, 0.8, num_negatives=2, rank_range=(1, 6), margin=0.15)
    assert pick == [(14, 0.6), (15, 0.5)]  # 12 (0.8) and 13 (0.7) fail the margin: > 0.65
    assert select_negatives(ids, scores, {11}, 0.8, num_negatives=3, rank_range=(1, 5), margin=0.15) is None


def test_corpus_file_and_skipped_rows(st_model, pairs_file, tmp_path):
    pairs = [json.loads(line) for line in pairs_file.read_text(encoding="utf-8").splitlines()]
    docs = [p["positive"] for p in pairs[:30]] + ["def unrelated():\n    return 42"]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)) + "\n",
                      encoding="utf-8")
    small = write_jsonl(pairs[:15], tmp_path / "small.jsonl")
    result = mine_hard_negatives(st_model, small, tmp_path / "out.jsonl", corpus=corpus, num_negatives=2,
                                 rank_range=(0, 10), margin=0.0, use_faiss=False, show_progress=False)
    assert result.stats["corpus_size"] == len(docs) and result.rows + result.skipped_no_candidates == 15
    ds = load_pairs(result.path).dataset
    for name in ("negative_1", "negative_2"):
        assert set(column(ds, name)) <= set(docs)
    assert all(p != n for p, n in zip(column(ds, "positive"), column(ds, "negative_1")))
    # A corpus copy of a positive that differs only in whitespace is that positive, never its negative.
    spaced = tmp_path / "spaced.jsonl"
    spaced.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs + [d + " " for d in docs[:15]]),
                      encoding="utf-8")
    result = mine_hard_negatives(st_model, small, tmp_path / "spaced_out.jsonl", corpus=spaced, num_negatives=2,
                                 rank_range=(0, 10), margin=0.0, use_faiss=False, show_progress=False)
    for row in load_pairs(result.path).dataset:
        assert row["positive"].strip() not in (row["negative_1"].strip(), row["negative_2"].strip()), row
    # Rows whose positive is missing from the corpus still get a positive score and negatives.
    far = write_jsonl(pairs[100:104], tmp_path / "far.jsonl")
    far_result = mine_hard_negatives(st_model, far, tmp_path / "far_out.jsonl", corpus=corpus, num_negatives=1,
                                     rank_range=(0, 20), margin=-1.0, use_faiss=False, show_progress=False)
    assert far_result.rows == 4 and far_result.skipped_no_candidates == 0
    # A margin no candidate can pass: every row is dropped, and nothing is written.
    with pytest.raises(DataError, match="no row got 1 negatives"):
        mine_hard_negatives(st_model, far, tmp_path / "none.jsonl", corpus=corpus, num_negatives=1,
                            margin=2.0, rank_range=(0, 10), use_faiss=False, show_progress=False)
    assert not (tmp_path / "none.jsonl").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_txt_corpus(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_bytes(b"first doc\r\n\nsecond doc\nfirst doc\n  \nthird\n")
    assert read_corpus(path) == ["first doc", "second doc", "third"]


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"text": "ok"}', '{"text": "fine"', '{"text": "x"}'], r"corpus\.jsonl:2: invalid JSON"),
        (['{"text": "ok"}', "", '["a"]'], r"corpus\.jsonl:3: expected a JSON object"),
        (['{"body": "ok"}'], r"corpus\.jsonl:1: missing \"text\" field"),
        (['{"text": "ok"}', '{"text": 5}'], r"corpus\.jsonl:2: \"text\" must be a non-empty string"),
    ],
)
def test_bad_corpus_line_names_file_and_line(st_model, pairs_file, tmp_path, lines, message):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=message) as info:
        mine_hard_negatives(st_model, pairs_file, tmp_path / "out.jsonl", corpus=corpus, show_progress=False)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out.jsonl").exists()


def test_bad_corpus_files(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"ok\n\xff\xfe\n")
    with pytest.raises(DataError, match=r"bad\.txt:2: invalid UTF-8"):
        read_corpus(tmp_path / "bad.txt")
    (tmp_path / "c.csv").write_text("text\nx\n")
    with pytest.raises(DataError, match="unsupported corpus format"):
        read_corpus(tmp_path / "c.csv")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="no documents"):
        read_corpus(tmp_path / "empty.jsonl")
    with pytest.raises(DataError, match="no such file"):
        read_corpus(tmp_path / "missing.jsonl")


def test_existing_output_refused_without_overwrite(st_model, pairs_file, tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text("keep me\n")
    with pytest.raises(SaveError, match="exists.*overwrite"):
        mine_hard_negatives(st_model, pairs_file, out, show_progress=False)
    assert out.read_text() == "keep me\n"
    small = write_jsonl(build_stdlib_pairs(max_pairs=12, seed=5), tmp_path / "small.jsonl")
    result = mine_hard_negatives(st_model, small, out, num_negatives=1, rank_range=(1, 10), margin=-1.0,
                                 overwrite=True, use_faiss=False, show_progress=False)
    assert result.rows > 0 and load_pairs(out).num_negatives == 1
    with pytest.raises(SaveError, match="is a folder"):
        mine_hard_negatives(st_model, pairs_file, tmp_path, show_progress=False)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_negatives=0), "num_negatives"),
        (dict(rank_range=(5, 5)), "0 <= lo < hi"),
        (dict(rank_range=(0, 2), num_negatives=3), "fewer than num_negatives"),
        (dict(margin=float("nan")), "margin"),
        (dict(chunk_size=0), "chunk_size"),
    ],
)
def test_bad_settings(pairs_file, tmp_path, kwargs, message):
    with pytest.raises(EmbedtuneError, match=message):
        mine_hard_negatives(None, pairs_file, tmp_path / "out.jsonl", show_progress=False, **kwargs)


def test_use_faiss_missing_is_one_line_error(monkeypatch, pairs_file, tmp_path):
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    with pytest.raises(EmbedtuneError, match="use_faiss=True but faiss cannot be imported") as info:
        mine_hard_negatives(None, pairs_file, tmp_path / "out.jsonl", use_faiss=True, show_progress=False)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out.jsonl").exists()
    assert _pick_backend(None) == "torch" and _pick_backend(False) == "torch"  # auto falls back


def test_cli_mine_uses_the_models_passage_prompt(tmp_path, monkeypatch):
    """A model whose document prompt is saved under "passage" (or "corpus"), as e5-style models keep it and
    as `encode_document` reads it: `embedtune mine` encodes the corpus with it, as `embedtune eval` does."""
    from tiny_models import make_tiny_st_model
    from typer.testing import CliRunner

    import embedtune.mine
    from embedtune.cli import app

    folder = make_tiny_st_model(tmp_path, "st")
    config_file = folder / "config_sentence_transformers.json"
    config = json.loads(config_file.read_text())
    config["prompts"] = {"query": "q: ", "passage": "p: "}
    config_file.write_text(json.dumps(config))
    seen = {}
    real = embedtune.mine.mine_hard_negatives

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(embedtune.mine, "mine_hard_negatives", spy)
    data = write_jsonl(build_stdlib_pairs(max_pairs=40, seed=1), tmp_path / "pairs.jsonl")
    result = CliRunner().invoke(app, ["mine", str(data), "--model", str(folder), "--output", str(tmp_path / "m.jsonl"),
                                      "--num-negatives", "1", "--range", "0:30", "--margin", "-1",
                                      "--max-seq-length", "32"])
    assert result.exit_code == 0, result.output
    assert seen["query_prompt"] == "q: " and seen["document_prompt"] == "p: "
