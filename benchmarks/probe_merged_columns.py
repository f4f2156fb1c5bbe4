"""The guide's step with sentence-transformers' MNRL: one forward per column (stock) against all columns
merged into one forward.

Why: sentence-transformers 6 embeds the anchor column on its own and merges only the candidate columns
(`merged_forward.embed_columns(separate_first=True)`), because a merged batch is padded to the widest
column. On embedtune's packed path padding costs nothing, and a batch of 8 pairs is bound by the host's
per-layer work, so one forward and backward instead of two would halve that work. This probe measures
what merging would save before anything is built on it: the step (tokenize, MNRL forward, backward,
AdamW) of a LoRA r8 SentenceTransformer over a FastModel, alternating the two forms, same batches.
The merged form swaps MNRL's `embed_columns` for one with `separate_first=False` in this process only.

CPU, BERT-large's depth at tiny width (host work without the arithmetic):
    python benchmarks/probe_merged_columns.py --tokenizer .bench/tokenizer
GPU, the guide's BERT-large shape, bf16 autocast:
    python benchmarks/probe_merged_columns.py --tokenizer .bench/tokenizer --shape bert-large --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

SHAPES = {
    "deep-tiny": dict(hidden_size=64, num_hidden_layers=24, num_attention_heads=4, intermediate_size=128),
    "bert-large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}


def build(folder: str, shape: str, tokenizer: str) -> None:
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, **SHAPES[shape]), add_pooling_layer=False).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer).save_pretrained(folder)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="deep-tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-seq-length", type=int, default=32)
    ap.add_argument("--steps", type=int, default=40, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of (separate, merged)")
    args = ap.parse_args()

    import sentence_transformers.sentence_transformer.losses.multiple_negatives_ranking as mnrl_module
    from sentence_transformers.base.losses import merged_forward
    from sentence_transformers.losses import MultipleNegativesRankingLoss

    from embedtune import FastModel
    from embedtune.data import build_stdlib_pairs
    from embedtune.st import to_sentence_transformer

    folder = tempfile.mkdtemp(prefix="probe-merged-")
    build(folder, args.shape, args.tokenizer)
    model, tok = FastModel.from_pretrained(folder, max_seq_length=args.max_seq_length, device=args.device)
    model = FastModel.get_peft_model(model, r=8, lora_alpha=8, target_modules=["query", "key", "value", "dense"])
    st = to_sentence_transformer(model, tok, pooling="cls").train()
    loss = MultipleNegativesRankingLoss(st)
    optimizer = torch.optim.AdamW([p for p in st.parameters() if p.requires_grad], lr=1e-4)
    pairs = build_stdlib_pairs(max_pairs=args.batch * (args.steps + 5), seed=1)
    batches = [pairs[i:i + args.batch] for i in range(0, len(pairs), args.batch)]
    stock = merged_forward.embed_columns
    forms = {"separate": stock,
             "merged": lambda model, features, separate_first=True: stock(model, features, separate_first=False)}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if args.device == "cuda" else torch.autocast("cpu", enabled=False)

    preprocess = getattr(st, "preprocess", None) or st.tokenize  # sentence-transformers 6 / 5

    def step(batch) -> None:
        features = [preprocess([r["anchor"] for r in batch]), preprocess([r["positive"] for r in batch])]
        features = [{k: v.to(args.device) if torch.is_tensor(v) else v for k, v in f.items()} for f in features]
        with autocast:
            value = loss(features, None)
        value.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync() -> None:
        if args.device == "cuda":
            torch.cuda.synchronize()

    seen: dict[str, list[float]] = {name: [] for name in forms}
    for _ in range(args.rounds):
        for name, embed in forms.items():
            mnrl_module.embed_columns = embed
            for batch in batches[:5]:  # warm-up: this form's shapes and kernels
                step(batch)
            sync()
            start = time.perf_counter()
            for batch in batches[5:5 + args.steps]:
                step(batch)
            sync()
            seen[name].append((time.perf_counter() - start) / args.steps * 1000)
            print(f"{name:9s} {seen[name][-1]:8.1f} ms/step", flush=True)
    mnrl_module.embed_columns = stock
    separate, merged = (statistics.median(seen[name]) for name in forms)
    print(f"\n{args.shape} on {args.device}, batch {args.batch}, max_seq_length {args.max_seq_length}, LoRA r8, MNRL")
    print(f"{'form':9s} {'ms/step (median)':>17s}")
    print(f"{'separate':9s} {separate:17.1f}\n{'merged':9s} {merged:17.1f}\nmerged/separate step time: {merged / separate:.2f}")


if __name__ == "__main__":
    main()
