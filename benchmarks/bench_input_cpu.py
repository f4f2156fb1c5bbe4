"""How fast the recipe's input side feeds a step, on this CPU: the trainer's own data loader (the hashed
NO_DUPLICATES sampler, then batches padded from the token cache, `embedtune.data.token_cache`), and
for --cuda-graphs also the graph step's host work (the columns merged into one batch and padded to
max_seq_length, as `GraphedStep.prepare` does). Issue 3 asks the input to sustain well above the
model's token rate: against the real tokens per second a GPU step consumes (docs/BENCHMARKS.md).

    python benchmarks/bench_input_cpu.py [--batch 128] [--max-seq-length 512] [--batches 60]

Runs `embedtune.train.run` on the stdlib pairs with the bundled MiniLM up to the point where training
would start (the token cache filled, the trainer built), then reads batches from the trainer's data
loader instead of training; then again without the token cache (each batch tokenized in the loop, as
stock sentence-transformers does). Prints the cache fill time and, per batch, host milliseconds and
real tokens per second; table last.
"""

from __future__ import annotations

import argparse
import importlib
import tempfile
import time
from pathlib import Path

import torch


class _Measured(Exception):
    """Raised in place of training, once the loader has been timed."""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--max-seq-length", type=int, default=512)
    parser.add_argument("--batches", type=int, default=60)
    args = parser.parse_args()

    from embedtune import resilience
    from embedtune.data.stdlib import build_stdlib_pairs, write_jsonl
    from embedtune.graphs import GraphedStep

    recipe = importlib.import_module("embedtune.train")  # the package's `train` is the function
    timings: dict[str, float] = {}
    fill = recipe.install_token_cache

    def timed_fill(*a, **kw):
        start = time.perf_counter()
        out = fill(*a, **kw)
        timings["cache_fill_s"] = time.perf_counter() - start
        return out

    def read_batches(trainer, *a, **kw):
        loader = trainer.get_train_dataloader()
        graph = GraphedStep(trainer.loss, args.max_seq_length)  # its host work only: nothing is captured here
        merged_ms, loader_ms, tokens, n = 0.0, 0.0, 0, 0
        batches = iter(loader)
        next(batches)  # the first batch starts the sampler (hashing) and the loader
        while n < args.batches:
            start = time.perf_counter()
            inputs = next(batches, None)
            if inputs is None:  # the epoch's end: the next one (the stdlib set is ~26 batches of 128)
                batches = iter(loader)
                continue
            loaded = time.perf_counter()
            features, _ = trainer.collect_features(dict(inputs))
            batch = graph.prepare(features)  # --cuda-graphs: all columns merged, padded to the fixed width
            tokens += int(batch.inputs["attention_mask"].sum())
            done = time.perf_counter()
            loader_ms += (loaded - start) * 1e3
            merged_ms += (done - loaded) * 1e3
            n += 1
        timings.update(loader_ms=loader_ms / n, merge_ms=merged_ms / n, tokens_per_batch=tokens / n)
        raise _Measured

    resilience.train_resumably = read_batches
    results = {}
    for cached in (True, False):  # without the cache: each batch tokenized in the loop, as stock does
        recipe.install_token_cache = timed_fill if cached else (lambda *a, **kw: None)
        with tempfile.TemporaryDirectory() as root:
            data = write_jsonl(build_stdlib_pairs(seed=0), Path(root) / "pairs.jsonl")
            config = recipe.TrainConfig(data=str(data), output_dir=str(Path(root) / "out"), batch_size=args.batch,
                                        max_seq_length=args.max_seq_length, max_steps=args.batches + 2, eval=False)
            try:
                recipe.run(config)
            except _Measured:
                results[cached] = dict(timings)
    print(f"\ncpu threads {torch.get_num_threads()}  torch {torch.__version__}  batch {args.batch} pairs, "
          f"max_seq_length {args.max_seq_length}, {args.batches} batches after the first")
    print(f"{'step':48s} {'ms/batch':>9s} {'real tokens/s':>14s}")
    print(f"{'token cache fill (once, all texts)':48s} {results[True]['cache_fill_s'] * 1e3:9.0f}")
    for cached, label in ((True, "cached"), (False, "tokenized per batch (stock)")):
        loader, merge, tokens = (results[cached][k] for k in ("loader_ms", "merge_ms", "tokens_per_batch"))
        print(f"{'data loader, ' + label:48s} {loader:9.2f} {tokens / loader * 1e3:14,.0f}")
        print(f"{'  + graph step host work (merge + pad)':48s} {loader + merge:9.2f} "
              f"{tokens / (loader + merge) * 1e3:14,.0f}")
    print(f"real tokens per batch: {results[True]['tokens_per_batch']:,.0f}")


if __name__ == "__main__":
    main()
