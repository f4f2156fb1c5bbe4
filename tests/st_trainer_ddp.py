"""Worker for tests/test_trainer_steps.py, run under torchrun (two ranks, gloo): the guide's
SentenceTransformerTrainer (FastModel + LoRA, MNRL, dropout off) for a few steps under DDP, once with
the steps embedtune chooses (off a GPU: the trainer's own step with all columns in one forward) and
once with the trainer's stock step. Rank 0 writes each run's logged losses, encoder forwards per rank,
the chosen step and the trained LoRA weights.

    torchrun --nproc-per-node 2 tests/st_trainer_ddp.py MODEL_DIR OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from datasets import Dataset
from safetensors.torch import save_file
from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
from sentence_transformers.losses import MultipleNegativesRankingLoss

from embedtune import FastModel, trainer_steps
from embedtune.st import to_sentence_transformer


def run(model_dir: str, out: Path, name: str) -> dict:
    torch.manual_seed(0)
    model, tok = FastModel.from_pretrained(model_dir, max_seq_length=32)
    model = FastModel.get_peft_model(model, r=4, target_modules=["query", "key", "value", "dense"],
                                     use_gradient_checkpointing=False, random_state=0)
    st = to_sentence_transformer(model, tok)
    for m in st.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    forwards = []
    st[0].register_forward_pre_hook(lambda module, args: forwards.append(1))
    data = Dataset.from_dict({"anchor": [f"how to do thing {i}" for i in range(32)],
                              "positive": [f"def thing_{i}(x):\n    return x * {i} + {i % 5}" for i in range(32)]})
    args = SentenceTransformerTrainingArguments(
        output_dir=str(out / name), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-3, warmup_steps=0,
        report_to="none", save_strategy="no", logging_steps=1, seed=0, data_seed=0, dataloader_num_workers=0,
        use_cpu=True, disable_tqdm=True)
    trainer = SentenceTransformerTrainer(model=st, args=args, train_dataset=data, loss=MultipleNegativesRankingLoss(st))
    trainer.train()
    choice = trainer_steps._CHOICES.get(trainer)
    lora = {n: p.detach().clone().contiguous() for n, p in st.named_parameters() if p.requires_grad}
    return {"losses": [h["loss"] for h in trainer.state.log_history if "loss" in h], "forwards": len(forwards),
            "step": type(choice).__name__ if choice is not None else "stock", "world": dist.get_world_size(),
            "is_ddp": type(trainer.model_wrapped).__name__}, lora


def main() -> None:
    model_dir, out = sys.argv[1], Path(sys.argv[2])
    ours, ours_lora = run(model_dir, out, "ours")
    decide = trainer_steps.decide
    trainer_steps.decide = lambda trainer, inputs: None  # the trainer's stock step
    stock, stock_lora = run(model_dir, out, "stock")
    trainer_steps.decide = decide
    results = {"ours": ours, "stock": stock}
    if dist.get_rank() == 0:
        save_file(ours_lora, str(out / "ours.safetensors"))
        save_file(stock_lora, str(out / "stock.safetensors"))
        (out / "results.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    from torchrun_launch import exit_without_teardown

    exit_without_teardown()
