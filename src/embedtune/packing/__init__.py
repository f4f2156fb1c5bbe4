"""The padding-free fast path: packed batches, varlen attention, per-architecture packed forward.

`enable_fast_path(model)` makes a supported model run packed: its `forward` (the instance's, not
the class's) is replaced by `PackedForward`, which falls back to the original forward for anything
it does not handle (hidden states requested, inputs_embeds, no attention mask). The weights and
their names are untouched, so saving, merging and loading work as before. Families whose packed
forward covers only some configurations (DeBERTa, Gemma3) name the others in `UNSUPPORTED_CONFIG`;
those keep the padded forward, with the same one-line notice as an unsupported architecture.
"""

from __future__ import annotations

import logging

import torch
from transformers.modeling_outputs import BaseModelOutput

from ..model_facts import unwrap_peft
from ..speed import CompileWhenItPays
from .bert import packed_bert_forward
from .deberta import packed_deberta_forward
from .deberta import unsupported_reason as deberta_unsupported
from .decoder import packed_decoder_forward
from .distilbert import packed_distilbert_forward
from .gemma3 import packed_gemma3_forward
from .gemma3 import unsupported_reason as gemma3_unsupported
from . import layers
from .layers import PackedOptions
from .modernbert import packed_modernbert_forward
from .mpnet import packed_mpnet_forward

logger = logging.getLogger(__name__)

DEFAULT_TOKEN_MULTIPLE = 1024  # compile="reduce-overhead": streams padded to size classes (see PackedBatch)

PACKED_FORWARDS = {
    "bert": packed_bert_forward,
    "roberta": packed_bert_forward,
    "xlm-roberta": packed_bert_forward,
    "electra": packed_bert_forward,
    "distilbert": packed_distilbert_forward,
    "mpnet": packed_mpnet_forward,
    "deberta-v2": packed_deberta_forward,
    "modernbert": packed_modernbert_forward,
    "qwen2": packed_decoder_forward,
    "qwen3": packed_decoder_forward,
    "llama": packed_decoder_forward,
    "mistral": packed_decoder_forward,
    "gemma3_text": packed_gemma3_forward,
}

# Families whose packed forward covers only some configurations: model -> reason to fall back, or None.
UNSUPPORTED_CONFIG = {
    "deberta-v2": deberta_unsupported,
    "gemma3_text": gemma3_unsupported,
}


class PackedForward:
    """A model's forward that runs packed; anything unusual goes to the original forward."""

    def __init__(self, model, packed_fn, attention_backend: str = "auto", compile: bool | str = False,
                 token_multiple: int | None = None, whole_stack: bool = False, fused_kernels: bool = False):
        self.original = model.forward
        self.model = model
        self.packed_fn = packed_fn
        self.compile = compile  # the layer stack compiled once (see packing.layers)
        self.token_multiple = token_multiple  # pad packed streams to a multiple of this (packing.varlen)
        self.whole_stack = whole_stack  # compiled: the whole layer stack as one graph (packing.layers)
        self.attention_backend = attention_backend
        self.fused_kernels = fused_kernels  # fused dropout + residual + LayerNorm where it applies (`fused_norm`)
        self.auto = None  # with compile="auto": when compiling starts to pay
        self.fixed_stream: int | None = None  # streams of exactly this many tokens (set by `graphs` per step)

    def __call__(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                 inputs_embeds=None, output_hidden_states=None, output_attentions=None, return_dict=True, **kwargs):
        if (input_ids is None or attention_mask is None or inputs_embeds is not None or position_ids is not None
                or output_hidden_states or output_attentions):
            return self.original(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                                 position_ids=position_ids, inputs_embeds=inputs_embeds,
                                 output_hidden_states=output_hidden_states, output_attentions=output_attentions,
                                 return_dict=return_dict, **kwargs)
        compile = self.compile
        if compile == "auto":  # compiled once the run has shown it is long enough (`speed.CompileWhenItPays`)
            if self.auto is None:
                self.auto = CompileWhenItPays(self.model)
            compile = self.auto(input_ids.is_cuda, self.model.training and torch.is_grad_enabled())
        options = PackedOptions(token_multiple=self.token_multiple, fixed_stream=self.fixed_stream,
                                compile_layers=compile, whole_stack=self.whole_stack,
                                fused_kernels=self.fused_kernels)
        hidden = self.packed_fn(self.model, input_ids, attention_mask, token_type_ids, self.attention_backend,
                                options=options)
        if compile and self.compile == "auto":
            self.auto.compiled()
        return BaseModelOutput(last_hidden_state=hidden)


def enable_fast_path(model, attention_backend: str = "auto", compile: bool | str = False,
                     token_multiple: int | None = None, whole_stack: bool | None = None,
                     fused_kernels: bool = False) -> bool:
    """Switch `model` (plain or peft) to the packed forward; returns False (with a notice) if unsupported.

    `compile=True` (or "default") also compiles the layers (one graph for the layer step, which every
    layer reuses, dynamic in the token count: one compile serves every batch shape; see `packing.layers`).
    `compile="auto"` (what `FastModel.from_pretrained` sets) compiles on a GPU once the training time
    spent has earned the warm-up back (`speed.CompileWhenItPays`); the recipe decides up front instead.
    `compile="reduce-overhead"` replays the compiled code as CUDA graphs, and pads packed streams to
    size classes (multiples of `token_multiple`, default 1024, see `PackedBatch`) so that few graphs
    are recorded; measured slower than "default" on an H200 (docs/BENCHMARKS.md): opt-in only.
    `whole_stack` (default `packing.layers.WHOLE_STACK`, off): compile the whole stack as one graph
    instead of one graph per layer step (as fast, longer to compile; a benchmark row).
    `fused_kernels`: BERT-family layers end their sub-blocks with the fused dropout + residual +
    LayerNorm kernels on a CUDA device when not compiled (`kernels.fused_norm`). Off by default: they
    pay only in a step replayed as a CUDA graph, which the recipe decides (`speed`, `set_fused_kernels`).
    """
    if whole_stack is None:
        whole_stack = layers.WHOLE_STACK
    if compile == "reduce-overhead" and token_multiple is None:
        token_multiple = DEFAULT_TOKEN_MULTIPLE
    base = unwrap_peft(model)
    fn = PACKED_FORWARDS.get(base.config.model_type)
    if fn is None:
        logger.warning("embedtune: no packed forward for %s yet; using the standard (padded) path",
                       base.config.model_type)
        return False
    check = UNSUPPORTED_CONFIG.get(base.config.model_type)
    reason = check(base) if check is not None else None
    if reason:
        logger.warning("embedtune: the packed forward for %s does not cover %s; using the standard (padded) path",
                       base.config.model_type, reason)
        return False
    current = base.__dict__.get("forward")
    if isinstance(current, PackedForward):
        current.compile, current.token_multiple, current.whole_stack = compile, token_multiple, whole_stack
        current.fused_kernels = fused_kernels
    else:
        base.forward = PackedForward(base, fn, attention_backend, compile, token_multiple, whole_stack, fused_kernels)
    return True


def set_compile(model, compile: bool | str) -> None:
    """How a packed model's layers run from now on (`enable_fast_path`'s `compile`); nothing for a
    model without the packed forward."""
    forward = unwrap_peft(model).__dict__.get("forward")
    if isinstance(forward, PackedForward):
        forward.compile = compile


def set_fused_kernels(model, on: bool) -> None:
    """Whether a packed model's layers use the fused kernels where they apply (`enable_fast_path`'s
    `fused_kernels`); nothing for a model without the packed forward."""
    forward = unwrap_peft(model).__dict__.get("forward")
    if isinstance(forward, PackedForward):
        forward.fused_kernels = on


def has_fused_kernels(model) -> bool:
    """Whether the model's packed forward has layers with the fused norm (the BERT family)."""
    forward = unwrap_peft(model).__dict__.get("forward")
    return isinstance(forward, PackedForward) and forward.packed_fn is packed_bert_forward


def disable_fast_path(model) -> None:
    base = unwrap_peft(model)
    if isinstance(base.__dict__.get("forward"), PackedForward):
        del base.forward
