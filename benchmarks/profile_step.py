"""Profile a few training steps of one configuration and print where the GPU time goes.

    python benchmarks/profile_step.py --model bert-base --mode lora --tokenizer .bench/tokenizer
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from bench_train_gpu import build_model_dir, embedtune_model, stock_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="bert-base")
    parser.add_argument("--mode", default="lora")
    parser.add_argument("--impl", default="embedtune")
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--no-dropout", action="store_true")
    parser.add_argument("--fp32-base", action="store_true", help="LoRA on fp32 base weights (autocast bf16)")
    parser.add_argument("--compile", default=None, help="embedtune compile mode: default or reduce-overhead")
    parser.add_argument("--cached", action="store_true", help="embedtune's cached loss (else its uncached loss)")
    parser.add_argument("--token-budget", type=int, default=None)
    parser.add_argument("--rows", type=int, default=18, help="rows of the table of kernels by device time")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="embedtune: each step replayed as a CUDA graph (embedtune.graphs); every batch is warmed "
                             "up and captured before the timed and profiled steps")
    parser.add_argument("--fused-kernels", action="store_true",
                        help="embedtune: the fused dropout + residual + LayerNorm kernels (kernels.fused_norm), as the "
                             "default mode runs them with CUDA graphs")
    parser.add_argument("--no-main-grads", action="store_true",
                        help="with --cuda-graphs: autocast's per-weight casts instead of `packing.main_grad`")
    args = parser.parse_args()

    from sentence_transformers.losses import MultipleNegativesRankingLoss

    from embedtune.data.stdlib import build_stdlib_pairs

    pairs = build_stdlib_pairs(seed=0)
    with tempfile.TemporaryDirectory() as root:
        path = build_model_dir(args.model, args.tokenizer, root)
        lora = args.mode == "lora"
        if args.impl == "embedtune":
            st = embedtune_model(path, lora, 512, fp32_base=args.fp32_base, compile_model=args.compile or False)
        else:
            st = stock_model(path, lora, 512, False)
        if args.fused_kernels:
            from embedtune.packing import set_fused_kernels

            set_fused_kernels(st[0].auto_model, True)
        if args.no_dropout:
            for m in st.modules():
                if isinstance(m, torch.nn.Dropout):
                    m.p = 0.0
        if args.impl == "embedtune":
            from embedtune.losses import ContrastiveLoss

            loss_fn = ContrastiveLoss(st, cached=args.cached, token_budget=args.token_budget)
        else:
            loss_fn = MultipleNegativesRankingLoss(st)
        st.train()  # dropout on, as in training (a loaded model starts in eval mode)
        opt = torch.optim.AdamW([p for p in st.parameters() if p.requires_grad], lr=1e-5, fused=True)
        encode = getattr(st, "preprocess", None) or st.tokenize
        batches = []
        for step in range(8):
            rows = [pairs[(step * args.batch + i) % len(pairs)] for i in range(args.batch)]
            feats = [encode([r["anchor"] for r in rows]), encode([r["positive"] for r in rows])]
            if args.cuda_graphs:  # the graph step takes the host batch (it picks the shape there)
                batches.append(feats)
            else:
                batches.append([{k: v.cuda() if torch.is_tensor(v) else v for k, v in f.items()} for f in feats])
        real_tokens = [sum(int(f["attention_mask"].sum()) for f in feats) for feats in batches]
        graphed = None
        if args.cuda_graphs:
            from embedtune.graphs import GraphedStep

            graphed = GraphedStep(loss_fn, 512, dtype=torch.bfloat16, main_grads=not args.no_main_grads)
            batches = [graphed.prepare(feats) for feats in batches]  # host work ahead, as a data loader would

        def step(feats):
            if graphed is not None:
                graphed(feats)
            else:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = loss_fn(feats, None)
                loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        from torch._inductor import metrics

        from embedtune.compile_cache import compile_seconds

        warm = time.perf_counter()
        for feats in batches + batches if graphed is not None else batches[:3]:  # graphs: eager, then capture
            step(feats)
        torch.cuda.synchronize()
        # Warm-up = compile (dynamo + AOT + inductor, torch's own timers) + the rest (first-call
        # Triton autotuning, cuBLAS heuristics, allocator growth).
        print(f"warm-up {time.perf_counter() - warm:.1f} s, of which compile {compile_seconds():.1f} s; "
              f"inductor kernels generated: {metrics.generated_kernel_count}")
        if args.compile:
            from torch._dynamo.utils import compile_times

            print(compile_times(repr="str", aggregate=True))
        t0 = time.perf_counter()
        for feats in batches[3:]:
            step(feats)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        tokens = sum(real_tokens[3:])
        print(f"{args.impl} {args.model} {args.mode} dropout={'off' if args.no_dropout else 'on'} "
              f"compile={args.compile} cached={args.cached} fp32_base={args.fp32_base}: "
              f"{seconds / 5 * 1000:.1f} ms/step, {tokens / seconds:,.0f} real tokens/s")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            for feats in batches[3:5]:
                step(feats)
            torch.cuda.synchronize()
            wall = time.perf_counter() - t0
        if graphed is not None:
            print("graphs:", graphed.counts, "off:", graphed.off_reason)
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=args.rows, max_name_column_width=60))
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60))
        from torch._dynamo.utils import counters

        print("dynamo:", {k: dict(v) for k, v in counters.items() if k in ("stats", "frames", "graph_break", "recompiles")})
        from torch.autograd import DeviceType

        device_events = [e for e in prof.events() if e.device_type == DeviceType.CUDA]  # kernels and copies
        busy = sum(e.self_device_time_total for e in device_events) / 1e6
        kernels = len(device_events)
        # GPU busy far below 100% of wall: the step waits on the host (kernel launches, syncs), not on the GPU
        print(f"GPU busy {busy:.3f} s of {wall:.3f} s wall ({busy / wall:.0%}); ~{kernels // 2} device ops per step")
        kinds = {}
        for e in device_events:  # where device time goes, by kernel family
            name = e.name.lower()
            kind = ("flash attention" if "flash" in name else  # first: its kernel names mention cutlass types
                    "gemm" if any(w in name for w in ("gemm", "cutlass", "sm90", "xmma", "cublas", "nvjet")) else
                    "triton (inductor)" if name.startswith("triton") else
                    "optimizer" if "adam" in name or "multi_tensor" in name else "copy/memset" if "memcpy" in name
                    or "memset" in name else "other")
            kinds[kind] = kinds.get(kind, 0.0) + e.self_device_time_total / 1e6
        print("device time by kind: " + ", ".join(f"{k} {v / 2 * 1000:.1f} ms/step" for k, v in
                                                   sorted(kinds.items(), key=lambda kv: -kv[1])))


if __name__ == "__main__":
    main()
