"""How far bf16 autocast alone moves the guide's loss and gradients from fp32, on the CPU: the scale of
the tolerance that a bf16 GPU check of the trainer's graphed step (check_trainer_graphs_gpu.py) can ask.

The check's model (`check_trainer_graphs_gpu.build`: a random-init BERT of a bench_train_gpu shape, LoRA
r8 with its B matrices drawn (0.02) so that every adapter gets a gradient, dropout off, max_seq_length
256) and the first 16 stdlib pairs: the loss and LoRA gradients of MultipleNegativesRankingLoss in fp32
(the reference), of MNRL under CPU bf16 autocast, and of the graphed step's loss (embedtune's ContrastiveLoss over one forward of both columns,
`trainer_steps.contrastive_equivalent`) in bf16 and in fp32.

    python benchmarks/probe_bf16_reference_cpu.py --tokenizer .bench/tokenizer [--model bert-base]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="bert-base")
    ap.add_argument("--tokenizer", default=".bench/tokenizer")
    args = ap.parse_args()
    from bench_train_gpu import build_model_dir
    from check_trainer_graphs_gpu import build
    from sentence_transformers.losses import MultipleNegativesRankingLoss

    from embedtune.data.stdlib import build_stdlib_pairs
    from embedtune.trainer_steps import contrastive_equivalent

    st = build(build_model_dir(args.model, args.tokenizer, tempfile.mkdtemp()), 0.0, cuda_graphs=False)  # the check's model
    st.train()
    pairs = build_stdlib_pairs(seed=0)[:16]
    features = [st.tokenize([p["anchor"] for p in pairs]), st.tokenize([p["positive"] for p in pairs])]
    mnrl = MultipleNegativesRankingLoss(st)
    graphed_loss = contrastive_equivalent(mnrl)

    def run(loss_fn, bf16: bool):
        st.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(features, None)
        loss.backward()
        return loss.item(), {n: p.grad.float().clone() for n, p in st.named_parameters() if p.grad is not None}

    ref_loss, ref = run(mnrl, False)
    print(f"{args.model}, 16 pairs: MNRL fp32 loss {ref_loss:.5f} (the reference)")
    for name, fn, bf16 in (("MNRL, bf16 autocast", mnrl, True), ("graphed step's loss, bf16 autocast", graphed_loss, True),
                           ("graphed step's loss, fp32", graphed_loss, False)):
        loss, grads = run(fn, bf16)
        worst = max(((grads[n] - ref[n]).norm() / ref[n].norm()).item() for n in ref)
        print(f"{name}: loss {loss:.5f} ({loss - ref_loss:+.5f}); LoRA gradients {worst:.2e} relative to fp32 MNRL "
              f"(worst of {len(ref)})")


if __name__ == "__main__":
    main()
