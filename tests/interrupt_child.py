"""A child process that tests kill or interrupt at a known point, never at a guessed time.

    python interrupt_child.py train ARGS...   runs `embedtune train ARGS...` (the real CLI)
    python interrupt_child.py save TARGET     saves a tiny merged model over the folder TARGET

The gate, set by environment variables, makes the child stop and wait at one point:
  CHILD_GATE_DIR   folder where the child writes `reached` when it gets there, and waits
                   until the test writes `release` (or kills it)
  CHILD_BLOCK_AT   train: `step:N` = before training step N+1, after the checkpoints up to step N;
                          `checkpoint:N` = in the middle of writing checkpoint N (its weights,
                          optimizer and scheduler written; RNG state, trainer state, marker not);
                   save:  `weights` = once the model is written into the temp folder, before the rename
  CHILD_TINY_MODEL save: the tiny model folder to build the saved model from
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def _wait_at_gate() -> None:
    gate = Path(os.environ["CHILD_GATE_DIR"])
    (gate / "reached").write_text(str(os.getpid()))
    while not (gate / "release").exists():
        time.sleep(0.02)


def _install_train_gate(where: str) -> None:
    import transformers

    kind, _, step = where.partition(":")
    step = int(step)
    done = []

    def once() -> bool:
        if done:
            return False
        done.append(True)
        return True

    if kind == "step":
        original_step = transformers.Trainer.training_step

        def training_step(self, *args, **kwargs):
            if self.state.global_step == step and once():
                _wait_at_gate()
            return original_step(self, *args, **kwargs)

        transformers.Trainer.training_step = training_step
    elif kind == "checkpoint":
        original_rng = transformers.Trainer._save_rng_state

        def _save_rng_state(self, output_dir):
            if self.state.global_step == step and once():
                _wait_at_gate()
            return original_rng(self, output_dir)

        transformers.Trainer._save_rng_state = _save_rng_state
    else:
        raise SystemExit(f"unknown CHILD_BLOCK_AT {where!r}")


def _save(target: str) -> None:
    import torch
    from sentence_transformers import SentenceTransformer

    from embedtune import FastModel, save_merged, to_sentence_transformer

    if os.environ.get("CHILD_BLOCK_AT") == "weights":
        original = SentenceTransformer.save

        def save(self, path, *args, **kwargs):  # save_merged writes into its temp folder here
            result = original(self, path, *args, **kwargs)
            _wait_at_gate()
            return result

        SentenceTransformer.save = save
    torch.manual_seed(1)
    model, tokenizer = FastModel.from_pretrained(os.environ["CHILD_TINY_MODEL"], max_seq_length=32)
    model = FastModel.get_peft_model(model, r=4)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)  # a model that differs from the one already in TARGET
    save_merged(to_sentence_transformer(model, tokenizer), target, overwrite=True)


def main() -> None:
    command, *args = sys.argv[1:]
    if command == "save":
        _save(args[0])
        return
    if os.environ.get("CHILD_BLOCK_AT"):
        _install_train_gate(os.environ["CHILD_BLOCK_AT"])
    from embedtune.cli import main as cli_main

    sys.argv = ["embedtune", command, *args]
    cli_main()


if __name__ == "__main__":
    main()
