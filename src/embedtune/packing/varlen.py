"""Variable-length (packed) attention: many sequences in one token stream, none attending across.

Inputs are packed `q, k, v` of shape [tokens, heads, head_dim] plus `cu_seqlens` (sequence starts,
int32, length batch+1). On CUDA we call the flash kernel behind torch's `varlen_attn` ourselves, as
one custom op (`embedtune::varlen_attn`): `varlen_attn` has no dropout and no sliding window, the
kernel has both (BERT checkpoints train with attention dropout 0.1), and as one opaque op it lets
torch.compile trace whole layer stacks. flash_attn serves where torch lacks the kernel. On CPU the exact
fallback runs SDPA over length buckets: sequences sorted by length are grouped so that padding
inside a bucket stays small, each bucket is gathered into a [n, heads, len, head_dim] view with a
key mask, and the results are scattered back. Retrieval batches mix 15-token queries with
256-token passages, so this is far cheaper than one padded [batch, max_len] attention.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .layers import _FIXED_STREAM, PackedOptions, mark_token_dim


def size_class_step(tokens: int, multiple: int) -> int:
    """Stream lengths are rounded up to a multiple of this: `multiple`, or 1/8 of the power of two at or
    below `tokens` if larger, so size classes are at most 1/8 apart and few (see `PackedBatch`)."""
    return max(multiple, 1 << max(tokens.bit_length() - 4, 0))


def size_class(tokens: int, multiple: int) -> int:
    """`tokens` rounded up to its size class (`size_class_step`)."""
    step = size_class_step(tokens, multiple)
    return -(-tokens // step) * step


FILLER_LEN = 128  # filler sequences in a fixed-length stream: short, so their attention costs little


@contextlib.contextmanager
def fixed_stream(tokens: int | None):
    """Inside this block, packed streams are exactly `tokens` long (at least the batch's real token
    count, which the caller knows from the host copy of the mask), and their plans are built on the
    device without a host sync (`PackedBatch.fixed`): what capturing a step as a CUDA graph needs
    (`embedtune.graphs`). For callers that pass no `PackedOptions` (`fixed_stream`); compatibility."""
    token = _FIXED_STREAM.set(tokens)
    try:
        yield
    finally:
        _FIXED_STREAM.reset(token)


@dataclass
class PackedBatch:
    """Where each real token of a padded batch lives in the packed stream.

    With `token_multiple`, the stream is padded with filler tokens, grouped into filler sequences
    that attend only among themselves: every real token's result is unchanged. Then every shape the
    layers see takes few distinct values (what CUDA graphs need: one recording per shape): the stream
    length (a multiple of the larger of `token_multiple` and 1/8 of the power of two at or below the
    token count: size classes at most 1/8 apart, so batches of 21k-30k tokens fall into five), the
    number of sequences (a fixed number of filler slots per size class, some empty), and
    `max_seqlen` (the padded width rounded up to a power of two).
    """

    flat_index: torch.Tensor  # [T] positions of real tokens in the flattened [B*L] batch
    cu_seqlens: torch.Tensor  # [B+1] int32 sequence starts in the packed stream
    position_ids: torch.Tensor  # [T] position of each token inside its own sequence
    seq_lens: torch.Tensor  # [B]
    batch: int
    max_len: int  # L of the padded batch
    # An empty [max_seqlen, 0] tensor. max_seqlen, the bound on the longest real sequence (the padded
    # width: no device sync needed), is its size, so compiled graphs take it as a symbol from the
    # first batch on; as a plain int it would be a constant of the graph, and the first batch of
    # another width would recompile the whole stack.
    width: torch.Tensor
    key_mask: torch.Tensor  # [B, L] bool, True at real tokens
    # A fixed-length stream (`fixed`): flat_index is stream-long, its filler entries point at row B*L
    # (one past the batch), which `pack` reads as zeros and `unpack` drops.
    fixed_length: bool = False

    @property
    def max_seqlen(self) -> int:
        return self.width.shape[0]

    @property
    def tokens(self) -> int:
        """Real tokens T (a fixed-length stream does not know T on the host: its stream length)."""
        return self.flat_index.numel()

    @property
    def stream(self) -> int:
        """Tokens in the packed stream: T, or T padded up to the token multiple."""
        return self.position_ids.numel()

    @classmethod
    def from_mask(cls, attention_mask: torch.Tensor, token_multiple: int | None = None) -> "PackedBatch":
        """Build the packing plan from a padded batch's attention mask (left or right padded)."""
        mask = attention_mask.bool()
        batch, max_len = mask.shape
        seq_lens = mask.sum(dim=1)
        flat_index = mask.reshape(-1).nonzero(as_tuple=False).squeeze(1)
        cu = torch.zeros(batch + 1, dtype=torch.int32, device=mask.device)
        cu[1:] = torch.cumsum(seq_lens, dim=0).to(torch.int32)
        positions = (torch.cumsum(mask.long(), dim=1) - 1).reshape(-1)[flat_index]
        tokens = flat_index.numel()
        max_seqlen = max_len
        if token_multiple:
            max_seqlen = 1 << max(max_len - 1, 1).bit_length()
            step = size_class_step(tokens, token_multiple)
            missing = -tokens % step
            full, rest = divmod(missing, max_seqlen)
            slots = -(-step // max_seqlen)  # the most filler sequences a batch of this size class needs
            fill = [max_seqlen] * full + [rest] + [0] * (slots - full - 1)
            fill_lens = torch.tensor(fill, dtype=seq_lens.dtype, device=mask.device)
            seq_lens = torch.cat([seq_lens, fill_lens])
            cu = torch.cat([cu, tokens + torch.cumsum(fill_lens, dim=0).to(torch.int32)])
            # filler positions stay below max_len: valid for any position table the real tokens fit
            positions = torch.cat([positions] + [torch.arange(n, device=mask.device) % max_len for n in fill if n])
        width = torch.empty(max_seqlen, 0, device=mask.device)
        mark_token_dim(cu, positions, width)
        return cls(flat_index, cu, positions, seq_lens, batch, max_len, width, mask)

    @classmethod
    def for_forward(cls, attention_mask: torch.Tensor, options: PackedOptions | None = None) -> "PackedBatch":
        """The plan a packed forward runs on: a stream of `options.fixed_stream` tokens if set, else the
        stream padded to the `options.token_multiple` multiple, if any (None: `PackedOptions.current()`)."""
        if options is None:
            options = PackedOptions.current()
        if options.fixed_stream is not None:
            return cls.fixed(attention_mask, options.fixed_stream)
        return cls.from_mask(attention_mask, options.token_multiple)

    @classmethod
    def fixed(cls, mask: torch.Tensor, stream: int) -> "PackedBatch":
        """The plan for a stream of exactly `stream` tokens (>= the real ones; not checked, as that
        would sync), made on the mask's device with every shape fixed by (batch, width, stream): no
        host sync, no data-dependent shape, so the step that uses it can be captured as a CUDA graph.
        Real tokens come first, in order; the rest are fillers in sequences of at most FILLER_LEN
        tokens that attend only among themselves (a fixed number of slots, some empty)."""
        mask = mask.bool()
        batch, width = mask.shape
        device = mask.device
        seq_lens = mask.sum(dim=1)
        real = seq_lens.sum()
        dump = batch * width  # the row past the batch
        flat_index = torch.nonzero_static(mask.reshape(-1), size=stream, fill_value=dump).squeeze(1)
        slot = torch.arange(stream, device=device)
        in_row = (torch.cumsum(mask, dim=1) - 1).reshape(-1)  # position of each slot inside its row
        positions = torch.cat([in_row, in_row.new_zeros(1)])[flat_index]
        filler_len = min(FILLER_LEN, width)
        filler = slot - real  # >= 0 at filler tokens
        positions = torch.where(filler >= 0, filler % filler_len, positions)
        slots = -(-stream // filler_len)
        bounds = torch.minimum(torch.arange(1, slots + 1, device=device) * filler_len, stream - real)
        cu = torch.cat([torch.zeros(1, dtype=torch.int64, device=device), torch.cumsum(seq_lens, dim=0),
                        real + bounds]).to(torch.int32)
        plan_width = torch.empty(width, 0, device=device)
        mark_token_dim(cu, positions, plan_width)
        return cls(flat_index, cu, positions, cu[1:] - cu[:-1], batch, width, plan_width, mask, fixed_length=True)

    def buckets(self, slack: float = 1.25) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Length buckets for attention: per bucket, a [n, len] index into the packed stream
        (padding slots point at token 0) and its [n, len] validity mask. Cached per batch."""
        cached = getattr(self, "_buckets", None)
        if cached is not None:
            return cached
        lens = self.seq_lens.tolist()
        starts = self.cu_seqlens[:-1].tolist()
        order = sorted((i for i in range(len(lens)) if lens[i]), key=lambda i: lens[i])  # with fillers, not empty slots
        groups: list[list[int]] = []
        for i in order:  # grow a bucket while its padded area stays within `slack` of its real area
            if groups:
                group = groups[-1]
                real = sum(lens[j] for j in group) + lens[i]
                if lens[i] * (len(group) + 1) <= slack * real:
                    group.append(i)
                    continue
            groups.append([i])
        device = self.cu_seqlens.device
        out = []
        for group in groups:
            width = max(lens[i] for i in group)
            pos = torch.arange(width, device=device)
            start = torch.tensor([starts[i] for i in group], device=device)[:, None]
            length = torch.tensor([lens[i] for i in group], device=device)[:, None]
            valid = pos[None, :] < length
            index = torch.where(valid, start + pos[None, :], torch.zeros_like(start))
            out.append((index, valid))
        self._buckets = out
        return out

    def pack(self, padded: torch.Tensor) -> torch.Tensor:
        """[B, L, ...] -> [stream, ...] (zeros at filler tokens)"""
        flat = padded.reshape(self.batch * self.max_len, *padded.shape[2:])
        if self.fixed_length:
            return torch.cat([flat, flat.new_zeros(1, *flat.shape[1:])])[self.flat_index]
        packed = flat[self.flat_index]
        if self.stream > self.tokens:
            packed = torch.cat([packed, packed.new_zeros(self.stream - self.tokens, *packed.shape[1:])])
        return packed

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """[stream, ...] -> [B, L, ...] with zeros at padding (filler tokens dropped)."""
        if self.fixed_length:
            rows = self.batch * self.max_len
            out = packed.new_zeros(rows + 1, *packed.shape[1:]).index_copy(0, self.flat_index, packed)
            return out[:rows].view(self.batch, self.max_len, *packed.shape[1:])
        if self.stream > self.tokens:
            packed = packed[: self.tokens]
        out = packed.new_zeros(self.batch * self.max_len, *packed.shape[1:])
        out = out.index_copy(0, self.flat_index, packed)
        return out.view(self.batch, self.max_len, *packed.shape[1:])


@functools.cache
def _flash_attn_varlen():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


# The two checks below run inside compiled graphs: dynamo must take their results as constants (an
# import attempt or a cached call it cannot trace would break the graph, layer by layer).
@torch.compiler.assume_constant_result
def _has_flash_attn() -> bool:
    return _flash_attn_varlen() is not None


@functools.cache
def _flash_capable(index: int) -> bool:
    return torch.backends.cuda.is_flash_attention_available() and torch.cuda.get_device_capability(index)[0] >= 8


@torch.compiler.assume_constant_result
def _flash_device(index: int) -> bool:
    return _flash_capable(index)


def flash_supported(q: torch.Tensor) -> bool:
    """Whether torch's built-in flash kernel takes these inputs (Ampere or newer, half precision)."""
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] % 8 == 0
            and q.shape[-1] <= 256 and _flash_device(q.device.index or 0))


def _op_uses_flash(q: torch.Tensor, buckets: bool) -> bool:
    return not buckets and flash_supported(q)


def _flash_window(causal: bool, window: int | None) -> tuple[int, int]:
    """Our window (see `_position_mask`) as the flash kernel's (left, right) key reach; -1 = unbounded."""
    if window is None:
        return -1, -1
    return (window - 1, 0) if causal else (window, window)


_LAST_PLAN: list = [None, None]  # [weakref to the cu_seqlens tensor, its plan]


def _plan_from_cu(cu_seqlens: torch.Tensor, max_seqlen: int) -> PackedBatch:
    """A bucketing plan from sequence starts alone (what the attention op receives). Every layer's
    forward and backward gets the same `cu_seqlens` tensor: the plan (and its buckets, host syncs
    included) is made once per batch, not once per call."""
    ref, plan = _LAST_PLAN
    if ref is not None and ref() is cu_seqlens:
        return plan
    seq_lens = cu_seqlens[1:] - cu_seqlens[:-1]
    empty = cu_seqlens.new_zeros(0)
    plan = PackedBatch(empty, cu_seqlens, empty, seq_lens, int(seq_lens.numel()), max_seqlen,
                       cu_seqlens.new_empty(max_seqlen, 0), empty)
    _LAST_PLAN[:] = [weakref.ref(cu_seqlens), plan]
    return plan


def _bucketed_backward(grad_out, q, k, v, plan: PackedBatch, scale: float, causal: bool, window: int | None):
    """Gradients of `bucketed_sdpa` without dropout, written out per bucket (softmax attention's
    backward), so the op needs no autograd of its own."""
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    work = torch.promote_types(q.dtype, torch.float32)  # half precision inputs: fp32 math
    for index, valid in plan.buckets():
        qb, kb, vb, gb = (t[index].transpose(1, 2).to(work) for t in (q, k, v, grad_out))  # [n, H, w, D]
        mask = valid[:, None, None, :]
        positional = _position_mask(index.shape[1], causal, window, q.device)
        if positional is not None:
            mask = mask & positional
        probs = (qb @ kb.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf")).softmax(-1)
        # Padding slots of a bucket produce no output; with a window they may see no key at all
        # (a NaN row), so zero them out rather than multiply.
        probs = probs.masked_fill(~valid[:, None, :, None], 0.0)
        gb = gb.masked_fill(~valid[:, None, :, None], 0.0)
        d_probs = gb @ vb.transpose(-1, -2)
        d_scores = probs * (d_probs - (d_probs * probs).sum(-1, keepdim=True)) * scale
        rows = index[valid]
        for grad, part in ((dq, d_scores @ kb), (dk, d_scores.transpose(-1, -2) @ qb),
                           (dv, probs.transpose(-1, -2) @ gb)):
            grad.index_copy_(0, rows, part.transpose(1, 2)[valid].to(grad.dtype))
    return dq, dk, dv


@torch.library.custom_op("embedtune::varlen_attn", mutates_args=())
def _varlen_attn_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                    dropout_p: float, causal: bool, scale: float, window: int, buckets: bool
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed attention as one opaque op, so compiled graphs span whole layer stacks (dynamo does not
    look inside). Returns (out, logsumexp, rng): what the backward needs to replay dropout exactly.
    `window` -1 = none. CUDA half precision: the flash kernel, unless `buckets`; elsewhere:
    length-bucketed SDPA."""
    window_ = None if window < 0 else window
    if _op_uses_flash(q, buckets):
        left, right = _flash_window(causal, window_)
        out, lse, rng, _, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, causal, False,
            scale=scale, window_size_left=left, window_size_right=right)
        return out, lse, rng
    if dropout_p > 0:
        raise ValueError("embedtune::varlen_attn draws dropout only in the flash kernel")
    out = bucketed_sdpa(q, k, v, _plan_from_cu(cu_seqlens, max_seqlen), scale, 0.0, causal, window_)
    return out, q.new_zeros(0, dtype=torch.float32), q.new_zeros(1, dtype=torch.int64)


@_varlen_attn_op.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, dropout_p, causal, scale, window, buckets):
    if _op_uses_flash(q, buckets):
        return (torch.empty_like(q), q.new_empty(q.shape[1], q.shape[0], dtype=torch.float32),
                q.new_empty(2, dtype=torch.uint64))
    return torch.empty_like(q), q.new_empty(0, dtype=torch.float32), q.new_empty(1, dtype=torch.int64)


@torch.library.custom_op("embedtune::varlen_attn_backward", mutates_args=())
def _varlen_attn_backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             out: torch.Tensor, lse: torch.Tensor, rng: torch.Tensor, cu_seqlens: torch.Tensor,
                             max_seqlen: int, dropout_p: float, causal: bool, scale: float, window: int,
                             buckets: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    window_ = None if window < 0 else window
    if _op_uses_flash(q, buckets):
        left, right = _flash_window(causal, window_)
        return torch.ops.aten._flash_attention_backward(
            grad_out.contiguous(), q, k, v, out, lse, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
            dropout_p, causal, rng, q.new_empty(0), scale=scale, window_size_left=left, window_size_right=right)
    return _bucketed_backward(grad_out, q, k, v, _plan_from_cu(cu_seqlens, max_seqlen), scale, causal, window_)


@_varlen_attn_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, rng, cu_seqlens, max_seqlen, dropout_p, causal, scale, window, buckets):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, dropout_p, causal, scale, window, buckets = inputs
    out, lse, rng = output
    ctx.save_for_backward(q, k, v, out, lse, rng, cu_seqlens)
    ctx.options = (max_seqlen, dropout_p, causal, scale, window, buckets)


def _backward(ctx, grad_out, _grad_lse, _grad_rng):
    q, k, v, out, lse, rng, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = _varlen_attn_backward_op(grad_out, q, k, v, out, lse, rng, cu_seqlens, *ctx.options)
    return dq, dk, dv, None, None, None, None, None, None, None


_varlen_attn_op.register_autograd(_backward, setup_context=_setup_context)


def varlen_op(q, k, v, plan: PackedBatch, scale: float, dropout_p: float = 0.0, causal: bool = False,
              window: int | None = None, buckets: bool = False) -> torch.Tensor:
    """Packed attention through `embedtune::varlen_attn` (the flash kernel on CUDA in half precision,
    length-bucketed SDPA elsewhere or with `buckets`); traceable by torch.compile as one node."""
    return _varlen_attn_op(q, k, v, plan.cu_seqlens, plan.max_seqlen, float(dropout_p), causal, float(scale),
                           -1 if window is None else int(window), buckets)[0]


def _position_mask(width: int, causal: bool, window: int | None, device) -> torch.Tensor | None:
    """[width, width] query-by-key mask.

    Causal: key <= query. Window, causal models (Mistral, Qwen2): key > query - window.
    Window, bidirectional models (ModernBERT local layers): |query - key| <= window.
    """
    if not causal and window is None:
        return None
    pos = torch.arange(width, device=device)
    mask = torch.ones(width, width, dtype=torch.bool, device=device)
    if causal:
        mask &= pos[:, None] >= pos[None, :]
        if window is not None:
            mask &= pos[None, :] > pos[:, None] - window
    elif window is not None:
        mask &= (pos[:, None] - pos[None, :]).abs() <= window
    return mask


def masked_sdpa(q, k, v, mask, dropout_p: float, scale: float):
    """SDPA with a mask; which kernel runs is SDPA's choice (callers may narrow it with `sdpa_kernel`)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)


def padded_sdpa(q, k, v, plan: PackedBatch, scale: float, dropout_p: float = 0.0, causal: bool = False,
                window: int | None = None):
    """Exact reference path: SDPA over the padded view with a key-padding (and causal/window) mask."""
    heads, dim = q.shape[1], q.shape[2]
    qp, kp, vp = (plan.unpack(t).transpose(1, 2) for t in (q, k, v))  # [B, H, L, D]
    mask = plan.key_mask[:, None, None, :]
    positional = _position_mask(plan.max_len, causal, window, q.device)
    if positional is not None:
        mask = mask & positional[None, None]
    out = masked_sdpa(qp, kp, vp, mask, dropout_p, scale)
    return plan.pack(out.transpose(1, 2).reshape(plan.batch, plan.max_len, heads, dim))


def bucketed_sdpa(q, k, v, plan: PackedBatch, scale: float, dropout_p: float = 0.0, causal: bool = False,
                  window: int | None = None):
    """Exact attention over length buckets (see the module docstring); padding only within buckets."""
    out = torch.empty_like(q)
    for index, valid in plan.buckets():
        qb, kb, vb = (t[index].transpose(1, 2) for t in (q, k, v))  # [n, H, len, D]
        mask = valid[:, None, None, :]
        positional = _position_mask(index.shape[1], causal, window, q.device)
        if positional is not None:
            mask = mask & positional
        ob = masked_sdpa(qb, kb, vb, mask, dropout_p, scale)
        ob = ob.transpose(1, 2)[valid]  # [real tokens of the bucket, H, D]
        out = out.index_copy(0, index[valid], ob)
    return out


@torch.compiler.disable  # data-dependent (host-side plans): outside compiled graphs
def _eager_attention(q, k, v, plan: PackedBatch, scale: float, dropout_p: float, causal: bool, backend: str,
                     window: int | None):
    """The paths that are not one opaque op: the padded reference, buckets with dropout, and the
    flash_attn package."""
    if backend == "padded":
        return padded_sdpa(q, k, v, plan, scale, dropout_p, causal, window)
    if backend == "bucketed":
        return bucketed_sdpa(q, k, v, plan, scale, dropout_p, causal, window)
    left, right = _flash_window(causal, window)
    return _flash_attn_varlen()(q, k, v, plan.cu_seqlens, plan.cu_seqlens, plan.max_seqlen, plan.max_seqlen,
                                dropout_p=dropout_p, softmax_scale=scale, causal=causal, window_size=(left, right))


def varlen_attention(q, k, v, plan: PackedBatch, scale: float, dropout_p: float = 0.0, causal: bool = False,
                     backend: str = "auto", window: int | None = None):
    """Attention over packed sequences; `backend` in {auto, flash, bucketed, padded}.

    auto (= flash): on CUDA, torch's flash kernel through `embedtune::varlen_attn` (or the flash_attn
    package where torch has no flash kernel); fp32 has no flash kernel and runs padded (one SDPA call). On
    CPU, length buckets (the op without dropout; eager SDPA, whose masks an op cannot replay, with).
    bucketed / padded: those exact SDPA paths on any device.
    """
    if torch.is_autocast_enabled(q.device.type):
        # Autocast casts SDPA's inputs; this op is ours, so cast as it would. Without this, fp32 master
        # weights in q/k norms (Qwen3) hand us fp32 queries and attention leaves the flash kernel.
        dtype = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if q.is_cuda and backend != "bucketed":
        if backend != "padded" and flash_supported(q):
            return varlen_op(q, k, v, plan, scale, dropout_p, causal, window)
        if backend != "padded" and q.dtype != torch.float32 and _has_flash_attn():
            return _eager_attention(q, k, v, plan, scale, dropout_p, causal, "flash", window)
        return _eager_attention(q, k, v, plan, scale, dropout_p, causal, "padded", window)
    if backend == "padded" or dropout_p > 0:
        return _eager_attention(q, k, v, plan, scale, dropout_p, causal, backend if backend == "padded" else "bucketed",
                                window)
    return varlen_op(q, k, v, plan, scale, 0.0, causal, window, buckets=True)
