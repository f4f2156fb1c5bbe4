"""A stock SentenceTransformerTrainer over a FastModel runs the steps embedtune chooses
(`embedtune.trainer_steps`): CUDA graphs where they pay, else its own eager step with all columns in
one forward. The loss both compute is the trainer's own, the choice is made for the right reasons, and
a run whose steps go through either trains as the eager run does, dropout on. On CPU the capture
cannot run: the graph step is a stand-in that runs its loss eagerly, so what these tests see is
everything around the capture (benchmarks/bench_guide_gpu.py and check_trainer_graphs_gpu.py run the
real one)."""

from __future__ import annotations

import logging

import pytest
import torch
from datasets import Dataset
from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
from sentence_transformers.losses import CachedMultipleNegativesRankingLoss, MultipleNegativesRankingLoss
from sentence_transformers.util import dot_score

import embedtune.graphs as graphs
from embedtune import FastModel
from embedtune.checkpointing import gates
from embedtune.losses import ContrastiveLoss
from embedtune.packing import PackedForward
from embedtune.st import to_sentence_transformer
from embedtune import trainer_steps
from embedtune.trainer_steps import contrastive_equivalent
from tiny_models import make_tiny_model

ANCHORS = ["how to sort a list", "open a file", "x", "parse json text into a dict"]
POSITIVES = ["def sort(items): return sorted(items)", "with open(path) as f: return f.read()", "y",
             "import json\ndef parse(text):\n    return json.loads(text) and a longer tail of tokens here"]
NEGATIVES = ["def add(a, b): return a + b", "print(1)", "z z z", "class A: pass"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return str(make_tiny_model("bert", tmp_path_factory.mktemp("trainer_steps")))


def _st(folder, lora=True, **load):
    torch.manual_seed(0)
    model, tok = FastModel.from_pretrained(folder, max_seq_length=48, **load)
    if lora:
        model = FastModel.get_peft_model(model, r=4, target_modules=["query", "key", "value", "dense"],
                                         use_gradient_checkpointing="unsloth", random_state=0)
    return model, to_sentence_transformer(model, tok)


def _grads(st):
    return {n: p.grad.detach().clone() for n, p in st.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("scale", [20.0, 7.5])
@pytest.mark.parametrize("columns", [2, 3])
def test_mnrl_at_its_defaults_is_the_contrastive_loss(folder, scale, columns):
    """Same loss and gradients (fp32, eval mode: the math, not the dropout draws) as
    MultipleNegativesRankingLoss itself, with and without a hard-negative column."""
    _, st = _st(folder, lora=False)
    st.eval()
    texts = [ANCHORS, POSITIVES, NEGATIVES][:columns]
    features = [st.tokenize(t) for t in texts]
    mnrl = MultipleNegativesRankingLoss(st, scale=scale)
    st.zero_grad(set_to_none=True)
    want = mnrl(features, None)
    want.backward()
    ref = _grads(st)
    ours = contrastive_equivalent(mnrl)
    assert isinstance(ours, ContrastiveLoss) and ours.model is st and ours.temperature == pytest.approx(1 / scale)
    st.zero_grad(set_to_none=True)
    got = ours(features)
    got.backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-6)
    mine = _grads(st)
    assert mine.keys() == ref.keys() and ref
    for name in ref:
        assert torch.allclose(mine[name], ref[name], atol=1e-6, rtol=1e-4), name


def test_other_losses_and_settings_have_no_equivalent(folder):
    _, st = _st(folder, lora=False)
    assert "similarity_fct" in contrastive_equivalent(MultipleNegativesRankingLoss(st, similarity_fct=dot_score))
    assert "Cached" in contrastive_equivalent(CachedMultipleNegativesRankingLoss(st))
    assert "cached" in contrastive_equivalent(ContrastiveLoss(st, cached=True))
    own = ContrastiveLoss(st, temperature=0.1)
    assert contrastive_equivalent(own) is own
    try:
        both = MultipleNegativesRankingLoss(st, directions=("query_to_doc", "doc_to_query"))
    except TypeError:  # sentence-transformers 5: one direction only
        return
    assert "directions" in contrastive_equivalent(both)


class StandIn:
    """A CPU stand-in for `graphs.GraphedStep` (same constructor): runs its loss eagerly and records
    each call's scale and the dropout modules' modes."""

    made: list = []

    def __init__(self, loss, max_seq_length, dtype=None):
        self.loss, self.width, self.dtype, self.calls = loss, max_seq_length, dtype, []
        StandIn.made.append(self)

    def __call__(self, features, scale=1.0):
        modes = {m.training for m in self.loss.model.modules() if isinstance(m, torch.nn.Dropout)}
        self.calls.append((scale, modes, [v.device.type for f in features for v in f.values() if torch.is_tensor(v)]))
        loss = self.loss(features)
        (loss * scale).backward()
        return loss.detach()


def _pairs(n=48):
    return Dataset.from_dict({"anchor": [f"how to do thing {i} with {i % 7}" for i in range(n)],
                              "positive": [f"def thing_{i}(x):\n    return x * {i} + {i % 5}" for i in range(n)]})


def _evaluator():
    """A small retrieval evaluation: run mid-training, it leaves the model in eval mode."""
    from sentence_transformers.evaluation import InformationRetrievalEvaluator

    pairs = _pairs(8)
    ids = [str(i) for i in range(8)]
    return InformationRetrievalEvaluator(queries=dict(zip(ids, pairs["anchor"])), corpus=dict(zip(ids, pairs["positive"])),
                                         relevant_docs={i: [i] for i in ids}, name="tiny", show_progress_bar=False)


def _train(st, loss, out, steps=6, accumulate=2, evaluate_every=None, trainers=None, bf16=False):
    evaluation = {"eval_strategy": "steps", "eval_steps": evaluate_every} if evaluate_every else {}
    args = SentenceTransformerTrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=4, gradient_accumulation_steps=accumulate,
        learning_rate=1e-3, warmup_steps=0, report_to="none", save_strategy="no", logging_steps=1, seed=0,
        data_seed=0, dataloader_num_workers=0, use_cpu=True, disable_tqdm=True, bf16=bf16, **evaluation)
    trainer = SentenceTransformerTrainer(model=st, args=args, train_dataset=_pairs(), loss=loss,
                                         evaluator=_evaluator() if evaluate_every else None)
    trainer.train()
    if trainers is not None:
        trainers.append(trainer)
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.fixture
def as_on_a_gpu(monkeypatch):
    """The decision as on one GPU (the CUDA check passes), with the stand-in for the graph step."""
    StandIn.made = []
    reasons = []
    original = graphs.unsupported_reason

    def unsupported(loss, device, checkpointing=True):
        reason = original(loss, device, checkpointing)
        reasons.append(reason)
        return None if reason == "the model is not on a CUDA device" else reason

    monkeypatch.setattr(graphs, "unsupported_reason", unsupported)
    monkeypatch.setattr(graphs, "GraphedStep", StandIn)
    return reasons


def test_guide_trainer_with_graphs_trains_like_eager_with_dropout(folder, tmp_path, as_on_a_gpu, caplog):
    """The guide's setup (LoRA, "unsloth" checkpointing, MNRL, dropout 0.1, an evaluation every 2
    steps), gradient accumulation 2: the trainer's steps go through the graph step with every dropout
    in train mode (an evaluation leaves them in eval mode) and the
    accumulation's scale, checkpointing settled off for the run (a captured step cannot offload), and
    the losses equal, step for step, those of the eager run with the same loss math (embedtune's
    contrastive loss at MNRL's temperature, one merged forward as the graph step runs it)."""
    model, st = _st(folder, cuda_graphs=False)
    assert any(m.p > 0 for m in st.modules() if isinstance(m, torch.nn.Dropout))
    eager = _train(st, ContrastiveLoss(st, temperature=0.05), tmp_path / "eager", evaluate_every=2)
    assert not StandIn.made

    model, st = _st(folder, cuda_graphs=True)
    with caplog.at_level(logging.INFO, logger="embedtune.trainer_steps"):
        graphed = _train(st, MultipleNegativesRankingLoss(st), tmp_path / "graphed", evaluate_every=2)
    assert len(StandIn.made) == 1, "one graph step for the run, made at its first step"
    step = StandIn.made[0]
    assert step.width == 48 and step.dtype is None and len(step.calls) == 12
    assert all(scale == 0.5 and modes == {True} for scale, modes, _ in step.calls)
    assert gates(model) and all(g.skips_every_batch and g.checkpointed == 0 for g in gates(model))
    assert "replay as CUDA graphs" in caplog.text and "cuda_graphs=True" in caplog.text
    assert len(eager) == len(graphed) == 6
    assert graphed == pytest.approx(eager, abs=1e-6)


def test_the_choice_says_why_steps_stay_eager(folder, tmp_path, as_on_a_gpu, caplog):
    """Too few planned steps (automatic choice), another loss, fp16, or cuda_graphs=False: the stock
    step, with the reason in the log; a model embedtune did not build is not looked at."""
    _, st = _st(folder)
    with caplog.at_level(logging.INFO, logger="embedtune.trainer_steps"):
        _train(st, MultipleNegativesRankingLoss(st), tmp_path / "short", steps=3, accumulate=1)
    assert not StandIn.made and "3 steps, fewer than the 40" in caplog.text
    caplog.clear()
    _, st = _st(folder, cuda_graphs=True)
    with caplog.at_level(logging.INFO, logger="embedtune.trainer_steps"):
        _train(st, MultipleNegativesRankingLoss(st, similarity_fct=dot_score), tmp_path / "dot", steps=2, accumulate=1)
    assert not StandIn.made and "cuda_graphs=True, but" in caplog.text and "similarity_fct" in caplog.text
    caplog.clear()
    _, st = _st(folder, cuda_graphs=False)
    with caplog.at_level(logging.INFO, logger="embedtune.trainer_steps"):
        _train(st, MultipleNegativesRankingLoss(st), tmp_path / "off", steps=2, accumulate=1)
    assert not StandIn.made and "cuda_graphs=False" in caplog.text


def test_a_long_run_chooses_graphs_and_settles_compile(folder, tmp_path, as_on_a_gpu, monkeypatch, caplog):
    """Enough planned steps: graphs chosen without being asked for, the layers' `compile="auto"` settled
    for the run and the fused norm kernels switched on, as the recipe's choice makes them (steps
    estimated at 1 s each, the kernels' build cached: they pay, a compile's cold warm-up does not)."""
    import embedtune.kernels.fused_norm as fused_norm
    import embedtune.speed as speed

    monkeypatch.setattr(speed, "step_seconds", lambda *args: 1.0)
    monkeypatch.setattr(speed, "fused_kernels_cached", lambda fingerprint: True)
    monkeypatch.setattr(fused_norm, "can_build", lambda: True)
    model, st = _st(folder)
    forward = model.get_base_model().__dict__["forward"]
    assert isinstance(forward, PackedForward) and forward.compile == "auto" and not forward.fused_kernels
    with caplog.at_level(logging.INFO, logger="embedtune.trainer_steps"):
        _train(st, MultipleNegativesRankingLoss(st), tmp_path / "long", steps=40, accumulate=1)
    assert len(StandIn.made) == 1 and len(StandIn.made[0].calls) == 40
    assert forward.compile is False and forward.fused_kernels is True
    assert "40 steps planned, at least 40 pay for the captures" in caplog.text
    assert "compile: saves ~5 s over 40 steps" in caplog.text and "fused norm: saves ~4.8 s" in caplog.text


def _count_forwards(st) -> list:
    """One entry per forward of the SentenceTransformer's first module (its encoder)."""
    calls = []
    st[0].register_forward_pre_hook(lambda module, args: calls.append(1))
    return calls


def _dropout(st, p: float) -> None:
    for m in st.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = p


def test_off_a_gpu_the_trainer_runs_its_own_step_with_one_forward(folder, tmp_path, monkeypatch, caplog):
    """On the CPU the decision finds no CUDA device: the trainer's own step runs, with all columns
    embedded in one forward (the stock MNRL runs two: the anchors apart), the checkpointing gates as
    they were (choosing per batch), and the trainer's loss (MNRL) back in place after the run, as
    evaluation uses it."""
    made = []
    monkeypatch.setattr(graphs, "GraphedStep", lambda *a, **k: made.append(1))
    model, st = _st(folder, cuda_graphs=True)
    forwards = _count_forwards(st)
    mnrl = MultipleNegativesRankingLoss(st)
    with caplog.at_level(logging.INFO, logger="embedtune.trainer_steps"):
        losses = _train(st, mnrl, tmp_path / "cpu", steps=2, accumulate=2)
    assert len(losses) == 2 and not made
    assert len(forwards) == 4, "one forward per micro-step"
    assert "not on a CUDA device" in caplog.text and "all 2 columns in one forward" in caplog.text
    assert gates(model) and not any(g.skips_every_batch for g in gates(model))

    _, st = _st(folder, cuda_graphs=True)
    forwards = _count_forwards(st)
    monkeypatch.setattr(trainer_steps, "decide", lambda trainer, inputs: None)  # the stock step
    _train(st, MultipleNegativesRankingLoss(st), tmp_path / "stock", steps=2, accumulate=2)
    assert len(forwards) == 8, "the stock MNRL step embeds the anchors apart"


def _run(folder, out, monkeypatch, dropout=0.0, stock=False, loss_of=MultipleNegativesRankingLoss, **train):
    """The guide's trainer on a fresh model with its dropout at `dropout`, through the steps embedtune
    chooses or (`stock`) the trainer's stock step: (logged losses, the loss, the trainer)."""
    _, st = _st(folder)
    _dropout(st, dropout)
    loss, trainers = loss_of(st), []
    with monkeypatch.context() as patch:
        if stock:
            patch.setattr(trainer_steps, "decide", lambda trainer, inputs: None)
        losses = _train(st, loss, out, accumulate=1, trainers=trainers, **train)
    return losses, loss, trainers[0]


def test_one_forward_trains_like_the_stock_step(folder, tmp_path, monkeypatch):
    """The eager step with one forward against the trainer's stock step (MNRL, a forward per column):
    with dropout off the same losses step for step, the trainer's loss untouched after the run; with
    dropout 0.1 the same losses as embedtune's own loss at MNRL's temperature in the same trainer
    (one forward each, the same draws), and different from the run with dropout off (dropout is live)."""
    ours, mnrl, trainer = _run(folder, tmp_path / "ours", monkeypatch, steps=4)
    stock, _, _ = _run(folder, tmp_path / "stock", monkeypatch, stock=True, steps=4)
    assert isinstance(trainer_steps._CHOICES.get(trainer), trainer_steps.OneForward)
    assert trainer.loss is mnrl, "the trainer's own loss is back after each step"
    assert ours == pytest.approx(stock, rel=1e-4, abs=1e-5)

    ours_dropout, _, _ = _run(folder, tmp_path / "ours_dropout", monkeypatch, dropout=0.1, steps=4)
    own_dropout, _, _ = _run(folder, tmp_path / "own_dropout", monkeypatch, dropout=0.1, steps=4,
                             loss_of=lambda st: ContrastiveLoss(st, temperature=0.05))
    assert ours_dropout == pytest.approx(own_dropout, abs=1e-6)
    assert abs(ours_dropout[0] - ours[0]) > 1e-4, "dropout 0.1 changes the first step's loss"


def test_one_forward_runs_in_the_trainers_bf16(folder, tmp_path, monkeypatch):
    """The trainer's bf16 is accelerate's autocast around the model's forward (transformers 5 leaves
    `autocast_smart_context_manager` empty): the swapped loss calls that same forward, so the one-forward
    step runs in bf16 as the stock step does, not in fp32 beside it. Dropout off: the same arithmetic on
    both sides, so only the precision tells them apart."""
    fp32, _, _ = _run(folder, tmp_path / "fp32", monkeypatch, steps=3)
    ours, _, trainer = _run(folder, tmp_path / "ours", monkeypatch, steps=3, bf16=True)
    stock, _, _ = _run(folder, tmp_path / "stock", monkeypatch, stock=True, steps=3, bf16=True)
    assert isinstance(trainer_steps._CHOICES.get(trainer), trainer_steps.OneForward)
    # the first step, before bf16's rounding of different GEMM shapes has moved the weights apart
    apart = abs(stock[0] - fp32[0])
    assert apart > 1e-3, "bf16 moves the stock step's loss"
    assert abs(ours[0] - stock[0]) < apart / 4, "the one-forward step runs in the stock step's bf16"


def test_the_trainer_loss_is_kept_where_no_one_forward_applies(folder, tmp_path, caplog):
    """A loss without an equivalent (MNRL over dot products) or a model off the packed path: the stock
    step, one forward per column, and the reason in the log."""
    _, st = _st(folder)
    forwards = _count_forwards(st)
    with caplog.at_level(logging.INFO, logger="embedtune.trainer_steps"):
        _train(st, MultipleNegativesRankingLoss(st, similarity_fct=dot_score), tmp_path / "dot", steps=2, accumulate=1)
    assert len(forwards) == 4 and "similarity_fct" in caplog.text and "one forward" not in caplog.text
    caplog.clear()
    torch.manual_seed(0)
    plain, tok = FastModel.from_pretrained(folder, max_seq_length=48, fast=False)
    st = to_sentence_transformer(plain, tok)
    forwards = _count_forwards(st)
    with caplog.at_level(logging.INFO, logger="embedtune.trainer_steps"):
        _train(st, MultipleNegativesRankingLoss(st), tmp_path / "plain", steps=2, accumulate=1)
    assert len(forwards) == 4 and "one forward" not in caplog.text


def test_checkpointing_stays_where_a_full_batch_would_not_fit(folder, tmp_path, as_on_a_gpu, monkeypatch, caplog):
    """Too little free memory for a full batch's activations: the steps stay eager and the layers keep
    choosing per batch (a captured step could not checkpoint); "always" checkpointing keeps graphs off."""
    import embedtune.checkpointing as checkpointing

    monkeypatch.setattr(checkpointing, "free_memory_bytes", lambda device: 1000)
    model, st = _st(folder, cuda_graphs=True)
    with caplog.at_level(logging.INFO, logger="embedtune.trainer_steps"):
        _train(st, MultipleNegativesRankingLoss(st), tmp_path / "tight", steps=2, accumulate=1)
    assert not StandIn.made and "a full batch's activations" in caplog.text
    assert not any(g.skips_every_batch for g in gates(model)) and any(g.checkpointed for g in gates(model))
    assert checkpointing.blocks_graphs(model)
    torch.manual_seed(0)
    base, tok = FastModel.from_pretrained(folder, max_seq_length=48, cuda_graphs=True)
    model = FastModel.get_peft_model(base, r=4, use_gradient_checkpointing="always", random_state=0)
    assert checkpointing.skip_for_run(model, 64, 32, torch.device("cpu")) == "gradient checkpointing is on for every batch"
    assert checkpointing.blocks_graphs(model)


def test_under_ddp_one_forward_trains_like_the_stock_step(folder, tmp_path):
    """Two ranks (torchrun, gloo): the trainer wraps the model in DistributedDataParallel and puts the
    wrapped model into the loss; the one-forward step (one forward per rank and step, against the stock
    step's two) gives the stock step's losses and LoRA weights, dropout off."""
    import json

    from safetensors.torch import load_file
    from torchrun_launch import HERE, torchrun

    proc = torchrun(HERE / "st_trainer_ddp.py", folder, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    ours, stock = results["ours"], results["stock"]
    assert ours["world"] == 2 and ours["is_ddp"] == "DistributedDataParallel"
    assert (ours["step"], ours["forwards"]) == ("OneForward", 3) and (stock["step"], stock["forwards"]) == ("stock", 6)
    assert len(ours["losses"]) == 3 and ours["losses"] == pytest.approx(stock["losses"], rel=1e-5, abs=1e-6)
    a, b = load_file(tmp_path / "ours.safetensors"), load_file(tmp_path / "stock.safetensors")
    assert a.keys() == b.keys() and a
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
