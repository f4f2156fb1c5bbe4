"""Does training with mined hard negatives beat in-batch negatives only, at the same steps?

Stdlib code-search pairs, bundled MiniLM, LoRA r16. Negatives are mined once with the base model
over all positives (`embedtune mine` defaults: ranks 3..50, margin 0.05). Both runs then train on
the same rows with the same seed and held-out split (the in-batch run drops the negative columns),
so the only difference is the negatives. Prints held-out nDCG@10 of both.

    python benchmarks/bench_mined_negatives.py --steps 30
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import embedtune
from embedtune.data import build_stdlib_pairs, load_pairs, write_jsonl
from embedtune.mine import mine_hard_negatives


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=1500)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-seq-length", type=int, default=96)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "mined_negatives_cpu.json"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        data = write_jsonl(build_stdlib_pairs(max_pairs=args.pairs, seed=0), Path(tmp) / "pairs.jsonl")
        model, tok = embedtune.FastModel.from_pretrained(embedtune.loading.DEFAULT_MODEL_ID,
                                                         max_seq_length=args.max_seq_length)
        mined = mine_hard_negatives(embedtune.to_sentence_transformer(model, tok), data, Path(tmp) / "mined.jsonl",
                                    num_negatives=1, show_progress=False)
        rows = load_pairs(mined.path).dataset.to_list()
        plain = write_jsonl([{"anchor": r["anchor"], "positive": r["positive"]} for r in rows], Path(tmp) / "plain.jsonl")
        common = dict(max_steps=args.steps, batch_size=args.batch_size, max_seq_length=args.max_seq_length,
                      lora_r=16, lr=3e-4, eval_size=300, evals_per_run=1, seed=11)
        _, with_negs = embedtune.train(str(mined.path), **common)
        _, in_batch = embedtune.train(str(plain), **common)
    result = {"base": in_batch["base"]["ndcg@10"], "in_batch_only": in_batch["final"]["ndcg@10"],
              "with_mined_negatives": with_negs["final"]["ndcg@10"], "rows": len(rows),
              "mining_stats": mined.stats, "settings": vars(args)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    print(f"held-out nDCG@10: base {result['base']:.4f} | in-batch only {result['in_batch_only']:.4f} | "
          f"with mined negatives {result['with_mined_negatives']:.4f}  ({args.steps} steps each)")


if __name__ == "__main__":
    main()
