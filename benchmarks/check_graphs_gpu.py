"""The CUDA-graph step (`embedtune.graphs.GraphedStep`) on a GPU, in bf16: its captured and replayed
steps against the same step run eagerly, and against the plain loss; dropout drawn anew per replay.

    python benchmarks/check_graphs_gpu.py --tokenizer .bench/tokenizer --models bert-base

Per model, mode (full, LoRA r8) and layers (eager, compiled), dropout off, weights fixed:
- "replay vs eager": each batch runs once eagerly in its static form (on the capture stream, outside
  the step's graphs: the reference), then three times through the step: the first batch's first sight
  runs eagerly, its second is captured and replayed; later batches of a new shape (the last one has
  fewer rows, so its shape is new) are captured at first sight with eager layers, and eagerly first
  with compiled ones. Loss and every gradient of every call must match the reference (relative error
  of the concatenated gradients, < 5e-3: flash attention's and the embedding's backward sum with
  atomics, so two eager runs differ too, by ~7e-4 here), which exercises capture; the row counts the
  first-sight captures;
- "vs plain": the plain loss (no fixed stream, no padding to max_seq_length) in bf16: other kernels and
  other sums, so bf16 rounding apart. In full fine-tuning the graphed step runs its linears through
  `packing.main_grad` (weight gradients summed into the fp32 `.grad` by the GEMM): the row says how many
  shadow buffers it made and which GEMM form this torch offers.
With dropout on (0.1), three replays of one batch must give gradients at least 1% apart (new masks; two
runs with the same masks differ by ~1e-3, and bf16-rounded losses may repeat by chance); a model without dropout (Qwen3's config has none) must give
the same loss three times (its gradients may differ: flash attention's backward sums with atomics).
With --switch (dropout off), the batches run first without the fused norm, then again with it switched
on, as the recipe does once the kernels' build ahead has ended: the graphs of the old kernels must go,
the first batch must run eagerly once (the new kernels' first use), and every later call must match
its eager reference with the new kernels.
Prints a table; exits non-zero if a check fails.
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import torch

from bench_train_gpu import build_model_dir, embedtune_model


def _grads(params) -> torch.Tensor:
    return torch.cat([p.grad.float().reshape(-1) for p in params])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def _replay_vs_eager(step, st, loss_fn, batches, row: dict) -> str:
    """Each batch: its eager run in static form (the reference), then three calls through the step;
    the worst relative errors (and against the plain loss) go into `row`. Returns how the first call ran."""
    params = step.params
    row.setdefault("first_sight_captures", 0)
    first = None
    for feats in batches:
        prepared = step.prepare(feats)
        st.zero_grad(set_to_none=True)
        reference = step._eager(prepared.inputs, (prepared.rows, prepared.stream), 1.0).float()
        reference = (reference, _grads(params).clone())
        seen = []
        for call in range(3):  # first sight (eager, or a capture once one worked), capture or replay, replay
            st.zero_grad(set_to_none=True)
            loss = step(prepared)
            first = first or step.last
            row["first_sight_captures"] += call == 0 and step.last == "captured"
            seen.append((loss.float(), _grads(params).clone()))
        for loss, grads in seen:
            row["replay_loss_rel"] = max(row["replay_loss_rel"], _rel(loss, reference[0]))
            row["replay_grad_rel"] = max(row["replay_grad_rel"], _rel(grads, reference[1]))
        st.zero_grad(set_to_none=True)
        moved = [{k: v.cuda() if torch.is_tensor(v) else v for k, v in f.items()} for f in feats]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            plain = loss_fn(moved)
        plain.backward()
        row["plain_loss_rel"] = max(row["plain_loss_rel"], _rel(seen[-1][0], plain.detach()))
        row["plain_grad_rel"] = max(row["plain_grad_rel"], _rel(seen[-1][1], _grads(params)))
        # Its autograd graph (made on the default stream) must not outlive it: a graph kept alive
        # keeps the parameters' accumulation nodes on that stream, and the next capture would
        # then pull the default stream in (torch 2.11 has no override; see graphs._fresh_leaf_streams).
        del plain
    return first


def check(path: str, lora: bool, compile_model: bool, batches, dropout: bool, fused_kernels: bool,
          switch: bool = False) -> dict:
    from embedtune.graphs import GraphedStep
    from embedtune.losses import ContrastiveLoss
    from embedtune.packing import set_fused_kernels

    st = embedtune_model(path, lora, 512, compile_model=compile_model, fused_kernels=fused_kernels and not switch)
    if not dropout:
        for m in st.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    st.train()
    loss_fn = ContrastiveLoss(st)
    step = GraphedStep(loss_fn, 512, dtype=torch.bfloat16)
    params = step.params
    row = {"replay_loss_rel": 0.0, "replay_grad_rel": 0.0, "plain_loss_rel": 0.0, "plain_grad_rel": 0.0}
    if dropout:
        losses, grads = [], []
        for _ in range(4):  # eager, capture + replay, replay, replay
            st.zero_grad(set_to_none=True)
            losses.append(step(batches[0]).item())
            grads.append(_grads(params).clone())
            assert torch.isfinite(grads[-1]).all()
        row["dropout_losses"] = losses
        # The replays' gradients tell masks apart (a bf16 model's loss can repeat by chance): new masks
        # move them by far more than the 1e-3 that flash attention's atomic sums leave between two runs.
        row["replay_grad_spread"] = min(_rel(grads[i], grads[j]) for i in (1, 2) for j in range(i + 1, 4))
        distinct = sum(_rel(grads[i], grads[j]) > 1e-2 for i in (1, 2) for j in range(i + 1, 4))
        # a model without dropout (decoder embedders such as Qwen3): its replays must agree instead
        row["has_dropout"] = any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in st.modules()) or any(
            getattr(getattr(m, "config", None), "attention_dropout", 0) for m in st.modules())
        row["dropout_ok"] = distinct == 3 if row["has_dropout"] else len(set(losses[1:])) == 1
    elif switch:  # the recipe's switch once the build ahead ended: the old kernels' graphs go
        _replay_vs_eager(step, st, loss_fn, batches, row)
        row["shapes_before_switch"] = step.shapes
        set_fused_kernels(st[0].auto_model, True)
        row["first_sight_captures"] = 0  # counted after the switch
        row["after_switch"] = _replay_vs_eager(step, st, loss_fn, batches, row)
    else:
        _replay_vs_eager(step, st, loss_fn, batches, row)
    from embedtune.packing import main_grad

    shadows = step._shadows
    row.update(counts=dict(step.counts), shapes=step.shapes, off=step.off_reason,
               main_grad_buffers=len(shadows._buffers) if shadows is not None else 0,
               gemm_mode=main_grad._gemm_mode(torch.cuda.current_device(), torch.bfloat16))
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="bert-base")
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--modes", default="full,lora")
    parser.add_argument("--layers", default="eager,compiled")
    parser.add_argument("--dropout", default="off,on")
    parser.add_argument("--fused-kernels", action=argparse.BooleanOptionalAction, default=True,
                        help="the fused norm kernels where they apply, as the defaults run (default: on)")
    parser.add_argument("--switch", action="store_true",
                        help="dropout off: the batches without the fused norm, then again with it switched on "
                             "(the recipe's switch once their build ahead ended), the first sight counted after it")
    args = parser.parse_args()

    from embedtune.data.stdlib import build_stdlib_pairs

    print(f"torch {torch.__version__}; stale-stream override: {hasattr(torch._C, '_set_override_stale_capture_stream')}")
    pairs = build_stdlib_pairs(seed=0)
    rows, failed = [], False
    with tempfile.TemporaryDirectory() as root:
        for name in args.models.split(","):
            path = build_model_dir(name, args.tokenizer, root)
            from embedtune import FastModel

            _, tok = FastModel.from_pretrained(path, max_seq_length=512, fast=False)
            batches = []
            sizes = [args.batch, args.batch, args.batch * 3 // 4]  # the last: fewer rows, so a new shape
            for b, size in enumerate(sizes):
                chunk = pairs[b * args.batch:b * args.batch + size]
                batches.append([tok([r["anchor"] for r in chunk], padding=True, truncation=True, max_length=512,
                                    return_tensors="pt"),
                                tok([r["positive"] for r in chunk], padding=True, truncation=True, max_length=512,
                                    return_tensors="pt")])
                batches[-1] = [dict(f) for f in batches[-1]]
            for mode in args.modes.split(","):
                for compile_model in [layers == "compiled" for layers in args.layers.split(",")]:
                    for dropout in [d == "on" for d in args.dropout.split(",")]:
                        row = check(path, mode == "lora", compile_model, batches, dropout, args.fused_kernels,
                                    switch=args.switch and not dropout)
                        row.update(model=name, mode=mode, layers="compiled" if compile_model else "eager",
                                   dropout=dropout)
                        ok = row["off"] is None and row["counts"]["replayed"] > 0
                        if dropout:
                            ok = ok and row["dropout_ok"]
                        else:
                            ok = ok and row["replay_loss_rel"] < 1e-3 and row["replay_grad_rel"] < 5e-3 \
                                and row["plain_loss_rel"] < 2e-2 and row["plain_grad_rel"] < 5e-2 \
                                and (compile_model or row["first_sight_captures"] >= 1)
                            if "after_switch" in row:  # the new kernels' first use eager; the old graphs gone
                                ok = ok and row["after_switch"] == "eager" and row["shapes"] == row["shapes_before_switch"]
                        row["ok"] = ok
                        failed |= not ok
                        print(row, flush=True)
                        rows.append(row)
                        torch.cuda.empty_cache()
    print(f"\ncard: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    print(f"{'model':10s} {'mode':5s} {'layers':8s} {'dropout':7s} {'replay loss':>11s} {'replay grad':>11s} "
          f"{'plain loss':>10s} {'plain grad':>10s} {'graphs':>6s} {'replays':>7s} {'first':>5s}  ok")
    for r in rows:
        print(f"{r['model']:10s} {r['mode']:5s} {r['layers']:8s} {str(r['dropout']):7s} {r['replay_loss_rel']:11.2e} "
              f"{r['replay_grad_rel']:11.2e} {r['plain_loss_rel']:10.2e} {r['plain_grad_rel']:10.2e} "
              f"{r['shapes']:6d} {r['counts']['replayed']:7d} {r.get('first_sight_captures', '-'):>5}  {r['ok']}"
              + (f"  losses {['%.5f' % x for x in r['dropout_losses']]}, replays' gradients >= "
                 f"{r['replay_grad_spread']:.2e} apart" if r["dropout"] else "")
              + ("  (the model has no dropout: replays must agree)" if r["dropout"] and not r["has_dropout"] else "")
              + (f"  OFF: {r['off']}" if r["off"] else "")
              + (f"  switched to the fused norm: its first step {r['after_switch']}" if "after_switch" in r else "")
              + f"  main-grad buffers {r['main_grad_buffers']} ({r['gemm_mode']})")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
