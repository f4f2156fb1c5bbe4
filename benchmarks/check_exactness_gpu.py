"""GPU exactness of the packed fast path, every packed architecture, bf16 and fp32.

For each architecture (tiny random-init config from tests/tiny_models.py), compares the packed
forward against the padded HF forward on the same batch: last hidden states over real tokens and
the gradients of LoRA and full parameters, as relative errors. Dropout is off so both paths compute
the same function; in bf16 the fused varlen kernel is the one under test.

    PYTHONPATH=src:tests python benchmarks/check_exactness_gpu.py --tokenizer .bench/tokenizer
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

TEXTS = ["short", "a much longer sentence with many more tokens in it so that padding matters " * 3,
         "def f(x):\n    return x + 1", "another medium length sentence"] * 4


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def check(arch: str, root: Path, dtype, lora: bool) -> tuple[float, float]:
    import tiny_models

    from embedtune import FastModel
    from embedtune.packing import disable_fast_path, enable_fast_path

    torch.manual_seed(0)
    model, tok = FastModel.from_pretrained(str(tiny_models.make_tiny_model(arch, root)), max_seq_length=96,
                                           dtype=dtype, fast=False)
    if lora:
        model = FastModel.get_peft_model(model, r=4)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    model.train()
    tok.padding_side = "right"
    batch = {k: v.cuda() for k, v in tok(TEXTS, padding=True, return_tensors="pt").items()}
    mask = batch["attention_mask"].bool()

    def run():
        model.zero_grad()
        out = model(**batch).last_hidden_state[mask]
        # per-channel weights: a plain mean of squares after a final LayerNorm/RMSNorm is constant
        weights = torch.linspace(0.5, 1.5, out.shape[-1], device=out.device)
        (out.float() * weights).pow(2).mean().backward()
        return out.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}

    ref, ref_g = run()
    enable_fast_path(model)
    out, g = run()
    disable_fast_path(model)
    worst = max(rel(g[n], ref_g[n]) for n in ref_g if ref_g[n].norm() > 1e-3 * max(x.norm() for x in ref_g.values()))
    return rel(out, ref), worst


def check_flash_dropout() -> dict[str, float]:
    """embedtune's flash call (dropout, windows) against padded SDPA, on random packed inputs.

    Dropout is random, so it is checked by what must hold for any mask: the same RNG state gives the
    same output; the mean over many masks is the dropout-free output; and for one mask the output is
    linear in `v`, so the backward's `dv` (which replays the mask) must predict the change of the
    output for a change of `v` exactly (up to rounding)."""
    from embedtune.packing.varlen import PackedBatch, flash_supported, padded_sdpa, varlen_op

    torch.manual_seed(0)
    lengths = [7, 300, 64, 129, 1, 512, 33, 250]
    mask = torch.zeros(len(lengths), max(lengths), dtype=torch.bool, device="cuda")
    for i, n in enumerate(lengths):
        mask[i, :n] = True
    plan = PackedBatch.from_mask(mask)
    tokens, heads, dim = plan.tokens, 4, 64
    results = {}
    for dtype in (torch.bfloat16, torch.float16):
        q, k, v = (torch.randn(tokens, heads, dim, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
        assert flash_supported(q)  # so varlen_op runs the flash kernel
        g = torch.randn(tokens, heads, dim, device="cuda", dtype=dtype)
        name = str(dtype).split(".")[-1]
        for causal, window in ((False, None), (True, None), (False, 48), (True, 48)):
            outs, grads = [], []
            for fn in (varlen_op, padded_sdpa):
                q.grad = k.grad = v.grad = None
                out = fn(q, k, v, plan, dim ** -0.5, 0.0, causal, window=window)
                (out.float() * g.float()).sum().backward()
                outs.append(out.detach())
                grads.append(torch.cat([q.grad, k.grad, v.grad]))
            key = f"{name} causal={causal} window={window}"
            results[f"{key}: output vs padded"] = rel(outs[0], outs[1])
            results[f"{key}: grads vs padded"] = rel(grads[0], grads[1])
        p = 0.1
        state = torch.cuda.get_rng_state()
        a = varlen_op(q, k, v, plan, dim ** -0.5, p)
        torch.cuda.set_rng_state(state)
        b = varlen_op(q, k, v, plan, dim ** -0.5, p)
        results[f"{name} dropout: same RNG state, output difference"] = rel(a, b)
        with torch.no_grad():
            clean = varlen_op(q, k, v, plan, dim ** -0.5, 0.0)
            mean = sum(varlen_op(q, k, v, plan, dim ** -0.5, p).float() for _ in range(400)) / 400
        results[f"{name} dropout: mean of 400 masks vs no dropout (expect ~1e-2)"] = rel(mean, clean)
        dv_dir = torch.randn_like(v)  # the output is exactly linear in v: any size of step works
        torch.cuda.set_rng_state(state)
        v.grad = None
        out = varlen_op(q, k, v, plan, dim ** -0.5, p)
        (out.float() * g.float()).sum().backward()
        predicted = (v.grad.float() * dv_dir.float()).sum()
        with torch.no_grad():
            torch.cuda.set_rng_state(state)
            moved = varlen_op(q, k, v + dv_dir, plan, dim ** -0.5, p)
            actual = ((moved.float() - out.float()) * g.float()).sum()
        results[f"{name} dropout: dv replays the mask (rel err of predicted change)"] = (
            (predicted - actual).abs() / actual.abs()).item()
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", required=True)
    args = parser.parse_args()
    import tiny_models

    import embedtune.loading
    from embedtune.packing import PACKED_FORWARDS

    # tiny_models borrows the bundled MiniLM's tokenizer; on the GPU box only its files travel
    embedtune.loading.bundled_model_path = lambda: Path(args.tokenizer)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in sorted(PACKED_FORWARDS):
            for dtype in (torch.float32, torch.bfloat16):
                for lora in (True, False):
                    out_err, grad_err = check(arch, Path(tmp), dtype, lora)
                    rows.append((arch, str(dtype).split(".")[-1], "lora" if lora else "full", out_err, grad_err))
    print("\nflash kernel with dropout / windows (embedtune::varlen_attn):")
    for key, value in check_flash_dropout().items():
        print(f"  {key:70s} {value:10.2e}")
    print(f"\n{'arch':12s} {'dtype':9s} {'mode':5s} {'output rel err':>15s} {'worst grad rel err':>19s}")
    for arch, dtype, mode, o, g in rows:
        print(f"{arch:12s} {dtype:9s} {mode:5s} {o:15.2e} {g:19.2e}")


if __name__ == "__main__":
    main()
