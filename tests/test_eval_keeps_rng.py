"""Evaluating does not change what a run trains (`ResumableTrainer.evaluate`).

The trainer's evaluation draws from the host's random generators while it sets up (a data loader's
seed), and on a CPU the next steps' dropout masks come from the same generator: a run that evaluated
every step used to end with other weights than one that never evaluated, and a resumed run whose
evaluations fell elsewhere than the uninterrupted run's trained differently. Dropout is on (BERT's 0.1):
with it off the generator's state would not matter.
"""

from __future__ import annotations

import random
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import make_tiny_model  # noqa: E402

STEPS = 6


@pytest.fixture(scope="module")
def pairs():
    from datasets import Dataset

    return Dataset.from_dict({"anchor": [f"how to use topic {i} with {i % 5}" for i in range(48)],
                              "positive": [f"def topic_{i}(x): return x + {i}" for i in range(48)]})


def _evaluator():
    from sentence_transformers.evaluation import InformationRetrievalEvaluator

    queries = {str(i): f"how to use topic {i} with {i % 5}" for i in range(6)}
    corpus = {f"d{i}": f"def topic_{i}(x): return x + {i}" for i in range(6)}
    return InformationRetrievalEvaluator(queries, corpus, {str(i): {f"d{i}"} for i in range(6)}, name="held",
                                         show_progress_bar=False)


def _train(tmp_path: Path, pairs, evaluate: bool) -> tuple[dict[str, torch.Tensor], object]:
    from sentence_transformers import SentenceTransformerTrainingArguments
    from sentence_transformers.losses import MultipleNegativesRankingLoss

    from embedtune import FastModel, to_sentence_transformer
    from embedtune.resumable_trainer import ResumableTrainer

    folder = make_tiny_model("bert", tmp_path.parent / "tiny", hidden_dropout_prob=0.1,
                             attention_probs_dropout_prob=0.1, name="bert_dropout")
    torch.manual_seed(0)
    model, tokenizer = FastModel.from_pretrained(str(folder), max_seq_length=32)
    st = to_sentence_transformer(model, tokenizer)
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path / ("eval" if evaluate else "plain")), max_steps=STEPS, per_device_train_batch_size=8,
        learning_rate=5e-3, warmup_steps=0, report_to="none", save_strategy="no", logging_steps=1, seed=0,
        eval_strategy="steps" if evaluate else "no", eval_steps=1, dataloader_num_workers=0, use_cpu=True,
        disable_tqdm=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = ResumableTrainer(model=st, args=args, train_dataset=pairs, loss=MultipleNegativesRankingLoss(st),
                                   evaluator=_evaluator() if evaluate else None)
        trainer.train()
    assert trainer.state.global_step == STEPS
    return {n: p.detach().clone() for n, p in st.named_parameters() if p.requires_grad}, trainer


def test_a_run_that_evaluates_every_step_trains_the_same_weights(tmp_path, pairs):
    plain, _ = _train(tmp_path, pairs, evaluate=False)
    evaluated, trainer = _train(tmp_path, pairs, evaluate=True)
    evaluations = [entry for entry in trainer.state.log_history if any(k.startswith("eval_") for k in entry)]
    assert len(evaluations) == STEPS  # it did evaluate at every step
    assert plain.keys() == evaluated.keys()
    assert max((plain[k] - evaluated[k]).abs().max().item() for k in plain) == 0.0


def test_an_evaluation_leaves_the_host_generators_as_it_found_them(tmp_path, pairs):
    _, trainer = _train(tmp_path, pairs, evaluate=True)
    torch.manual_seed(123), random.seed(123), np.random.seed(123)
    before = torch.random.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.evaluate()
    assert torch.equal(before[0], torch.random.get_rng_state())
    assert before[1] == random.getstate() and np.array_equal(before[2], np.random.get_state()[1])
