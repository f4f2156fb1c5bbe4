"""GPU training throughput: stock sentence-transformers (+PEFT) vs embedtune's packed fast path.

Same data (stdlib docstring -> code pairs), same model config (random init), same batch, same
loss (MNRL), same optimizer, in one process on one card. Prints a table and writes JSON.

    python benchmarks/bench_train_gpu.py --models bert-base,bert-large --modes lora,full \
        --tokenizer .bench/tokenizer --out $OUT/bench.json

It also checks exactness first: packed vs padded outputs in bf16 on the GPU.
Peak memory is each row's, net of what earlier rows of the process still hold when it starts
(`held_before_gb`; `peak_gb_raw` is torch's figure).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import tempfile
import time

import torch

SHAPES = {
    "bert-base": dict(kind="bert", hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "bert-large": dict(kind="bert", hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    # Qwen3-0.6B's shape (the tokenizer's 30k vocabulary instead of 151k: only the embedding table differs)
    "qwen3-0.6b": dict(kind="qwen3", hidden_size=1024, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, intermediate_size=3072),
    # Qwen3-4B's shape (again the tokenizer's vocabulary): 3.7B parameters, for the FSDP run
    "qwen3-4b": dict(kind="qwen3", hidden_size=2560, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, intermediate_size=9728),
    "tiny-bert": dict(kind="bert", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128),
    # BERT-large's depth at tiny width: a step's host work (each op's dispatch) with almost no arithmetic
    "deep-tiny": dict(kind="bert", hidden_size=64, num_hidden_layers=24, num_attention_heads=4, intermediate_size=128),
}
# --NAME-row: one more embedtune+compile row with one setting changed: (label suffix, help, settings)
COMPILED_VARIANTS = {
    "size-classes": (", size classes", "with packed streams padded to size classes (fewer distinct GEMM shapes)",
                     {"token_multiple": 1024}),
    "cpp-wrapper": (", C++ wrapper", "with inductor's C++ wrapper (fewer host cycles per kernel launch)",
                    {"cpp_wrapper": True}),
    "whole-stack": (", whole-stack graph", "with the whole layer stack as one graph (layers.WHOLE_STACK)",
                    {"whole_stack": True}),
    "per-layer-compile": (", per-layer graph", "with one compiled graph per layer step (WHOLE_STACK off)",
                          {"whole_stack": False}),
    # inductor settings for the GPU-bound step's own kernels (GELU, dropout + residual + LayerNorm)
    "coordinate-descent": (", coordinate-descent tuning", "with inductor tuning its kernels' block sizes",
                           {"inductor": {"coordinate_descent_tuning": True}}),
    "max-autotune-gemm": (", max-autotune GEMMs", "with inductor's GEMM templates autotuned (GELU can fuse "
                          "into a GEMM's epilogue; long compile)", {"inductor": {"max_autotune_gemm": True}}),
    "fallback-random": (", aten dropout RNG", "with dropout drawn by aten's kernels, not inductor's own",
                        {"inductor": {"fallback_random": True}}),
}
INDUCTOR_DEFAULTS: dict = {}  # inductor settings the variants change, at their values before any row
TARGETS = {"bert": ["query", "key", "value", "dense"],
           "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
POOLING = {"bert": "mean", "qwen3": "lasttoken"}


def build_model_dir(name: str, tokenizer_dir: str, root: str) -> str:
    from transformers import AutoTokenizer, BertConfig, BertModel, Qwen3Config, Qwen3Model

    shape = dict(SHAPES[name])
    kind = shape.pop("kind")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    path = os.path.join(root, name)
    previous = torch.get_default_dtype()
    if name == "qwen3-4b":
        torch.set_default_dtype(torch.bfloat16)  # 7 GB to write instead of 15; loading upcasts as asked
    if kind == "bert":
        config = BertConfig(vocab_size=tok.vocab_size, max_position_embeddings=512, **shape)
        model = BertModel(config, add_pooling_layer=False)
    else:
        config = Qwen3Config(vocab_size=tok.vocab_size, max_position_embeddings=4096, pad_token_id=0,
                             bos_token_id=101, eos_token_id=102, **shape)
        model = Qwen3Model(config)
    torch.set_default_dtype(previous)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _kind(path: str) -> str:
    return "qwen3" if "qwen3" in os.path.basename(path) else "bert"


def stock_model(path: str, lora: bool, max_len: int, compile_model: bool):
    """Stock ST with SDPA; LoRA through peft directly on the backbone (transformers' add_adapter refuses peft<0.22)."""
    from peft import LoraConfig, TaskType, get_peft_model
    from sentence_transformers import SentenceTransformer

    from embedtune.st import st_modules

    Transformer, Pooling = st_modules().Transformer, st_modules().Pooling
    module = Transformer(path, max_seq_length=max_len, model_kwargs={"dtype": torch.bfloat16 if lora else torch.float32})
    if lora:
        peft = get_peft_model(module.model, LoraConfig(r=8, lora_alpha=8, target_modules=TARGETS[_kind(path)],
                                                       task_type=TaskType.FEATURE_EXTRACTION))
        torch.nn.Module.__setattr__(module, "model", peft)
    if compile_model:
        torch.nn.Module.__setattr__(module, "model", torch.compile(module.model, dynamic=True))
    st = SentenceTransformer(modules=[module, Pooling(module.auto_model.config.hidden_size, POOLING[_kind(path)])], device="cuda")
    return st


def embedtune_model(path: str, lora: bool, max_len: int, fp32_base: bool = False, compile_model: bool | str = False,
                    token_multiple: int | None = None, fused_kernels: bool = False):
    from embedtune import FastModel, to_sentence_transformer
    from embedtune.packing import enable_fast_path

    dtype = torch.bfloat16 if lora and not fp32_base else torch.float32
    model, tok = FastModel.from_pretrained(path, max_seq_length=max_len, dtype=dtype, fast=False)
    enable_fast_path(model, compile=compile_model, token_multiple=token_multiple, fused_kernels=fused_kernels)
    if lora:
        model = FastModel.get_peft_model(model, r=8, lora_alpha=8, target_modules=TARGETS[_kind(path)])
    return to_sentence_transformer(model, tok, pooling=POOLING[_kind(path)], normalize=False)


def run_steps(st, pairs, batch: int, steps: int, warmup: int, lora: bool, embedtune_loss: bool = False,
              cuda_graphs: bool = False, max_len: int = 512):
    """Stock rows train with sentence-transformers' MNRL; embedtune rows with embedtune's recipe loss,
    `ContrastiveLoss` (equal to MNRL, tested; on the packed path it embeds all columns in one forward).
    `cuda_graphs`: forward and backward through `embedtune.graphs.GraphedStep` (as `--cuda-graphs` runs);
    its host work (`prepare`: merge the columns, pad to the fixed width) is done before the timed
    window, as tokenizing is for every row, but it copies the batch to the device itself, so its rows
    time that copy too (the other rows' copies finish before their window).
    Besides the rate over all timed steps, the rate over steady steps: those in which nothing was
    compiled and, under CUDA graphs, the step was a replay (what a long run settles at)."""
    from sentence_transformers.losses import MultipleNegativesRankingLoss

    from embedtune.compile_cache import compile_seconds
    from embedtune.graphs import GraphedStep, StaticBatch
    from embedtune.losses import ContrastiveLoss

    loss_fn = ContrastiveLoss(st) if embedtune_loss else MultipleNegativesRankingLoss(st)
    graphed = GraphedStep(loss_fn, max_len, dtype=torch.bfloat16) if cuda_graphs else None
    params = [p for p in st.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
    st.train()
    torch.cuda.reset_peak_memory_stats()
    times, tokens, square_lengths, steady = [], 0, 0, []
    warm_start = time.perf_counter()
    for step in range(warmup + steps):
        if step == warmup:
            torch.cuda.synchronize()
            warmup_s = time.perf_counter() - warm_start
        rows = [pairs[(step * batch + i) % len(pairs)] for i in range(batch)]
        encode = getattr(st, "preprocess", None) or st.tokenize
        feats = [encode([r["anchor"] for r in rows]), encode([r["positive"] for r in rows])]
        if graphed is None:
            feats = [{k: v.cuda(non_blocking=True) if torch.is_tensor(v) else v for k, v in f.items()} for f in feats]
        else:  # its host work (merge, pad to the fixed width): a data loader's, like tokenizing
            feats = graphed.prepare(feats)
        torch.cuda.synchronize()
        compiled_before = compile_seconds()
        t0 = time.perf_counter()
        if graphed is not None:
            loss = graphed(feats)
        else:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = loss_fn(feats, None)
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - t0)
            columns = [feats.inputs] if isinstance(feats, StaticBatch) else feats
            lengths = [f["attention_mask"].sum(dim=1).float() for f in columns]
            step_tokens = sum(int(n.sum()) for n in lengths)
            tokens += step_tokens
            # steady state: no compile (stock + compile recompiles when a batch fails a shape guard)
            # and, under CUDA graphs, a replay (no eager first sight, no capture)
            if compile_seconds() == compiled_before and (graphed is None or graphed.last == "replayed"):
                steady.append((times[-1], step_tokens))
            square_lengths += sum(float((n * n).sum()) for n in lengths)
    elapsed = sum(times)
    extra = {"steady_steps": len(steady)}
    if steady:
        extra["steady_tokens_per_s"] = sum(n for _, n in steady) / sum(t for t, _ in steady)
    if graphed is not None:
        extra["graphs"] = {**graphed.counts, "shapes": graphed.shapes, "off": graphed.off_reason}
    return {**extra, "samples_per_s": batch * steps / elapsed, "tokens_per_s": tokens / elapsed,
            "peak_gb": torch.cuda.max_memory_allocated() / 1e9, "step_ms": 1000 * elapsed / steps,
            "tokens": tokens, "loss": float(loss), "warmup_s": warmup_s,
            "attention_flops_per_s": square_lengths / elapsed}  # x flops_per_token_pair(name) below


def exactness(path: str, compile_model: bool = False) -> float:
    """Packed (compiled layer steps with `compile_model`) vs padded last hidden states in bf16,
    relative error over real tokens."""
    from embedtune import FastModel
    from embedtune.packing import disable_fast_path, enable_fast_path

    model, tok = FastModel.from_pretrained(path, max_seq_length=128, dtype=torch.bfloat16, fast=False)
    tok.padding_side = "right"
    model.eval()
    texts = ["short", "a much longer text " * 12, "def f(x):\n    return x + 1", "medium length text here"] * 8
    batch = {k: v.cuda() for k, v in tok(texts, padding=True, return_tensors="pt").items()}
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        ref = model(**batch).last_hidden_state[mask].float()
        enable_fast_path(model, compile=compile_model)
        out = model(**batch).last_hidden_state[mask].float()
        disable_fast_path(model)
    return ((out - ref).norm() / ref.norm()).item()


def flops_per_token(name: str, lora: bool) -> float:
    s = SHAPES[name]
    h, n_layers, inter = s["hidden_size"], s["num_hidden_layers"], s["intermediate_size"]
    if s["kind"] == "bert":
        n = n_layers * (4 * h * h + 2 * h * inter)
    else:  # q and o at heads*head_dim, k and v at kv_heads*head_dim, gated MLP
        attn = s["num_attention_heads"] * s["head_dim"]
        kv = s["num_key_value_heads"] * s["head_dim"]
        n = n_layers * (2 * h * attn + 2 * h * kv + 3 * h * inter)
    return (4 if lora else 6) * n


def attention_flops(name: str) -> float:
    """Training FLOPs of attention per (query token, key token) pair of one sequence: QK^T and AV
    (2 x 2 x width forward, 3x for forward + backward), in every layer; half for causal decoders."""
    s = SHAPES[name]
    width = s["num_attention_heads"] * s.get("head_dim", s["hidden_size"] // s["num_attention_heads"])
    per_pair = 3 * 4 * width * s["num_hidden_layers"]
    return per_pair / 2 if s["kind"] == "qwen3" else per_pair


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="bert-base")
    parser.add_argument("--modes", default="lora,full")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--max-seq-length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--compile", action="store_true", help="also run stock + torch.compile")
    parser.add_argument("--out", default="bench.json")
    parser.add_argument("--compile-modes", type=lambda s: s.split(","), default=["default"],
                        help="embedtune compile rows: default and/or reduce-overhead (CUDA graphs)")
    parser.add_argument("--skip-stock-compile", action="store_true", help="stock + compile warms up for minutes")
    parser.add_argument("--fused-lora-row", action="store_true",
                        help="also run embedtune eager with LoRA's low-rank product and sum fused (lora_linear.FUSE_LORA_ADD)")
    parser.add_argument("--unfused-projections-row", action="store_true",
                        help="also run embedtune eager with q/k/v (gate/up) as separate products (lora_linear.FUSE_PROJECTIONS off)")
    for variant, (_, help_text, _) in COMPILED_VARIANTS.items():
        parser.add_argument(f"--{variant}-row", action="store_true", help=f"also run embedtune+compile {help_text}")
    parser.add_argument("--variant-graphs", action="store_true",
                        help="run the embedtune+compile variant rows above with each step replayed as a CUDA graph")
    parser.add_argument("--cuda-graph-rows", action="store_true",
                        help="also run embedtune (and embedtune+compile) with each step replayed as a CUDA graph")
    parser.add_argument("--fused-norm-row", action="store_true",
                        help="also run embedtune + CUDA graphs with the fused dropout + residual + LayerNorm kernels "
                             "(kernels.fused_norm)")
    parser.add_argument("--warm-cache-row", action="store_true",
                        help="repeat each embedtune+compile row: its warm-up then reads torch's on-disk compile caches")
    args = parser.parse_args()

    from embedtune.data.stdlib import build_stdlib_pairs
    from embedtune.packing import layers, lora_linear
    import torch._inductor.config  # noqa: F401 - the C++ wrapper row sets it
    default_whole_stack = layers.WHOLE_STACK
    INDUCTOR_DEFAULTS.update({key: getattr(torch._inductor.config, key) for variant in COMPILED_VARIANTS.values()
                              for key in variant[2].get("inductor", {})})

    pairs = build_stdlib_pairs(seed=0)
    torch.backends.cuda.matmul.allow_tf32 = True
    results = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    peak_tflops = 989e12 if "H100" in results["card"] or "H200" in results["card"] else None
    with tempfile.TemporaryDirectory() as root:
        for name in args.models.split(","):
            path = build_model_dir(name, args.tokenizer, root)
            results.setdefault("exactness_bf16_rel_err", {})[name] = exactness(path)
            for mode in args.modes.split(","):
                lora = mode == "lora"
                runners = [("stock", lambda: stock_model(path, lora, args.max_seq_length, False), {})]
                if args.compile and not args.skip_stock_compile:
                    runners.append(("stock+compile", lambda: stock_model(path, lora, args.max_seq_length, True), {}))
                runners.append(("embedtune", lambda: embedtune_model(path, lora, args.max_seq_length), {}))
                if args.unfused_projections_row:
                    runners.append(("embedtune, projections one by one",
                                    lambda: embedtune_model(path, lora, args.max_seq_length), {}))
                if args.cuda_graph_rows:
                    runners.append(("embedtune + CUDA graphs", lambda: embedtune_model(path, lora, args.max_seq_length),
                                    {"cuda_graphs": True}))
                if args.fused_norm_row:
                    runners.append(("embedtune + CUDA graphs, fused norm", lambda: embedtune_model(
                        path, lora, args.max_seq_length, fused_kernels=True), {"cuda_graphs": True}))
                if lora and args.fused_lora_row:
                    runners.append(("embedtune, LoRA add fused", lambda: embedtune_model(path, lora, args.max_seq_length), {}))
                for compile_mode in args.compile_modes if args.compile else ():
                    label = "embedtune+compile" + ("" if compile_mode == "default" else f"({compile_mode})")
                    runners.append((label, lambda m=compile_mode: embedtune_model(path, lora, args.max_seq_length,
                                                                                 compile_model=m), {}))
                    for variant, (suffix, _, settings) in COMPILED_VARIANTS.items() if compile_mode == "default" else ():
                        if getattr(args, variant.replace("-", "_") + "_row"):
                            settings = dict(settings, cuda_graphs=args.variant_graphs)
                            runners.append((label + suffix + (" + CUDA graphs" if args.variant_graphs else ""),
                                            lambda t=settings.get("token_multiple"): embedtune_model(
                                                path, lora, args.max_seq_length, compile_model="default",
                                                token_multiple=t), settings))
                    if args.cuda_graph_rows and compile_mode == "default":
                        runners.append((label + " + CUDA graphs", lambda: embedtune_model(
                            path, lora, args.max_seq_length, compile_model="default"), {"cuda_graphs": True}))
                    if args.warm_cache_row:  # a second run: what a job pays with torch's compile caches filled
                        runners.append((label + " warm cache", lambda m=compile_mode: embedtune_model(
                            path, lora, args.max_seq_length, compile_model=m), {}))
                for label, make, settings in runners:  # settings: see COMPILED_VARIANTS
                    lora_linear.FUSE_LORA_ADD = label.endswith("LoRA add fused")
                    lora_linear.FUSE_PROJECTIONS = not label.endswith("projections one by one")
                    layers.WHOLE_STACK = settings.get("whole_stack", default_whole_stack)
                    torch._inductor.config.cpp_wrapper = settings.get("cpp_wrapper", False)  # part of the cache key
                    for key, value in INDUCTOR_DEFAULTS.items():  # each row compiles with its own settings only
                        setattr(torch._inductor.config, key, settings.get("inductor", {}).get(key, value))
                    # memory still held by earlier rows (a compiled graph's cache can keep a model alive): not
                    # this row's; its peak is reported net of it, the raw peak beside
                    gc.collect()
                    torch.cuda.empty_cache()
                    held_gb = torch.cuda.memory_allocated() / 1e9
                    st = make()
                    try:
                        row = run_steps(st, pairs, args.batch, args.steps, args.warmup, lora,
                                        embedtune_loss=label.startswith("embedtune"),
                                        cuda_graphs=settings.get("cuda_graphs", False), max_len=args.max_seq_length)
                    except torch.OutOfMemoryError:
                        row = {"samples_per_s": math.nan, "tokens_per_s": math.nan, "peak_gb": math.nan, "oom": True}
                    row.update(model=name, mode=mode, impl=label, held_before_gb=held_gb, peak_gb_raw=row["peak_gb"])
                    row["peak_gb"] -= held_gb
                    if peak_tflops:
                        dense = row["tokens_per_s"] * flops_per_token(name, lora)
                        row["mfu"] = (dense + row.get("attention_flops_per_s", 0) * attention_flops(name)) / peak_tflops
                    results["rows"].append(row)
                    print(json.dumps(row), flush=True)
                    del st
                    torch.cuda.empty_cache()
            if args.compile:  # after the rows, so the first compiled row's warm-up is a cold compile
                results["exactness_bf16_rel_err"][name + "+compile"] = exactness(path, compile_model=True)
    with open(args.out, "w") as fh:
        json.dump(results, fh, indent=2)
    print(f"\ncard: {results['card']}  torch {results['torch']}  bf16 packed-vs-padded rel err: "
          f"{results['exactness_bf16_rel_err']}")
    print(f"{'model':11s} {'mode':5s} {'impl':44s} {'samples/s':>10s} {'tokens/s':>10s} {'MFU':>6s} {'peak GB':>8s} {'warmup s':>9s}")
    for r in results["rows"]:
        print(f"{r['model']:11s} {r['mode']:5s} {r['impl']:44s} {r['samples_per_s']:10.1f} {r['tokens_per_s']:10.0f} "
              f"{r.get('mfu', math.nan):6.1%} {r['peak_gb']:8.1f} {r.get('warmup_s', math.nan):9.1f}"
              + (f"  steady steps only: {r['steady_tokens_per_s']:,.0f} tokens/s ({r['steady_steps']} of {args.steps})"
                 if r.get("steady_steps", args.steps) < args.steps and "steady_tokens_per_s" in r else "")
              + (f"; {r['graphs']['shapes']} graphs" if "graphs" in r else ""))


if __name__ == "__main__":
    main()
