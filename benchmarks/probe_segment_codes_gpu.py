"""Segment-coded attention: can short sequences share FlashAttention-2's tiles?

FlashAttention-2 gives every sequence of a packed stream its own 128-row tiles, so a 15-token query costs
about what a 128-token passage does (probe_flash_profile_gpu.py). This probe merges short sequences into
groups of at most 128 tokens that the kernel sees as one sequence, and keeps them from attending across
their borders with extra head dimensions holding a segment code: for token t of segment s(t),

    q_code(t) = C * (b_1(s), ..., b_m(s), 1)        k_code(t) = C * (b_1(s), ..., b_m(s), -m)

with b_i(s) = +-1 the bits of s. Then q_code . k_code = C^2 (b(s) . b(s') - m): exactly 0 for one segment,
at most -2 C^2 across two (integers, exact in the kernel's fp32 sums). With C = 16 and the softmax scale of
the real head size, a cross-segment score is pushed 64 below its own value: its weight is exp(-64) of what
it would be, zero in fp32 beside the row's own keys. v gets zeros in the code dimensions. The codes cost
head size 64 + 8 = 72, which the kernel runs as its 96-wide template.

Variants, forward + backward, bf16, the stdlib batch (128 pairs, max_seq_length 512), BERT-base and -large
heads; every kernel call and copy replayed in a CUDA graph:
  flash            one call as embedtune runs it today (hd 64, every sequence alone)
  coded, one call  one hd-72 call, sequences of <= SHORT tokens merged into groups of <= 128
  two calls        the merged groups in an hd-72 call, the rest in an hd-64 call (kernels only)
  two calls+copies the same with the copies a layer would add: the coded q, k, v built from q, k, v, the
                   outputs and gradients merged back

Checks (dropout 0): every variant's output and gradients against the flash call's, relative error.

    python3 benchmarks/probe_segment_codes_gpu.py --tokenizer .bench/tokenizer
"""

from __future__ import annotations

import argparse

import torch
from gpu_timing import finish, graph_ms, record
from probe_attention_gpu import flash, flash_bwd, real_lengths, rel

CODE_BITS = 7  # up to 128 segments a group
CODE_DIMS = CODE_BITS + 1  # the bits and the constant dimension: the extra head dims
CODE_SCALE = 16.0


def groups_of(lengths: list[int], short: int, cap: int = 128) -> tuple[list[int], list[list[int]], list[int]]:
    """(order, groups, rest): the short sequences by length, next-fit into groups of <= cap tokens; the
    others in their own order. `order` is the stream's new sequence order: the groups' members, then rest."""
    shorts = sorted((i for i, n in enumerate(lengths) if n <= short), key=lambda i: lengths[i])
    rest = [i for i, n in enumerate(lengths) if n > short]
    groups: list[list[int]] = []
    used = cap
    for i in shorts:
        if used + lengths[i] > cap:
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += lengths[i]
    return [i for g in groups for i in g] + rest, groups, rest


def codes(groups: list[list[int]], lengths: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """[tokens, CODE_DIMS] q and k code rows for the grouped tokens, in stream order."""
    seg = torch.cat([torch.full((lengths[i],), s, dtype=torch.int64) for g in groups for s, i in enumerate(g)])
    bits = ((seg[:, None] >> torch.arange(CODE_BITS)) & 1) * 2 - 1
    q = torch.cat([bits, torch.ones(len(seg), 1, dtype=torch.int64)], 1) * CODE_SCALE
    k = torch.cat([bits, torch.full((len(seg), 1), -CODE_BITS, dtype=torch.int64)], 1) * CODE_SCALE
    return q.to(device, torch.bfloat16), k.to(device, torch.bfloat16)


def zero_coded(t: torch.Tensor) -> torch.Tensor:
    """[T, H, D] -> [T, H, CODE_DIMS + D] with zero codes (v, and the output gradient of a coded call)."""
    return torch.cat([t.new_zeros(*t.shape[:2], CODE_DIMS), t], -1)


def cu_of(lengths: list[int], start: int = 0) -> torch.Tensor:
    cu = torch.tensor([0] + lengths).cumsum(0) + start
    return cu.to("cuda", torch.int32)


class Setup:
    """One stream (the short sequences' groups first, then the rest) and the plans of every variant."""

    def __init__(self, lengths: list[int], heads: int, short: int, seed: int = 0):
        order, groups, rest = groups_of(lengths, short)
        self.lengths = [lengths[i] for i in order]
        self.group_lens = [sum(lengths[i] for i in g) for g in groups]
        self.rest_lens = [lengths[i] for i in rest]
        self.n_short = sum(self.group_lens)
        self.groups = len(groups)
        total = sum(lengths)
        g = torch.Generator(device="cuda").manual_seed(seed)
        self.q, self.k, self.v, self.go = (torch.randn(total, heads, 64, device="cuda", generator=g,
                                                       dtype=torch.bfloat16) for _ in range(4))
        self.cu = cu_of(self.lengths)
        self.width = 512
        qc, kc = codes(groups, lengths, "cuda")
        self.qc, self.kc = (c[:, None, :].expand(-1, heads, -1) for c in (qc, kc))
        self.cu_groups = cu_of(self.group_lens)
        self.cu_mixed = cu_of(self.group_lens + self.rest_lens)  # coded one call: groups, then the rest alone
        self.cu_rest = cu_of(self.rest_lens, self.n_short)  # starts past the groups' tokens: they are not read
        self.scale = 64 ** -0.5
        n = self.n_short  # the coded inputs, built once, for the variants timed without their copies
        self.coded_all = self.coded(self.q, self.k, self.v, n)
        self.short_coded = tuple(t[:n].contiguous() for t in self.coded_all)
        self.go_coded = zero_coded(self.go[:n])

    def coded(self, q, k, v, rows: int):
        """q, k, v with their code dimensions first: the groups' codes on the first `rows` tokens, zeros on
        the rest (sequences alone, so a zero code changes no score)."""
        zeros = q.new_zeros(q.shape[0] - rows, q.shape[1], CODE_DIMS)
        qc, kc = torch.cat([self.qc, zeros]), torch.cat([self.kc, zeros])
        return torch.cat([qc, q], -1), torch.cat([kc, k], -1), zero_coded(v)


def run_flash(s: Setup, p: float):
    out, saved = flash(s.q, s.k, s.v, s.cu, s.width, p, s.scale)
    return (out, *flash_bwd(s.go, s.q, s.k, s.v, out, saved, s.cu, s.width, p, s.scale))


def run_coded_one(s: Setup, p: float):
    """Every sequence in one hd-72 call: the groups coded, the rest with zero codes (alone anyway)."""
    qa, ka, va = s.coded_all
    out, saved = flash(qa, ka, va, s.cu_mixed, s.width, p, s.scale)
    dq, dk, dv = flash_bwd(zero_coded(s.go), qa, ka, va, out, saved, s.cu_mixed, s.width, p, s.scale)
    return tuple(t[..., CODE_DIMS:] for t in (out, dq, dk, dv))


def run_two(s: Setup, p: float, copies: bool):
    """The groups in an hd-72 call over the stream's first tokens, the rest in an hd-64 call in place."""
    n = s.n_short
    if copies:  # what a layer would pay: the coded inputs built, the outputs and gradients merged
        qa, ka, va = torch.cat([s.qc, s.q[:n]], -1), torch.cat([s.kc, s.k[:n]], -1), zero_coded(s.v[:n])
    else:
        qa, ka, va = s.short_coded
    out_a, saved_a = flash(qa, ka, va, s.cu_groups, 128, p, s.scale)
    out_b, saved_b = flash(s.q, s.k, s.v, s.cu_rest, s.width, p, s.scale)
    go_a = zero_coded(s.go[:n]) if copies else s.go_coded
    grads_a = flash_bwd(go_a, qa, ka, va, out_a, saved_a, s.cu_groups, 128, p, s.scale)
    grads_b = flash_bwd(s.go, s.q, s.k, s.v, out_b, saved_b, s.cu_rest, s.width, p, s.scale)
    if not copies:
        return out_a, out_b, grads_a, grads_b
    merged = []
    for a, b in zip((out_a, *grads_a), (out_b, *grads_b)):
        b[:n] = a[..., CODE_DIMS:]  # call B left the groups' rows unwritten
        merged.append(b)
    return tuple(merged)


def check(s: Setup) -> dict:
    ref = run_flash(s, 0.0)
    one = run_coded_one(s, 0.0)
    two = run_two(s, 0.0, copies=True)
    return {"err_one": max(rel(a, b) for a, b in zip(one, ref)), "err_two": max(rel(a, b) for a, b in zip(two, ref))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--out", default=None)
    ap.add_argument("--batches", type=int, default=2)
    args = ap.parse_args()
    batches = real_lengths(args.tokenizer, 128, 512, args.batches)
    rows = []
    for heads, model in ((12, "bert-base"), (16, "bert-large")):
        for b, lens in enumerate(batches):
            for short in (64, 128):
                s = Setup(lens, heads, short)
                errs = check(s)
                for p in (0.1, 0.0):
                    times = {"flash": graph_ms(lambda: run_flash(s, p)),
                             "coded one call": graph_ms(lambda: run_coded_one(s, p)),
                             "two calls": graph_ms(lambda: run_two(s, p, copies=False)),
                             "two calls+copies": graph_ms(lambda: run_two(s, p, copies=True))}
                    base = times["flash"]
                    record(rows, {"model": model, "batch": b, "short": short, "dropout": p,
                                  "seqs": len(lens), "groups": s.groups, "rest": len(s.rest_lens),
                                  "short_tokens": s.n_short, "tokens": sum(lens),
                                  **{k: round(v * 1000, 1) for k, v in times.items()},
                                  "best_x": round(min(times["two calls+copies"], times["coded one call"]) / base, 3),
                                  **{k: float(f"{v:.2e}") for k, v in errs.items()}})
    finish(rows, args.out, [("model", "model", 10), ("b", "batch", 2), ("short", "short", 5), ("p", "dropout", 4),
                            ("seqs", "seqs", 4), ("groups", "groups", 6), ("rest", "rest", 4),
                            ("short tok", "short_tokens", 9), ("flash us", "flash", 9),
                            ("one call", "coded one call", 9), ("two", "two calls", 8),
                            ("two+copy", "two calls+copies", 9), ("best/flash", "best_x", 10),
                            ("err one", "err_one", 8), ("err two", "err_two", 8)])


if __name__ == "__main__":
    main()
