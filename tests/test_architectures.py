"""Every supported architecture end to end on tiny random-init checkpoints (CPU, fp32).

For each Hugging Face `model_type` in embedtune's registry, a 2-layer model is built by
`tiny_models.make_tiny_model` (once per session) and pushed through the real workflow:
load -> LoRA (or full fine-tuning) -> SentenceTransformer -> 2 training steps -> merged save ->
reload with stock sentence-transformers, whose embeddings must match the in-memory model's.
"""

from __future__ import annotations

import json
import logging
import math
import random
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_models import ALL_ARCHS, DECODER_ARCHS, ENCODER_ARCHS, LOCAL_WINDOW, make_tiny_model  # noqa: E402

import embedtune  # noqa: E402
from embedtune import FastModel, to_sentence_transformer  # noqa: E402
from embedtune.architectures import default_lora_targets  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

MAX_SEQ = 48
ATOL = 1e-5

# Where each family keeps its attention and MLP projections (module-name substrings, as read off
# the tiny models' named_modules()). A default LoRA must reach both kinds in every layer.
_BERT_ATTN = (".attention.self.query", ".attention.self.key", ".attention.self.value", ".attention.output.dense")
_BERT_MLP = (".intermediate.dense", ".output.dense")  # the layer's ".output.dense", not ".attention.output.dense"
_DECODER_ATTN = (".self_attn.q_proj", ".self_attn.k_proj", ".self_attn.v_proj", ".self_attn.o_proj")
_DECODER_MLP = (".mlp.gate_proj", ".mlp.up_proj", ".mlp.down_proj")
PROJECTIONS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "bert": (_BERT_ATTN, _BERT_MLP),
    "roberta": (_BERT_ATTN, _BERT_MLP),
    "xlm-roberta": (_BERT_ATTN, _BERT_MLP),
    "electra": (_BERT_ATTN, _BERT_MLP),
    "distilbert": ((".attention.q_lin", ".attention.k_lin", ".attention.v_lin", ".attention.out_lin"),
                   (".ffn.lin1", ".ffn.lin2")),
    "mpnet": ((".attention.attn.q", ".attention.attn.k", ".attention.attn.v", ".attention.attn.o"), _BERT_MLP),
    "deberta-v2": ((".attention.self.query_proj", ".attention.self.key_proj", ".attention.self.value_proj",
                    ".attention.output.dense"), _BERT_MLP),
    "modernbert": ((".attn.Wqkv", ".attn.Wo"), (".mlp.Wi", ".mlp.Wo")),
    **{arch: (_DECODER_ATTN, _DECODER_MLP) for arch in DECODER_ARCHS},
}
assert set(PROJECTIONS) == set(ALL_ARCHS)

# Texts of very different lengths (so padding matters), several longer than ModernBERT's/Gemma3's
# local window, and one longer than MAX_SEQ (so truncation matters too).
TEXTS = [
    "hi",
    "a short query about rivers",
    "The quick brown fox jumps over the lazy dog while the farmer watches from the old wooden porch.",
    "embeddings",
    " ".join(["tokens"] * 80),
    "Where does the river meet the sea, and why do the gulls gather there every autumn evening?",
    "two words",
]
assert any(len(t.split()) > LOCAL_WINDOW for t in TEXTS)

_WORDS = (
    "river mountain garden window bridge forest silver ocean winter summer library engine market "
    "village candle harbor meadow thunder pencil basket rocket castle valley mirror lantern violin "
    "desert island coffee planet shadow orchard compass feather ladder marble tunnel glacier canyon "
    "blanket festival harvest journey kitchen magnet needle palace quarry saddle temple umbrella"
).split()
_VERBS = "builds finds carries paints watches repairs follows describes measures remembers".split()


def _sentence(rng: random.Random, n_words: int) -> str:
    words = [rng.choice(_WORDS) if i % 3 else rng.choice(_VERBS) for i in range(n_words)]
    return " ".join(words).capitalize() + "."


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    """24 distinct (short anchor -> longer positive) pairs, 3 to 40 words, from a seeded generator."""
    rng = random.Random(1234)
    rows, seen = [], set()
    while len(rows) < 24:
        anchor = _sentence(rng, rng.randint(3, 10))
        positive = _sentence(rng, rng.randint(12, 40))
        if anchor in seen or positive in seen:
            continue
        seen.update((anchor, positive))
        rows.append({"anchor": anchor, "positive": positive})
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture(scope="session")
def tiny(tiny_root):
    """`tiny(arch)`: the path of the session's tiny checkpoint for `arch`, built on first use."""
    quiet = logging.getLogger("transformers")

    def build(arch: str) -> Path:
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return make_tiny_model(arch, tiny_root)
        finally:
            quiet.setLevel(level)

    return build


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and OpenMP spin-waiting makes them crawl
    (milliseconds per 32-wide matmul) whenever the cores are shared with other processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _quiet_progress(monkeypatch):
    """No tqdm bars or transformers load reports in the test log."""
    monkeypatch.setenv("TQDM_DISABLE", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    yield
    hf_logging.enable_progress_bar()
    hf_logging.set_verbosity(level)


def _transformer_weights(st_folder: Path) -> dict[str, torch.Tensor]:
    """The encoder weights of a saved SentenceTransformer folder (wherever its Transformer module lives)."""
    modules = json.loads((st_folder / "modules.json").read_text())
    sub = next(st_folder / m.get("path", "") for m in modules if str(m.get("type", "")).endswith("Transformer"))
    files = sorted(sub.glob("*.safetensors"))
    assert files, f"no safetensors weights in {sub}"
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        weights.update(load_file(str(f)))
    return weights


def _match_keys(saved: dict, base: dict) -> dict[str, str]:
    """Map saved keys to base keys, tolerating a model-prefix difference (e.g. 'bert.')."""
    mapping = {}
    for key in saved:
        if key in base:
            mapping[key] = key
            continue
        hits = [b for b in base if b.endswith("." + key) or key.endswith("." + b)]
        if len(hits) == 1:
            mapping[key] = hits[0]
    return mapping


def _targeted(key: str, targets) -> bool:
    parts = key.split(".")
    return len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in targets


def _assert_spread(embeddings: torch.Tensor) -> None:
    """Guard against a degenerate tiny model whose embeddings barely depend on the input."""
    sims = embeddings @ embeddings.T
    off_diagonal = sims[~torch.eye(len(sims), dtype=torch.bool, device=sims.device)]
    assert off_diagonal.min().item() < 0.99, "embeddings are (nearly) input-independent"


def _run_roundtrip(arch: str, tiny_dir: Path, pairs: Path, out: Path, lora_r: int | None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        st_model, metrics = embedtune.train(
            str(pairs), model=str(tiny_dir), output_dir=str(out), max_steps=2, batch_size=4,
            max_seq_length=MAX_SEQ, lora_r=lora_r, eval=False, overwrite=True, logging_steps=1,
        )
    assert metrics["steps"] == 2
    losses = [row["loss"] for row in metrics["history"] if "loss" in row]
    assert len(losses) == 2, metrics["history"]
    assert all(math.isfinite(x) for x in losses), losses
    assert (out / "model" / "modules.json").exists()

    base = load_file(str(tiny_dir / "model.safetensors"))
    saved = _transformer_weights(out / "model")
    mapping = _match_keys(saved, base)
    assert mapping, f"no saved key matches the base checkpoint: {sorted(saved)[:5]}"
    changed = {k for k, b in mapping.items() if not torch.equal(saved[k], base[b])}
    assert changed, "training changed no encoder weight"
    if lora_r:
        targets = set(default_lora_targets(arch))
        assert {k for k in changed if _targeted(k, targets)}, f"no LoRA-targeted weight changed: {sorted(changed)}"
        untouched = {k for k in changed if not _targeted(k, targets)}
        assert not untouched, f"LoRA training changed non-targeted weights: {sorted(untouched)}"
        assert not any("lora_" in k for k in saved), "merged save still holds LoRA tensors"

    from sentence_transformers import SentenceTransformer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = SentenceTransformer(str(out / "model"), device="cpu")
    assert reloaded.max_seq_length == MAX_SEQ
    assert reloaded[1].pooling_mode == st_model[1].pooling_mode
    expected = st_model.encode(TEXTS, convert_to_tensor=True, batch_size=len(TEXTS))
    got = reloaded.encode(TEXTS, convert_to_tensor=True, batch_size=len(TEXTS))
    assert got.shape == expected.shape
    assert torch.isfinite(got).all()
    _assert_spread(got)
    diff = (got.cpu() - expected.cpu()).abs().max().item()
    assert diff < ATOL, f"{arch}: stock reload differs from in-memory model by {diff:.2e}"
    # Padding must not leak into the embeddings: one text alone equals the same text in the padded batch.
    alone = reloaded.encode([TEXTS[1]], convert_to_tensor=True)
    assert (alone[0].cpu() - got[1].cpu()).abs().max().item() < 1e-4
    return st_model, metrics


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_load_wrap_train_roundtrip(arch, tiny, pairs_file, tmp_path):
    _run_roundtrip(arch, tiny(arch), pairs_file, tmp_path / "out", lora_r=4)


@pytest.mark.parametrize("arch", ["bert", "modernbert", "qwen3"])
def test_full_finetune_roundtrip(arch, tiny, pairs_file, tmp_path):
    _run_roundtrip(arch, tiny(arch), pairs_file, tmp_path / "out", lora_r=None)


def _load(path: Path, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return FastModel.from_pretrained(str(path), max_seq_length=MAX_SEQ, dtype=None, **kwargs)


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_default_lora_targets_cover_attention_and_mlp(arch, tiny):
    from peft.tuners.lora import LoraLayer

    model, _ = _load(tiny(arch))
    assert model.config.model_type == arch
    peft_model = FastModel.get_peft_model(model, r=8)
    wrapped = {name for name, module in peft_model.named_modules() if isinstance(module, LoraLayer)}
    attn, mlp = PROJECTIONS[arch]

    def is_mlp(name: str) -> bool:
        return any(name.endswith(p) for p in mlp) and ".attention." not in name and ".attn." not in name

    attn_hits = {n for n in wrapped if any(n.endswith(p) for p in attn)}
    mlp_hits = {n for n in wrapped if is_mlp(n)}
    assert attn_hits, f"{arch}: no attention projection wrapped; wrapped={sorted(wrapped)}"
    assert mlp_hits, f"{arch}: no MLP projection wrapped; wrapped={sorted(wrapped)}"
    layers = model.config.num_hidden_layers if hasattr(model.config, "num_hidden_layers") else model.config.n_layers
    for i in range(layers):
        tag = f".{i}."
        assert any(tag in n for n in attn_hits), f"{arch}: layer {i} has no LoRA on attention"
        assert any(tag in n for n in mlp_hits), f"{arch}: layer {i} has no LoRA on the MLP"

    trainable = {n: p.numel() for n, p in peft_model.named_parameters() if p.requires_grad}
    assert sum(trainable.values()) > 0
    assert all("lora_" in n for n in trainable), f"base weights left trainable: {[n for n in trainable if 'lora_' not in n]}"


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_pooling_default(arch, tiny):
    model, tok = _load(tiny(arch))
    peft_model = FastModel.get_peft_model(model, r=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        st_model = to_sentence_transformer(peft_model, tok)
    expected = "lasttoken" if arch in DECODER_ARCHS else "cls"
    assert arch in (ENCODER_ARCHS if expected == "cls" else DECODER_ARCHS)
    assert st_model[1].pooling_mode == expected
    assert st_model.max_seq_length == MAX_SEQ

    # The ST pipeline pools what the pooling mode says: recompute it from stock transformers' hidden
    # states (fresh LoRA is a no-op: lora_B starts at zero).
    import inspect

    from transformers import AutoModel

    got = st_model.encode(TEXTS, convert_to_tensor=True, batch_size=len(TEXTS)).cpu()
    _assert_spread(got)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = AutoModel.from_pretrained(str(tiny(arch))).eval()
    enc = tok(TEXTS, padding=True, truncation=True, max_length=MAX_SEQ, return_tensors="pt")
    accepted = inspect.signature(reference.forward).parameters
    with torch.no_grad():
        hidden = reference(**{k: v for k, v in enc.items() if k in accepted}).last_hidden_state
    if expected == "cls":
        pooled = hidden[:, 0]
    elif tok.padding_side == "right":
        pooled = hidden[torch.arange(len(TEXTS)), enc["attention_mask"].sum(dim=1) - 1]
    else:
        pooled = hidden[:, -1]
    pooled = torch.nn.functional.normalize(pooled, dim=-1)
    assert (pooled - got).abs().max().item() < 1e-5


def test_add_pooling_layer_only_when_accepted(tiny):
    bert = tiny("bert")
    with_pooler, _ = _load(bert, add_pooling_layer=True)
    assert with_pooler.pooler is not None
    # The saved pooler weights are the ones loaded (not re-initialised).
    base = load_file(str(bert / "model.safetensors"))
    key = next(k for k in base if k.endswith("pooler.dense.weight"))
    assert torch.equal(with_pooler.pooler.dense.weight.detach(), base[key])

    without, _ = _load(bert, add_pooling_layer=False)
    assert getattr(without, "pooler", None) is None

    default, _ = _load(bert)
    assert getattr(default, "pooler", None) is None  # embedtune's default: no pooler

    qwen3, _ = _load(tiny("qwen3"), add_pooling_layer=False)
    assert type(qwen3).__name__ == "Qwen3Model"
    assert not hasattr(qwen3, "pooler")


def _tiny_t5(root: Path, layout: str) -> Path:
    """A tiny T5 checkpoint as the hub holds them: the whole encoder-decoder (t5-base, mT5), or the
    encoder alone (a GTR / sentence-T5 Transformer folder), with the MiniLM tokenizer."""
    from transformers import AutoTokenizer, T5Config, T5EncoderModel, T5Model

    from embedtune.loading import bundled_model_path

    target = root / f"t5-{layout}"
    if (target / "model.safetensors").exists():
        return target
    config = T5Config(vocab_size=30522, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      pad_token_id=0, eos_token_id=102, decoder_start_token_id=0, initializer_factor=2.0)
    torch.manual_seed(0)
    model = (T5Model if layout == "encoder-decoder" else T5EncoderModel)(config).eval()
    model.save_pretrained(target, safe_serialization=True)
    AutoTokenizer.from_pretrained(str(bundled_model_path())).save_pretrained(target)
    return target


@pytest.mark.parametrize("layout", ["encoder-decoder", "encoder-only"])
def test_t5_checkpoints_train_their_encoder(layout, tiny_root, pairs_file, tmp_path):
    """T5-family checkpoints load as transformers' T5EncoderModel (as sentence-transformers loads them), with
    every encoder weight from the file, pool by mean, and go through the whole train-save-reload round trip."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = _tiny_t5(tiny_root, layout)
    model, _ = _load(path)
    assert type(model).__name__ == "T5EncoderModel"
    base = load_file(str(path / "model.safetensors"))
    loaded = {k: v for k, v in model.state_dict().items() if k in base}
    assert any(k.startswith("encoder.block.") for k in loaded)
    assert all(k in loaded for k in base if k.startswith("encoder."))
    assert all(torch.equal(v, base[k]) for k, v in loaded.items())
    st_model, _ = _run_roundtrip("t5", path, pairs_file, tmp_path / "out", lora_r=4)
    assert st_model[1].pooling_mode == "mean"


def test_guide_targets_that_miss_an_architectures_layers_are_named(tiny):
    """The guide's query/key/value/dense matches only MPNet's `dense`: peft wraps that silently, embedtune
    says which names matched nothing and what MPNet calls its projections; on BERT every name matches."""
    guide_targets = ["query", "key", "value", "dense"]
    model, _ = _load(tiny("mpnet"))
    with pytest.warns(UserWarning, match=r"target_modules query, key, value matched no layer of this mpnet model, "
                                         r"so LoRA trains only dense; .* q, k, v, o, dense"):
        FastModel.get_peft_model(model, r=4, target_modules=guide_targets)
    model, _ = _load(tiny("bert"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message="(?!target_modules)")  # only this warning must not come
        FastModel.get_peft_model(model, r=4, target_modules=guide_targets)
