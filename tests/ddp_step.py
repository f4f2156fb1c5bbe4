"""One optimizer step of ContrastiveLoss, run either as one process over all pairs or under torchrun
(DDP, gloo) with each rank holding its slice of the pairs. Used by tests/test_distributed.py.

usage: ddp_step.py MODEL_DIR OUT_DIR PAIRS_PER_RANK NAME:FLAGS [NAME:FLAGS ...]
FLAGS: comma-separated, of cached, symmetric, negatives, no-gather, matryoshka, fsdp (may be empty).
Each variant starts from the model as saved and writes OUT_DIR/NAME.safetensors; one launch runs
them all (a launch's imports cost more than its steps).
Single process (no torchrun): steps on PAIRS_PER_RANK * 2 pairs, i.e. what two ranks hold together.
fsdp: under torchrun, shard the model (embedtune.sharding) instead of wrapping it in DDP; the
backbone's full weights are written (keys without the sentence-transformers prefix) in both modes.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from embedtune import FastModel
from embedtune.losses import ContrastiveLoss
from embedtune.sharding import backbone_of, full_state_dict, shard_model
from embedtune.st import to_sentence_transformer

WORDS = "sort open parse join hash split read write encode decode compress format print load dump find".split()


def pairs(n: int):
    """Deterministic, distinct (anchor, positive, negative) texts of varied lengths."""
    rows = []
    for i in range(n):
        w = WORDS[i % len(WORDS)]
        rows.append((f"how to {w} item {i}" + " quickly" * (i % 3),
                     f"def {w}_{i}(x): return {w}(x) " + "and more " * (i % 4),
                     f"class {w.title()}{i}: pass"))
    return rows


FLAGS = ("cached", "symmetric", "negatives", "no-gather", "matryoshka", "fsdp")


def step(model_dir: str, out: str, per_rank: int, flags: set[str], rank: int, world: int, distributed: bool) -> None:
    torch.manual_seed(0)
    backbone, tokenizer = FastModel.from_pretrained(model_dir, max_seq_length=48)
    st = to_sentence_transformer(backbone, tokenizer).eval()  # dropout off: both runs are deterministic
    if distributed and "fsdp" in flags:
        shard_model(st)
        model = st
    else:
        model = torch.nn.parallel.DistributedDataParallel(st) if distributed else st

    total = per_rank * 2
    rows = pairs(total)
    mine = rows[rank * per_rank:(rank + 1) * per_rank] if distributed else rows
    columns = [[r[0] for r in mine], [r[1] for r in mine]] + ([[r[2] for r in mine]] if "negatives" in flags else [])
    features = [st.tokenize(texts) for texts in columns]

    loss_fn = ContrastiveLoss(model, symmetric="symmetric" in flags, cached="cached" in flags, token_budget=40,
                              matryoshka_dims=[32, 16] if "matryoshka" in flags else None,
                              gather_across_devices="no-gather" not in flags)
    optimizer = torch.optim.SGD(st.parameters(), lr=0.5)
    loss = loss_fn(features)
    loss.backward()
    optimizer.step()
    if "fsdp" in flags:
        weights = full_state_dict(st) if distributed else backbone_of(st).state_dict()
    else:
        weights = dict(st.named_parameters())
    if rank == 0:
        save_file({n: p.detach().contiguous() for n, p in weights.items()}, out)
    if distributed:
        dist.barrier()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("out_dir")
    ap.add_argument("per_rank", type=int)
    ap.add_argument("variants", nargs="+", help="NAME:FLAGS")
    args = ap.parse_args()
    variants = []
    for spec in args.variants:
        name, _, flags = spec.partition(":")
        flags = {f for f in flags.split(",") if f}
        unknown = flags - set(FLAGS)
        if unknown:
            raise SystemExit(f"unknown flags {sorted(unknown)} in {spec!r}")
        variants.append((name, flags))

    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    for name, flags in variants:
        step(args.model, os.path.join(args.out_dir, f"{name}.safetensors"), args.per_rank, flags, rank, world, distributed)
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
    if "LOCAL_RANK" in os.environ:
        from torchrun_launch import exit_without_teardown

        exit_without_teardown()
