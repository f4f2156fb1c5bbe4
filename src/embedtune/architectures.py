"""The architecture registry: what embedtune knows about each supported model family.

One row per Hugging Face `model_type`. The row says how the family pools by default,
which linear layers LoRA targets by default (attention and MLP projections), and whether
the model is a decoder (causal LM body used as an embedder, last-token pooling).
"""

from __future__ import annotations

from dataclasses import dataclass

BERT_TARGETS = ("query", "key", "value", "dense")
DECODER_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
T5_TARGETS = ("q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo")  # wi_0/wi_1: the gated (T5 v1.1, mT5) MLP


@dataclass(frozen=True)
class ArchSpec:
    """What embedtune needs to know about one model family."""

    family: str
    lora_targets: tuple[str, ...]
    pooling: str = "cls"
    is_decoder: bool = False


ARCHITECTURES: dict[str, ArchSpec] = {
    "bert": ArchSpec("bert", BERT_TARGETS),
    "roberta": ArchSpec("bert", BERT_TARGETS),
    "xlm-roberta": ArchSpec("bert", BERT_TARGETS),
    "electra": ArchSpec("bert", BERT_TARGETS),
    "distilbert": ArchSpec("bert", ("q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2")),
    "mpnet": ArchSpec("bert", ("q", "k", "v", "o", "dense")),
    "deberta-v2": ArchSpec("deberta", ("query_proj", "key_proj", "value_proj", "dense")),
    "modernbert": ArchSpec("modernbert", ("Wqkv", "Wo", "Wi")),
    "qwen2": ArchSpec("decoder", DECODER_TARGETS, pooling="lasttoken", is_decoder=True),
    "qwen3": ArchSpec("decoder", DECODER_TARGETS, pooling="lasttoken", is_decoder=True),
    "llama": ArchSpec("decoder", DECODER_TARGETS, pooling="lasttoken", is_decoder=True),
    "mistral": ArchSpec("decoder", DECODER_TARGETS, pooling="lasttoken", is_decoder=True),
    # EmbeddingGemma is a bidirectional Gemma3 text model that ships mean pooling in its ST config.
    "gemma3_text": ArchSpec("decoder", DECODER_TARGETS, pooling="lasttoken", is_decoder=True),
    # The encoder of T5-family checkpoints (GTR, sentence-T5): no CLS token, mean pooling as they ship.
    "t5": ArchSpec("t5", T5_TARGETS, pooling="mean"),
    "mt5": ArchSpec("t5", T5_TARGETS, pooling="mean"),
    "umt5": ArchSpec("t5", T5_TARGETS, pooling="mean"),
}


def arch_spec(model_type: str) -> ArchSpec | None:
    """The registry row for `model_type`, or None for an architecture embedtune has no defaults for."""
    return ARCHITECTURES.get(model_type)


def default_lora_targets(model_type: str) -> list[str] | str:
    """Per-architecture LoRA targets; unknown architectures get every linear layer (peft's 'all-linear')."""
    spec = arch_spec(model_type)
    return list(spec.lora_targets) if spec else "all-linear"


def default_pooling(model_type: str) -> str:
    """cls for encoders (mean for T5's), lasttoken for decoders, when the checkpoint does not say otherwise."""
    spec = arch_spec(model_type)
    if spec:
        return spec.pooling
    return "cls"
