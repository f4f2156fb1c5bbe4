"""Short sequences grouped so that they share the flash kernel's tiles, kept apart by segment codes.

FlashAttention-2 gives every sequence of a packed stream its own 128-row tiles, so a 15-token query
costs about what a 128-token passage does; retrieval batches are mostly such short texts. A plan with
tile groups puts the short sequences first in the stream, sorted into classes by how many fit in one
tile (`TILE // length`), and cuts each class into groups of that many: every group is at most `TILE`
tokens, and the kernel runs it as one sequence. What keeps a group's members from attending to each
other is a code of `CODE_DIMS` extra head dimensions (`code_rows`): for a token of segment s (its
member index in the group, below CODE_DIMS),

    q_code = C * e_s        k_code = -C * (1 - e_s)        (e_s: the one-hot vector of s)

so q_code . k_code is -C^2 between two segments and 0 within one, where every term of the sum is an
exact zero: a score within a segment is the plain score to the bit, whatever order the kernel sums
in. Across segments the score drops by C^2 = 4096, 512 below its own value after a 64-wide head's
softmax scale: its weight is exactly zero in fp32. v carries zeros there, so the outputs and the gradients of the real
dimensions are those of attention over each sequence alone. Measured on an H100
(benchmarks/probe_segment_codes_gpu.py, with a bit code of the same width class): the grouped call
and the call over the other sequences take 0.60-0.67x of one call over the stream.

Everything here is torch ops of fixed shapes on the mask's device: no host sync, so a CUDA-graph step
(`PackedBatch.fixed`) can plan with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TILE = 128  # tokens of a group: the flash kernel's query tile
SHORT = TILE // 2  # longest sequence grouped: two or more to a tile
CODE_DIMS = 16  # one-hot segment codes: at most this many sequences a group (head size 64 -> 80)
CODE_SCALE = 64.0  # C: cross-segment scores move by -C^2 = -4096 (-512 after a 64-wide head's scale)
GROUPED_SHARE = 1 / 2  # the stream's first tokens that may be grouped: what the coded copies cover


def row_order(seq_lens: torch.Tensor) -> torch.Tensor:
    """The stream order of a batch's rows: short rows first, by class (`TILE // length`, most per tile
    first), then the others in their own order. Stable, so equal classes keep the batch's order."""
    short = (seq_lens > 0) & (seq_lens <= SHORT)
    return torch.argsort(torch.where(short, -_per_tile(seq_lens), 0), stable=True)


def _per_tile(seq_lens: torch.Tensor) -> torch.Tensor:
    """How many sequences of each length a group takes: as many as fill a tile, at most CODE_DIMS."""
    return (TILE // seq_lens.clamp(min=1)).clamp(max=CODE_DIMS)


def grouped_rows(stream: int) -> int:
    """How many of a stream's first tokens the grouped call covers (a fixed share, so that every shape
    depends on the stream length alone)."""
    return min(stream, -(-int(stream * GROUPED_SHARE) // 8) * 8)


@dataclass
class TileGroups:
    """The grouped call's plan, beside the per-sequence `cu_seqlens` of the stream.

    cu_groups: [g+1] int32 group starts over the stream's first tokens, ending at `end`, then
        repeated (empty groups; g bounds the groups a batch can have: `group_slots`);
    cu_rest: [n+1] int32 the stream's sequences with those before `end` emptied: the other call's plan;
    codes: [rows, 3, CODE_DIMS] float32, the query, key and value code of each of the first `rows`
        tokens (values' zero; all zero past `end`);
    inside: [rows, 1, 1] bool, the rows before `end`: those the grouped call answers for;
    end = cu_rest[0]: tokens of the grouped call (a device scalar, <= rows).
    """

    cu_groups: torch.Tensor
    cu_rest: torch.Tensor
    codes: torch.Tensor
    inside: torch.Tensor

    @property
    def rows(self) -> int:
        return self.codes.shape[0]


def code_rows(segment: torch.Tensor) -> torch.Tensor:
    """[tokens, 3, CODE_DIMS] query, key and value codes of these segment indices (see the module
    docstring; the value's are zero)."""
    one_hot = (segment[:, None] == torch.arange(CODE_DIMS, device=segment.device)).float()
    return torch.stack([one_hot, one_hot - 1, torch.zeros_like(one_hot)], 1) * CODE_SCALE


def group_slots(rows: int) -> int:
    """The most groups `rows` batch rows can make: every group but the last of its class (`TILE //
    length`, CODE_DIMS - 1 classes of two or more) has two or more members."""
    return min(rows, rows // 2 + CODE_DIMS)


def tile_groups(seq_lens: torch.Tensor, cu_seqlens: torch.Tensor, real: int, stream: int) -> TileGroups:
    """Groups of the stream's short sequences, which `row_order` put first: in each class of
    `TILE // length`, consecutive runs of that many. `real`: how many of the sequences are the batch's
    rows (the rest are fillers, never grouped); `stream`: tokens in the stream."""
    device = seq_lens.device
    n = seq_lens.numel()
    index = torch.arange(n, device=device)
    short = (seq_lens > 0) & (seq_lens <= SHORT) & (index < real)
    per_tile = torch.where(short, _per_tile(seq_lens), 1)
    first_of_class = torch.ones_like(short)
    first_of_class[1:] = (per_tile[1:] != per_tile[:-1]) | (short[1:] != short[:-1])
    rank = index - torch.cummax(torch.where(first_of_class, index, 0), 0).values
    segment = torch.where(short, rank % per_tile, 0)
    starts = cu_seqlens[:-1].long()
    shorts_end = torch.where(short, cu_seqlens[1:].long(), 0).amax()  # shorts lead the stream
    bounds = torch.where(short & (segment == 0), starts, shorts_end).sort().values[:group_slots(real)]
    bounds = torch.cat([bounds, shorts_end[None]])
    rows = grouped_rows(stream)
    end = torch.where(bounds <= rows, bounds, 0).amax()  # whole groups that fit the coded copies
    cu_groups = torch.minimum(bounds, end).to(torch.int32)
    cu_rest = torch.maximum(cu_seqlens.long(), end).to(torch.int32)
    token = torch.arange(rows, device=device)
    seq_of_token = (torch.searchsorted(cu_seqlens.long(), token, right=True) - 1).clamp(0, n - 1)
    token_segment = torch.where(token < end, segment[seq_of_token], 0)
    inside = (token < end)[:, None, None]
    return TileGroups(cu_groups, cu_rest, code_rows(token_segment) * inside, inside)
