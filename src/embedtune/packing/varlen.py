"""Variable-length (packed) attention: many sequences in one token stream, none attending across.

Inputs are packed `q, k, v` of shape [tokens, heads, head_dim] plus `cu_seqlens` (sequence starts,
int32, length batch+1). On CUDA we use torch's fused `varlen_attn` (torch >= 2.10) or flash_attn
when installed. torch's `varlen_attn` has no dropout and no sliding window, but the flash kernel it
calls has both: with attention dropout in training (BERT checkpoints ship 0.1) or a window, we call
that kernel ourselves (`flash_varlen`). On CPU the exact fallback runs SDPA over length buckets: sequences sorted by length are grouped so that padding
inside a bucket stays small, each bucket is gathered into a [n, heads, len, head_dim] view with a
key mask, and the results are scattered back. Retrieval batches mix 15-token queries with
256-token passages, so this is far cheaper than one padded [batch, max_len] attention.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F


_TOKEN_MULTIPLE = contextvars.ContextVar("embedtune_token_multiple", default=None)


@contextlib.contextmanager
def static_tokens(multiple: int | None):
    """Inside this block, packed streams are padded up to a multiple of `multiple` tokens (see
    `PackedBatch.from_mask`), so compiled code and CUDA graphs see a few shapes, not one per batch."""
    token = _TOKEN_MULTIPLE.set(multiple)
    try:
        yield
    finally:
        _TOKEN_MULTIPLE.reset(token)


def static_token_multiple() -> int | None:
    return _TOKEN_MULTIPLE.get()


@dataclass
class PackedBatch:
    """Where each real token of a padded batch lives in the packed stream.

    With `token_multiple`, the stream is padded up to a multiple of it with filler tokens, grouped
    into filler sequences of at most `max_len` tokens that attend only among themselves: every
    real token's result is unchanged, and the stream length takes few distinct values.
    """

    flat_index: torch.Tensor  # [T] positions of real tokens in the flattened [B*L] batch
    cu_seqlens: torch.Tensor  # [B+1] int32 sequence starts in the packed stream
    position_ids: torch.Tensor  # [T] position of each token inside its own sequence
    seq_lens: torch.Tensor  # [B]
    batch: int
    max_len: int  # L of the padded batch
    max_seqlen: int  # bound on the longest real sequence (the padded width: no device sync needed)
    key_mask: torch.Tensor  # [B, L] bool, True at real tokens

    @property
    def tokens(self) -> int:
        """Real tokens T."""
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
        missing = -tokens % token_multiple if token_multiple else 0
        if missing:  # filler sequences of at most max_len tokens
            full, rest = divmod(missing, max_len)
            fill = [max_len] * full + ([rest] if rest else [])
            fill_lens = torch.tensor(fill, dtype=seq_lens.dtype, device=mask.device)
            seq_lens = torch.cat([seq_lens, fill_lens])
            cu = torch.cat([cu, tokens + torch.cumsum(fill_lens, dim=0).to(torch.int32)])
            positions = torch.cat([positions] + [torch.arange(n, device=mask.device) for n in fill])
        return cls(flat_index, cu, positions, seq_lens, batch, max_len, max_len, mask)

    def buckets(self, slack: float = 1.25) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Length buckets for attention: per bucket, a [n, len] index into the packed stream
        (padding slots point at token 0) and its [n, len] validity mask. Cached per batch."""
        cached = getattr(self, "_buckets", None)
        if cached is not None:
            return cached
        lens = self.seq_lens.tolist()
        starts = self.cu_seqlens[:-1].tolist()
        order = sorted(range(len(lens)), key=lambda i: lens[i])  # filler sequences included
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
        packed = padded.reshape(self.batch * self.max_len, *padded.shape[2:])[self.flat_index]
        if self.stream > self.tokens:
            packed = torch.cat([packed, packed.new_zeros(self.stream - self.tokens, *packed.shape[1:])])
        return packed

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """[stream, ...] -> [B, L, ...] with zeros at padding (filler tokens dropped)."""
        if self.stream > self.tokens:
            packed = packed[: self.tokens]
        out = packed.new_zeros(self.batch * self.max_len, *packed.shape[1:])
        out = out.index_copy(0, self.flat_index, packed)
        return out.view(self.batch, self.max_len, *packed.shape[1:])


@functools.cache
def _fused_varlen():
    """torch's fused varlen attention, or None where this torch lacks it."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@functools.cache
def _causal_kwargs(fused, causal: bool) -> dict:
    """torch's varlen_attn spelled causality `is_causal` first and `window_size=(-1, 0)` later
    (cached: this runs once per attention call on the hot path)."""
    params = inspect.signature(fused).parameters
    if "window_size" in params:
        return {"window_size": (-1, 0)} if causal else {}
    return {"is_causal": causal} if "is_causal" in params else {}


@functools.cache
def _flash_attn_varlen():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


@functools.cache
def _flash_device(index: int) -> bool:
    return torch.backends.cuda.is_flash_attention_available() and torch.cuda.get_device_capability(index)[0] >= 8


def flash_supported(q: torch.Tensor) -> bool:
    """Whether torch's built-in flash kernel takes these inputs (Ampere or newer, half precision)."""
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] % 8 == 0
            and q.shape[-1] <= 256 and _flash_device(q.device.index if q.device.index is not None
                                                     else torch.cuda.current_device()))


def _flash_window(causal: bool, window: int | None) -> tuple[int, int]:
    """Our window (see `_position_mask`) as the flash kernel's (left, right) key reach; -1 = unbounded."""
    if window is None:
        return -1, -1
    return (window - 1, 0) if causal else (window, window)


class _FlashVarlen(torch.autograd.Function):
    """torch's flash kernel on packed sequences, with dropout and windows. The forward returns the
    RNG state it drew the dropout mask from; the backward replays that same mask."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, dropout_p, causal, scale, left, right):
        out, lse, rng_state, unused, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, causal, False,
            scale=scale, window_size_left=left, window_size_right=right)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, rng_state, unused)
        ctx.options = (max_seqlen, dropout_p, causal, scale, left, right)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, cu_seqlens, rng_state, unused = ctx.saved_tensors
        max_seqlen, dropout_p, causal, scale, left, right = ctx.options
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            grad_out.contiguous(), q, k, v, out, lse, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
            dropout_p, causal, rng_state, unused, scale=scale, window_size_left=left, window_size_right=right)
        return dq, dk, dv, None, None, None, None, None, None, None


def flash_varlen(q, k, v, plan: PackedBatch, scale: float, dropout_p: float = 0.0, causal: bool = False,
                 window: int | None = None) -> torch.Tensor:
    """Packed attention through torch's flash kernel (CUDA, half precision; see `flash_supported`)."""
    left, right = _flash_window(causal, window)
    return _FlashVarlen.apply(q, k, v, plan.cu_seqlens, plan.max_seqlen, dropout_p, causal, scale, left, right)


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


@torch.compiler.disable  # data-dependent (host-side plans, bucketing): outside compiled layer graphs
def varlen_attention(q, k, v, plan: PackedBatch, scale: float, dropout_p: float = 0.0, causal: bool = False,
                     backend: str = "auto", window: int | None = None):
    """Attention over packed sequences; `backend` in {auto, fused, flash, bucketed, padded}
    ("flash": the flash_attn package if installed, else torch's built-in flash kernel)."""
    if torch.is_autocast_enabled(q.device.type):
        # Autocast casts SDPA's inputs; this call is ours, so cast as it would. Without this, fp32 master
        # weights in q/k norms (Qwen3) hand us fp32 queries and attention falls back to the padded path.
        dtype = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if window is not None and window >= plan.max_len:
        window = None  # no sequence is long enough for the window to matter
    if backend == "padded":
        return padded_sdpa(q, k, v, plan, scale, dropout_p, causal, window)
    if backend == "bucketed" or not q.is_cuda:
        return bucketed_sdpa(q, k, v, plan, scale, dropout_p, causal, window)
    flash = _flash_attn_varlen() if backend in ("auto", "flash") else None
    if dropout_p > 0 or window is not None:  # torch's varlen_attn has neither
        if flash is not None:
            left, right = _flash_window(causal, window)
            return flash(q, k, v, plan.cu_seqlens, plan.cu_seqlens, plan.max_seqlen, plan.max_seqlen,
                         dropout_p=dropout_p, softmax_scale=scale, causal=causal, window_size=(left, right))
        if backend in ("auto", "flash", "fused") and flash_supported(q):
            return flash_varlen(q, k, v, plan, scale, dropout_p, causal, window)
    if dropout_p > 0 or q.dtype == torch.float32 or window is not None:
        # fp32 (no flash kernel): one padded SDPA call (memory-efficient kernel) beats many bucket launches.
        return padded_sdpa(q, k, v, plan, scale, dropout_p, causal, window)
    fused = _fused_varlen() if backend in ("auto", "fused") else None
    if fused is not None:
        return fused(q, k, v, plan.cu_seqlens, plan.cu_seqlens, plan.max_seqlen, plan.max_seqlen,
                     scale=scale, **_causal_kwargs(fused, causal))
    if flash is not None:
        return flash(q, k, v, plan.cu_seqlens, plan.cu_seqlens, plan.max_seqlen, plan.max_seqlen,
                     softmax_scale=scale, causal=causal)
    if backend == "flash" and flash_supported(q):
        return flash_varlen(q, k, v, plan, scale, dropout_p, causal, window)
    return bucketed_sdpa(q, k, v, plan, scale, dropout_p, causal, window)
