"""The stock SentenceTransformerTrainer's graphed step (`embedtune.trainer_steps`) against its own eager
step, on a GPU: the guide's setup (FastModel, LoRA r8, MultipleNegativesRankingLoss, bf16) on a
random-init BERT with dropout off, three batches (the last of fewer rows: a new shape), each run
three times through the trainer's `training_step` (eager first sight, capture, replay; later shapes
captured at first sight). Each call's loss and LoRA gradients are compared with the trainer's eager
step on the same batch in fp32 (the stock `compute_loss`, MNRL embedding the anchors apart), and so is
the trainer's eager step in bf16: on a random-init model (scores near one another) bf16 moves MNRL's
loss by about 1% and its gradients by 10-20%; the graphed step must come at least as close to the
fp32 step as that. The trainer's bf16 is accelerate's: `Trainer.train` has accelerate wrap the
model's forward in autocast (`autocast_smart_context_manager` is a no-op in transformers 5), so every
trainer here gets its model prepared the same way before its first step. The eager step that
`cuda_graphs=False` leaves (the trainer's own step, all columns in one forward) is held to the same
bounds. Then dropout 0.1: the replays' gradients must differ (new masks each replay). Without a GPU
(a smoke run) only the eager parts run, in the CPU's bf16 autocast.

    python benchmarks/check_trainer_graphs_gpu.py --tokenizer .bench/tokenizer [--model bert-base]
Prints one line per call and PASS/FAIL last; exit 1 on a failure.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

# the fp32 reference in IEEE fp32: images that turn TF32 on for every fp32 matmul do it through this
# variable, which torch reads once, at its first cuBLAS call
TF32_OVERRIDE = os.environ.pop("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", None)

import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

LOSS_TOL, GRAD_TOL = 1e-2, 5e-2  # floors of the bounds below (bf16 against fp32)


def build(model_dir: str, dropout: float, cuda_graphs):
    from embedtune import FastModel
    from embedtune.st import to_sentence_transformer

    torch.manual_seed(0)
    model, tok = FastModel.from_pretrained(model_dir, max_seq_length=256, cuda_graphs=cuda_graphs)
    model = FastModel.get_peft_model(model, r=8, lora_alpha=8, target_modules=["query", "key", "value", "dense"],
                                     use_gradient_checkpointing="unsloth", random_state=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)  # gradients reach lora_A too
    st = to_sentence_transformer(model, tok)
    for m in st.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = dropout
    return st


def trainer_for(st, pairs_path: str, out: str, bf16: bool = True):
    from datasets import load_dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.losses import MultipleNegativesRankingLoss

    data = load_dataset("json", data_files=pairs_path, split="train").select(range(40))
    args = SentenceTransformerTrainingArguments(output_dir=out, max_steps=100, per_device_train_batch_size=16,
                                                bf16=bf16, use_cpu=not torch.cuda.is_available(),
                                                report_to="none", save_strategy="no",
                                                dataloader_drop_last=False, seed=0)
    trainer = SentenceTransformerTrainer(model=st, args=args, train_dataset=data.select_columns(["anchor", "positive"]),
                                         loss=MultipleNegativesRankingLoss(st))
    trainer.create_optimizer_and_scheduler(num_training_steps=100)
    trainer.state.max_steps = 100
    trainer.current_gradient_accumulation_steps = 1
    # as `Trainer.train` does before its first step: with bf16, accelerate wraps the forward in autocast
    trainer.model_wrapped = trainer.accelerator.prepare_model(st)
    return trainer


def grads(st) -> dict:
    return {n: p.grad.detach().float().clone() for n, p in st.named_parameters() if p.requires_grad and p.grad is not None}


def rows_of(batch) -> object:
    return batch["anchor_input_ids"].shape[0] if "anchor_input_ids" in batch else "?"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def eager_reference(trainer, st, batch):
    """The stock `compute_loss` on `batch` (MNRL, anchors apart), in the trainer's precision."""
    st.zero_grad(set_to_none=True)
    st.train()
    loss = trainer.compute_loss(st, dict(batch))
    loss.backward()
    return loss.detach().float().item(), grads(st)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="bert-base")
    ap.add_argument("--tokenizer", default=".bench/tokenizer")
    args = ap.parse_args()
    from bench_train_gpu import build_model_dir
    from embedtune.data.stdlib import build_stdlib_pairs, write_jsonl

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    print(f"fp32 matmuls in IEEE fp32 (TORCH_ALLOW_TF32_CUBLAS_OVERRIDE was {TF32_OVERRIDE!r}, now unset)")
    root = tempfile.mkdtemp(prefix="trainer-graphs-")
    pairs = str(write_jsonl(build_stdlib_pairs(seed=0), os.path.join(root, "pairs.jsonl")))
    model_dir = build_model_dir(args.model, args.tokenizer, root)
    failures = []

    # dropout off: every call of the graphed step against the trainer's eager step on its batch
    st_ref = build(model_dir, 0.0, cuda_graphs=False)
    ref_trainer = trainer_for(st_ref, pairs, os.path.join(root, "ref"), bf16=False)
    batches = []
    for batch in ref_trainer.get_train_dataloader():
        batches.append({k: v for k, v in batch.items()})
        if len(batches) == 3:
            break
    references = [eager_reference(ref_trainer, st_ref, b) for b in batches]  # fp32
    st_bf16 = build(model_dir, 0.0, cuda_graphs=False)
    bf16_trainer = trainer_for(st_bf16, pairs, os.path.join(root, "ref_bf16"))
    stock_bf16 = [eager_reference(bf16_trainer, st_bf16, b) for b in batches]

    # how far the trainer's own bf16 step's gradients are from fp32, per batch: the scale of the bounds
    bf16_apart = [max(rel(stock[n], want[n]) for n in want) for (_, want), (_, stock) in zip(references, stock_bf16)]
    for i, ((want_loss, _), (stock_loss, _)) in enumerate(zip(references, stock_bf16)):
        print(f"batch {i}: the trainer's own bf16 step against fp32: loss {stock_loss:.5f} vs {want_loss:.5f}, "
              f"gradients {bf16_apart[i]:.2e} relative", flush=True)
        if bf16_apart[i] == 0.0:  # the bounds below would be the floors alone, judged against nothing
            failures.append(f"batch {i}: the trainer's bf16 step equals its fp32 step (no autocast applied)")
    from embedtune import trainer_steps

    def graph_step(trainer):
        choice = trainer_steps._CHOICES.get(trainer)
        return choice.step if isinstance(choice, trainer_steps.Graphed) else None

    def judge(label: str, i: int, loss: float, got: dict) -> bool:
        """This call against the fp32 step on batch i, within the bf16 step's own distance x1.5."""
        (want_loss, want), (stock_loss, stock) = references[i], stock_bf16[i]
        loss_bound = max(LOSS_TOL * max(1.0, abs(want_loss)), 1.5 * abs(stock_loss - want_loss))
        grad_bound = max(GRAD_TOL, 1.5 * bf16_apart[i])
        worst = max(rel(got[n], want[n]) for n in want) if got.keys() == want.keys() else float("inf")
        ok = abs(loss - want_loss) <= loss_bound and worst <= grad_bound
        # shown, not judged: the distance from the trainer's own bf16 step, the step this one replaces
        to_bf16 = max(rel(got[n], stock[n]) for n in stock) if got.keys() == stock.keys() else float("inf")
        print(f"batch {i} ({rows_of(batches[i])} rows) {label}; loss {loss:.5f} vs fp32 {want_loss:.5f}; "
              f"gradients {worst:.2e} relative (worst of {len(want)}; bounds {loss_bound:.4f}, {grad_bound:.2e}) "
              f"{'ok' if ok else 'FAIL'}; vs the trainer's bf16 step: loss {stock_loss:.5f}, gradients {to_bf16:.2e}",
              flush=True)
        return ok

    gpu = torch.cuda.is_available()
    if gpu:
        st = build(model_dir, 0.0, cuda_graphs=True)
        trainer = trainer_for(st, pairs, os.path.join(root, "graphed"))
        for i in range(len(batches)):
            for call in range(3):
                st.zero_grad(set_to_none=True)
                loss = trainer.training_step(st, dict(batches[i])).float().item()
                step = graph_step(trainer)
                if not judge(f"call {call}: {step.last if step else 'not graphed'}", i, loss, grads(st)) or step is None:
                    failures.append(f"batch {i} call {call}")
        step = graph_step(trainer)
        if step:
            print(f"graph step: {step.counts}, shapes {step.shapes}, off: {step.off_reason}")
    else:
        print("no GPU: the graphed step and its dropout are not checked (a smoke run of the eager parts)")

    # cuda_graphs=False: the trainer's own eager step, all columns in one forward (`OneForward`)
    st = build(model_dir, 0.0, cuda_graphs=False)
    trainer = trainer_for(st, pairs, os.path.join(root, "one_forward"))
    for i in range(len(batches)):
        st.zero_grad(set_to_none=True)
        loss = trainer.training_step(st, dict(batches[i])).float().item()
        one = isinstance(trainer_steps._CHOICES.get(trainer), trainer_steps.OneForward)
        if not judge("eager, " + ("one forward" if one else "NOT one forward"), i, loss, grads(st)) or not one:
            failures.append(f"batch {i} one forward")

    if not gpu:
        print("PASS (eager parts)" if not failures else f"FAIL: {failures}")
        sys.exit(1 if failures else 0)
    # dropout 0.1: replays of one batch draw new masks
    st = build(model_dir, 0.1, cuda_graphs=True)
    trainer = trainer_for(st, pairs, os.path.join(root, "dropout"))
    seen = []
    for call in range(4):
        st.zero_grad(set_to_none=True)
        trainer.training_step(st, dict(batches[0]))
        seen.append(grads(st))
    apart = min(rel(seen[a][n], seen[b][n]) for a, b in ((1, 2), (2, 3)) for n in list(seen[0])[:4])
    step = graph_step(trainer)
    how = step.counts if step else "not graphed"
    print(f"dropout 0.1: replays' gradients at least {apart:.2e} relative apart ({how})")
    if apart < 1e-3:
        failures.append("dropout: replays drew the same masks")
    print("PASS" if not failures else f"FAIL: {failures}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
