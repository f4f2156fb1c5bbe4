"""The recipe (`embedtune.train.run`, what `embedtune train` runs) with and without `--cuda-graphs`, same
seed, data and settings, on a GPU: the graphed run must replay its steps (through the trainer's
step, gradient accumulation's scale included) and train as well as the plain one.

    python benchmarks/smoke_train_graphs_gpu.py --tokenizer .bench/tokenizer [--model bert-base]

Prints, per run: steps replayed, first and last logged loss, held-out nDCG@10, train time.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch

from bench_train_gpu import build_model_dir


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--model", default="bert-base")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()

    from embedtune.data.stdlib import build_stdlib_pairs, write_jsonl
    from embedtune.train import TrainConfig, run

    rows = []
    with tempfile.TemporaryDirectory() as root:
        path = build_model_dir(args.model, args.tokenizer, root)
        data = write_jsonl(build_stdlib_pairs(seed=0), os.path.join(root, "pairs.jsonl"))
        for graphs in (False, True):
            config = TrainConfig(data=str(data), model=path, output_dir=os.path.join(root, f"out-{graphs}"),
                                 max_steps=args.steps, batch_size=64, max_seq_length=256, lora_r=None,
                                 eval_size=512, evals_per_run=1, compile=args.compile, cuda_graphs=graphs,
                                 extra={"gradient_accumulation_steps": 2})
            result = run(config)
            losses = [h["loss"] for h in result.metrics["history"] if "loss" in h]
            final = result.metrics["final"]
            rows.append({"cuda_graphs": graphs, "graphs": result.metrics.get("cuda_graphs"),
                         "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
                         "ndcg@10": next((v for k, v in final.items() if "ndcg@10" in k), None),
                         "train_time_s": result.metrics["train_time_s"]})
            print(json.dumps(rows[-1]), flush=True)
    print(f"\ncard: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}  torch {torch.__version__}")
    for r in rows:
        print(f"cuda_graphs={r['cuda_graphs']!s:5s} loss {r['first_loss']} -> {r['last_loss']}  ndcg@10 {r['ndcg@10']}  "
              f"train {r['train_time_s']} s  graphs {r['graphs']}")


if __name__ == "__main__":
    main()
