"""The stock job bench_job_gpu.py times: what a user writes with sentence-transformers (+ peft) to do
what `embedtune train` does, from loading the model to saving it.

    python benchmarks/stock_job.py PAIRS.jsonl MODEL_DIR OUTPUT --max-steps 150 [--lora-r 8] [--torch-compile]

SentenceTransformerTrainer + MultipleNegativesRankingLoss (NO_DUPLICATES batches), SDPA attention,
bf16 + fused AdamW on CUDA, 4 dataloader workers (tokenizing off the step's path: --workers 0 is the
trainer's default, which tokenizes each batch inside the training loop: ~140 ms per 128 stdlib pairs on
a 2-core CPU), embedtune's recipe otherwise (lr 2e-5 full / 2e-4 LoRA, constant
schedule after 10% warmup, weight decay 0.01, grad clipping 1.0); LoRA through peft directly
(sentence-transformers 6's `auto_model` is read-only, hence Module.__setattr__). Saves the model
(merged for LoRA) and prints one JSON line last: steps, train_s, peak_gb, step_times (between the
perf_counter readings at each step's end; no device sync per step, so single steps are rough but
sums over many steps are right: the host can run only a bounded way ahead of the GPU), data_wait_s
(the time between a step's end and the next one's start: fetching and tokenizing the batch).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("model")
    ap.add_argument("output")
    ap.add_argument("--max-steps", type=int, required=True)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--max-seq-length", type=int, default=512)
    ap.add_argument("--lora-r", type=int, default=0, help="0: full fine-tuning")
    ap.add_argument("--torch-compile", action="store_true")
    ap.add_argument("--workers", type=int, default=4,
                    help="dataloader_num_workers: 4 tokenizes beside the step, as a tuned user would (the stronger "
                         "peer); 0 is the trainer's default, tokenizing in the training loop")
    args = ap.parse_args()

    from datasets import load_dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.losses import MultipleNegativesRankingLoss
    from sentence_transformers.training_args import BatchSamplers
    from transformers import TrainerCallback

    cuda = torch.cuda.is_available()
    model = SentenceTransformer(args.model, device="cuda" if cuda else "cpu", model_kwargs={"attn_implementation": "sdpa"})
    model.max_seq_length = args.max_seq_length
    module = model[0]
    slot = "model" if hasattr(module, "model") else "auto_model"
    peft = None
    if args.lora_r:
        from peft import LoraConfig, TaskType, get_peft_model

        peft = get_peft_model(module.auto_model, LoraConfig(r=args.lora_r, lora_alpha=args.lora_r,
                                                            target_modules=["query", "key", "value", "dense"],
                                                            task_type=TaskType.FEATURE_EXTRACTION))
        torch.nn.Module.__setattr__(module, slot, peft)
    data = load_dataset("json", data_files=args.data, split="train").select_columns(["anchor", "positive"])

    step_ends: list[float] = []
    step_begins: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_begin(self, *a, **k):  # after the batch is fetched: begin - previous end = waiting for data
            step_begins.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            step_ends.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as tmp:
        trainer = SentenceTransformerTrainer(
            model=model,
            args=SentenceTransformerTrainingArguments(
                output_dir=tmp, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
                learning_rate=2e-4 if args.lora_r else 2e-5, lr_scheduler_type="constant_with_warmup",
                warmup_steps=math.ceil(0.1 * args.max_steps), weight_decay=0.01, max_grad_norm=1.0,
                batch_sampler=BatchSamplers.NO_DUPLICATES, eval_strategy="no", save_strategy="no",
                report_to="none", logging_steps=10, seed=42, dataloader_drop_last=True,
                dataloader_num_workers=args.workers, dataloader_persistent_workers=args.workers > 0,
                bf16=cuda, optim="adamw_torch_fused" if cuda else "adamw_torch", torch_compile=args.torch_compile),
            train_dataset=data,
            loss=MultipleNegativesRankingLoss(model),
            callbacks=[StepTimes()],
        )
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - t0
    if peft is not None:
        torch.nn.Module.__setattr__(module, slot, peft.merge_and_unload())
    model.save(args.output)
    print(json.dumps({"steps": trainer.state.global_step, "train_s": round(train_s, 3),
                      "peak_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if cuda else None,
                      "workers": args.workers,
                      "data_wait_s": round(sum(b - a for a, b in zip(step_ends, step_begins[1:])), 3),
                      "step_times": [round(b - a, 5) for a, b in zip([t0] + step_ends, step_ends)]}), flush=True)


if __name__ == "__main__":
    main()
