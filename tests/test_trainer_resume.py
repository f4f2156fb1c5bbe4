"""The stock SentenceTransformerTrainer resumes and restores the best checkpoint of a LoRA model.

The guide's flow (FastModel.from_pretrained -> FastModel.get_peft_model -> a SentenceTransformer around
it, by `to_sentence_transformer` or the guide's own `get_st_unsloth_wrapper` -> stock
SentenceTransformerTrainer) saves checkpoints that sentence-transformers' own `_load_from_checkpoint`
cannot load back (peft's state-dict keys differ from a stock reload's). `embedtune.st.install_compat`
takes that case over; these tests check that a resumed run ends with exactly the weights of an
uninterrupted one, and that `load_best_model_at_end=True` really restores the best checkpoint.
All on CPU with a tiny BERT (and a Dense head after the pooling).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch

import embedtune
from embedtune import EmbedtuneError, FastModel, to_sentence_transformer
from embedtune.st import st_modules

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import make_tiny_model, make_tiny_st_model  # noqa: E402

STEPS = 6
SAVE_EVERY = 2
BATCH = 8


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny_resume")


@pytest.fixture(scope="module")
def pairs():
    from datasets import Dataset

    topics = ["files", "sockets", "threads", "json", "regex", "dates", "paths", "math"]
    anchors, positives = [], []
    for i in range(40):
        topic = topics[i % len(topics)]
        anchors.append(f"how do I work with {topic} number {i} in python")
        positives.append(f"def handle_{topic}_{i}(x): return process_{topic}(x, {i})")
    return Dataset.from_dict({"anchor": anchors, "positive": positives})


def _build(flow: str, tiny_root: Path, lora: bool = True, seed: int = 0, **peft):
    """The model a user's program builds, in one process or the next (the same code each time)."""
    torch.manual_seed(seed)
    if flow == "to_st":  # a SentenceTransformer checkpoint with a Dense head, through to_sentence_transformer
        folder = make_tiny_st_model(tiny_root, "bert_dense", dense_dims=(16,), normalize=True)
    else:
        folder = make_tiny_model("bert", tiny_root)
    model, tokenizer = FastModel.from_pretrained(str(folder), max_seq_length=32)
    if lora:
        model = FastModel.get_peft_model(model, **{"r": 4, "lora_alpha": 8, "random_state": seed, **peft})
    if flow == "to_st":
        return to_sentence_transformer(model, tokenizer)
    # the guide's get_st_unsloth_wrapper, plus a trainable Dense after the pooling
    import sentence_transformers
    from sentence_transformers import SentenceTransformer

    st_modules()
    transformer_module = sentence_transformers.models.Transformer(model_name_or_path=str(folder), max_seq_length=32)
    transformer_module.auto_model = model
    transformer_module.tokenizer = tokenizer
    pooling = sentence_transformers.models.Pooling(word_embedding_dimension=model.config.hidden_size,
                                                   pooling_mode="cls")
    dense = sentence_transformers.models.Dense(model.config.hidden_size, 16, activation_function=torch.nn.Tanh())
    return SentenceTransformer(modules=[transformer_module, pooling, dense, sentence_transformers.models.Normalize()],
                               device="cpu")


def _trainer(st, pairs, output_dir: Path, evaluator=None, **extra):
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.losses import MultipleNegativesRankingLoss

    args = SentenceTransformerTrainingArguments(
        output_dir=str(output_dir), max_steps=STEPS, per_device_train_batch_size=BATCH, learning_rate=5e-3,
        warmup_steps=0, report_to="none", save_strategy="steps", save_steps=SAVE_EVERY, logging_steps=SAVE_EVERY,
        seed=0, data_seed=0, dataloader_num_workers=0, use_cpu=True, disable_tqdm=True, **extra)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return SentenceTransformerTrainer(model=st, args=args, train_dataset=pairs,
                                          loss=MultipleNegativesRankingLoss(st), evaluator=evaluator)


def _trainable(st) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in st.named_parameters() if p.requires_grad}


def _all(st) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in st.state_dict().items()}


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def _quiet_train(trainer, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train(**kwargs)


@pytest.mark.parametrize("flow", ["to_st", "guide_wrapper"])
def test_lora_resume_matches_uninterrupted_run(flow, tiny_root, pairs, tmp_path):
    st = _build(flow, tiny_root)
    start = _trainable(st)
    assert any(".lora_A." in n for n in start) and all(".lora_" in n or n.startswith("2.") for n in start)
    _quiet_train(_trainer(st, pairs, tmp_path / "full"))
    uninterrupted, uninterrupted_all = _trainable(st), _all(st)
    assert _max_diff(start, uninterrupted) > 1e-3  # it trained

    # a second "process": the same program builds the model anew and resumes from a middle checkpoint
    resumed = _build(flow, tiny_root, seed=1)  # another LoRA init (and Dense init): the checkpoint must win
    middle = tmp_path / "full" / f"checkpoint-{SAVE_EVERY * (STEPS // SAVE_EVERY // 2)}"
    assert (middle / "adapter_model.safetensors").is_file()
    trainer = _trainer(resumed, pairs, tmp_path / "resumed")
    _quiet_train(trainer, resume_from_checkpoint=str(middle))
    assert trainer.state.global_step == STEPS
    assert _max_diff(_trainable(resumed), uninterrupted) <= 1e-6
    assert _max_diff(_all(resumed), uninterrupted_all) <= 1e-6  # the frozen weights too (Dense under to_st)


def test_load_best_model_at_end_restores_best_adapter(tiny_root, pairs, tmp_path):
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file
    from sentence_transformers.evaluation import SentenceEvaluator

    class Scripted(SentenceEvaluator):
        """Scores that make the second evaluation (step 4 of 6) the best."""

        def __init__(self):
            super().__init__()
            self.primary_metric = "custom_score"
            self.scores = iter([0.1, 0.9, 0.2])

        def __call__(self, model, output_path=None, epoch=-1, steps=-1):
            return {"custom_score": next(self.scores)}

    st = _build("guide_wrapper", tiny_root)
    trainer = _trainer(st, pairs, tmp_path / "run", eval_strategy="steps", eval_steps=SAVE_EVERY,
                       load_best_model_at_end=True, metric_for_best_model="eval_custom_score",
                       greater_is_better=True, evaluator=Scripted())
    _quiet_train(trainer)
    best = tmp_path / "run" / "checkpoint-4"
    assert Path(trainer.state.best_model_checkpoint).name == best.name

    backbone = st[0].auto_model
    now = {k: v.detach().clone() for k, v in get_peft_model_state_dict(backbone).items()}
    saved_best = load_file(str(best / "adapter_model.safetensors"))
    saved_last = load_file(str(tmp_path / "run" / f"checkpoint-{STEPS}" / "adapter_model.safetensors"))
    assert now.keys() == saved_best.keys()
    assert _max_diff(saved_best, saved_last) > 1e-4  # the two checkpoints differ, so the test can tell
    assert _max_diff(now, saved_best) == 0.0
    dense_best = load_file(str(best / "2_Dense" / "model.safetensors"))
    assert _max_diff({k: v.detach() for k, v in st[2].state_dict().items()}, dense_best) == 0.0


def test_full_finetuning_resume_still_exact(tiny_root, pairs, tmp_path):
    st = _build("to_st", tiny_root, lora=False)
    start = _trainable(st)
    assert not any(".lora_" in n for n in start)
    _quiet_train(_trainer(st, pairs, tmp_path / "full"))
    uninterrupted = _all(st)
    assert _max_diff(_trainable(st), start) > 1e-3

    resumed = _build("to_st", tiny_root, lora=False)
    trainer = _trainer(resumed, pairs, tmp_path / "resumed")
    _quiet_train(trainer, resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    assert trainer.state.global_step == STEPS
    assert _max_diff(_all(resumed), uninterrupted) <= 1e-6


def test_resume_with_other_lora_settings_is_one_clear_error(tiny_root, pairs, tmp_path):
    st = _build("guide_wrapper", tiny_root)
    _quiet_train(_trainer(st, pairs, tmp_path / "run"))
    other = _build("guide_wrapper", tiny_root, r=2)
    lora_before = _trainable(other)
    with pytest.raises(EmbedtuneError, match="do not fit this model"):
        _quiet_train(_trainer(other, pairs, tmp_path / "other"),
                     resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert _max_diff(_trainable(other), lora_before) == 0.0  # left as it was, not half loaded


def test_patch_is_installed_once_and_narrow():
    from sentence_transformers.base.trainer import BaseTrainer

    embedtune.install_compat()  # what building a model with embedtune installs
    patched = BaseTrainer._load_from_checkpoint
    embedtune.install_compat()
    assert BaseTrainer._load_from_checkpoint is patched
    assert hasattr(patched, "__wrapped__")  # functools.wraps of the stock method, which non-LoRA models still get
