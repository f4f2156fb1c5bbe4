"""No network unless a hub download is really needed: the bundled MiniLM and local folders load, train,
save and reload with every connection refused, even with HF_HUB_OFFLINE unset; with HF_HUB_OFFLINE set,
a hub id that is not cached fails with one line and no connection attempt."""

from __future__ import annotations

import socket

import pytest

from embedtune.errors import EmbedtuneError
from embedtune.loading import DEFAULT_MODEL_ID, FastModel, bundled_model_path

pytestmark = pytest.mark.skipif(bundled_model_path() is None, reason="bundled all-MiniLM-L6-v2 not installed")


@pytest.fixture()
def connections(monkeypatch) -> list:
    """Every attempt to resolve a host name or open a connection is recorded and refused."""
    attempts: list = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access in an offline test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return attempts


@pytest.fixture()
def online(monkeypatch):
    """Offline mode off, as on a user's machine: only our own care keeps loading local."""
    import huggingface_hub.constants

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


def test_local_models_train_and_reload_without_network(tmp_path, online, connections):
    from sentence_transformers import SentenceTransformer

    from embedtune import to_sentence_transformer
    from embedtune.data import write_jsonl
    from embedtune.train import TrainConfig, run

    model, tokenizer = FastModel.from_pretrained(DEFAULT_MODEL_ID, max_seq_length=16)  # served by the bundled copy
    to_sentence_transformer(model, tokenizer).encode(["offline"])
    rows = [{"anchor": f"question {i} about offline use", "positive": f"answer {i}: no network needed"} for i in range(16)]
    data = write_jsonl(rows, tmp_path / "pairs.jsonl")
    result = run(TrainConfig(data=str(data), model=str(bundled_model_path()), output_dir=str(tmp_path / "run"),
                             max_steps=1, batch_size=4, max_seq_length=16, eval_size=4, evals_per_run=1))
    assert result.output_dir is not None
    SentenceTransformer(str(tmp_path / "run" / "model"), device="cpu").encode(["offline"])
    assert connections == []


def test_offline_hub_id_fails_in_one_line_without_trying(monkeypatch, connections):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # as if set after import
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EmbedtuneError, match="nobody-here/no-such-model.*HF_HUB_OFFLINE is set"):
        FastModel.from_pretrained("nobody-here/no-such-model")
    assert connections == []
