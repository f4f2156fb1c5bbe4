"""The ST 6 compat patch, FastModel loading rules, and gradient checkpointing that is never ignored."""

from __future__ import annotations

import pytest
import torch

import embedtune  # noqa: F401  (applies the compat patch)
from embedtune import FastModel, to_sentence_transformer
from embedtune.checkpointing import _OffloadedCheckpoint
from embedtune.loading import bundled_model_path, load_info, resolve_dtype

MINILM = str(bundled_model_path())


def test_models_namespace_is_reachable():
    import sentence_transformers

    import embedtune

    embedtune.install_compat()  # what building a model with embedtune installs

    assert sentence_transformers.models.Transformer is not None
    assert sentence_transformers.models.Pooling is not None


def test_assigning_auto_model_replaces_the_backbone():
    import sentence_transformers

    module = sentence_transformers.models.Transformer(MINILM, max_seq_length=32)
    other, tok = FastModel.from_pretrained(MINILM, max_seq_length=32)
    with torch.no_grad():
        other.embeddings.word_embeddings.weight.mul_(1.5)
    module.auto_model = other
    module.tokenizer = tok
    assert module.auto_model is other
    assert module.tokenizer is tok
    assert "auto_model" not in module._modules
    features = module.preprocess(["hello world"]) if hasattr(module, "preprocess") else module.tokenize(["hello world"])
    with torch.no_grad():
        got = module(dict(features))["token_embeddings"]
        want = other(**{k: v for k, v in features.items() if k in ("input_ids", "attention_mask", "token_type_ids")}).last_hidden_state
    assert torch.allclose(got, want, atol=1e-6)
    assert tok.model_max_length == 32


def test_st_folder_pooling_and_dtype_are_read():
    model, tok = FastModel.from_pretrained(MINILM, max_seq_length=1000)
    info = load_info(model)
    assert info.pooling == "mean" and info.normalize is True
    assert tok.model_max_length == 512, "capped at the model's position table"
    assert next(model.parameters()).dtype == torch.float32
    st = to_sentence_transformer(model, tok)
    assert st[1].pooling_mode == "mean"
    assert resolve_dtype(None) == torch.float32  # CPU
    assert resolve_dtype("bf16") == torch.bfloat16


def test_wrapper_is_not_a_second_load():
    model, tok = FastModel.from_pretrained(MINILM, max_seq_length=64)
    st = to_sentence_transformer(model, tok)
    assert st[0].auto_model is model
    assert st[0].tokenizer is tok


def test_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(embedtune.EmbedtuneError, match="no such model folder"):
        FastModel.from_pretrained(str(tmp_path / "nope"))


def _gates(model):
    from embedtune.checkpointing import WhenMemoryNeeds

    return {id(m._gradient_checkpointing_func): m._gradient_checkpointing_func for m in model.modules()
            if isinstance(getattr(m, "_gradient_checkpointing_func", None), WhenMemoryNeeds)}


@pytest.mark.parametrize("mode, short_of_memory", [(True, False), ("unsloth", False), (True, True), ("unsloth", True),
                                                   ("always", False)])
def test_gradient_checkpointing_is_enabled_and_exact(mode, short_of_memory, monkeypatch):
    """Checkpointed or not (True / "unsloth" checkpoint a batch only when its activations would not fit:
    here plenty of memory, or almost none), the gradients are those of the plain model, dropout on."""
    from embedtune import checkpointing

    if short_of_memory:
        monkeypatch.setattr(checkpointing, "free_memory_bytes", lambda device: 1 << 20)
    torch.manual_seed(0)
    model, tok = FastModel.from_pretrained(MINILM, max_seq_length=32)
    plain = FastModel.get_peft_model(model, r=4)
    torch.manual_seed(0)
    model2, _ = FastModel.from_pretrained(MINILM, max_seq_length=32)
    ckpt = FastModel.get_peft_model(model2, r=4, use_gradient_checkpointing=mode)
    assert ckpt.get_base_model().is_gradient_checkpointing
    with torch.no_grad():
        for (n, p), (_, q) in zip(plain.named_parameters(), ckpt.named_parameters()):
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
                q.copy_(p)
    batch = tok(["a short one", "a somewhat longer sentence for the test"], padding=True, return_tensors="pt")
    for m in (plain, ckpt):
        m.train()
        torch.manual_seed(1)  # same dropout masks; checkpointing replays the RNG state on recompute
        m(**batch).last_hidden_state.pow(2).mean().backward()
    for (n, p), (_, q) in zip(plain.named_parameters(), ckpt.named_parameters()):
        if p.requires_grad:
            assert q.grad is not None, n
            assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6), n
    gates = list(_gates(ckpt).values())
    if mode == "always":
        assert not gates  # every batch checkpointed, no choice made
    else:
        assert len(gates) == 1 and gates[0].layers == 6  # one gate serves MiniLM's six layers
        ran = (gates[0].checkpointed, gates[0].skipped)
        assert ran == ((6, 0) if short_of_memory else (0, 6)), ran


def test_offloaded_checkpoint_function_matches_plain_backward():
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
    x = torch.randn(4, 8, requires_grad=True)
    layer(x).sum().backward()
    want_x, want_w = x.grad.clone(), layer[0].weight.grad.clone()
    x.grad = None
    layer.zero_grad()
    _OffloadedCheckpoint.apply(layer, x).sum().backward()
    assert torch.allclose(x.grad, want_x, atol=1e-6)
    assert torch.allclose(layer[0].weight.grad, want_w, atol=1e-6)


def test_max_seq_length_none_takes_the_checkpoints_own():
    _, tok = FastModel.from_pretrained(MINILM, max_seq_length=None)
    assert tok.model_max_length == 256  # all-MiniLM-L6-v2's sentence_bert_config.json


def test_saved_model_keeps_its_max_seq_length_on_reload(tmp_path):
    """sentence-transformers 6 saves max_seq_length only as the tokenizer's model_max_length; a reload
    (what `embedtune eval` does) must use it, as stock SentenceTransformer(dir) does, not the 512 of
    the position table."""
    from sentence_transformers import SentenceTransformer

    from embedtune import save_merged
    from embedtune.loading import FastModel, bundled_model_path, load_info
    from embedtune.st import to_sentence_transformer

    model, tokenizer = FastModel.from_pretrained(str(bundled_model_path()), max_seq_length=64)
    folder = save_merged(to_sentence_transformer(model, tokenizer), tmp_path / "model")
    reloaded, _ = FastModel.from_pretrained(str(folder), max_seq_length=None)
    assert load_info(reloaded).max_seq_length == 64 == SentenceTransformer(str(folder)).max_seq_length


def test_checkpointing_refusals_are_user_errors():
    """One line on the command line (an EmbedtuneError), still a ValueError for Python callers."""
    import pytest
    import torch

    from embedtune.checkpointing import enable_checkpointing
    from embedtune.errors import EmbedtuneError

    with pytest.raises(EmbedtuneError, match="does not support gradient checkpointing") as caught:
        enable_checkpointing(torch.nn.Linear(2, 2), True)
    assert isinstance(caught.value, ValueError)
    with pytest.raises(EmbedtuneError, match="must be True, False, 'unsloth' or 'always'"):
        enable_checkpointing(torch.nn.Linear(2, 2), "sometimes")


def _train_losses(mode, steps: int = 3) -> list[float]:
    torch.manual_seed(0)
    model, tok = FastModel.from_pretrained(MINILM, max_seq_length=32)
    model = FastModel.get_peft_model(model, r=4, use_gradient_checkpointing=mode, random_state=0)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    anchors = ["sort a list", "open a file", "parse json", "join paths"]
    positives = ["def sort(xs): return sorted(xs)", "def open_file(p): return open(p)",
                 "def parse(s): return json.loads(s)", "def join(a, b): return os.path.join(a, b)"]
    losses = []
    torch.manual_seed(1)
    for _ in range(steps):
        embed = [model(**tok(texts, padding=True, return_tensors="pt")).last_hidden_state[:, 0] for texts in (anchors, positives)]
        scores = torch.nn.functional.normalize(embed[0], dim=-1) @ torch.nn.functional.normalize(embed[1], dim=-1).T
        loss = torch.nn.functional.cross_entropy(20 * scores, torch.arange(len(anchors)))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_training_with_checkpointing_skipped_follows_every_batch_checkpointed():
    """The guide's "unsloth" with memory to spare runs the layers as is: three steps with dropout on
    (MiniLM's 0.1) give the losses of checkpointing every batch, so the RNG stays in step."""
    always, chosen, plain = _train_losses("always"), _train_losses("unsloth"), _train_losses(False)
    assert len(set(always)) == 3  # training moves
    assert chosen == pytest.approx(always, rel=1e-5, abs=1e-6)
    assert plain == pytest.approx(always, rel=1e-5, abs=1e-6)


def test_several_processes_checkpoint_every_batch(monkeypatch):
    """Under DDP each process would choose alone; there every batch is checkpointed, as asked."""
    from embedtune import checkpointing

    gate = checkpointing.WhenMemoryNeeds(lambda fn, h: fn(h), layers=2, heads=2)
    hidden = torch.zeros(4, 8, 16)
    assert gate.fits(hidden) and (gate.skipped, gate.checkpointed) == (1, 0)
    monkeypatch.setattr(checkpointing, "_several_processes", lambda: True)
    assert not gate.fits(hidden) and (gate.skipped, gate.checkpointed) == (1, 1)
    # the estimate: tokens x width x 96 bytes plus, padded, batch x heads x seq^2 x 10, for every layer
    assert gate.activation_bytes(hidden) == 2 * (32 * 16 * 96 + 4 * 2 * 64 * 10)
    assert gate.activation_bytes(torch.zeros(32, 16)) == 2 * 32 * 16 * 96
