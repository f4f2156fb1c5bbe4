"""What activation checkpointing saves and costs, measured exactly on any device.

Memory: the bytes autograd keeps for the backward pass, counted with `saved_tensors_hooks` (each
storage once) during one training forward of a real batch; that is the activation memory that
grows with batch and depth. With checkpointing only each layer's input is kept (and, with
"unsloth" on a GPU, moved to CPU memory). Time: forward + backward, median of `--repeats`.

    python benchmarks/bench_checkpointing.py --pairs 64 --max-seq-length 256
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def saved_bytes_and_time(mode, pairs, max_len: int, repeats: int, lora: bool) -> dict:
    from embedtune import FastModel
    from embedtune.checkpointing import enable_checkpointing
    from embedtune.losses import ContrastiveLoss
    from embedtune.st import to_sentence_transformer

    torch.manual_seed(0)
    model, tok = FastModel.from_pretrained(None or "sentence-transformers/all-MiniLM-L6-v2", max_seq_length=max_len)
    if lora:
        model = FastModel.get_peft_model(model, r=16, use_gradient_checkpointing=mode)
    elif mode:
        enable_checkpointing(model, mode)
    st = to_sentence_transformer(model, tok).train()
    device = next(st.parameters()).device
    feats = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in st.tokenize([p[c] for p in pairs]).items()}
             for c in ("anchor", "positive")]
    loss_fn = ContrastiveLoss(st)

    seen, total = set(), [0, 0]  # bytes on the compute device, bytes elsewhere (offloaded)

    def pack(t):
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total[0 if t.device == device else 1] += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(feats)
    loss.backward()
    st.zero_grad(set_to_none=True)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        loss_fn(feats).backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        st.zero_grad(set_to_none=True)
    tokens = sum(int(f["attention_mask"].sum()) for f in feats)
    return {"mode": str(mode), "lora": lora, "saved_mb_on_device": round(total[0] / 2**20, 1),
            "saved_mb_offloaded": round(total[1] / 2**20, 1), "fwd_bwd_s": round(sorted(times)[len(times) // 2], 3),
            "tokens": tokens, "device": str(device)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--max-seq-length", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from embedtune.data.stdlib import build_stdlib_pairs

    pairs = build_stdlib_pairs(max_pairs=args.pairs, seed=0)
    rows = [saved_bytes_and_time(mode, pairs, args.max_seq_length, args.repeats, lora)
            for lora in (True, False) for mode in (False, True, "unsloth")]
    for row in rows:
        print(json.dumps(row))
    print(f"\n{'mode':10s} {'lora':5s} {'saved MB':>9s} {'offloaded':>9s} {'fwd+bwd s':>10s}")
    for r in rows:
        print(f"{r['mode']:10s} {str(r['lora']):5s} {r['saved_mb_on_device']:9.1f} {r['saved_mb_offloaded']:9.1f} "
              f"{r['fwd_bwd_s']:10.3f}")


if __name__ == "__main__":
    main()
