"""Large contrastive batches and many GPUs: the numbers behind issue "Scale".

Real data (stdlib docstring -> code pairs, repeated when a batch needs more), random-init models of
real shapes, embedtune's packed fast path and `ContrastiveLoss`, AdamW, bf16 autocast, one process
per GPU. Subcommands:

  single   cached vs uncached time at a batch where both fit (BERT-base, LoRA and full);
           one step at 16,384 pairs (BERT-base, cached); the largest batch reached for BERT-large
           and a Qwen3-0.6B-shaped decoder (cached; stops at OOM or --max-step-s).
  ddp      run under torchrun --nproc-per-node 2: throughput of 1 GPU (rank 0 alone) and of 2 GPUs
           (DDP, cross-device negatives) at the same per-GPU batch, alternating for --rounds.

    python benchmarks/bench_scale_gpu.py single --tokenizer .bench/tokenizer --out $OUT/scale.json
    torchrun --nproc-per-node 2 benchmarks/bench_scale_gpu.py ddp --tokenizer .bench/tokenizer
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_train_gpu import POOLING, build_model_dir  # noqa: E402



def make_model(path: str, lora: bool, max_len: int, device: str = "cuda", checkpointing: bool | str = False):
    from embedtune import FastModel, to_sentence_transformer
    from embedtune.checkpointing import enable_checkpointing

    kind = "qwen3" if "qwen3" in os.path.basename(path) else "bert"
    model, tok = FastModel.from_pretrained(path, max_seq_length=max_len,
                                           dtype=torch.bfloat16 if lora else torch.float32)
    if lora:
        model = FastModel.get_peft_model(model, r=16, lora_alpha=16, use_gradient_checkpointing=checkpointing)
    elif checkpointing:
        enable_checkpointing(model, checkpointing)
    return to_sentence_transformer(model, tok, pooling=POOLING[kind]).to(device)


def batch_features(st, pairs, batch: int, offset: int, device: str):
    """Tokenized anchor and positive columns of `batch` pairs (pairs repeat if the set is smaller)."""
    rows = [pairs[(offset + i) % len(pairs)] for i in range(batch)]
    encode = getattr(st, "preprocess", None) or st.tokenize
    feats = []
    for name in ("anchor", "positive"):
        f = encode([r[name] for r in rows])
        feats.append({k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in f.items()})
    return feats


def run_steps(st, pairs, batch: int, steps: int, cached: bool, token_budget: int | None = None,
              warmup: int = 1, device: str = "cuda", gather: bool = True) -> dict:
    """Median step time (forward, loss, backward, optimizer) and peak memory; features prepared outside."""
    from embedtune.losses import ContrastiveLoss

    model = st
    if gather and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        # buffers (position ids) are constants: no per-forward broadcast; grads live in the buckets
        model = torch.nn.parallel.DistributedDataParallel(st, device_ids=[torch.cuda.current_device()],
                                                          broadcast_buffers=False, gradient_as_bucket_view=True)
    loss_fn = ContrastiveLoss(model, cached=cached, token_budget=token_budget, gather_across_devices=gather)
    params = [p for p in st.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
    st.train()
    feats_all = [batch_features(st, pairs, batch, s * batch, device) for s in range(warmup + steps)]
    tokens = [sum(int(f["attention_mask"].sum()) for f in feats) for feats in feats_all]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    def one_step(feats):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(feats, None)
        loss.backward()  # outside autocast, as the HF trainer does
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        return loss

    times = []
    for step, feats in enumerate(feats_all):
        t0 = time.perf_counter()
        loss = one_step(feats)
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    if os.environ.get("BENCH_PROFILE"):  # one more step under the profiler (every rank steps: DDP)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            one_step(feats_all[-1])
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))
    step_s = sorted(times)[len(times) // 2]
    return {"batch": batch, "cached": cached, "step_s": round(step_s, 4),
            "pairs_per_s": round(batch / step_s, 1),
            "tokens_per_s": round(sum(tokens[warmup:]) / len(times) / step_s),
            "peak_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2), "loss": round(float(loss), 4),
            "token_budget": loss_fn.token_budget if cached else None}  # the default's choice when not given


def _free(*objs):
    for o in objs:
        del o
    torch.cuda.empty_cache()


def single(args, pairs) -> dict:
    results = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}

    def record(row):
        results["rows"].append(row)
        print(json.dumps(row), flush=True)

    with tempfile.TemporaryDirectory() as root:
        base = build_model_dir("bert-base", args.tokenizer, root)
        # 1. cached vs uncached at a batch where both fit
        for lora in (True, False) if "cached" in args.parts else ():
            for cached in (False, True):
                st = make_model(base, lora, args.max_seq_length)
                row = run_steps(st, pairs, args.both_fit_batch, args.steps, cached, args.token_budget)
                row.update(model="bert-base", mode="lora" if lora else "full", test="cached-vs-uncached")
                record(row)
                _free(st)
        # 1b. activation checkpointing (plain, and "unsloth": checkpoints offloaded to CPU), uncached
        for lora in (True, False) if "checkpointing" in args.parts else ():
            for mode in (True, "unsloth"):
                st = make_model(base, lora, args.max_seq_length, checkpointing=mode)
                row = run_steps(st, pairs, args.both_fit_batch, args.steps, False, args.token_budget)
                row.update(model="bert-base", mode="lora" if lora else "full", test="checkpointing",
                           checkpointing=str(mode))
                record(row)
                _free(st)
        # 2. 16,384 pairs per step, cached, full fine-tuning
        if "16k" in args.parts:
            st = make_model(base, False, args.max_seq_length)
            try:
                row = run_steps(st, pairs, 16384, 1, True, args.token_budget)
            except torch.OutOfMemoryError:
                row = {"batch": 16384, "oom": True}
            row.update(model="bert-base", mode="full", test="16k")
            record(row)
            _free(st)
        # 3. largest batch (cached, full fine-tuning) for BERT-large and a Qwen3-0.6B shape
        for name in args.largest_models if "largest" in args.parts else ():
            path = build_model_dir(name, args.tokenizer, root)
            for batch in args.largest:
                st = make_model(path, False, args.max_seq_length)
                try:
                    row = run_steps(st, pairs, batch, 1, True, args.token_budget, warmup=0)
                except torch.OutOfMemoryError:
                    row = {"batch": batch, "oom": True}
                row.update(model=name, mode="full", test="largest")
                record(row)
                _free(st)
                if row.get("oom") or row["step_s"] > args.max_step_s:
                    break
    return results


def ddp(args, pairs) -> dict:
    """1 GPU vs 2 GPUs in one launch, alternating, so both see the same machine state.

    Each round: rank 0 alone trains an unwrapped copy (no collectives: the other GPU idles), then
    both ranks train the DDP model with cross-device negatives. Same per-GPU batch, same features.
    """
    torch.distributed.init_process_group("nccl")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    rows = []
    with tempfile.TemporaryDirectory() as root:
        path = build_model_dir("bert-base", args.tokenizer, root) if rank == 0 else None
        holder = [path]
        torch.distributed.broadcast_object_list(holder)
        for mode in args.ddp_modes:
            lora = mode == "lora"
            shared = make_model(holder[0], lora, args.max_seq_length)
            alone = make_model(holder[0], lora, args.max_seq_length) if rank == 0 else None
            shard = pairs[rank::world]  # each rank its own pairs
            for round_ in range(args.rounds):
                if rank == 0:
                    one = run_steps(alone, shard, args.ddp_batch, args.steps, args.ddp_cached, args.token_budget,
                                    gather=False)
                torch.distributed.barrier()
                two = run_steps(shared, shard, args.ddp_batch, args.steps, args.ddp_cached, args.token_budget)
                torch.distributed.barrier()
                if rank == 0:
                    row = dict(model="bert-base", mode=mode, round=round_, per_gpu_batch=args.ddp_batch,
                               steps=args.steps, one_gpu_pairs_per_s=one["pairs_per_s"],
                               two_gpu_pairs_per_s=round(two["pairs_per_s"] * world, 1),
                               speedup=round(two["pairs_per_s"] * world / one["pairs_per_s"], 3),
                               one_gpu_step_s=one["step_s"], two_gpu_step_s=two["step_s"],
                               peak_gb=two["peak_gb"], card=torch.cuda.get_device_name())
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            del shared, alone
            torch.cuda.empty_cache()
    torch.distributed.destroy_process_group()
    return {"rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["single", "ddp"])
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--max-seq-length", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--both-fit-batch", type=int, default=1024)
    ap.add_argument("--largest", type=lambda s: [int(x) for x in s.split(",")], default=[16384, 32768])
    ap.add_argument("--max-step-s", type=float, default=45.0)
    ap.add_argument("--largest-models", type=lambda s: s.split(","), default=["bert-large", "qwen3-0.6b"])
    ap.add_argument("--token-budget", type=int, default=None)
    ap.add_argument("--ddp-batch", type=int, default=512)
    ap.add_argument("--ddp-cached", action="store_true")
    ap.add_argument("--ddp-modes", type=lambda s: s.split(","), default=["full", "lora"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="scale.json")
    ap.add_argument("--parts", type=lambda s: s.split(","), default=["cached", "checkpointing", "16k", "largest"])
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    from embedtune.data.stdlib import build_stdlib_pairs

    pairs = build_stdlib_pairs(seed=0)
    result = single(args, pairs) if args.what == "single" else ddp(args, pairs)
    if args.what == "single":
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
