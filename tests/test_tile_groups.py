"""Tile groups (`packing.tile_groups`): short sequences sharing attention tiles, kept apart by codes.

The plan (groups, codes, the two calls' sequence starts) is checked for what the kernel relies on;
the grouped attention op against attention over each sequence alone (outputs and gradients, fp32 on
the CPU, where the op's two calls run as length buckets); and the BERT family's packed forward with
groups against the padded model, in train mode, on host-made and fixed-length (CUDA-graph) streams.
"""

from __future__ import annotations

import random

import pytest
import torch

from embedtune.packing import varlen
from embedtune.packing.tile_groups import CODE_DIMS, CODE_SCALE, SHORT, TILE, grouped_rows
from embedtune.packing.varlen import PackedBatch, bucketed_sdpa, grouped_op
from test_packing import _check_packed_equals_padded

# a retrieval batch's shape: short queries of many lengths, passages longer than SHORT, a few of each
LENGTHS = [[1, 2, 3, 5, 8, 13, 21, 30, 40, 60, 90, 110, 4, 6, 7, 9, 11, 2, 3, 50],
           [12] * 30 + [70] * 3,  # one class, many full groups
           [100, 120, 66],  # nothing short
           [5, 64, 65, 64, 1]]  # the class edges


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny_grouped")


def _mask(lengths, left: bool = False) -> torch.Tensor:
    mask = torch.zeros(len(lengths), max(lengths), dtype=torch.bool)
    for i, n in enumerate(lengths):
        if left:
            mask[i, mask.shape[1] - n:] = True
        else:
            mask[i, :n] = True
    return mask


def _plans(lengths):
    mask = _mask(lengths)
    real = sum(lengths)
    return [("host", PackedBatch.from_mask(mask, group_short=True)),
            ("token multiple", PackedBatch.from_mask(mask, 64, group_short=True)),
            ("fixed", PackedBatch.fixed(mask, real + 100, group_short=True))]


@pytest.mark.parametrize("lengths", LENGTHS)
def test_groups_fit_a_tile_and_every_short_sequence_is_in_one(lengths):
    for name, plan in _plans(lengths):
        tiles = plan.tiles
        cu = plan.cu_seqlens.tolist()
        groups, rest = tiles.cu_groups.tolist(), tiles.cu_rest.tolist()
        end = rest[0]
        assert groups[0] == 0 and groups[-1] == end and end <= tiles.rows == grouped_rows(plan.stream), name
        assert all(a <= b for a, b in zip(groups, groups[1:])), name
        starts = set(cu)
        for a, b in zip(groups, groups[1:]):
            assert b - a <= TILE and a in starts and b in starts, (name, a, b)  # whole sequences, one tile
            members = [s for s in cu if a <= s < b]
            assert len(members) <= CODE_DIMS, name
            assert all(0 < e - s <= SHORT for s, e in zip(cu, cu[1:]) if a <= s < b), name
        # the other call: every sequence at or past `end` as it is, the rest emptied
        assert rest == [max(c, end) for c in cu], name
        # short rows lead the stream (fillers after the batch's rows are never grouped)
        lens = plan.seq_lens[: plan.batch].tolist()
        shorts = [n for n in lens if n <= SHORT]
        assert lens[: len(shorts)] == shorts, name
        assert end <= sum(shorts), name
        if sum(shorts) <= tiles.rows and shorts:
            assert end == sum(shorts), name  # all grouped when the coded rows hold them


@pytest.mark.parametrize("lengths", LENGTHS[:2])
def test_codes_zero_within_a_segment_and_far_below_across(lengths):
    plan = PackedBatch.from_mask(_mask(lengths), group_short=True)
    tiles = plan.tiles
    cu, groups = plan.cu_seqlens.tolist(), tiles.cu_groups.tolist()
    codes = tiles.codes
    for a, b in zip(groups, groups[1:]):
        if a == b:
            continue
        seq = torch.tensor([max(i for i, s in enumerate(cu) if s <= t) for t in range(a, b)])
        scores = codes[a:b, 0] @ codes[a:b, 1].T
        same = seq[:, None] == seq[None, :]
        assert (scores[same] == 0).all() and (scores[~same] == -CODE_SCALE ** 2).all()


def _attention_and_grads(fn, q, k, v, grad):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    return (out, *torch.autograd.grad((out * grad).sum(), (q, k, v)))


@pytest.mark.parametrize("lengths", LENGTHS)
def test_grouped_attention_equals_each_sequence_alone(lengths):
    """fp32: outputs and gradients of the grouped op equal per-sequence attention to rounding."""
    torch.manual_seed(0)
    for name, plan in _plans(lengths):
        heads, dim = 2, 16
        q, k, v, grad = (torch.randn(plan.stream, heads, dim) for _ in range(4))
        scale = dim ** -0.5
        ours = _attention_and_grads(lambda *t: grouped_op(*t, plan, scale, buckets=True), q, k, v, grad)
        ref = _attention_and_grads(lambda *t: bucketed_sdpa(*t, plan, scale), q, k, v, grad)
        for got, want, what in zip(ours, ref, ("out", "dq", "dk", "dv")):
            assert (got - want).abs().max() <= 1e-5 * want.abs().max(), (name, what)


def test_short_sequences_past_the_coded_rows_run_alone(monkeypatch):
    """When the short rows outgrow the coded copies (`GROUPED_SHARE` of the stream), the groups that do
    not fit go to the other call as single sequences: same result."""
    lengths = [20] * 40 + [100]
    monkeypatch.setattr("embedtune.packing.tile_groups.GROUPED_SHARE", 0.25)
    plan = PackedBatch.from_mask(_mask(lengths), group_short=True)
    end = int(plan.tiles.cu_rest[0])
    assert 0 < end <= plan.tiles.rows < 800  # some grouped, most not
    torch.manual_seed(1)
    q, k, v, grad = (torch.randn(plan.stream, 2, 8) for _ in range(4))
    ours = _attention_and_grads(lambda *t: grouped_op(*t, plan, 8 ** -0.5, buckets=True), q, k, v, grad)
    ref = _attention_and_grads(lambda *t: bucketed_sdpa(*t, plan, 8 ** -0.5), q, k, v, grad)
    for got, want in zip(ours, ref):
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_plan_order_keeps_pack_and_unpack_exact():
    """Reordered rows: `unpack(pack(x))` is x at real tokens (left padding too), positions count from
    each row's first real token."""
    lengths = LENGTHS[0]
    for left in (False, True):
        mask = _mask(lengths, left)
        x = torch.randn(*mask.shape, 3)
        for plan in (PackedBatch.from_mask(mask, group_short=True), PackedBatch.fixed(mask, 700, group_short=True)):
            back = plan.unpack(plan.pack(x))
            assert torch.equal(back[mask], x[mask]) and not back[~mask].any()
            packed_pos = plan.unpack(plan.position_ids[:, None].float())[..., 0]
            expected = (mask.cumsum(1) - 1).float() * mask
            assert torch.equal(packed_pos, expected)


TEXTS = [" ".join(random.Random(n).choice("alpha beta gamma delta eps zeta eta theta".split()) for _ in range(n))
         for n in (1, 2, 3, 5, 8, 13, 21, 30, 40, 60, 90, 4, 6, 7, 9, 11, 50)]


@pytest.mark.parametrize("stream", [None, 1000], ids=["host plan", "fixed stream"])
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
@pytest.mark.parametrize("arch", ["bert", "roberta", "electra"])
def test_packed_bert_with_tile_groups_equals_padded(arch, lora, stream, tiny_root, monkeypatch):
    calls = []
    original = varlen.grouped_op
    monkeypatch.setattr(varlen, "grouped_op", lambda *a, **k: calls.append(1) or original(*a, **k))
    _check_packed_equals_padded(arch, lora, "right", tiny_root, stream=stream, short_groups=True, texts=TEXTS)
    assert len(calls) == 2  # both layers ran the grouped op


@pytest.mark.parametrize("flag, expected", [("--short-groups", True), ("--no-short-groups", False)])
def test_the_cli_flag_reaches_the_plan(flag, expected, tmp_path, monkeypatch):
    """`embedtune train --short-groups / --no-short-groups` decides whether the plans group (by default
    only on CUDA, so a CPU run without the flag never groups)."""
    from typer.testing import CliRunner

    from embedtune.cli import app
    from embedtune.data import build_stdlib_pairs, write_jsonl

    seen = []
    original = PackedBatch.from_mask.__func__

    def spy(cls, mask, token_multiple=None, group_short=False):
        seen.append(group_short)
        return original(cls, mask, token_multiple, group_short)

    monkeypatch.setattr(PackedBatch, "from_mask", classmethod(spy))
    data = write_jsonl(build_stdlib_pairs(max_pairs=40, seed=3), tmp_path / "pairs.jsonl")
    result = CliRunner().invoke(app, ["train", str(data), "--output", str(tmp_path / "run"), "--max-steps", "1",
                                      "--batch-size", "8", "--max-seq-length", "32", "--no-eval", flag])
    assert result.exit_code == 0, result.output
    assert seen and set(seen) == {expected}


def test_grouped_attention_compiles_as_one_op():
    """Inside a compiled graph (`--compile`), the op's fake shapes hold: the same gradients as eager."""
    plan = PackedBatch.fixed(_mask([3, 5, 9, 12, 40, 70, 100, 2]), 300, group_short=True)
    torch.manual_seed(2)
    q, k, v = (torch.randn(300, 2, 8, requires_grad=True) for _ in range(3))
    compiled = torch.compile(lambda *t: grouped_op(*t, plan, 8 ** -0.5, buckets=True).sin().sum(), fullgraph=True)
    ours = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    ref = torch.autograd.grad(bucketed_sdpa(q, k, v, plan, 8 ** -0.5).sin().sum(), (q, k, v))
    for got, want in zip(ours, ref):
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()
