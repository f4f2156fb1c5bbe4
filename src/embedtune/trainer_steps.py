"""The steps of a stock SentenceTransformerTrainer that trains a model `FastModel` built.

Why: the guide's own program trains with `SentenceTransformerTrainer` and
`MultipleNegativesRankingLoss` at small batches (8 pairs), where an eager step is bound by the host
(each layer's LoRA linears, dropout and attention calls launched one by one), not by the GPU; and
sentence-transformers embeds MNRL's anchor column in a forward of its own, since a merged batch is
padded to its widest column, which the packed path never pays. One narrow patch of
`SentenceTransformerTrainer.training_step` (`install`, run by `FastModel.from_pretrained`) gives such
a trainer what embedtune's recipe runs. At a trainer's first step, `decide` chooses one of:

- CUDA graphs (`graphed_training_step`): where the model's backbone is embedtune's, on a GPU, in one
  process, with a loss the graph step computes exactly (`contrastive_equivalent`: MNRL at its
  defaults, any scale, is embedtune's `ContrastiveLoss`), no checkpointing needed
  (`checkpointing.skip_for_run`) and enough planned steps to pay for the captures; `speed.choose`
  then settles `compile="auto"` and the fused norm kernels for the run, as the recipe's choice
  does. `FastModel.from_pretrained(cuda_graphs=False)` keeps the steps eager, `True` asks for graphs
  whatever the length;
- the trainer's own eager step with that same loss (`one_forward_training_step`): where graphs are
  not chosen (a CPU, fp16, several processes, a short run, checkpointing needed) but the loss has
  the equivalent and the backbone runs packed: all columns go through one forward instead of one
  per column, the same math (MNRL's loss and gradients, tested), half the host's per-layer work;
- the stock step untouched: every other trainer, model or loss, and trainers that choose their own
  step (`chooses_own_steps`, embedtune's `ResumableTrainer`).

One line says what was chosen and why.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import weakref

logger = logging.getLogger(__name__)

_FLAG = "_embedtune_trainer_steps"
_UNDECIDED = object()
# trainer -> its choice: None (the stock step), a `Graphed` or a `OneForward`
_CHOICES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


@dataclasses.dataclass
class Graphed:
    """A trainer's steps replayed by `step` (a `graphs.GraphedStep`); `modules`: the model's modules,
    listed at the first step (`listed_modules`)."""

    step: object
    modules: list | None = None


@dataclasses.dataclass
class OneForward:
    """A trainer's own eager steps with `loss` (the `ContrastiveLoss` equal to the trainer's MNRL)
    computing each step's loss: all columns in one forward."""

    loss: object


def contrastive_equivalent(loss):
    """embedtune's `ContrastiveLoss` computing exactly what `loss` does, over the same model, or a str
    saying why there is none. MultipleNegativesRankingLoss at its defaults (cosine similarity, the
    anchor-to-documents direction only, no hardness penalty, no gathering across devices) is InfoNCE
    at temperature 1 / scale; embedtune's own uncached ContrastiveLoss is itself."""
    from sentence_transformers import losses as st_losses
    from sentence_transformers.util import cos_sim

    from .losses import ContrastiveLoss

    if isinstance(loss, ContrastiveLoss):
        return "the cached loss runs its own backward in chunks" if loss.cached else loss
    if type(loss) is not st_losses.MultipleNegativesRankingLoss:
        return f"the loss is {type(loss).__name__} (embedtune's trainer steps cover MultipleNegativesRankingLoss)"
    settings = {"similarity_fct": (getattr(loss, "similarity_fct", cos_sim), cos_sim),
                "directions": (tuple(getattr(loss, "directions", ("query_to_doc",))), ("query_to_doc",)),
                "hardness_strength": (float(getattr(loss, "hardness_strength", 0.0) or 0.0), 0.0),
                "gather_across_devices": (bool(getattr(loss, "gather_across_devices", False)), False)}
    other = [name for name, (value, default) in settings.items() if value != default]
    if other:
        return f"MultipleNegativesRankingLoss with {', '.join(other)} not at the default"
    if not float(loss.scale) > 0:
        return f"MultipleNegativesRankingLoss with scale {loss.scale}"
    return ContrastiveLoss(loss.model, temperature=1.0 / float(loss.scale), symmetric=False,
                           gather_across_devices=False)


def listed_modules(model, listed: list | None) -> list:
    """`model`'s modules, listed once: `listed` (an earlier listing, whose first entry is its model)
    where it lists `model`, else a new listing. Reading the modules' flags each step is cheap,
    walking the tree is not."""
    return listed if listed is not None and listed[0] is model else list(model.modules())


def graphed_training_step(trainer, graph_step, model, inputs, modules: list):
    """The trainer's step (`Trainer.training_step`: train mode, the loss scaled for gradient
    accumulation) with forward and backward replayed by `graph_step`. `modules`: `model`'s modules,
    listed once by the caller (`listed_modules`)."""
    import torch

    from .graphs import train_mode

    # a replayed graph keeps the modes it was captured in: every module in train mode, as the
    # trainer's own step does, and the optimizer's train mode where it has one
    train_mode(model, modules)
    if callable(getattr(trainer.optimizer, "train", None)):
        trainer.optimizer.train()
    inputs = dict(inputs)
    inputs.pop("dataset_name", None)
    features, _labels = trainer.collect_features(inputs)
    scale = 1.0 / trainer.current_gradient_accumulation_steps
    loss = graph_step(features, scale=scale) * scale
    every = trainer.args.torch_empty_cache_steps
    if every is not None and trainer.state.global_step % every == 0:
        torch.cuda.empty_cache()
    return loss


def _embedtune_backbone(st_model):
    from .model_facts import load_info
    from .st import first_backbone

    backbone = first_backbone(st_model)
    return backbone if backbone is not None and load_info(backbone) is not None else None


def one_forward_training_step(trainer, loss, stock, model, inputs, *args, **kwargs):
    """The trainer's own step (`stock`: autocast, the backward through accelerate, gradient
    accumulation's scale) with `loss` in place of the trainer's loss for that step only: its
    `compute_loss` then embeds all columns in one forward. Evaluation keeps the trainer's loss."""
    own = trainer.loss
    trainer.loss = loss
    try:
        return stock(trainer, model, inputs, *args, **kwargs)
    finally:
        trainer.loss = own


def decide(trainer, inputs):
    """A `Graphed` or `OneForward` for this trainer's steps, or None for the stock step (see the
    module's docstring); `inputs` is its first batch. Says what it chose in one line where the model
    is embedtune's."""
    st_model = getattr(trainer.model, "_orig_mod", trainer.model)
    backbone = _embedtune_backbone(st_model)
    if backbone is None:
        return None
    from .model_facts import load_info

    features, _labels = trainer.collect_features({k: v for k, v in inputs.items() if k != "dataset_name"})
    loss = ("the trainer has one loss per data set" if isinstance(trainer.loss, dict)
            else contrastive_equivalent(trainer.loss))
    asked = load_info(backbone).cuda_graphs
    if asked is False:
        why = "FastModel.from_pretrained(cuda_graphs=False)"
    else:
        choice = loss if isinstance(loss, str) else _graph_step(trainer, st_model, backbone, features, loss, asked)
        if not isinstance(choice, str):
            step, why = choice
            logger.warning("embedtune: the trainer's steps replay as CUDA graphs (%s); "
                           "FastModel.from_pretrained(..., cuda_graphs=False) keeps them eager", why)
            return Graphed(step)
        why = choice
    say = logger.warning if asked else logger.info
    prefix = "cuda_graphs=True, but the trainer's steps run eagerly" if asked else "the trainer's steps run eagerly"
    if isinstance(loss, str) or loss.merged_columns(features) is None:
        say("embedtune: %s: %s", prefix, why)
        return None
    say("embedtune: %s: %s; each step embeds all %d columns in one forward (the loss's math unchanged)",
        prefix, why, len(features))
    return OneForward(loss)


def _graph_step(trainer, st_model, backbone, features, loss, asked):
    """(GraphedStep, why) or the reason the steps stay eager; `loss` is the trainer's loss as the
    equivalent `ContrastiveLoss`, `features` the first batch's columns."""
    import torch

    from . import speed
    from .checkpointing import skip_for_run
    from .graphs import TOKEN_MULTIPLE, GraphedStep, unsupported_reason
    from .model_facts import unwrap_peft
    from .packing import PackedForward, set_compile, set_fused_kernels

    args = trainer.args
    if args.fp16:
        return "fp16 training scales its loss on the host (bf16 does not)"
    device = next(st_model.parameters()).device
    reason = unsupported_reason(loss, device, checkpointing=False)
    if reason:
        return reason
    steps = int(trainer.state.max_steps or 0) * int(args.gradient_accumulation_steps or 1)
    if asked is None and steps < speed.GRAPH_MIN_STEPS:
        return f"{steps} steps, fewer than the {speed.GRAPH_MIN_STEPS} that pay for the captures"
    rows = sum(int(f["attention_mask"].shape[0]) for f in features if "attention_mask" in f)
    width = int(getattr(st_model, "max_seq_length", 0) or max(f["attention_mask"].shape[1] for f in features))
    base = unwrap_peft(backbone)
    hidden = int(getattr(base.config, "hidden_size", 0) or 0)
    worst = -(-rows * width // TOKEN_MULTIPLE) * TOKEN_MULTIPLE  # a full batch, every row max_seq_length long
    reason = skip_for_run(base, worst, hidden, device) if hidden else "the model's width is unknown"
    if reason:
        return reason
    forward = base.__dict__.get("forward")
    mode = None
    if isinstance(forward, PackedForward):
        mode = _speed_mode(base, forward, features, steps)
        if forward.compile == "auto":
            set_compile(base, mode.compile)
        set_fused_kernels(base, mode.fused_kernels)
    step = GraphedStep(loss, width, dtype=torch.bfloat16 if args.bf16 else None)
    why = f"{steps} steps planned" + (", cuda_graphs=True" if asked else
                                     f", at least {speed.GRAPH_MIN_STEPS} pay for the captures")
    if mode is not None:  # compile's and the fused norm's reasons, as `speed.choose` gives them
        why += "; " + "; ".join(mode.why.split("; ")[1:])
    return step, why


def _speed_mode(base, forward, features, steps: int):
    """`speed.choose` for a graphed run of `steps` micro-steps, as the recipe makes it: compiled layers
    where `compile="auto"` and the steps earn the warm-up back (else as the model was loaded), the
    fused norm kernels where the layers have them and they pay. The step's time is estimated from
    the first batch's real tokens."""
    from . import speed
    from .compile_cache import compile_cache_dir
    from .packing import has_fused_kernels

    params = trainable = 0
    for p in base.parameters():
        params += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    tokens = sum(int(f["attention_mask"].sum()) for f in features if "attention_mask" in f)
    fused_applies = fused_warm = False
    if has_fused_kernels(base):
        from .kernels.fused_norm import can_build, kernels_fingerprint

        fused_applies = can_build()
        fused_warm = fused_applies and speed.fused_kernels_cached(kernels_fingerprint())
    return speed.choose(
        compile=None if forward.compile == "auto" else bool(forward.compile), cuda_graphs=True, fast=True, cuda=True,
        steps=steps, step_s=speed.step_seconds(tokens, params, trainable, speed.peak_flops()),
        layers=int(getattr(base.config, "num_hidden_layers", 0) or 0),
        cache_warm=speed.cache_is_warm(compile_cache_dir(), speed.model_fingerprint(base)),
        fused_applies=fused_applies, fused_warm=fused_warm)


def install() -> None:
    """Route `SentenceTransformerTrainer.training_step` through `decide` and the step it chose,
    once. Trainers whose class sets `chooses_own_steps` (embedtune's recipe) are passed through."""
    from sentence_transformers import SentenceTransformerTrainer as cls

    if getattr(cls, _FLAG, False):
        return
    own = vars(cls).get("training_step")  # None: inherited, looked up at each call (as without the patch)

    def stock(self, model, inputs, *args, **kwargs):
        step = own.__get__(self, type(self)) if own is not None else super(cls, self).training_step
        return step(model, inputs, *args, **kwargs)

    @functools.wraps(cls.training_step)
    def training_step(self, model, inputs, *args, **kwargs):
        if getattr(type(self), "chooses_own_steps", False):
            return stock(self, model, inputs, *args, **kwargs)
        choice = _CHOICES.get(self, _UNDECIDED)
        if choice is _UNDECIDED:
            choice = _CHOICES[self] = decide(self, inputs)
        if choice is None:
            return stock(self, model, inputs, *args, **kwargs)
        if isinstance(choice, OneForward):
            return one_forward_training_step(self, choice.loss, stock, model, inputs, *args, **kwargs)
        choice.modules = listed_modules(model, choice.modules)
        return graphed_training_step(self, choice.step, model, inputs, choice.modules)

    cls.training_step = training_step
    setattr(cls, _FLAG, True)
